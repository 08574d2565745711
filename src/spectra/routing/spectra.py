"""The SPECTRA router (METHOD.md §2-3): GRU routing state, expression projector, OSR cost,
Sinkhorn plan and quota-constrained top-k selection.

Per MoE layer, for N = B·S token positions (padding masked by `valid`):

    h      = GRU routing state                         [B, S, Dh]   (router.recurrence)
    r      = head(h)  -> E routing vectors             [N, E, D]
    p      = P x      -> E expression vectors          [N, E, D]    (router.use_expression)
    s      = cos(r_e, p_e)                             [N, E]
    M, G   = batch-mean expert directions, M Mᵀ        [E, D], [E, E]
    C      = OSR cost(s, G)                            [N, E]
    train: Q = Sinkhorn(C) (rows 1, columns N/E); experts = quota-top-k(Q); w = Q renormalised
    eval:  experts = top-k(−C) per token; w = softmax(−C/ε) renormalised   (causal, batch-free)

Recurrence (router.recurrence):
- token_and_depth: h^l_t = GRU([x^l_t ; h^{l-1}_t], h^l_{t-1}) — causal over tokens, with the
  previous MoE layer's state at the same token as extra input. Resets to 0 at document starts,
  carried unchanged through padding, continues from `cached_state` in incremental decoding.
- depth: h^l_t = GRUCell(x^l_t, h^{l-1}_t), per token (no token recurrence).
- none (-GRU ablation): r = head(x), no state.

State cell (router.state_cell): `gru` (default) is the paper's GRU above. `mingru` swaps it for
the minimal GRU (routing/min_gru.py; Feng et al. 2024): z = σ(W_z u), h̃ = W_h u,
h' = (1 − z) ⊙ h + z ⊙ h̃ with gates from the same input u ([x^l_t ; h^{l-1}_t], or x^l_t for
depth), so the token recurrence is a linear scan computed in ~2√S steps instead of S; same state
size, resets, padding carry and decoding cache. A different (cheaper) routing state, not the
paper's; no effect with recurrence=none.

Implementation of the token recurrence (routing/gru.py): one `nn.GRU` call (cuDNN on GPU).
Without padding or mid-row document starts the [B, S] batch goes in directly. Otherwise every
(row, document) segment of real tokens becomes its own sequence of a hand-built
`PackedSequence` (memory O(N)), so resets and padding cost one index permutation and a few host
syncs rather than a Python loop over tokens. On CPU the same forward gets a hand-written
backward (nn.GRU's CPU autograd is per-step overhead at the router's sizes).

Batch dependence: in training the Gram G in the cost is the current batch's (as in the paper),
and Sinkhorn/quota couple the tokens of one rank's micro-batch. At inference the cost uses a
running average of M (buffer `expert_repr_ema`) so routing at position t depends only on
positions ≤ t and never on other rows; `osr.sinkhorn_inference=true` re-enables Sinkhorn (+ quota
when enabled) over the tokens of the current call, which is batch-dependent by design.

Running average: one update per optimizer step, ema ← d · ema + (1 − d) · mean of the step's
micro-batch M's (d = `router.gram_ema_decay`, default 0.99; the first update copies the mean).
Training forwards only collect M; `on_optimizer_step` (the Trainer's RouterStepCallback, after
each optimizer step) folds the collected mean in, as does switching to eval mode in a single
process, so a loop that never calls `on_optimizer_step` still gets a running average. Hence d
means the same per optimizer step whatever `trainer.gradient_accumulation_steps` is, and gradient
checkpointing does not count a micro-batch twice: its recomputed forward runs inside autograd's
backward pass and collects nothing. A step whose mean is not finite (a skipped non-finite step) is not folded in.

Data parallel (torch.distributed initialised, world size > 1): each rank sees its own tokens;
DeepSpeed never syncs buffers (DDP broadcasts rank 0's before each forward, dropping the other
ranks' tokens). So the fold all-reduces the step's M sum and count, and every rank folds the
same mean over all ranks' micro-batches: the buffers stay
identical, and equal to what one process would fold had it run all those micro-batches as
gradient-accumulation steps. A collective must be entered by every rank the same number of
times, so when distributed:
- the fold runs only from `on_optimizer_step`, which RouterStepCallback calls on every rank at
  every step (and at train begin), and it all-reduces even when nothing was collected;
- switching to eval mode does not fold: ranks need not switch together (rank-0-only evaluation or
  generation), and a collective there could hang. The Trainer evaluates after on_step_end, so
  nothing is pending then; anything still pending is folded at the next optimizer step.

Learning the balance into the inference scores (routing/balance_learning.py, both off by default):
- router.balance_distill_coef = γ > 0: training adds γ · KL(π ‖ softmax(−C/ε)) over real tokens,
  π = the plan's rows (balance_distill_target=plan) or uniform over the quota's picks (selected);
  C recomputed from detached inputs (`router_only_cost`), so the term trains the router only.
- router.balance_bias_rate = u > 0: a buffer `expert_bias` b [E] (registered only then, so models
  saved without it still load) shifts the eval selection to top-k(−C + b), never the weights;
  training forwards collect the load of that rule and `on_optimizer_step` moves b by −u · sign
  (load − mean), all-reducing the step's load when distributed (one collective per step, entered
  on every rank, as the fold above). Switching to eval mode never moves b.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from spectra.config import SpectraRouterConfig
from spectra.routing.balance_learning import (
    biased_topk_load,
    distill_kl,
    expert_bias_step,
    plan_target,
    selected_target,
)
from spectra.routing.base import Router, RoutingInputs, RoutingOutput, dispatch_counts_of, register_router
from spectra.routing.gru import token_recurrence
from spectra.routing.min_gru import MinGRU, min_gru_states
from spectra.routing.orthogonality import gram_matrix, newton_schulz, ortho_loss, srip_lambda
from spectra.routing.osr import osr_cost
from spectra.routing.scores import cosine_scores, expert_directions
from spectra.routing.selection import expert_capacity, quota_topk, topk_select
from spectra.routing.sinkhorn import marginal_error, sinkhorn
from spectra.routing.softmax_gate import expert_slots_per_token, routing_entropy
from spectra.routing.step_stats import all_reduce_sum, data_parallel_world, in_backward

__all__ = ["SpectraRouter", "token_recurrence"]


def _xavier_gru_(weight: torch.Tensor, gates: int = 3) -> None:
    """Xavier-uniform init per gate block of a stacked GRU weight [gates·Dh, in]."""
    for w in weight.data.chunk(gates, dim=0):
        nn.init.xavier_uniform_(w)


@register_router("spectra")
class SpectraRouter(Router):
    """SPECTRA router; see the module docstring. Built as SpectraRouter(config, hidden_size=H, num_experts=E)
    from its typed group (router knobs + osr + quota; `build_router` makes it from the run config)."""

    config_class = SpectraRouterConfig

    def __init__(self, config: SpectraRouterConfig, hidden_size: int, num_experts: int):
        rc = SpectraRouterConfig.of(config).check_for(num_experts)  # k >= 2, k <= E (stated in the group)
        oc, qc = rc.osr, rc.quota
        super().__init__(hidden_size, num_experts, int(rc.top_k))
        h, e = hidden_size, num_experts
        self.dim = d = int(rc.router_dim)
        self.state_size = dh = int(rc.gru_hidden_size)
        self.recurrence = str(rc.recurrence)
        self.recurrent = self.recurrence != "none"
        self.state_cell = str(rc.state_cell)
        if self.state_cell not in ("gru", "mingru"):
            raise ValueError(f"router.state_cell: unknown {self.state_cell!r}; gru | mingru")
        gates = 3
        if self.recurrence != "none" and self.state_cell == "mingru":
            # minGRU (routing/min_gru.py): gates [z ; h̃] from the input only, same input as the GRU's
            self.gru: nn.Module | None = MinGRU(h + dh if self.recurrence == "token_and_depth" else h, dh)
            weights, biases, gates = (self.gru.weight,), (self.gru.bias,), 2
        elif self.recurrence == "token_and_depth":
            self.gru = nn.GRU(h + dh, dh, batch_first=True)
            weights = (self.gru.weight_ih_l0, self.gru.weight_hh_l0)
            biases = (self.gru.bias_ih_l0, self.gru.bias_hh_l0)
        elif self.recurrence == "depth":
            self.gru = nn.GRUCell(h, dh)
            weights = (self.gru.weight_ih, self.gru.weight_hh)
            biases = (self.gru.bias_ih, self.gru.bias_hh)
        elif self.recurrence == "none":
            self.gru, weights, biases = None, (), ()
        else:
            raise ValueError(f"router.recurrence: unknown {self.recurrence!r}")
        for w in weights:
            _xavier_gru_(w, gates)
        for bias in biases:
            nn.init.zeros_(bias)
        self.head = nn.Linear(dh if self.gru is not None else h, e * d, bias=False)  # -> E routing vectors
        nn.init.xavier_uniform_(self.head.weight)

        if bool(rc.use_expression):
            self.projector: nn.Linear | None = nn.Linear(h, e * d, bias=False)  # P: R^H -> R^{E·D}
            nn.init.orthogonal_(self.projector.weight, gain=0.1)
            self.expert_keys = None
        else:
            # -Expression: no projector; each routing vector is scored against a learned expert key
            # (a linear map to E logits, cosine-normalised so s stays in [-1, 1]).
            self.projector = None
            self.expert_keys = nn.Parameter(torch.empty(e, d))  # [E, D]
            nn.init.orthogonal_(self.expert_keys)
        self.newton_schulz_steps = int(rc.newton_schulz_steps)

        self.entropy_coef = float(rc.entropy_coef)
        self.ortho_enabled = bool(rc.ortho_loss)
        self.srip_enabled = bool(rc.srip_enabled)
        self.so_warmup_steps = int(rc.so_warmup_steps)
        self.so_lambda_max = float(rc.so_lambda_max)
        self.gram_ema_decay = float(rc.gram_ema_decay)

        self.repulsion_weight = float(oc.repulsion_weight)
        self.hinge_weight = float(oc.hinge_weight)
        self.hinge_threshold = float(oc.hinge_threshold)
        self.epsilon = float(oc.epsilon)
        self.iterations = int(oc.iterations)
        self.log_sinkhorn = bool(oc.log_sinkhorn)
        self.sinkhorn_inference = bool(oc.sinkhorn_inference)
        self.quota_enabled = bool(qc.enabled)
        self.capacity_factor = float(qc.capacity_factor)
        self.balance_distill_coef = float(rc.balance_distill_coef)
        self.balance_distill_target = str(rc.balance_distill_target)
        if self.balance_distill_target not in ("plan", "selected"):
            raise ValueError(f"router.balance_distill_target: unknown {self.balance_distill_target!r}; plan | selected")
        self.balance_bias_rate = float(rc.balance_bias_rate)

        # Optimizer steps taken (SRIP warm-up); a buffer so checkpoints carry it across resume.
        self.register_buffer("srip_step", torch.zeros((), dtype=torch.long))
        # Running expert directions for batch-independent inference (see module docstring).
        self.register_buffer("expert_repr_ema", torch.zeros(e, d))
        self.register_buffer("expert_repr_ema_ready", torch.zeros((), dtype=torch.bool))
        # This optimizer step's collected M's: sum [E, D] and count (0-dim), created on first use.
        # Plain attributes, not buffers: transient within a step, so neither checkpoints nor
        # DDP's buffer broadcast should carry them.
        self._ema_sum: torch.Tensor | None = None
        self._ema_count: torch.Tensor | None = None
        # Expert bias on the inference selection (balance_learning.py (b)). Registered only when
        # enabled: with u = 0 the state_dict keys are those of models saved before the knob.
        self.register_buffer("expert_bias", torch.zeros(e) if self.balance_bias_rate > 0 else None)  # [E] or None
        self._bias_load: torch.Tensor | None = None  # [E] this step's inference-rule load (transient)

    # ----------------------------------------------------------------------------- schedules
    def on_optimizer_step(self, step: int) -> None:
        """After an optimizer step: fold the step's M's into the running Gram, record the step
        (it drives the SRIP warm-up of λ_ortho)."""
        self.fold_expert_repr()
        self.fold_expert_bias()
        self.srip_step.fill_(int(step))

    def on_skipped_step(self) -> None:
        """A skipped optimizer step contributes nothing to the running Gram or the expert bias."""
        self._ema_sum = self._ema_count = None
        self._bias_load = None

    @torch.no_grad()
    def fold_expert_bias(self) -> None:
        """b ← b − u · sign(c − mean c), c = the step's inference-rule load (balance_learning.py
        (b)); summed over ranks when distributed (an all_reduce entered on every rank, with zeros
        when nothing was collected). No-op when the bias is off."""
        if self.expert_bias is None:
            return
        load, self._bias_load = self._bias_load, None
        if data_parallel_world() > 1:
            packed = load if load is not None else torch.zeros(self.num_experts, dtype=torch.float32, device=self.expert_bias.device)
            load = all_reduce_sum(packed)
        if load is not None:
            expert_bias_step(self.expert_bias, load, self.balance_bias_rate)

    def train(self, mode: bool = True):
        """Switching to eval folds what training collected (no optimizer step may have followed);
        not when distributed, where only `on_optimizer_step` folds (see the module docstring)."""
        if not mode and data_parallel_world() == 1:
            self.fold_expert_repr()
        return super().train(mode)

    @torch.no_grad()
    def collect_expert_repr(self, m: torch.Tensor) -> None:
        """Add a training micro-batch's M [E, D] to this step's running-Gram update."""
        md = m.detach().to(self.expert_repr_ema.dtype)
        if self._ema_sum is None:
            self._ema_sum, self._ema_count = torch.zeros_like(md), md.new_zeros(())
        self._ema_sum += md
        self._ema_count += 1

    @torch.no_grad()
    def _step_sum_and_count(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This step's collected M sum [E, D] and count (0-dim), summed over all data-parallel
        ranks when distributed (one all_reduce, entered on every rank even with nothing collected:
        zeros then); None when a single process collected nothing."""
        world = data_parallel_world()
        if world == 1:
            return None if self._ema_sum is None else (self._ema_sum, self._ema_count)
        ema = self.expert_repr_ema
        # [E·D + 1]: the sum, then the count; at least fp32 so a bf16 buffer's count stays exact
        packed = torch.zeros(ema.numel() + 1, dtype=torch.promote_types(ema.dtype, torch.float32), device=ema.device)
        if self._ema_sum is not None:
            packed[:-1] = self._ema_sum.reshape(-1)
            packed[-1] = self._ema_count
        packed = all_reduce_sum(packed)
        return packed[:-1].reshape_as(ema), packed[-1]

    @torch.no_grad()
    def fold_expert_repr(self) -> None:
        """ema ← d · ema + (1 − d) · mean of the collected M's (copy on the first update); no host
        sync. Distributed: the mean over every rank's M's (a collective: see the module docstring)."""
        summed = self._step_sum_and_count()
        self._ema_sum = self._ema_count = None
        if summed is None:
            return
        total, count = summed
        mean = total / count.clamp_min(1)  # [E, D]
        # 0-dim; a non-finite step is dropped (on every rank alike: a NaN on one rank is in the sum)
        ok = (count > 0) & torch.isfinite(mean).all()
        blended = torch.add(self.expert_repr_ema * self.gram_ema_decay, mean, alpha=1.0 - self.gram_ema_decay)
        new = torch.where(self.expert_repr_ema_ready, blended, mean)  # `where`, not `if flag` (a host sync)
        self.expert_repr_ema.copy_(torch.where(ok, new, self.expert_repr_ema))
        self.expert_repr_ema_ready.logical_or_(ok)

    def router_only_cost(self, x: torch.Tensor, inputs: RoutingInputs, valid: torch.Tensor) -> torch.Tensor:
        """C [N, E] recomputed from detached inputs (hidden states x [B, S, H], the previous MoE
        layer's state, the decoding cache) with the batch Gram: the same values as the forward's
        training cost, but its gradient reaches this router's parameters only, never the backbone
        (nor the previous layer's router through the depth recurrence). The distillation term uses
        it: in the 200-step demo, letting that term's gradient into the hidden states raised the
        eval loss (γ = 0.1: 6.25 vs 5.98 without distillation), training the router alone did not
        (5.77). Costs one more router forward per training step while the term is on."""
        b, s_len, h = x.shape
        n = b * s_len
        xd = x.detach()
        detached = replace(
            inputs,
            prev_state=None if inputs.prev_state is None else inputs.prev_state.detach(),
            cached_state=None if inputs.cached_state is None else inputs.cached_state.detach(),
        )
        state = self.routing_state(xd, detached)  # [B, S, Dh] or None
        feats = (state if state is not None else xd).reshape(n, -1)  # [N, Dh or H]
        s, m = self.scores(xd.reshape(n, h), feats, valid)  # [N, E], [E, D]
        g = gram_matrix(m)  # the batch's, as the training cost (not collected again for the running Gram)
        return osr_cost(s, g, self.repulsion_weight, self.hinge_weight, self.hinge_threshold)

    @torch.no_grad()
    def _collect_bias_load(self, load: torch.Tensor) -> None:
        """Add a training micro-batch's inference-rule load [E] to this step's bias update."""
        self._bias_load = load if self._bias_load is None else self._bias_load + load

    def lambda_ortho(self) -> torch.Tensor:
        """Current λ_ortho: linear 0 → so_lambda_max over so_warmup_steps (if srip_enabled)."""
        return srip_lambda(self.srip_step, self.so_lambda_max, self.so_warmup_steps, self.srip_enabled)

    # ------------------------------------------------------------------------------- pieces
    def routing_state(self, x: torch.Tensor, inputs: RoutingInputs) -> torch.Tensor | None:
        """Routing state [B, S, Dh] (GRU, or minGRU with state_cell=mingru) for hidden states
        x [B, S, H] (None for recurrence=none)."""
        if self.gru is None:
            return None
        b, s, _ = x.shape
        dh = self.state_size
        prev = inputs.prev_state
        if self.recurrence == "depth":
            prev = x.new_zeros(b, s, dh) if prev is None else prev.to(x.dtype)  # [B, S, Dh]
            out = self.gru(x.reshape(b * s, -1), prev.reshape(b * s, dh))  # [N, Dh] (GRUCell or MinGRU step)
            return out.reshape(b, s, dh)
        h0 = inputs.cached_state
        h0 = x.new_zeros(b, dh) if h0 is None else h0.to(x.dtype)  # [B, Dh]
        # The first MoE layer has no previous state: token_recurrence takes the absent trailing
        # columns of [x ; h^{l-1}] as zeros (their matmul work skipped, #23).
        inp = x if prev is None else torch.cat([x, prev.to(x.dtype)], dim=-1)  # [B, S, H] or [B, S, H + Dh]
        if self.state_cell == "mingru":
            return min_gru_states(self.gru, inp, inputs.valid, inputs.doc_start, h0)
        return token_recurrence(self.gru, inp, inputs.valid, inputs.doc_start, h0)

    def projector_weight(self) -> torch.Tensor:
        """P's weight [E·D, H], Newton–Schulz re-orthogonalised when router.newton_schulz_steps > 0."""
        assert self.projector is not None
        return newton_schulz(self.projector.weight, self.newton_schulz_steps)

    def routing_vectors(self, feats: torch.Tensor) -> torch.Tensor:
        """r = head(feats): E unnormalised routing vectors per token, [N, F] -> [N, E, D] fp32."""
        return self.head(feats).reshape(feats.shape[0], self.num_experts, self.dim).float()

    def expression(self, x: torch.Tensor) -> torch.Tensor:
        """p = P x: E unnormalised expression vectors per token, [N, H] -> [N, E, D] fp32."""
        return F.linear(x, self.projector_weight()).reshape(x.shape[0], self.num_experts, self.dim).float()

    def scores(self, x: torch.Tensor, feats: torch.Tensor, valid: torch.Tensor):
        """Cosine scores s [N, E] and expert representations M [E, D].

        x: [N, H] hidden states; feats: [N, F] head input (GRU state or x); valid: [N].
        """
        r = self.routing_vectors(feats)  # [N, E, D]
        if self.projector is not None:
            p = self.expression(x)  # [N, E, D]
            s, p_norm = cosine_scores(r, p)  # [N, E] cos(r_e, p_e), [N, E] ‖p_e‖
            m = expert_directions(p, p_norm, valid)  # [E, D]
        else:
            m = F.normalize(self.expert_keys.float(), dim=-1)  # [E, D]
            s, _ = cosine_scores(r, m.unsqueeze(0).expand_as(r))  # [N, E] cos(r_e, key_e)
        return s, m

    def cost_gram(self, m: torch.Tensor) -> torch.Tensor:
        """Gram used inside the cost: the batch's in training; a running one at inference."""
        if self.projector is None:
            return gram_matrix(m)  # static keys: batch-independent already
        if self.training:
            if not in_backward():  # a checkpointed forward's recompute is the same micro-batch again
                self.collect_expert_repr(m)
            return gram_matrix(m)
        # Never trained: zero Gram = no repulsion, rather than a Gram borrowed from this batch.
        return gram_matrix(F.normalize(self.expert_repr_ema.float(), dim=-1)).detach()

    # ------------------------------------------------------------------------------ forward
    def forward(self, inputs: RoutingInputs) -> RoutingOutput:
        hidden = inputs.hidden
        b, s_len, h = hidden.shape
        n, e, k = b * s_len, self.num_experts, self.top_k
        valid = inputs.flat_valid.to(torch.bool)  # [N]
        x = hidden.to(self.head.weight.dtype)  # [B, S, H]
        state = self.routing_state(x, inputs)  # [B, S, Dh] or None
        feats = (state if state is not None else x).reshape(n, -1)  # [N, Dh or H]
        s, m = self.scores(x.reshape(n, h), feats, valid)  # [N, E], [E, D]
        g = gram_matrix(m)  # [E, E] this batch's Gram (losses, metrics)
        cost = osr_cost(s, self.cost_gram(m), self.repulsion_weight, self.hinge_weight, self.hinge_threshold)  # [N, E]
        vmask = valid.unsqueeze(1)  # [N, 1]
        diag: dict[str, torch.Tensor] = {}
        aux: dict[str, torch.Tensor] = {}
        load_before: torch.Tensor | None = None  # [E] pre-quota load (quota branch only)

        if not self.training and self.sinkhorn_inference and inputs.past_length > 0:
            # One new token per row per call: a Sinkhorn plan over B tokens (uniform for B = 1)
            # would decide the route, not the cost, so cached decoding could never match the
            # full forward. Refuse instead of routing by an arbitrary plan.
            raise ValueError(
                "osr.sinkhorn_inference=true cannot route incremental decoding with a KV cache: each call "
                "sees one token per sequence, so the Sinkhorn plan ignores the cost. Generate with "
                "use_cache=False, or set osr.sinkhorn_inference=false (per-token top-k of -C)."
            )
        if self.training or self.sinkhorn_inference:
            probs, log_q = sinkhorn(
                cost, self.epsilon, self.iterations, valid, log_domain=self.log_sinkhorn, return_log=True
            )  # [N, E] each
            log_q = log_q.masked_fill(~vmask, 0.0)  # padding rows: finite, never used
            if self.quota_enabled:
                n_valid = int(valid.sum())  # host sync: the capacity is an integer
                cap = expert_capacity(n_valid, k, e, self.capacity_factor)
                res = quota_topk(log_q, k, cap, valid, n_valid=n_valid)
                index = res.index  # [N, k]
                with torch.no_grad():  # what plain top-k of the same plan would have dispatched
                    load_before = dispatch_counts_of(topk_select(log_q, k), vmask.expand(n, k), e)  # [E]
                diag["quota_capacity"] = cost.new_full((), float(cap))  # a fill, not a host-to-device copy
                diag["quota_swaps"] = cost.new_full((), float(res.swaps))
            else:
                index = topk_select(log_q, k)  # [N, k]
            weight = torch.softmax(log_q.gather(1, index), dim=-1)  # [N, k] = Q_sel / Σ Q_sel
            diag["sinkhorn_marginal_error"] = marginal_error(probs.detach(), valid)
            if self.training and self.balance_distill_coef > 0:  # balance_learning.py (a)
                target = (plan_target(log_q, valid) if self.balance_distill_target == "plan"
                          else selected_target(index, e, valid))  # [N, E] detached
                # −C recomputed from detached inputs: the term trains this router only (see below)
                l_distill = distill_kl(-self.router_only_cost(x, inputs, valid), self.epsilon, target, valid)
                aux["balance_distill"] = self.balance_distill_coef * l_distill
                diag["balance_distill"] = l_distill.detach()
        else:
            z = -cost / self.epsilon  # [N, E]
            probs = torch.softmax(z, dim=-1)  # [N, E]
            if self.expert_bias is None:
                index = topk_select(z, k)  # [N, k] per token, causal and batch-independent
            else:  # selection only: top-k(−C + b); the weights below stay softmax(−C/ε)
                index = topk_select(-cost.detach() + self.expert_bias.float(), k)
            weight = torch.softmax(z.gather(1, index), dim=-1)  # [N, k]
        weight = weight * vmask  # [N, k], 0 at padding

        ent = routing_entropy(probs, valid)
        if self.entropy_coef != 0.0:
            # Positive coefficient sharpens: minimising +coef · H lowers the routing entropy.
            aux["entropy"] = self.entropy_coef * ent
        l_ortho = ortho_loss(g)
        lam = self.lambda_ortho()
        if self.ortho_enabled:
            aux["ortho"] = lam * l_ortho
        diag["routing_entropy"] = ent.detach()
        diag["ortho_loss"] = l_ortho.detach()
        diag["lambda_ortho"] = lam.detach()
        diag["max_abs_cost"] = cost.detach().abs().masked_fill(~vmask, 0.0).max()

        if self.expert_bias is not None:
            if self.training and not in_backward():  # what eval would route: b's error signal
                self._collect_bias_load(biased_topk_load(-cost, self.expert_bias, k, valid))
            diag["expert_bias_absmax"] = self.expert_bias.detach().abs().max().float()

        served = vmask.expand(n, k)  # [N, k] quota never drops: every real assignment is served
        diag["expert_slots_per_token"] = expert_slots_per_token(served, valid)  # = k: the compute spent

        return RoutingOutput(
            expert_index=index,
            expert_weight=weight,
            probs=probs,
            dropped=torch.zeros(n, k, dtype=torch.bool, device=index.device),
            valid=valid,
            dispatch_counts=dispatch_counts_of(index, served, e),
            aux_losses=aux,
            diagnostics=diag,
            logits=-cost,
            scores=s,
            gram=g,
            expert_repr=m,
            state=state,
            load_before_quota=load_before,
        )
