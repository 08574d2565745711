"""Switch top-1 (Fedus et al. 2021) and top-2 (GShard / Mixtral) softmax routers.

    x'      = x * U(1 - jitter, 1 + jitter)        training only, router.jitter > 0   [N, H]
    logits  = W x'                                                                    [N, E]
    probs   = softmax(logits)                                                         [N, E]
    experts = top-k(probs)                         k = 1 (switch_top1) or 2 (switch_top2)  [N, k]
    weights = probs at experts                     top-1: the raw probability (Switch eq. 2)
              probs at experts / their sum          top-2: renormalised to sum 1 (GShard, Mixtral)

Top-1 weights are *not* renormalised: renormalising would make every weight exactly 1, and the
router would get no gradient from the language-modelling loss (only from the aux loss). The
consequence: at upcycling time the routed part is p * MLP(x), not MLP(x) (see the MoE block).

Losses (each added only when its coefficient is > 0, logged unscaled in `diagnostics` always):
    aux_losses["load_balancing"] = router.aux_loss_coef * E * sum_e f_e P_e   (losses.py)
        f_e from the choices *before* capacity dropping; router.aux_loss_variant says which:
        first_choice (default): each token's first choice only (Switch's argmax, GShard,
        fairscale, DeepSpeed); all_slots: all N * k assignments (Megatron-Core). Same for top-1.
    aux_losses["z_loss"]         = router.z_loss_coef * mean_t logsumexp(logits_t)^2
    aux_losses["entropy"]        = router.entropy_coef * mean_t H(probs_t)  (positive sharpens)

Score function and groups (router.score_function, router.num_groups / group_topk; softmax_gate.py):
    sigmoid scores s = sigmoid(logits) select the experts; weights = s at them (top-1) or s over
    their sum (top-2); probs (the P_e of the balance loss) = s / sum_e s. Group-limited top-k
    picks the k experts inside each token's best group_topk groups (selection.group_limited_topk).

Capacity (router.capacity_factor = cf, null = no dropping):
    capacity = ceil(cf * N_valid * k / E) assignments per expert (selection.expert_capacity), N_valid = real tokens.
    Which assignments an over-full expert keeps is router.drop_policy:
    position (default)  position order, slot-major as in GShard: every token's first choice is
                        queued (in token order t = b * S + s) before any token's second choice;
                        the first `capacity` of an expert's queue are kept (`capacity_keep_mask`).
    probs               the `capacity` assignments of highest combine weight (after top-2's
                        renormalisation) are kept, ties in the position order above (Megatron-Core's
                        moe_token_drop_policy=probs, which ranks its top-k-masked probs the same
                        way; `capacity_keep_mask_by_weight`).
    Assignments beyond an
    expert's capacity are dropped: weight 0, dropped=True; the other slot of that token keeps its
    (already renormalised) weight, as in GShard. A token with all slots dropped reaches only the
    residual / shared expert. Diagnostics: `dropped_fraction` (of the N_valid * k assignments),
    `dropped_token_fraction` (real tokens with every slot dropped), `capacity`,
    `expert_slots_per_token` (served assignments / real tokens: the expert applications spent).
    GShard's random dispatch of the second expert is not used (Mixtral does not use it either).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spectra.config import (
    AuxLossRouterConfig,
    AuxLossVariant,
    DropPolicy,
    SwitchRouterConfig,
    SwitchTop1RouterConfig,
    SwitchTop2RouterConfig,
)
from spectra.routing.base import RoutingInputs, RoutingOutput, register_router
from spectra.routing.losses import load_balancing_loss, router_z_loss
from spectra.routing.selection import expert_capacity
from spectra.routing.softmax_gate import SoftmaxGateRouter


def capacity_keep_mask(
    expert_index: torch.Tensor, valid: torch.Tensor, capacity: int, num_experts: int
) -> torch.Tensor:
    """Which assignments fit in their expert's capacity, GShard priority (slot-major, token order).

    expert_index: [N, k] chosen experts; valid: [N] bool; returns keep: [N, k] bool, False at
    padding and at assignments beyond `capacity`.

    The assignments are queued slot-major — (t=0, slot 0), (t=1, slot 0), ..., (t=N-1, slot 0),
    (t=0, slot 1), ... — and the i-th assignment to expert e is kept iff i < capacity. Padding is
    not queued, so it takes no capacity.
    """
    n, k = expert_index.shape
    slot_major = expert_index.t().reshape(-1)  # [k*N], slot 0 of every token first
    queued = valid.repeat(k)  # [k*N], valid of the token behind each assignment
    onehot = F.one_hot(slot_major, num_experts) * queued.unsqueeze(-1)  # [k*N, E] int64
    position = (onehot.cumsum(0) - 1) * onehot  # [k*N, E], place in the expert's queue
    keep = queued & (position.sum(-1) < capacity)  # [k*N]
    return keep.view(k, n).t()  # [N, k]


def capacity_keep_mask_by_weight(
    expert_index: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor, capacity: int, num_experts: int
) -> torch.Tensor:
    """Which assignments fit in their expert's capacity, highest weight first (drop_policy=probs).

    expert_index, weight: [N, k]; valid: [N] bool; returns keep: [N, k] bool. Each expert keeps the
    `capacity` assignments of largest weight among the real tokens' assignments to it; equal
    weights are ranked in the slot-major position order of `capacity_keep_mask`. Padding takes no
    capacity. Three stable sorts, no loop over experts or tokens.
    """
    n, k = expert_index.shape
    slot_major_e = expert_index.t().reshape(-1)  # [k*N] in position order
    w = weight.detach().t().reshape(-1).float()  # [k*N]
    queued = valid.repeat(k)  # [k*N]
    group = torch.where(queued, slot_major_e, num_experts)  # padding queues in a dummy group E
    order = torch.argsort(-w, stable=True)  # weight desc, ties in position order
    order = order[torch.argsort(group[order], stable=True)]  # then by expert
    grp_sorted = group[order]
    counts = torch.bincount(grp_sorted, minlength=num_experts + 1)  # [E + 1]
    first = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - first[grp_sorted]
    keep = queued & (rank < capacity)  # [k*N]
    return keep.view(k, n).t()  # [N, k]


class AuxLossRouter(SoftmaxGateRouter):
    """Token-choice gate router with a balance loss, z-loss, jitter and optional capacity: the
    shared body of switch_top1/2 (this module), seq_aux and global_aux (their own modules), which
    differ only in `balance_loss`. Renormalises the weights when k > 1."""

    config_class: type[AuxLossRouterConfig] = AuxLossRouterConfig
    balance_loss_name = "load_balancing"  # aux_losses / diagnostics key of `balance_loss`

    def __init__(self, config: AuxLossRouterConfig, hidden_size: int, num_experts: int):
        rc = self.config_class.of(config).check_for(num_experts)
        self.k = rc.top_k
        # Switch init: truncated normal, std = sqrt(0.1 / fan_in), cut at 2 std -> near-uniform probs.
        super().__init__(hidden_size, num_experts, self.k, jitter=rc.jitter, entropy_coef=rc.entropy_coef,
                         gate_init="switch", score_function=rc.score_function, num_groups=rc.num_groups,
                         group_topk=rc.group_topk)
        self.aux_loss_coef = float(rc.aux_loss_coef)
        self.z_loss_coef = float(rc.z_loss_coef)
        self.capacity_factor = None if rc.capacity_factor is None else float(rc.capacity_factor)
        self.drop_policy = rc.drop_policy

    def balance_loss(self, probs: torch.Tensor, expert_index: torch.Tensor, valid: torch.Tensor,
                     inputs: RoutingInputs) -> torch.Tensor:  # pragma: no cover - abstract
        """The unscaled balance loss from probs [N, E] and the choices [N, k] before dropping."""
        raise NotImplementedError

    def forward(self, inputs: RoutingInputs) -> RoutingOutput:
        valid, logits, scores, probs = self.gate_scores(inputs)  # [N], [N, E] x3
        top_i = self.select(scores)  # [N, k]
        weights = self.combine_weights(scores, top_i, renormalise=self.k > 1)  # [N, k]

        served = valid.unsqueeze(-1).expand_as(top_i)  # [N, k]
        diag: dict[str, torch.Tensor] = {}
        if self.capacity_factor is not None:
            # Host sync: the capacity is an integer that must be known before dispatch.
            n_valid = int(valid.sum())
            capacity = expert_capacity(n_valid, self.k, self.num_experts, self.capacity_factor)
            if self.drop_policy == DropPolicy.probs:
                served = capacity_keep_mask_by_weight(top_i, weights, valid, capacity, self.num_experts)
            else:
                served = capacity_keep_mask(top_i, valid, capacity, self.num_experts)  # [N, k]
            diag["capacity"] = torch.tensor(float(capacity), device=logits.device)
        weights = torch.where(served, weights, 0.0)  # dropped slots and padding carry weight 0

        n_valid_t = valid.sum().clamp_min(1).float()
        diag["dropped_fraction"] = (valid.unsqueeze(-1) & ~served).sum() / (n_valid_t * self.k)
        diag["dropped_token_fraction"] = (valid & ~served.any(-1)).sum() / n_valid_t

        aux: dict[str, torch.Tensor] = {}
        lb = self.balance_loss(probs, top_i, valid, inputs)  # on the choices before dropping
        z = router_z_loss(logits, valid)
        diag[f"{self.balance_loss_name}_loss"] = lb.detach()
        diag["z_loss"] = z.detach()
        if self.aux_loss_coef > 0:
            aux[self.balance_loss_name] = self.aux_loss_coef * lb
        if self.z_loss_coef > 0:
            aux["z_loss"] = self.z_loss_coef * z
        return self.routing_output(expert_index=top_i, expert_weight=weights, served=served, valid=valid,
                                   logits=logits, probs=probs, diagnostics=diag, aux_losses=aux)


class SwitchRouter(AuxLossRouter):
    """Switch's balance loss E * sum_e f_e P_e (losses.load_balancing_loss). Subclasses fix k
    through their config group (`switch_top1`, `switch_top2`: the group's `check_for` refuses
    another `router.top_k`)."""

    config_class: type[SwitchRouterConfig] = SwitchRouterConfig

    def __init__(self, config: SwitchRouterConfig, hidden_size: int, num_experts: int):
        super().__init__(config, hidden_size, num_experts)
        self.aux_loss_variant = self.config_class.of(config).aux_loss_variant

    def balance_loss(self, probs, expert_index, valid, inputs):
        # f_e on all k slots, or slot 0 = the first choices
        counted = expert_index if self.aux_loss_variant == AuxLossVariant.all_slots else expert_index[:, :1]
        return load_balancing_loss(probs, counted, valid)


@register_router("switch_top1")
class SwitchTop1Router(SwitchRouter):
    """Switch Transformer routing: one expert per token, gate weight = its softmax probability."""

    config_class = SwitchTop1RouterConfig


@register_router("switch_top2")
class SwitchTop2Router(SwitchRouter):
    """GShard / Mixtral top-2 routing: two experts per token, weights renormalised to sum 1."""

    config_class = SwitchTop2RouterConfig
