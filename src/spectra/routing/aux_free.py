"""Auxiliary-loss-free load balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing
Strategy for Mixture-of-Experts", arXiv 2408.15664; used by DeepSeek-V3, arXiv 2412.19437 §2.1.2;
Megatron-Core's `moe_router_enable_expert_bias`).

Per MoE layer, a per-expert bias b ∈ R^E steers *which* experts are selected, and nothing else:

    logits  = W x                                                  [N, E]
    s       = sigmoid(logits)       router.score_function=sigmoid (conf/router/aux_free.yaml, as DeepSeek-V3)
              softmax(logits)       router.score_function=softmax
    experts = top-k(s + b)          group-limited when router.num_groups > 1 (group scores from s + b too,
                                    as DeepSeek-V3)                [N, k]
    weights = s at the experts / their sum   (k > 1; the raw s when k = 1)   — b never enters  [N, k]
    probs   = s / Σ_e s             (rows sum to 1; entropy and metrics read it)              [N, E]

No auxiliary loss: the gradient never sees b (it is added to detached scores), so balancing does
not trade against the language-modelling loss, which is the method's point.

Bias update, once per optimizer step (`on_optimizer_step`, called by the Trainer's
RouterStepCallback after each optimizer step, on every rank):

    c_e   = real tokens that selected expert e over the step's training forwards (all micro-batches
            of gradient accumulation; all data-parallel ranks: all-reduced when torch.distributed
            is initialised)                                                         [E]
    c̄     = mean_e c_e
    b_e  ← b_e + u · sign(c̄ − c_e)          u = router.bias_update_rate (DeepSeek-V3's γ; default 1e-3)

An under-loaded expert's bias rises, an over-loaded one's falls; an expert at exactly the mean
keeps its bias (sign 0). A step that collected no token (train begin, a resumed run's first call)
changes nothing. Padding is not counted. Evaluation forwards and the forward that gradient
checkpointing recomputes in backward collect nothing (routing/step_stats.py). A step the numerics
guard skips drops what it collected (`on_skipped_step`). A loop that never calls
`on_optimizer_step` never moves b.

b is a persistent buffer (`expert_bias`, [E], fp32 at construction): saved with the model weights
(save_moe_model, Trainer checkpoints) and restored on resume and load, so a resumed run continues
with the bias it had. At inference the learned b keeps steering selection (it is part of the
router); each token's routing depends on that token alone (causal, batch-independent).
The step's collected load is transient (a plain attribute, not a buffer).

Diagnostics: `expert_bias_absmax` (max_e |b_e|).
"""

from __future__ import annotations

import torch

from spectra.config import AuxFreeRouterConfig
from spectra.routing.base import RoutingInputs, RoutingOutput, dispatch_counts_of, register_router
from spectra.routing.softmax_gate import SoftmaxGateRouter
from spectra.routing.step_stats import all_reduce_sum, data_parallel_world, in_backward


@torch.no_grad()
def bias_update(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """The new bias b + u · sign(mean(load) − load); unchanged when the load is all zero.

    bias, load: [E]. No host sync (the all-zero case is a multiplication by 0)."""
    load = load.to(torch.float32)
    step = rate * torch.sign(load.mean() - load) * (load.sum() > 0)
    return (bias.float() + step).to(bias.dtype)


@register_router("aux_free")
class AuxFreeRouter(SoftmaxGateRouter):
    """Gate + per-expert selection bias updated from the load (module docstring)."""

    config_class = AuxFreeRouterConfig

    def __init__(self, config: AuxFreeRouterConfig, hidden_size: int, num_experts: int):
        rc = AuxFreeRouterConfig.of(config).check_for(num_experts)
        super().__init__(hidden_size, num_experts, rc.top_k, jitter=rc.jitter, entropy_coef=rc.entropy_coef,
                         gate_init="normal", score_function=rc.score_function, num_groups=rc.num_groups,
                         group_topk=rc.group_topk)
        self.bias_update_rate = float(rc.bias_update_rate)
        self.register_buffer("expert_bias", torch.zeros(num_experts))  # persistent: checkpoints carry it
        self._load: torch.Tensor | None = None  # [E] this optimizer step's collected load

    def forward(self, inputs: RoutingInputs) -> RoutingOutput:
        valid, logits, scores, probs = self.gate_scores(inputs)  # [N], [N, E] x3
        choice = scores.detach() + self.expert_bias.to(scores.dtype)  # [N, E]; selection only
        top_i = self.select(choice)  # [N, k]
        weights = self.combine_weights(scores, top_i, renormalise=self.top_k > 1)  # b not in here
        served = valid.unsqueeze(-1).expand_as(top_i)  # nothing is dropped
        weights = torch.where(served, weights, 0.0)
        if self.training and not in_backward():
            self.collect_load(dispatch_counts_of(top_i, served, self.num_experts))
        diag = {"expert_bias_absmax": self.expert_bias.detach().abs().max().float()}
        return self.routing_output(expert_index=top_i, expert_weight=weights, served=served, valid=valid,
                                   logits=logits, probs=probs, diagnostics=diag)

    @torch.no_grad()
    def collect_load(self, counts: torch.Tensor) -> None:
        """Add a training forward's real-token load [E] to this step's."""
        self._load = counts.detach().float() if self._load is None else self._load + counts.detach().float()

    @torch.no_grad()
    def on_optimizer_step(self, step: int) -> None:
        """b ← b + u · sign(mean load − load) on the step's load, summed over ranks (a collective
        when distributed, entered on every call with zeros when nothing was collected)."""
        load = self._load
        self._load = None
        if load is None:
            if data_parallel_world() == 1:
                return
            load = torch.zeros(self.num_experts, device=self.expert_bias.device)
        load = all_reduce_sum(load)
        self.expert_bias.copy_(bias_update(self.expert_bias, load, self.bias_update_rate))

    def on_skipped_step(self) -> None:
        """A skipped optimizer step contributes no load."""
        self._load = None
