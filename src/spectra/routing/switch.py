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

Capacity (router.capacity_factor = cf, null = no dropping):
    capacity = ceil(cf * N_valid * k / E) assignments per expert (selection.expert_capacity), N_valid = real tokens.
    Priority is position order, slot-major as in GShard: every token's first choice is queued
    (in token order t = b * S + s) before any token's second choice. Assignments beyond an
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

from spectra.config import AuxLossVariant, SwitchRouterConfig, SwitchTop1RouterConfig, SwitchTop2RouterConfig
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


class SwitchRouter(SoftmaxGateRouter):
    """Softmax top-k router with load-balancing loss, z-loss, jitter and optional capacity.

    Subclasses fix k through their config group (`switch_top1`, `switch_top2`: the group's
    `check_for` refuses another `router.top_k`).
    """

    config_class: type[SwitchRouterConfig] = SwitchRouterConfig

    def __init__(self, config: SwitchRouterConfig, hidden_size: int, num_experts: int):
        rc = self.config_class.of(config).check_for(num_experts)
        self.k = rc.top_k
        # Switch init: truncated normal, std = sqrt(0.1 / fan_in), cut at 2 std -> near-uniform probs.
        super().__init__(hidden_size, num_experts, self.k, jitter=rc.jitter, entropy_coef=rc.entropy_coef,
                         gate_init="switch")
        self.aux_loss_variant = rc.aux_loss_variant
        self.aux_loss_coef = float(rc.aux_loss_coef)
        self.z_loss_coef = float(rc.z_loss_coef)
        self.capacity_factor = None if rc.capacity_factor is None else float(rc.capacity_factor)

    def forward(self, inputs: RoutingInputs) -> RoutingOutput:
        valid, logits, probs = self.gate_probs(inputs)  # [N], [N, E], [N, E]
        top_p, top_i = probs.topk(self.k, dim=-1)  # [N, k], [N, k]
        weights = top_p if self.k == 1 else top_p / top_p.sum(-1, keepdim=True)  # [N, k]

        served = valid.unsqueeze(-1).expand_as(top_i)  # [N, k]
        diag: dict[str, torch.Tensor] = {}
        if self.capacity_factor is not None:
            # Host sync: the capacity is an integer that must be known before dispatch.
            n_valid = int(valid.sum())
            capacity = expert_capacity(n_valid, self.k, self.num_experts, self.capacity_factor)
            served = capacity_keep_mask(top_i, valid, capacity, self.num_experts)  # [N, k]
            diag["capacity"] = torch.tensor(float(capacity), device=logits.device)
        weights = torch.where(served, weights, 0.0)  # dropped slots and padding carry weight 0

        n_valid_t = valid.sum().clamp_min(1).float()
        diag["dropped_fraction"] = (valid.unsqueeze(-1) & ~served).sum() / (n_valid_t * self.k)
        diag["dropped_token_fraction"] = (valid & ~served.any(-1)).sum() / n_valid_t

        aux: dict[str, torch.Tensor] = {}
        # f_e on the choices before dropping (all k slots, or slot 0 = the first choices)
        counted = top_i if self.aux_loss_variant == AuxLossVariant.all_slots else top_i[:, :1]  # [N, k] or [N, 1]
        lb = load_balancing_loss(probs, counted, valid)
        z = router_z_loss(logits, valid)
        diag["load_balancing_loss"] = lb.detach()
        diag["z_loss"] = z.detach()
        if self.aux_loss_coef > 0:
            aux["load_balancing"] = self.aux_loss_coef * lb
        if self.z_loss_coef > 0:
            aux["z_loss"] = self.z_loss_coef * z
        return self.routing_output(expert_index=top_i, expert_weight=weights, served=served, valid=valid,
                                   logits=logits, probs=probs, diagnostics=diag, aux_losses=aux)


@register_router("switch_top1")
class SwitchTop1Router(SwitchRouter):
    """Switch Transformer routing: one expert per token, gate weight = its softmax probability."""

    config_class = SwitchTop1RouterConfig


@register_router("switch_top2")
class SwitchTop2Router(SwitchRouter):
    """GShard / Mixtral top-2 routing: two experts per token, weights renormalised to sum 1."""

    config_class = SwitchTop2RouterConfig
