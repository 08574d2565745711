"""Auxiliary router losses as pure functions (no module state, no host sync).

Both functions return the *unscaled* loss; routers multiply by their coefficient, skip the term
when the coefficient is 0 and log the unscaled value in `RoutingOutput.diagnostics`.

Padding (`valid == False`) is excluded everywhere: it contributes neither to the counts nor to
the means, and the means divide by the number of real tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Switch/GShard auxiliary load-balancing loss `E * sum_e f_e * P_e`.

    probs:        [N, E] router probabilities (softmax over experts, rows sum to 1).
    expert_index: [N, k] experts each token *chose* (before capacity dropping).
    valid:        [N] bool, real tokens.

        f_e = (# of the N_valid * k assignments that go to e) / (N_valid * k)    [E], sums to 1
        P_e = (1 / N_valid) * sum_{valid t} probs[t, e]                          [E], sums to 1
        loss = E * sum_e f_e * P_e         (= 1 when both are uniform; >= 0 always)

    Convention: f_e counts *all* k choices of each token, normalised by N*k (Megatron-Core's
    `switch_load_balancing_loss_func`). For k = 1 this is exactly Switch's loss (f from the
    argmax); for k > 1 it is HF's `load_balancing_loss_func` divided by k, so the value is on the
    same scale (minimum 1 at perfect balance) for top-1 and top-2. f_e uses the router's choices
    *before* capacity dropping, as in Switch/GShard/Megatron: after dropping, the counts saturate
    at the capacity and would hide the imbalance the loss is meant to penalise. f_e is a count
    (no gradient); the gradient flows through P_e.
    """
    num_experts = probs.shape[-1]
    k = expert_index.shape[-1]
    w = valid.to(probs.dtype)  # [N]
    n_valid = w.sum().clamp_min(1.0)  # avoid 0/0 on an all-padding batch (loss is then 0)
    # one_hot(...).sum(1): [N, E] with 1 where e is among the token's k (distinct) choices.
    chosen = F.one_hot(expert_index, num_experts).sum(1).to(probs.dtype)  # [N, E]
    # torch.where, not multiplication by the mask: 0 * (garbage at padding, e.g. inf) is NaN.
    f = torch.where(valid.unsqueeze(-1), chosen, 0.0).sum(0) / (n_valid * k)  # [E]
    p_mean = torch.where(valid.unsqueeze(-1), probs, 0.0).sum(0) / n_valid  # [E]
    return num_experts * (f * p_mean).sum()


def sequence_segments(valid: torch.Tensor, doc_start: torch.Tensor) -> torch.Tensor:
    """[N] long: the sequence each flattened position belongs to, for sequence-wise losses.

    valid, doc_start: [B, S] bool. A sequence starts at every row start and at every document start
    of a packed row (doc_start, i.e. position_ids == 0), so no sequence spans two rows or two
    documents. Ids are 0 .. (number of sequences - 1) in position order; padding keeps the id of the
    sequence it sits in (it is excluded by `valid` wherever the id is used).
    """
    start = doc_start.clone()
    start[:, 0] = True
    return start.reshape(-1).long().cumsum(0) - 1


def sequence_balance_loss(probs: torch.Tensor, expert_index: torch.Tensor, valid: torch.Tensor,
                          segment: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2/V3 sequence-wise balance loss, averaged over the sequences (unscaled).

    probs:        [N, E] normalised scores s'_{t,i} (rows sum to 1: softmax, or sigmoid / its sum).
    expert_index: [N, k] experts each token chose (before capacity dropping).
    valid:        [N] bool, real tokens; segment: [N] long sequence ids (`sequence_segments`).

    Per sequence q with S_q real tokens (DeepSeek-V3, eqs. 17-20; V2's expert-level loss per sequence):
        f_i = E / (k · S_q) · #(real tokens t of q with i among their k choices)
        P_i = (1 / S_q) · Σ_{real t in q} s'_{t,i}
        L_q = Σ_i f_i · P_i            (= 1 when both are uniform)
    and the loss is the mean of L_q over the sequences with S_q > 0 (Megatron-Core's
    seq_aux_loss sums over the batch's sequences instead; the mean keeps the coefficient
    independent of the batch size). f is a count (no gradient); the gradient flows through P.
    """
    n, num_experts = probs.shape
    k = expert_index.shape[-1]
    chosen = F.one_hot(expert_index, num_experts).sum(1).to(probs.dtype)  # [N, E]
    vmask = valid.unsqueeze(-1)
    counts = torch.zeros(n, num_experts, dtype=probs.dtype, device=probs.device)  # [segments <= N, E]
    counts = counts.index_add(0, segment, torch.where(vmask, chosen, 0.0))
    psum = torch.zeros_like(counts).index_add(0, segment, torch.where(vmask, probs, 0.0))  # [segments, E]
    size = torch.zeros(n, dtype=probs.dtype, device=probs.device).index_add(0, segment, valid.to(probs.dtype))
    live = size > 0  # [segments]
    s = size.clamp_min(1.0)
    per_seq = num_experts / (k * s * s) * (counts * psum).sum(-1)  # [segments]
    return torch.where(live, per_seq, 0.0).sum() / live.sum().clamp_min(1)


def router_z_loss(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over real tokens of `logsumexp_e(logits[t, e]) ** 2`.

    logits: [N, E] raw router output (before softmax); valid: [N] bool. Returns a scalar.
    It keeps the router logits small, which keeps the softmax numerically stable (Zoph 2022).
    """
    logits = logits.float()  # the square of a logsumexp overflows bf16 quickly
    w = valid.to(logits.dtype)  # [N]
    lse = torch.logsumexp(logits, dim=-1)  # [N]
    return torch.where(valid, lse.square(), 0.0).sum() / w.sum().clamp_min(1.0)
