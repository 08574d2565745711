"""The plain softmax top-k router (Mixtral / Qwen-MoE style gate, no auxiliary loss).

    logits = W x                     [N, E]
    probs  = softmax(logits)         [N, E]
    experts = top-k(probs)           [N, k]
    weights = probs at experts, renormalised to sum to 1 over the k choices

It is the simplest learned router and the walking skeleton's default; the Switch baselines
(routing/switch.py) add the load-balancing loss, z-loss and capacity dropping on top of this.
"""

from __future__ import annotations

import torch
from torch import nn

from spectra.routing.base import Router, RoutingInputs, RoutingOutput, dispatch_counts_of, register_router


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


@register_router("topk")
class TopKRouter(Router):
    """Linear gate + softmax + top-k with renormalised weights."""

    def __init__(self, cfg, hidden_size: int, num_experts: int):
        super().__init__(hidden_size, num_experts, cfg.router.top_k)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # W: [E, H]
        nn.init.normal_(self.gate.weight, std=hidden_size**-0.5)
        self.entropy_coef = cfg.router.entropy_coef
        self.jitter = cfg.router.jitter

    def forward(self, inputs: RoutingInputs) -> RoutingOutput:
        x = inputs.flat_hidden  # [N, H]
        valid = inputs.flat_valid  # [N]
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.gate(x).float()  # [N, E]; routing math in fp32
        probs = logits.softmax(dim=-1)  # [N, E]
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # [N, k], [N, k]
        weights = top_p / top_p.sum(-1, keepdim=True)  # [N, k], sums to 1 per token
        weights = weights * valid.unsqueeze(-1)
        dropped = torch.zeros_like(top_i, dtype=torch.bool)
        served = valid.unsqueeze(-1).expand_as(top_i)
        aux: dict[str, torch.Tensor] = {}
        diag: dict[str, torch.Tensor] = {}
        ent = routing_entropy(probs, valid)
        diag["routing_entropy"] = ent.detach()
        diag["expert_slots_per_token"] = expert_slots_per_token(served, valid)
        if self.entropy_coef != 0.0:
            # A positive coefficient *sharpens* routing: minimising +coef * H lowers the entropy.
            aux["entropy"] = self.entropy_coef * ent
        return RoutingOutput(
            expert_index=top_i,
            expert_weight=weights,
            probs=probs,
            dropped=dropped,
            valid=valid,
            dispatch_counts=dispatch_counts_of(top_i, served, self.num_experts),
            aux_losses=aux,
            diagnostics=diag,
            logits=logits,
        )
