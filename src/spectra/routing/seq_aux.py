"""Sequence-wise auxiliary balance loss (DeepSeek-V2, arXiv 2405.04434 §2.2.4, expert-level balance
loss applied per sequence; DeepSeek-V3, arXiv 2412.19437 §2.1.2 "complementary sequence-wise
auxiliary loss"; Megatron-Core's moe_router_load_balancing_type=seq_aux_loss).

Routing is the token-choice gate of the other balance-loss routers (routing/switch.py's
AuxLossRouter): logits = W x [N, E]; scores s (router.score_function: softmax, or sigmoid as in
DeepSeek-V3); experts = top-k(s) (group-limited with router.num_groups > 1) [N, k]; weights = s at
the experts over their sum (k > 1; the raw s for k = 1); optional capacity (router.capacity_factor,
router.drop_policy) and z-loss (router.z_loss_coef), as for Switch.

Balance loss, per sequence q (S_q real tokens), with s' = s / Σ_j s_j the normalised scores (`probs`):

    f_i = E / (k · S_q) · Σ_{t ∈ q} 1[i ∈ top-k(t)]        the choices before capacity dropping
    P_i = (1 / S_q) · Σ_{t ∈ q} s'_{t,i}
    L   = α · mean_q Σ_i f_i · P_i                            α = router.aux_loss_coef

(losses.sequence_balance_loss). Unlike Switch's batch-level loss, it balances the experts inside
every sequence, which penalises a sequence sending all its tokens to the same experts even when
the batch as a whole is balanced. "Sequence" = a document: a packed row's documents (split at
`doc_start`, position_ids == 0) are separate sequences, and so are rows; padding is excluded from
f, P and S_q, and a sequence with no real token does not count in the mean. Megatron-Core sums
L_q over the batch's sequences; the mean here keeps α independent of the batch size.

Logged: diagnostics["seq_load_balancing_loss"] (unscaled), aux_losses["seq_load_balancing"]
(α · L, when α > 0), plus the Switch diagnostics (z_loss, dropped fractions, capacity).
"""

from __future__ import annotations

import torch

from spectra.config import AuxLossRouterConfig
from spectra.routing.base import RoutingInputs, register_router
from spectra.routing.losses import sequence_balance_loss, sequence_segments
from spectra.routing.switch import AuxLossRouter


@register_router("seq_aux")
class SeqAuxRouter(AuxLossRouter):
    """Token-choice gate with the sequence-wise balance loss (module docstring)."""

    config_class = AuxLossRouterConfig
    balance_loss_name = "seq_load_balancing"

    def balance_loss(self, probs: torch.Tensor, expert_index: torch.Tensor, valid: torch.Tensor,
                     inputs: RoutingInputs) -> torch.Tensor:
        segment = sequence_segments(inputs.valid, inputs.doc_start)  # [N]
        return sequence_balance_loss(probs, expert_index, valid, segment)
