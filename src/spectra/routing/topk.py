"""The plain softmax top-k router (Mixtral / Qwen-MoE style gate, no auxiliary loss).

    logits = W x                     [N, E]
    probs  = softmax(logits)         [N, E]
    experts = top-k(probs)           [N, k]
    weights = probs at experts, renormalised to sum to 1 over the k choices

It is the simplest learned router and the walking skeleton's default; the Switch baselines
(routing/switch.py) add the load-balancing loss, z-loss and capacity dropping on top of this.
The gate, jitter, entropy term and output tail are shared with them (routing/softmax_gate.py).
"""

from __future__ import annotations

from spectra.config import GateRouterConfig
from spectra.routing.base import RoutingInputs, RoutingOutput, register_router
from spectra.routing.softmax_gate import SoftmaxGateRouter


@register_router("topk")
class TopKRouter(SoftmaxGateRouter):
    """Linear gate + softmax + top-k with renormalised weights."""

    config_class = GateRouterConfig

    def __init__(self, config: GateRouterConfig, hidden_size: int, num_experts: int):
        rc = GateRouterConfig.of(config).check_for(num_experts)
        super().__init__(hidden_size, num_experts, rc.top_k, jitter=rc.jitter, entropy_coef=rc.entropy_coef,
                         gate_init="normal")

    def forward(self, inputs: RoutingInputs) -> RoutingOutput:
        valid, logits, probs = self.gate_probs(inputs)  # [N], [N, E], [N, E]
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # [N, k], [N, k]
        weights = top_p / top_p.sum(-1, keepdim=True)  # [N, k], sums to 1 per token
        weights = weights * valid.unsqueeze(-1)
        served = valid.unsqueeze(-1).expand_as(top_i)  # nothing is dropped
        return self.routing_output(expert_index=top_i, expert_weight=weights, served=served, valid=valid,
                                   logits=logits, probs=probs, diagnostics={})
