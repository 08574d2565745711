"""The MoE block that replaces a decoder layer's MLP (METHOD.md §1).

    y = (1 - a) * sum_{e in S(x)} w_e(x) * Expert_e(x)  +  a * SharedExpert(x)

Stages, in order: route (router -> RoutingOutput) -> experts (dispatch + compute + combine,
by transformers' kernels) -> mix with the shared expert. With no shared expert, a = 0.
A dropped assignment has weight 0, so a token whose every slot was dropped passes through
the shared expert (and the residual connection of the decoder layer) only.

Router replacement of a Qwen2-MoE-style model (moe/replace.py) keeps that model's own shared
expert *and its combination*, y = routed + sigmoid(g(x)) * shared with g = `shared_expert_gate`
(Linear(H, 1)); `a` is unused then. Changing the combination would change the pretrained model.
Likewise a DeepSeek-V3-style model keeps its own: y = s * sum_e w_e(x) Expert_e(x) + shared(x),
the shared experts added unweighted (`shared_expert_added`) and the routed weights multiplied by
the model's `routed_scaling_factor` s before the experts combine them (as its removed gate did).
"""

from __future__ import annotations

import torch
from torch import nn

from spectra.moe.context import RoutingContext
from spectra.moe.timing import stage
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
        shared_expert_gate: nn.Module | None = None,
        *,
        shared_expert_added: bool = False,
        routed_scaling_factor: float = 1.0,
    ):
        super().__init__()
        self.router = router
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_weight = shared_expert_weight if shared_expert is not None else 0.0
        # Optional (router replacement only): the model's own sigmoid gate of the shared expert.
        self.shared_expert_gate = shared_expert_gate
        # Optional (router replacement of DeepSeek-V3-style models only): y = s * routed + shared.
        self.shared_expert_added = shared_expert_added
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.layer_idx = layer_idx
        # A plain attribute, not a submodule: the context holds tensors of the current forward.
        object.__setattr__(self, "context", context)
        # A moe.timing.StageTimer while the routing monitor times a forward (Table 9), else None.
        self.stage_timer = None

    def route(self, hidden_states: torch.Tensor) -> RoutingOutput:
        """hidden_states [B, S, H] -> RoutingOutput over N = B*S positions."""
        inputs = self.context.routing_inputs(self.layer_idx, hidden_states)
        out = self.router(inputs)
        self.context.record(self.layer_idx, out, training=self.training)
        return out

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # `stage(...)`: profiler ranges spectra/layer{i}/{router,experts,shared} and, while the
        # monitor times a forward, wall time per stage (moe/timing.py); a no-op otherwise.
        B, S, H = hidden_states.shape
        with stage(self, "router"):
            out = self.route(hidden_states)
        with stage(self, "experts"):
            flat = hidden_states.reshape(B * S, H)  # [N, H]
            weights = out.expert_weight  # [N, k]
            if self.routed_scaling_factor != 1.0:  # DeepSeek-V3: the model's s, as its gate applied it
                weights = weights * self.routed_scaling_factor
            weights = weights.to(flat.dtype)
            routed = self.experts(flat, out.expert_index, weights).reshape(B, S, H)  # [B, S, H]
        if self.shared_expert is None:
            return routed
        with stage(self, "shared"):
            if self.shared_expert_added:  # DeepSeek-V3: the shared experts' output added unweighted
                return routed + self.shared_expert(hidden_states)
            if self.shared_expert_gate is not None:  # Qwen2-MoE: routed + sigmoid(g(x)) * shared
                gate = torch.sigmoid(self.shared_expert_gate(hidden_states))  # [B, S, 1]
                return routed + gate * self.shared_expert(hidden_states)
            a = self.shared_expert_weight
            return (1.0 - a) * routed + a * self.shared_expert(hidden_states)
