"""The MoE block that replaces a decoder layer's MLP (METHOD.md §1).

    y = (1 - a) * sum_{e in S(x)} w_e(x) * Expert_e(x)  +  a * SharedExpert(x)

Stages, in order: route (router -> RoutingOutput) -> experts (dispatch + compute + combine,
by transformers' kernels) -> mix with the shared expert. With no shared expert, a = 0.
A dropped assignment has weight 0, so a token whose every slot was dropped passes through
the shared expert (and the residual connection of the decoder layer) only.
"""

from __future__ import annotations

import torch
from torch import nn

from spectra.moe.context import RoutingContext
from spectra.routing.base import Router, RoutingOutput


class MoEBlock(nn.Module):
    """Router + stacked experts (+ optional frozen shared expert) for one decoder layer."""

    def __init__(
        self,
        router: Router,
        experts: nn.Module,
        shared_expert: nn.Module | None,
        shared_expert_weight: float,
        layer_idx: int,
        context: RoutingContext,
    ):
        super().__init__()
        self.router = router
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_weight = shared_expert_weight if shared_expert is not None else 0.0
        self.layer_idx = layer_idx
        # A plain attribute, not a submodule: the context holds tensors of the current forward.
        object.__setattr__(self, "context", context)

    def route(self, hidden_states: torch.Tensor) -> RoutingOutput:
        """hidden_states [B, S, H] -> RoutingOutput over N = B*S positions."""
        inputs = self.context.routing_inputs(self.layer_idx, hidden_states)
        out = self.router(inputs)
        self.context.record(self.layer_idx, out, training=self.training)
        return out

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, S, H = hidden_states.shape
        out = self.route(hidden_states)
        flat = hidden_states.reshape(B * S, H)  # [N, H]
        weights = out.expert_weight.to(flat.dtype)  # [N, k]
        routed = self.experts(flat, out.expert_index, weights).reshape(B, S, H)  # [B, S, H]
        if self.shared_expert is None:
            return routed
        a = self.shared_expert_weight
        return (1.0 - a) * routed + a * self.shared_expert(hidden_states)
