"""The plain top-k router (Mixtral / Qwen-MoE style gate, no auxiliary loss).

    logits = W x                     [N, E]
    probs  = softmax(logits)         [N, E]
    experts = top-k(probs)           [N, k]
    weights = probs at experts, renormalised to sum to 1 over the k choices

router.score_function=sigmoid scores sigmoid(logits) instead (weights: the selected sigmoids over
their sum, DeepSeek-V3), router.num_groups > 1 limits the top-k to the token's best
router.group_topk expert groups (softmax_gate.py, selection.group_limited_topk).

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
                         gate_init="normal", score_function=rc.score_function, num_groups=rc.num_groups,
                         group_topk=rc.group_topk)

    def forward(self, inputs: RoutingInputs) -> RoutingOutput:
        valid, logits, scores, probs = self.gate_scores(inputs)  # [N], [N, E] x3
        top_i = self.select(scores)  # [N, k]
        weights = self.combine_weights(scores, top_i, renormalise=True)  # [N, k], sums to 1 per token
        weights = weights * valid.unsqueeze(-1)
        served = valid.unsqueeze(-1).expand_as(top_i)  # nothing is dropped
        return self.routing_output(expert_index=top_i, expert_weight=weights, served=served, valid=valid,
                                   logits=logits, probs=probs, diagnostics={})
