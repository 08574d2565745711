"""Learning SPECTRA's balanced training plan into the scores it routes with at inference (#21).

Why. In training SPECTRA selects from the Sinkhorn plan Q under a hard quota, so every expert
gets ≈ N·k/E tokens whatever the cost C says. At inference it routes each token alone by top-k of
−C (METHOD.md §2.9): no plan, no quota. Nothing in the paper's loss asks −C itself to be
balanced, so the balance the quota enforces need not survive into inference (the 200-step demo:
training load CV ≈ 0.3, inference load CV ≈ 1.0, MaxVio ≈ 2, one expert in eight collapsed). Two
knobs, both off by default (0 = the paper's method, bit for bit), teach the router's own scores
the balance. Demo, same code, seed 0 (inference load CV / MaxVio / eval loss): off 0.96 / 2.04 /
5.96; (a) plan γ = 0.1: 0.21 / 0.44 / 5.75; (a) plan γ = 0.01: 0.23 / 0.45 / 5.85; (a) selected
γ = 0.01: 0.20 / 0.28 / 5.90; (b) u = 1e-2: 0.11 / 0.20 / 5.94; (a) γ = 0.01 + (b): 0.14 / 0.25 /
5.85. Seed-to-seed and code-drift spread of the baseline: ≈ 0.05 in eval loss, ≈ 0.15 in CV.

(a) Distillation — router.balance_distill_coef = γ > 0, router.balance_distill_target.

    The inference distribution of a real token t is  p_t = softmax(−C_t / ε)  [E] (the one the
    eval path takes its top-k and its combine weights from; ε = osr.epsilon). Its target π_t [E]
    comes from the same training forward, detached (no gradient into the plan or the quota):

        plan:      π_t = Q_t / Σ_e Q_{t,e}          the Sinkhorn plan's row, normalised to 1
        selected:  π_t = 1/k on S_t, 0 elsewhere    S_t = the k experts the quota selected

    The loss is the mean over the N_v real tokens (padding excluded) of KL(π_t ‖ p_t):

        L_distill = (1/N_v) Σ_t Σ_e π_{t,e} (log π_{t,e} − log p_{t,e})        (0 log 0 = 0)

    and γ · L_distill joins the training loss (RoutingOutput.aux_losses["balance_distill"]; the
    unscaled L_distill is diagnostics["balance_distill"]). KL and the cross-entropy −Σ π log p
    differ by the target's entropy, a constant of the parameters, so the gradient is the
    cross-entropy's: ∂L/∂(−C_{t,e}/ε) = (p_{t,e} − π_{t,e}) / N_v. It reaches the router's
    parameters through C = OSR(s, G): the cosine scores s (GRU, head, projector) and, in training,
    the batch Gram G — and only them: the router evaluates C for this term a second time on
    detached inputs (hidden states, the previous MoE layer's routing state;
    SpectraRouter.router_only_cost), so the term never reshapes the backbone's hidden states to
    suit the router. In the 200-step demo with γ = 0.1 the gradient into the hidden states cost
    0.27 in eval loss (6.25 vs 5.98 without the term); the router-only term improved it (5.77).
    Price: one more router forward per training step while γ > 0. KL rather than CE so that the
    logged value is 0 when p matches the plan.
    `plan` asks p to copy the plan's balanced soft assignment (knowledge distillation, Hinton et
    al. 2015, of the balanced OT plan into the per-token softmax); `selected` asks top-k of p to
    be the quota's hard choice (a token-level imitation of the balanced assignment, as BASE layers,
    Lewis et al. 2021, arXiv 2103.16716, train each token toward its balanced-assignment expert).
    Caveat: in training C uses the batch Gram, at inference the running one (expert_repr_ema);
    the two agree once the running average has settled, so the loss distils into the cost the
    eval path will see up to that drift.

(b) Expert bias — router.balance_bias_rate = u > 0 (auxiliary-loss-free balancing, Wang et al.
    2024, arXiv 2408.15664, as in DeepSeek-V3 and Megatron-Core's moe_router_enable_expert_bias).

    A persistent buffer b [E] (`expert_bias`, in cost units) shifts the *selection* at inference:

        S_t = top-k_e (−C_{t,e} + b_e)          w_t = softmax(−C_{t,S_t} / ε)   (b not in w)

    b only decides which experts a token goes to; the combine weights and `probs` stay those of
    softmax(−C/ε), so b carries no gradient and never scales an expert's output. Learning b: every
    training forward also computes, without gradient, the load the *inference* rule would produce
    on the batch, c_e = #{real t : e ∈ top-k(−C_t + b)}, summed over the step's micro-batches
    (and over data-parallel ranks: one all_reduce per optimizer step, entered on every rank even
    when nothing was collected, as the running Gram's fold). After each optimizer step

        c̄ = Σ_e c_e / E,      b_e ← b_e − u · sign(c_e − c̄)

    (an overloaded expert gets less attractive, an underloaded one more; sign(0) = 0). We feed
    the rule the load of the biased inference selection, not the quota's overflow
    (load_before_quota − capacity): the plan Q is already column-balanced by Sinkhorn, so its
    top-k overflow says little about top-k of −C, which is the routing b must correct; the
    inference-rule load closes the loop exactly as Wang et al. do (their load is that of the
    biased top-k itself).

    The bias does not enter training's Sinkhorn or quota. Training is balanced already, and a
    per-expert shift of the cost is (at convergence exactly) absorbed by Sinkhorn's column
    normalisation: Q ∝ diag(a) exp(−C/ε) diag(β) is unchanged by C − b·1ᵀ up to β. It would also
    change the plan the training combine weights are read from. With osr.sinkhorn_inference=true
    the eval path balances by its own Sinkhorn and ignores b too.

    Old checkpoints: b is a buffer registered only when u > 0, so a router built with u = 0 has
    exactly the state_dict keys it had before this feature and loads models saved before it
    (spectra.moe.load_weights is strict). A model trained with u > 0 records u in its
    `spectra_moe` config, so load_moe_model rebuilds the buffer and restores b bit for bit.

What the two have in common. A log-domain plan is log Q_{t,e} = −C_{t,e}/ε + f_t + g_e: it differs
from the inference scores −C/ε only by the row potential f_t (no effect on a token's ranking) and
the column potential g_e, one number per expert. So top-k of the plan is top-k of (−C + ε g): the
per-expert shift that Sinkhorn applies in training is exactly what inference lacks.
`plan_column_potential` recovers ε (g − mean g) from a batch. (b) learns such a shift by
feedback on the inference load; (a) asks the scores themselves to absorb it (and, with the plan
target, the plan's softness too). Copying the plan's averaged potential into b (measured offline
on the demo model: inference load CV 1.12 → 0.71) gives the plan's pre-quota balance only; the
sign rule, which targets the inference load itself, got further (→ 0.11 at u = 1e-2).

Other options looked at (not implemented): temperature alone cannot balance (it does not change
the per-token ranking); running Sinkhorn at inference (osr.sinkhorn_inference) balances but is
batch-dependent; BASE-style balanced assignment at inference needs the whole batch, like Expert
Choice. (a) and (b) are the two that keep inference causal and per-token.
"""

from __future__ import annotations

import torch

__all__ = [
    "biased_topk_load",
    "distill_kl",
    "expert_bias_step",
    "plan_target",
    "selected_target",
]


def plan_target(log_q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """π = the plan's rows renormalised to sum 1, detached: [N, E] from log Q [N, E] (−inf allowed
    at forbidden pairs); padding rows (valid [N] False) are 0."""
    lq = log_q.detach().float()
    pi = torch.softmax(lq, dim=-1)  # exp(log Q) / Σ_e exp(log Q) = Q_t / Σ_e Q_{t,e}
    return pi.masked_fill(~valid.reshape(-1, 1).bool(), 0.0)


def selected_target(index: torch.Tensor, num_experts: int, valid: torch.Tensor) -> torch.Tensor:
    """π = uniform 1/k over each token's selected experts index [N, k], 0 elsewhere: [N, E]
    detached; padding rows are 0."""
    n, k = index.shape
    pi = torch.zeros(n, num_experts, dtype=torch.float32, device=index.device)
    pi.scatter_(1, index.detach(), 1.0 / k)
    return pi.masked_fill(~valid.reshape(-1, 1).bool(), 0.0)


def distill_kl(neg_cost: torch.Tensor, epsilon: float, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of KL(π_t ‖ softmax(−C_t/ε)), a 0-dim fp32 tensor with gradient
    through neg_cost = −C [N, E]; target π [N, E] (rows sum to 1 on real tokens); valid [N]."""
    vmask = valid.reshape(-1).bool()
    log_p = torch.log_softmax(neg_cost.float() / epsilon, dim=-1)  # [N, E]
    pi = target.detach().float()
    # π (log π − log p) with 0 log 0 = 0, and 0 · (−inf) = 0 where π = 0 (a forbidden pair)
    log_pi = torch.log(pi.clamp_min(torch.finfo(pi.dtype).tiny))
    terms = torch.where(pi > 0, pi * (log_pi - log_p), torch.zeros_like(log_p))  # [N, E]
    per_token = terms.sum(dim=-1).masked_fill(~vmask, 0.0)  # [N]
    return per_token.sum() / vmask.sum().clamp_min(1)


@torch.no_grad()
def biased_topk_load(neg_cost: torch.Tensor, bias: torch.Tensor, k: int, valid: torch.Tensor) -> torch.Tensor:
    """c_e = real tokens whose top-k of (−C + b) contains e: [E] fp32 from −C [N, E], b [E]."""
    sel = (neg_cost.detach().float() + bias.float()).topk(k, dim=-1).indices  # [N, k]
    served = valid.reshape(-1, 1).bool().expand_as(sel)
    load = torch.zeros(neg_cost.shape[-1], dtype=torch.float32, device=neg_cost.device)
    return load.index_add_(0, sel.reshape(-1), served.reshape(-1).float())


@torch.no_grad()
def expert_bias_step(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """b ← b − u · sign(c − mean(c)) in place (Wang et al. 2024's sign rule); bias [E], load [E].
    A load that is not finite, or all zero (nothing routed), leaves b unchanged."""
    load = load.to(torch.float32)
    ok = torch.isfinite(load).all() & (load.sum() > 0)  # 0-dim, no host sync
    step = torch.sign(load - load.mean()).to(bias.dtype) * rate
    bias.sub_(torch.where(ok, step, torch.zeros_like(step)))


@torch.no_grad()
def plan_column_potential(
    log_q: torch.Tensor, neg_cost: torch.Tensor, epsilon: float, valid: torch.Tensor
) -> torch.Tensor:
    """The Sinkhorn plan's per-expert log-scaling, in cost units, centred: [E] fp32.

    A log-domain plan is log Q_{t,e} = −C_{t,e}/ε + f_t + g_e (row and column potentials), so
    R = log Q + C/ε = f_t + g_e and g_e − mean(g) = mean over real tokens of R_{t,e} minus its
    grand mean. Returns ε (g − mean g): with b = that vector, top-k(−C_t + b) = top-k(log Q_t)
    for every token of this batch, i.e. the plan's own (pre-quota) choice. Entries that are not
    finite (forbidden pairs) are left out of the means.
    """
    vmask = valid.reshape(-1).bool()
    r = (log_q.detach().float() - neg_cost.detach().float() / epsilon)[vmask]  # [Nv, E] = f_t + g_e
    ok = torch.isfinite(r)
    r = torch.where(ok, r, torch.zeros_like(r))
    f = r.sum(dim=1) / ok.sum(dim=1).clamp_min(1)  # [Nv] ≈ f_t + mean g
    g = ((r - f.unsqueeze(1)) * ok).sum(dim=0) / ok.sum(dim=0).clamp_min(1)  # [E] g_e − mean g
    return epsilon * (g - g.mean())
