"""Expert Choice routing (Zhou et al. 2022): experts pick tokens instead of tokens picking experts.

Training (`self.training`):
    logits = W x                                 [N, E]
    probs  = softmax over experts, per token     [N, E]
    cap    = min(ceil(N_valid * cf / E), N_valid)     cf = router.ec_capacity_factor (1.25)
    expert e takes the `cap` real tokens with the highest probs[:, e]  (ties: earlier token first)
    gating weight of a picked (token, expert) pair = probs[token, expert]  (the EC paper's G;
    not renormalised, so a token's weights need not sum to 1)

Representation in the token-major `RoutingOutput` ([N, k] like every other router):
    k = k_max = max(1, largest number of experts that picked one token) — data dependent.
    Row t lists the experts that picked token t (by descending prob), then fills the remaining
    slots with experts that did *not* pick it (so the k indices stay distinct) at weight 0.
    `dropped` is True at every slot of a real token that is not a served pick, so the contract's
    invariant holds for every router: served = valid & ~dropped, and `dispatch_counts` counts
    exactly the served slots. A token picked by no expert has all slots dropped (weight 0) and
    reaches only the residual / shared expert. The token-level rate is
    `diagnostics["unpicked_fraction"]` (= `dropped_token_fraction`, the name Switch uses too);
    `dropped.mean()` is *not* a token drop rate for this router.
    Padding is never picked, never dropped, takes no capacity and is not counted in N_valid.

Inference (`not self.training`): the selection above looks at every token of the batch, future
ones included, so it is neither causal nor batch-independent. It falls back to per-token
token-choice top-k over the same probs (k = router.top_k, weights renormalised to sum 1), which
depends on token t alone — causal, and the same in incremental decoding as in a full forward.

No auxiliary loss (balance holds by construction); router.entropy_coef and router.jitter apply as
for the other learned routers; aux_loss_coef, z_loss_coef and capacity_factor are ignored.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from spectra.routing.base import Router, RoutingInputs, RoutingOutput, dispatch_counts_of, register_router
from spectra.routing.switch import expert_capacity
from spectra.routing.topk import routing_entropy


def expert_choice_pick(probs: torch.Tensor, valid: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each expert picks its `capacity` real tokens of highest probability.

    probs: [N, E]; valid: [N] bool; capacity <= N_valid. Returns picked: [N, E] bool with exactly
    `capacity` True per column. Padding gets score -1 (< every probability), so it is never
    picked while capacity <= N_valid. A stable sort breaks ties by token order.
    """
    n, num_experts = probs.shape
    scores = torch.where(valid.unsqueeze(-1), probs, -1.0).t()  # [E, N]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :capacity]  # [E, cap]
    picked = torch.zeros(num_experts, n, dtype=torch.bool, device=probs.device)
    return picked.scatter_(1, order, True).t()  # [N, E]


def token_major(picked: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn an [N, E] pick mask into token-major slots (see the module docstring).

    Returns (expert_index [N, k_max] long, served [N, k_max] bool): picked experts first by
    descending prob, then unpicked ones (served False), k_max = max(1, max_t sum_e picked[t, e]).
    """
    k_max = max(1, int(picked.sum(-1).max()))  # host sync: the slot count is a shape
    key = picked.to(probs.dtype) * 2.0 + probs.detach()  # [N, E]; picked (>= 2) before unpicked (<= 1)
    expert_index = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k_max]  # [N, k_max]
    return expert_index, picked.gather(1, expert_index)


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Expert Choice in training; causal token-choice top-k at inference (module docstring)."""

    def __init__(self, cfg, hidden_size: int, num_experts: int):
        rc = cfg.router
        if not rc.ec_capacity_factor > 0:
            raise ValueError(f"router.ec_capacity_factor: must be > 0, got {rc.ec_capacity_factor}")
        if not 1 <= rc.top_k <= num_experts:
            raise ValueError(
                f"router.top_k: expert_choice's inference fallback routes each token to top_k experts; "
                f"need 1 <= top_k <= num_experts={num_experts}, got {rc.top_k}"
            )
        if rc.jitter < 0:
            raise ValueError(f"router.jitter: must be >= 0, got {rc.jitter}")
        super().__init__(hidden_size, num_experts, rc.top_k)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # W: [E, H]
        std = math.sqrt(0.1 / hidden_size)  # same init as the Switch router
        nn.init.trunc_normal_(self.gate.weight, std=std, a=-2 * std, b=2 * std)
        self.capacity_factor = float(rc.ec_capacity_factor)
        self.entropy_coef = float(rc.entropy_coef)
        self.jitter = float(rc.jitter)

    def forward(self, inputs: RoutingInputs) -> RoutingOutput:
        x = inputs.flat_hidden  # [N, H]
        valid = inputs.flat_valid  # [N]
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.gate(x).float()  # [N, E]
        probs = logits.softmax(dim=-1)  # [N, E]
        diag: dict[str, torch.Tensor] = {}

        if self.training:
            n_valid = int(valid.sum())  # host sync: capacity is a top-k size
            capacity = min(expert_capacity(self.capacity_factor, n_valid, 1, self.num_experts), n_valid)
            picked = expert_choice_pick(probs, valid, capacity)  # [N, E]
            expert_index, served = token_major(picked, probs)  # [N, k_max] x2
            weights = torch.where(served, probs.gather(1, expert_index), 0.0)  # not renormalised
            unpicked = valid & ~picked.any(-1)  # [N]
            n = valid.sum().clamp_min(1).float()
            diag["capacity"] = torch.tensor(float(capacity), device=logits.device)
            diag["unpicked_fraction"] = unpicked.sum() / n
            diag["dropped_token_fraction"] = diag["unpicked_fraction"]
            diag["experts_per_token"] = (picked.sum(-1) * valid).sum() / n  # mean picks per real token
        else:
            # Causal fallback: token-choice top-k, a function of token t alone.
            top_p, expert_index = probs.topk(self.top_k, dim=-1)  # [N, k]
            weights = top_p / top_p.sum(-1, keepdim=True)
            served = valid.unsqueeze(-1).expand_as(expert_index)
            weights = torch.where(served, weights, 0.0)

        dropped = valid.unsqueeze(-1) & ~served  # [N, k]
        aux: dict[str, torch.Tensor] = {}
        ent = routing_entropy(probs, valid)
        diag["routing_entropy"] = ent.detach()
        if self.entropy_coef != 0:
            aux["entropy"] = self.entropy_coef * ent  # positive coefficient sharpens routing
        return RoutingOutput(
            expert_index=expert_index,
            expert_weight=weights,
            probs=probs,
            dropped=dropped,
            valid=valid,
            dispatch_counts=dispatch_counts_of(expert_index, served, self.num_experts),
            aux_losses=aux,
            diagnostics=diag,
            logits=logits,
        )
