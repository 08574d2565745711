"""Entropic optimal transport between tokens and experts (METHOD.md §2 step 6).

Given a cost C [N, E] (low cost = good match), Sinkhorn finds the plan

    Q = diag(u) · exp(-C / ε) · diag(v)          [N, E]

whose rows sum to 1 (every real token routes one unit of mass) and whose columns sum to N/E
(every expert receives the same share), N = number of *real* tokens. Padding rows take no part:
they get Q = 0 and do not count in N.

The iteration starts from the row-normalised kernel, Q⁰ = softmax(-C/ε) per row, then alternates
    columns:  Q ← Q · (N/E) / colsum(Q)
    rows:     Q ← Q / rowsum(Q)
`iterations` times, so the returned plan has exact row sums 1 and approximate column sums N/E
(`marginal_error` measures how approximate). ε divides the cost exactly once.

Two numerically different, mathematically identical implementations:
- `sinkhorn_log`: everything in log space with logsumexp; finite for ε = 0.01 and |C| = 1e4
  (exponents of 1e6), bf16 inputs included.
- `sinkhorn_plain`: multiplies exp-kernels. Because the first step is a row normalisation, the
  kernel may be shifted by its row maximum before `exp` without changing the result (a row
  scaling is absorbed by u), so it cannot overflow; it can still underflow (a whole column of
  zeros) when ε is tiny relative to the cost spread, which is what Sweep B's log/plain axis probes.

Both compute in fp32 whatever the input dtype.

Forbidden pairs: a cost of +inf forbids token t from expert e. Both variants then return
Q_{t,e} = 0 (log Q = -inf) and finite values and gradients everywhere else (the gradient at a
forbidden pair is exactly 0). The plan equals Sinkhorn on the allowed sub-matrix:
- scattered +inf entries: kernel 0 there, the rest of the row and column renormalises around them;
- a column forbidden to every token stays 0, and since the column targets are uniform (they cancel
  in the next row normalisation) the other experts share the tokens as if it did not exist;
- a real token with every expert forbidden has nowhere to send mass: its row is 0 (log Q = -inf),
  like a padding row. It still counts in N, so `marginal_error` reports the imbalance it causes.
A -inf or NaN cost is not a forbidden pair; it propagates as before (an upstream bug to surface).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["sinkhorn", "sinkhorn_log", "sinkhorn_plain", "marginal_error"]

_NEG = -1e30  # stands for log 0 (padding rows, forbidden pairs) inside the log-domain iteration
_TINY = 1e-30  # floor for log Q in the plain variant (fp32 min normal is ~1e-38)


class _Prepared(NamedTuple):
    """What both variants start from (see `_prepare`)."""

    logits: torch.Tensor  # [N, E] fp32, -C/ε shifted to row max 0; _NEG where not live
    live: torch.Tensor  # [N, E] bool: real token and allowed pair (cost < +inf)
    row_live: torch.Tensor  # [N, 1] bool: real token with at least one allowed expert
    col_live: torch.Tensor  # [1, E] bool: expert allowed for at least one live token
    log_target: torch.Tensor  # 0-dim: log(N/E), N = real tokens


def _prepare(cost: torch.Tensor, epsilon: float, valid: torch.Tensor | None) -> _Prepared:
    """fp32 logits -C/ε with padding rows and forbidden pairs (cost = +inf) masked."""
    if cost.dim() != 2:
        raise ValueError(f"cost must be [N, E], got shape {tuple(cost.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    n, e = cost.shape
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=cost.device)
    valid = valid.reshape(-1).to(torch.bool)  # [N]
    c = cost.float()  # [N, E]
    live = valid.unsqueeze(1) & ~torch.isposinf(c)  # [N, E]
    # ε applied here and nowhere else. Not-live entries get a finite _NEG *before* the row max, so
    # a fully forbidden row shifts by a finite amount (−inf − −inf would be NaN), and `where`
    # (not arithmetic on inf) keeps their gradient an exact 0.
    logits = torch.where(live, -c / epsilon, _NEG)  # [N, E]
    # Row-max shift: exact (the first step is a row normalisation) and keeps exp() in range.
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()  # [N, E], max 0 per live row
    logits = logits.masked_fill(~live, _NEG)
    row_live = live.any(dim=1, keepdim=True)  # [N, 1]
    col_live = live.any(dim=0, keepdim=True)  # [1, E]
    n_valid = valid.sum().clamp_min(1).to(torch.float32)  # scalar tensor, no host sync
    return _Prepared(logits, live, row_live, col_live, torch.log(n_valid / e))


def _safe(den: torch.Tensor) -> torch.Tensor:
    """Denominator with exact zeros (padding rows, underflowed columns) replaced by 1.

    The numerators there are 0 as well, so the quotient stays 0; a clamp to a tiny floor would
    instead square to 0 in the division's backward (0/0 = NaN gradients).
    """
    return torch.where(den > 0, den, torch.ones_like(den))


def sinkhorn_log(
    cost: torch.Tensor,
    epsilon: float,
    iterations: int,
    valid: torch.Tensor | None = None,
    *,
    return_log: bool = False,
):
    """Log-domain Sinkhorn plan for a cost matrix.

    cost: [N, E] (any float dtype; computed in fp32; +inf = forbidden pair); valid: [N] bool or
    None (all real). Q ∝ exp(-cost/ε), rows sum to 1, columns to N_valid/E after `iterations`
    column+row sweeps. Returns Q [N, E] (fp32, zero at padding rows and forbidden pairs), or
    (Q, log Q) when return_log (log Q is -inf there). Differentiable w.r.t. cost; no NaN in the
    forward or backward pass, forbidden pairs included (see the module docstring).
    """
    p = _prepare(cost, epsilon, valid)
    # Not-live entries hold a huge *finite* negative: they vanish from every logsumexp, and unlike
    # -inf they keep logsumexp's backward free of exp(-inf - -inf) = NaN. A row or column with no
    # live entry would be normalised back to finite values (its logsumexp is ≈ _NEG too), so its
    # normaliser is replaced by 0: _NEG − 0 stays _NEG (fp32 absorbs any |log| ≪ 1e22).
    log_q = p.logits  # [N, E]
    log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True).masked_fill(~p.row_live, 0.0)  # rows -> 1
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True).masked_fill(~p.col_live, 0.0) + p.log_target  # cols
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True).masked_fill(~p.row_live, 0.0)  # rows -> 1
    log_q = log_q.masked_fill(~p.live, float("-inf"))  # [N, E]
    q = log_q.exp()  # [N, E]; 0 at padding and forbidden pairs
    return (q, log_q) if return_log else q


def sinkhorn_plain(
    cost: torch.Tensor,
    epsilon: float,
    iterations: int,
    valid: torch.Tensor | None = None,
    *,
    return_log: bool = False,
):
    """Sinkhorn in the plain (exp) domain; same contract as `sinkhorn_log`.

    Stable against overflow (row-max shift, see module docstring); a column that underflows to
    all zeros stays zero (visible in `marginal_error`) instead of producing 0/0. log Q, when
    requested, is log(max(Q, 1e-30)) on live entries and -inf at padding and forbidden pairs.
    """
    p = _prepare(cost, epsilon, valid)
    live = p.live.to(torch.float32)  # [N, E]
    target = p.log_target.exp()  # N/E
    q = p.logits.exp() * live  # [N, E], each live row has max entry 1
    q = q / _safe(q.sum(dim=1, keepdim=True))  # rows -> 1
    for _ in range(iterations):
        q = q * (target / _safe(q.sum(dim=0, keepdim=True)))  # columns -> N/E
        q = q / _safe(q.sum(dim=1, keepdim=True))  # rows -> 1
    q = q * live
    if not return_log:
        return q
    log_q = torch.log(q.clamp_min(_TINY)).masked_fill(~p.live, float("-inf"))  # [N, E]
    return q, log_q


def sinkhorn(
    cost: torch.Tensor,
    epsilon: float,
    iterations: int,
    valid: torch.Tensor | None = None,
    *,
    log_domain: bool = True,
    return_log: bool = False,
):
    """Dispatch to `sinkhorn_log` (osr.log_sinkhorn=true) or `sinkhorn_plain`."""
    fn = sinkhorn_log if log_domain else sinkhorn_plain
    return fn(cost, epsilon, iterations, valid, return_log=return_log)


def marginal_error(q: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Largest relative deviation of a plan's column sums from N/E (diagnostic).

    q: [N, E] plan; valid: [N] bool. Returns max_e |Σ_t Q_{t,e} − N/E| / (N/E) as a 0-dim tensor
    (0 = perfectly balanced). Rows are exact by construction, so only columns are measured.
    """
    n, e = q.shape
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=q.device)
    w = valid.reshape(-1, 1).to(torch.float32)  # [N, 1]
    target = w.sum().clamp_min(1.0) / e  # N/E
    col = (q.float() * w).sum(dim=0)  # [E]
    return ((col - target).abs().max() / target).detach()

