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
"""

from __future__ import annotations

import torch

__all__ = ["sinkhorn", "sinkhorn_log", "sinkhorn_plain", "marginal_error"]

_NEG = -1e30  # stands for log 0 at padding rows inside the log-domain iteration
_TINY = 1e-30  # floor for log Q in the plain variant (fp32 min normal is ~1e-38)


def _prepare(cost: torch.Tensor, epsilon: float, valid: torch.Tensor | None):
    """fp32 logits -C/ε with padding rows masked; returns (logits [N, E], valid [N], log(N/E))."""
    if cost.dim() != 2:
        raise ValueError(f"cost must be [N, E], got shape {tuple(cost.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    n, e = cost.shape
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=cost.device)
    valid = valid.reshape(-1).to(torch.bool)  # [N]
    logits = -cost.float() / epsilon  # [N, E]; ε applied here and nowhere else
    # Row-max shift: exact (the first step is a row normalisation) and keeps exp() in range.
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()  # [N, E], max 0 per row
    n_valid = valid.sum().clamp_min(1).to(torch.float32)  # scalar tensor, no host sync
    log_col_target = torch.log(n_valid / e)  # log(N/E)
    return logits, valid, log_col_target


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

    cost: [N, E] (any float dtype; computed in fp32); valid: [N] bool or None (all real).
    Q ∝ exp(-cost/ε), rows sum to 1, columns to N_valid/E after `iterations` column+row sweeps.
    Returns Q [N, E] (fp32, zero rows at padding), or (Q, log Q) when return_log (log Q is
    -inf at padding rows). Differentiable w.r.t. cost.
    """
    logits, valid, log_target = _prepare(cost, epsilon, valid)
    vmask = valid.unsqueeze(1)  # [N, 1]
    # Padding rows hold a huge *finite* negative: they vanish from every column logsumexp, and
    # unlike -inf they keep logsumexp's backward free of exp(-inf - -inf) = NaN.
    log_q = logits.masked_fill(~vmask, _NEG)  # [N, E]
    log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True).masked_fill(~vmask, 0.0)  # rows -> 1
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) + log_target  # columns -> N/E
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True).masked_fill(~vmask, 0.0)  # rows -> 1
    log_q = log_q.masked_fill(~vmask, float("-inf"))  # [N, E]
    q = log_q.exp()  # [N, E]; 0 at padding
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
    requested, is log(max(Q, 1e-30)).
    """
    logits, valid, log_target = _prepare(cost, epsilon, valid)
    vmask = valid.unsqueeze(1).to(torch.float32)  # [N, 1]
    target = log_target.exp()  # N/E
    q = logits.exp() * vmask  # [N, E], each valid row has max entry 1
    q = q / _safe(q.sum(dim=1, keepdim=True))  # rows -> 1
    for _ in range(iterations):
        q = q * (target / _safe(q.sum(dim=0, keepdim=True)))  # columns -> N/E
        q = q / _safe(q.sum(dim=1, keepdim=True))  # rows -> 1
    q = q * vmask
    if not return_log:
        return q
    log_q = torch.log(q.clamp_min(_TINY)).masked_fill(vmask == 0, float("-inf"))  # [N, E]
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

