"""The linear gate of the top-k, Switch, Expert Choice and the other gate routers, and the tail
every one of them ends with, written once.

    x'     = x * U(1 - jitter, 1 + jitter)     training only, router.jitter > 0   [N, H]
    logits = W x'                              in fp32                            [N, E]
    probs  = softmax(logits)                                                      [N, E]

Token-choice routers choose the score function (router.score_function, `gate_scores`):
    softmax  scores = probs = softmax(logits)
    sigmoid  scores = sigmoid(logits) (DeepSeek-V3), probs = scores / sum_e scores   [N, E]
and select with `select` (top-k, group-limited when router.num_groups > 1: selection.py). Their
combine weights (`combine_weights`) are the *scores* at the selected experts, divided by their sum
when renormalised: for softmax that is probs renormalised over the k choices (the raw probability
when not renormalised, Switch top-1); for sigmoid it is DeepSeek-V3's s_i / sum_{j in top-k} s_j
(the raw sigmoid when not renormalised: a top-1 weight of 1 would send the router no LM gradient).
`probs` always has rows summing to 1: balance losses, entropy and metrics read it.

A subclass selects experts its own way (top-k, capacity dropping, experts picking
tokens) and hands the selection to `routing_output`, which adds what they all report alike:
    diagnostics["routing_entropy"]         mean per-token entropy of probs (always, unscaled)
    diagnostics["expert_slots_per_token"]  served assignments per real token (the compute spent)
    aux_losses["entropy"]                  router.entropy_coef * that entropy, when the coefficient
                                           is non-zero (a positive coefficient sharpens routing)
    dropped = valid & ~served, dispatch_counts over the served slots.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from spectra.config import ScoreFunction
from spectra.routing.base import Router, RoutingInputs, RoutingOutput, dispatch_counts_of
from spectra.routing.selection import group_limited_topk


def routing_entropy(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of a routing distribution over real tokens.

    probs: [N, E] rows summing to 1; valid: [N] bool. Returns a scalar (nats).
    """
    ent = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1)  # [N]
    w = valid.to(probs.dtype)
    return (ent * w).sum() / w.sum().clamp_min(1.0)


def expert_slots_per_token(served: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Expert applications spent per real token: served assignments / real tokens.

    served: [N, k] bool (real token, not dropped); valid: [N] bool. Returns a scalar float. The
    compute a router spends (top-k: k; Switch with drops: less; Expert Choice: ~cf), logged as
    the diagnostic `expert_slots_per_token` so tables can set routers side by side at equal compute.
    """
    return served.sum().float() / valid.sum().clamp_min(1).float()


class SoftmaxGateRouter(Router):
    """Base of the routers whose scores are a linear gate's softmax (module docstring).

    gate_init: "normal" draws W ~ N(0, 1/H) (Mixtral / Qwen-MoE style); "switch" draws the Switch
    Transformer's truncated normal, std = sqrt(0.1 / H) cut at 2 std, so probs start near uniform.
    score_function, num_groups, group_topk: the token-choice knobs (`gate_scores`, `select`).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, jitter: float, entropy_coef: float,
                 gate_init: str, score_function: ScoreFunction | str = ScoreFunction.softmax, num_groups: int = 1,
                 group_topk: int = 1):
        super().__init__(hidden_size, num_experts, top_k)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # W: [E, H]
        if gate_init == "normal":
            nn.init.normal_(self.gate.weight, std=hidden_size**-0.5)
        elif gate_init == "switch":
            std = math.sqrt(0.1 / hidden_size)
            nn.init.trunc_normal_(self.gate.weight, std=std, a=-2 * std, b=2 * std)
        else:
            raise ValueError(f"gate_init: choose normal or switch, got {gate_init!r}")
        self.jitter = float(jitter)
        self.entropy_coef = float(entropy_coef)
        self.score_function = ScoreFunction(score_function)
        self.num_groups = int(num_groups)
        self.group_topk = int(group_topk)

    def gate_probs(self, inputs: RoutingInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(valid [N] bool, logits [N, E] fp32, probs [N, E]) for the flattened tokens."""
        x = inputs.flat_hidden  # [N, H]
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.gate(x).float()  # [N, E]; routing math in fp32
        return inputs.flat_valid, logits, logits.softmax(dim=-1)

    def gate_scores(self, inputs: RoutingInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(valid [N], logits [N, E], scores [N, E], probs [N, E]) under router.score_function."""
        valid, logits, probs = self.gate_probs(inputs)
        if self.score_function == ScoreFunction.softmax:
            return valid, logits, probs, probs
        scores = torch.sigmoid(logits)  # [N, E]
        return valid, logits, scores, scores / scores.sum(-1, keepdim=True)

    def select(self, choice_scores: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Expert index [N, k] (best first): top-k of `choice_scores` [N, E], group-limited when
        router.num_groups > 1 (selection.group_limited_topk)."""
        return group_limited_topk(choice_scores, k or self.top_k, self.num_groups, self.group_topk)

    @staticmethod
    def combine_weights(scores: torch.Tensor, expert_index: torch.Tensor, renormalise: bool) -> torch.Tensor:
        """[N, k]: scores at the selected experts, divided by their sum when `renormalise`."""
        w = scores.gather(1, expert_index)  # [N, k]
        return w / w.sum(-1, keepdim=True) if renormalise else w

    def routing_output(
        self,
        *,
        expert_index: torch.Tensor,
        expert_weight: torch.Tensor,
        served: torch.Tensor,
        valid: torch.Tensor,
        logits: torch.Tensor,
        probs: torch.Tensor,
        diagnostics: dict[str, torch.Tensor],
        aux_losses: dict[str, torch.Tensor] | None = None,
        chosen: torch.Tensor | None = None,
    ) -> RoutingOutput:
        """The shared tail: entropy term and diagnostics added, then the `RoutingOutput`.

        expert_index, expert_weight, served: [N, k]; valid: [N]; logits, probs: [N, E].
        `aux_losses` (the subclass's own, already scaled) keep their order; entropy comes last.
        """
        aux = {} if aux_losses is None else aux_losses
        ent = routing_entropy(probs, valid)
        diagnostics["routing_entropy"] = ent.detach()
        diagnostics["expert_slots_per_token"] = expert_slots_per_token(served, valid)
        if self.entropy_coef != 0:
            aux["entropy"] = self.entropy_coef * ent  # positive coefficient sharpens routing
        return RoutingOutput(
            expert_index=expert_index,
            expert_weight=expert_weight,
            probs=probs,
            dropped=valid.unsqueeze(-1) & ~served,  # [N, k]; padding is never dropped
            valid=valid,
            dispatch_counts=dispatch_counts_of(expert_index, served, self.num_experts),
            aux_losses=aux,
            diagnostics=diagnostics,
            logits=logits,
            chosen=chosen,
        )
