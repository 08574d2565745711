"""S-BASE: Sinkhorn-balanced assignment in training, plain top-k at inference (Clark et al. 2022,
"Unified Scaling Laws for Routed Language Models", ICML, arXiv 2202.01169, §2.3 / App. A:
Sinkhorn-BASE, approximating the BASE layers' balanced linear assignment, Lewis et al. 2021;
Megatron-Core's moe_router_load_balancing_type=sinkhorn).

    logits = W x                                                              [N, E]
    a      = sigmoid(logits)     k = 1          (Megatron's `_sinkhorn_activation`)
             softmax(logits)     k > 1                                        [N, E]
Training:
    Q       = Sinkhorn(exp(logits)): scaled so that rows sum to 1 and columns to N/E   [N, E]
              (routing/sinkhorn.py with cost −logits, ε = 1, router.sinkhorn_iterations
              column + row sweeps, log domain; N = real tokens, padding takes no part)
    experts = top-k(Q)                                                        [N, k]
Inference (eval mode):
    experts = top-k(a)   (= top-k of the logits: a is monotone in them)       [N, k]
Both:
    weights = a at the experts (not renormalised, as Megatron: scores = a ⊙ routing map)  [N, k]

Q is computed without gradient: the balanced assignment only decides *which* experts; the gate
learns through the weights a, so the LM loss pulls the logits toward the assignment's experts and
inference's plain top-k inherits the balance the router learned. No auxiliary loss.

Sinkhorn's fixed point is exp(logits) scaled by a row and a column vector (unique up to one scalar);
Megatron iterates d0 = 1/(N·(K d1)), d1 = 1/(E·(Kᵀ d0)) until the mean change of d1 < 1e-4. The
row scaling does not change a row's top-k, so both pick the same experts once converged; here a
fixed number of sweeps (no host sync per iteration) replaces the tolerance.

`probs` (entropy, metrics) is softmax(logits). Diagnostics: `sinkhorn_marginal_error` (column
imbalance of Q, training), `balanced_reassigned_fraction` (real tokens whose training selection
differs from plain top-k of the logits: the assignment's correction), `balanced_routing` (1 in
training, 0 at inference).
"""

from __future__ import annotations

import torch

from spectra.config import SinkhornBaseRouterConfig
from spectra.routing.base import RoutingInputs, RoutingOutput, register_router
from spectra.routing.sinkhorn import marginal_error, sinkhorn
from spectra.routing.softmax_gate import SoftmaxGateRouter


@register_router("sinkhorn_base")
class SinkhornBaseRouter(SoftmaxGateRouter):
    """S-BASE (module docstring)."""

    config_class = SinkhornBaseRouterConfig

    def __init__(self, config: SinkhornBaseRouterConfig, hidden_size: int, num_experts: int):
        rc = SinkhornBaseRouterConfig.of(config).check_for(num_experts)
        super().__init__(hidden_size, num_experts, rc.top_k, jitter=rc.jitter, entropy_coef=rc.entropy_coef,
                         gate_init="switch")
        self.iterations = int(rc.sinkhorn_iterations)

    def forward(self, inputs: RoutingInputs) -> RoutingOutput:
        valid, logits, probs = self.gate_probs(inputs)  # [N], [N, E], [N, E]
        act = torch.sigmoid(logits) if self.top_k == 1 else probs  # [N, E]
        plain = act.topk(self.top_k, dim=-1).indices  # [N, k]
        diag: dict[str, torch.Tensor] = {}
        if self.training:
            with torch.no_grad():
                plan = sinkhorn(-logits.detach(), 1.0, self.iterations, valid)  # [N, E]
                top_i = plan.topk(self.top_k, dim=-1).indices  # [N, k]
                diag["sinkhorn_marginal_error"] = marginal_error(plan, valid)
                same = torch.sort(top_i, -1).values == torch.sort(plain, -1).values  # [N, k]
                moved = valid & ~same.all(-1)
                diag["balanced_reassigned_fraction"] = moved.sum() / valid.sum().clamp_min(1)
        else:
            top_i = plain
        diag["balanced_routing"] = torch.tensor(float(self.training), device=logits.device)
        served = valid.unsqueeze(-1).expand_as(top_i)  # nothing is dropped
        weights = torch.where(served, act.gather(1, top_i), 0.0)  # [N, k], not renormalised
        return self.routing_output(expert_index=top_i, expert_weight=weights, served=served, valid=valid,
                                   logits=logits, probs=probs, diagnostics=diag)
