"""Expert Choice routing (Zhou et al. 2022): experts pick tokens instead of tokens picking experts.

Batch routing (training, and teacher-forced evaluation by default):
    logits = W x                                 [N, E]
    probs  = softmax over experts, per token     [N, E]
    cap    = min(ceil(N_valid * cf / E), N_valid)     cf = router.ec_capacity_factor (selection.expert_capacity, k = 1)
                                                      (null = top_k: compute-matched, the EC
                                                      paper's c = k; each token gets ~cf experts)
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

Which path an eval-mode forward takes (`router.ec_inference`):
    batch (default)  a teacher-forced forward (`RoutingInputs.teacher_forced`: the trainer's eval
                     loss, the routing monitor) over a whole sequence (`past_length == 0`) routes
                     exactly as training does, so eval_loss and monitor metrics describe the
                     routing EC trained with. Like training it sees the whole batch, future tokens
                     of a row and other rows included: the evaluation is batch-dependent (it
                     depends on the eval batch's composition, as EC's training does).
    causal           every eval-mode forward uses the fallback below.
Every other eval-mode call takes the causal fallback: generation (with a cache, where
past_length > 0 for the decoding steps and the prefill is not teacher-forced, or recomputing
with use_cache=False), and a plain forward of a saved model. So a cached decode equals
recomputing the sequence, and greedy generation is causal. The fallback is per-token
token-choice top-k over the same probs (k = router.top_k, weights renormalised to sum 1), a
function of token t alone; EC never trained on it.

Diagnostics: `causal_fallback` (1 when the causal fallback produced the output, 0 for batch
routing) labels the path, `expert_slots_per_token` (served assignments / real tokens) the compute
spent (~cf in batch routing, top_k in the fallback).

No auxiliary loss (balance holds by construction); router.entropy_coef and router.jitter apply as
for the other learned routers; aux_loss_coef, z_loss_coef and capacity_factor are ignored.
"""

from __future__ import annotations

import torch

from spectra.config import ECInference, ExpertChoiceRouterConfig
from spectra.routing.base import RoutingInputs, RoutingOutput, register_router
from spectra.routing.selection import expert_capacity
from spectra.routing.softmax_gate import SoftmaxGateRouter


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
class ExpertChoiceRouter(SoftmaxGateRouter):
    """Expert Choice batch routing (training, teacher-forced eval); causal token-choice top-k otherwise."""

    config_class = ExpertChoiceRouterConfig

    def __init__(self, config: ExpertChoiceRouterConfig, hidden_size: int, num_experts: int):
        rc = ExpertChoiceRouterConfig.of(config).check_for(num_experts)  # the fallback's k <= E
        super().__init__(hidden_size, num_experts, rc.top_k, jitter=rc.jitter, entropy_coef=rc.entropy_coef,
                         gate_init="switch")  # same init as the Switch router
        self.capacity_factor = rc.capacity_factor  # null ec_capacity_factor = top_k (compute-matched)
        self.inference = rc.ec_inference

    def uses_batch_routing(self, inputs: RoutingInputs) -> bool:
        """Batch (Expert Choice) routing in training and, with ec_inference=batch, for a
        teacher-forced eval forward over whole sequences; the causal fallback otherwise."""
        if self.training:
            return True
        return self.inference == ECInference.batch and inputs.teacher_forced and inputs.past_length == 0

    def forward(self, inputs: RoutingInputs) -> RoutingOutput:
        valid, logits, probs = self.gate_probs(inputs)  # [N], [N, E], [N, E]
        if self.uses_batch_routing(inputs):
            expert_index, weights, served, diag = self._batch_route(probs, valid)
        else:
            expert_index, weights, served, diag = self._causal_route(probs, valid)
        return self.routing_output(
            expert_index=expert_index, expert_weight=weights, served=served, valid=valid, logits=logits,
            probs=probs, diagnostics=diag,
            chosen=served,  # the picks; the other k_max slots are fillers, not choices
        )

    def _batch_route(self, probs: torch.Tensor, valid: torch.Tensor):
        """Experts pick tokens (module docstring). probs [N, E], valid [N] ->
        (expert_index [N, k_max], weights [N, k_max], served [N, k_max], diagnostics)."""
        n_valid = int(valid.sum())  # host sync: capacity is a top-k size
        capacity = min(expert_capacity(n_valid, 1, self.num_experts, self.capacity_factor), n_valid)
        picked = expert_choice_pick(probs, valid, capacity)  # [N, E]
        expert_index, served = token_major(picked, probs)  # [N, k_max] x2
        weights = torch.where(served, probs.gather(1, expert_index), 0.0)  # not renormalised
        unpicked = valid & ~picked.any(-1)  # [N]
        n = valid.sum().clamp_min(1).float()
        diag = {
            "causal_fallback": torch.zeros((), device=probs.device),
            "capacity": torch.tensor(float(capacity), device=probs.device),
            "unpicked_fraction": unpicked.sum() / n,
        }
        diag["dropped_token_fraction"] = diag["unpicked_fraction"]
        diag["experts_per_token"] = (picked.sum(-1) * valid).sum() / n  # mean picks per real token
        return expert_index, weights, served, diag

    def _causal_route(self, probs: torch.Tensor, valid: torch.Tensor):
        """The causal fallback: token-choice top-k, a function of token t alone. probs [N, E],
        valid [N] -> (expert_index [N, k], weights [N, k], served [N, k], diagnostics)."""
        top_p, expert_index = probs.topk(self.top_k, dim=-1)  # [N, k]
        served = valid.unsqueeze(-1).expand_as(expert_index)
        weights = torch.where(served, top_p / top_p.sum(-1, keepdim=True), 0.0)
        return expert_index, weights, served, {"causal_fallback": torch.ones((), device=probs.device)}
