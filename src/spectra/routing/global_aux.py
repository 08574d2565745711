"""Switch's balance loss on global-batch statistics (Qiu et al. 2025, "Demons in the Detail: On
Implementing Load Balancing Loss for Training Specialized Mixture-of-Expert Models", arXiv
2501.11873; Megatron-Core's moe_router_load_balancing_type=global_aux_loss).

Routing is the token-choice gate of the other balance-loss routers (routing/switch.py's
AuxLossRouter: score function, group-limited top-k, capacity with drop policy, z-loss). The loss is

    L = α · E · Σ_e f_e · P_e                     α = router.aux_loss_coef
    P_e = (1 / N_local) · Σ_{real t of this forward} probs[t, e]          local, differentiable
    f_e = c_e / (k · T)                                                   global, a count (no gradient)

with c_e = assignments to e (all k choices of every real token, before capacity dropping) and T the
real tokens, both summed over *every micro-batch of the current optimizer step so far* (gradient
accumulation) and *every data-parallel rank* (an all-reduce per training forward when
torch.distributed is initialised). So micro-batch j of a step uses the counts of micro-batches
1..j (a forward cannot see later ones; Megatron-Core accumulates the same way), and the last
micro-batch's f is the whole global batch's. At the balance optimum the loss is 1, as Switch's.

Why: a micro-batch of a few sequences, often from one domain, is pushed by the micro-batch loss to
spread those tokens over all experts — which forbids domain specialisation. Balancing the global
batch (thousands of sequences) leaves each micro-batch free to prefer the experts of its domain
(Qiu et al.: better perplexity and visibly specialised experts).

Gradient: f is a constant, the gradient flows through the local P only. Data-parallel training
averages the ranks' gradients; with equal real tokens per rank that is the gradient of
α · E · Σ_e f_e · P_e over the concatenated global batch, i.e. what one process would compute
(tests/test_megatron_routers.py checks this with 2 gloo processes).

State: the step's running c and T (plain attributes, not checkpointed: a step is never split by a
checkpoint), reset by `on_optimizer_step` (RouterStepCallback, after every optimizer step and at
train begin) and `on_skipped_step`. The forward that gradient checkpointing recomputes in backward
reuses the f of the micro-batch's forward (no second all-reduce, no double count). Evaluation
forwards use their own batch's f (the plain Switch loss, nothing accumulated or communicated).

Logged: diagnostics["global_load_balancing_loss"] (unscaled), aux_losses["global_load_balancing"]
(α · L when α > 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spectra.config import AuxLossRouterConfig
from spectra.routing.base import RoutingInputs, register_router
from spectra.routing.step_stats import all_reduce_sum, in_backward
from spectra.routing.switch import AuxLossRouter


@register_router("global_aux")
class GlobalAuxRouter(AuxLossRouter):
    """Token-choice gate with the global-batch balance loss (module docstring)."""

    config_class = AuxLossRouterConfig
    balance_loss_name = "global_load_balancing"

    def __init__(self, config: AuxLossRouterConfig, hidden_size: int, num_experts: int):
        super().__init__(config, hidden_size, num_experts)
        self._step_counts: torch.Tensor | None = None  # [E + 1]: c_e, then k·T, this step so far
        self._last_f: torch.Tensor | None = None  # [E] f of the latest training forward

    def balance_loss(self, probs: torch.Tensor, expert_index: torch.Tensor, valid: torch.Tensor,
                     inputs: RoutingInputs) -> torch.Tensor:
        num_experts, k = probs.shape[-1], expert_index.shape[-1]
        vmask = valid.unsqueeze(-1)
        n_valid = valid.sum()
        p_mean = torch.where(vmask, probs, 0.0).sum(0) / n_valid.clamp_min(1)  # [E], local, differentiable
        chosen = F.one_hot(expert_index, num_experts).sum(1)  # [N, E]
        counts = torch.where(vmask, chosen, 0).sum(0).float()  # [E]
        local = torch.cat([counts, (n_valid * k).float().reshape(1)])  # [E + 1]
        if not self.training:
            f = local[:-1] / local[-1].clamp_min(1)
        elif in_backward() and self._last_f is not None:
            f = self._last_f  # a checkpointed forward's recompute: the same micro-batch again
        else:
            summed = all_reduce_sum(local)  # a collective in every training forward of every rank
            self._step_counts = summed if self._step_counts is None else self._step_counts + summed
            f = self._step_counts[:-1] / self._step_counts[-1].clamp_min(1)
            self._last_f = f
        return num_experts * (f.to(p_mean.dtype) * p_mean).sum()

    def on_optimizer_step(self, step: int) -> None:
        """A new optimizer step starts a new global batch."""
        self._step_counts = self._last_f = None

    def on_skipped_step(self) -> None:
        self._step_counts = self._last_f = None
