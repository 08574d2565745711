"""Sinkhorn plans (routing/sinkhorn.py) against independent references.

References: a float64 numpy Sinkhorn written here (same documented schedule: row-normalise, then
`iterations` × (columns, rows)), the 2×2 closed form of the converged plan, marginal sums, and
scale/sign properties that a wrong ε or an inverted sign would break.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from spectra.routing.sinkhorn import marginal_error, sinkhorn, sinkhorn_log, sinkhorn_plain

FNS = [sinkhorn_log, sinkhorn_plain]


def numpy_sinkhorn(cost: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """Textbook Sinkhorn in float64 on real rows only: rows -> 1, columns -> N/E."""
    n, e = cost.shape
    k = np.exp(-(cost - cost.min(axis=1, keepdims=True)) / eps)  # row shift: absorbed by u
    q = k / k.sum(axis=1, keepdims=True)
    for _ in range(iters):
        q = q * (n / e) / q.sum(axis=0, keepdims=True)
        q = q / q.sum(axis=1, keepdims=True)
    return q


@pytest.mark.parametrize("fn", FNS)
def test_marginals_converge(fn):
    torch.manual_seed(0)
    n, e = 24, 6
    cost = torch.randn(n, e)
    q = fn(cost, 0.5, 200)
    torch.testing.assert_close(q.sum(1), torch.ones(n), atol=1e-4, rtol=0)
    torch.testing.assert_close(q.sum(0), torch.full((e,), n / e), atol=1e-4, rtol=0)
    assert float(marginal_error(q)) < 1e-4


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("iters", [1, 3, 8])
def test_matches_numpy_reference(fn, iters):
    rng = np.random.default_rng(1)
    cost = rng.normal(size=(16, 4))
    q = fn(torch.tensor(cost, dtype=torch.float32), 0.2, iters)
    ref = numpy_sinkhorn(cost, 0.2, iters)
    np.testing.assert_allclose(q.numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("fn", FNS)
def test_two_by_two_closed_form(fn):
    # A 2x2 plan with unit marginals is [[a, 1-a], [1-a, a]]; diagonal scaling keeps the cross
    # ratio Q11 Q22 / (Q12 Q21) = exp(-(C11 + C22 - C12 - C21)/eps) =: rho, so a = sqrt(rho)/(1+sqrt(rho)).
    c = [[0.3, -0.2], [0.5, 0.1]]
    eps = 0.4
    rho = math.exp(-(0.3 + 0.1 - (-0.2) - 0.5) / eps)
    a = math.sqrt(rho) / (1 + math.sqrt(rho))
    q = fn(torch.tensor(c), eps, 100)
    expected = torch.tensor([[a, 1 - a], [1 - a, a]])
    torch.testing.assert_close(q, expected, atol=1e-5, rtol=0)


def test_log_and_plain_agree_where_plain_is_stable():
    torch.manual_seed(2)
    for eps in (0.05, 0.1, 0.5):
        cost = torch.rand(32, 8) * 2 - 1
        for iters in (1, 3, 5):
            torch.testing.assert_close(sinkhorn_log(cost, eps, iters), sinkhorn_plain(cost, eps, iters), atol=1e-5, rtol=1e-4)


def log_numpy_sinkhorn(cost: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """The same schedule in float64 log space (scipy logsumexp): exact enough for |C/eps| ~ 1e6."""
    n, e = cost.shape
    lq = -cost / eps
    lq = lq - logsumexp(lq, axis=1, keepdims=True)
    for _ in range(iters):
        lq = lq - logsumexp(lq, axis=0, keepdims=True) + np.log(n / e)
        lq = lq - logsumexp(lq, axis=1, keepdims=True)
    return np.exp(lq)


def test_log_domain_extreme_cost_bf16_matches_fp64():
    # |C| = 1e4 in bf16 with eps = 0.01: exponents of 1e6. Row sums are 1 by construction, so the
    # check is on the columns: against a float64 log-domain reference on the same bf16-rounded
    # cost. bf16 values are exact in fp32, so the only error is fp32 rounding through 2 * 5 + 1
    # logsumexps of O(1) log-masses after the row shift: ~1e-6, well inside 1e-5 (measured 2e-7).
    torch.manual_seed(3)
    cost = (torch.randn(64, 8) * 1e4).clamp(-1e4, 1e4).to(torch.bfloat16).requires_grad_(True)
    q, log_q = sinkhorn_log(cost, 0.01, 5, return_log=True)
    assert q.dtype == torch.float32
    assert torch.isfinite(q).all() and torch.isfinite(log_q).all()
    ref = log_numpy_sinkhorn(cost.detach().double().numpy(), 0.01, 5)  # [64, 8]
    np.testing.assert_allclose(q.detach().double().numpy(), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(q.detach().sum(0).double().numpy(), ref.sum(0), atol=1e-4, rtol=0)
    # Five sweeps move the columns towards N/E = 8 (the row softmax alone is far off).
    assert float(marginal_error(q.detach())) < float(marginal_error(torch.softmax(-cost.detach().float() / 0.01, 1)))
    (q * torch.randn(64, 8)).sum().backward()
    assert torch.isfinite(cost.grad.float()).all()


@pytest.mark.parametrize("fn", FNS)
def test_bf16_cost_columns_reach_n_over_e(fn):
    # A well-conditioned bf16 cost (eps = 0.5, 100 sweeps): the columns must reach N/E = 8,
    # and the plan must equal the float64 reference on the bf16-rounded cost (fp32 rounding over
    # ~200 normalisations of O(1) values: ~1e-6; measured 3e-7).
    torch.manual_seed(3)
    cost = torch.randn(64, 8).to(torch.bfloat16)
    q = fn(cost, 0.5, 100)
    ref = log_numpy_sinkhorn(cost.double().numpy(), 0.5, 100)
    torch.testing.assert_close(q.sum(0), torch.full((8,), 64 / 8), atol=1e-4, rtol=0)
    np.testing.assert_allclose(q.double().numpy(), ref, atol=1e-5, rtol=0)


def test_low_cost_gets_high_mass():
    # Token t's cheapest expert is t % E, and each expert is cheapest for exactly N/E tokens
    # (a balanced problem): the plan must put most of each row on that expert. An inverted sign
    # (exp(+C/eps)) would put it on the most expensive expert instead.
    n, e = 12, 4
    cost = torch.ones(n, e)
    cost[torch.arange(n), torch.arange(n) % e] = -1.0
    cost[:, 3] += 0.5  # make the rows non-trivial: expert 3 costs more for everyone
    cost[torch.arange(n) % e == 3, 3] = -1.0
    for fn in FNS:
        q = fn(cost, 0.1, 10)
        assert torch.equal(q.argmax(1), torch.arange(n) % e)
        assert (q[torch.arange(n), torch.arange(n) % e] > 0.9).all()


def test_epsilon_applied_once():
    # Q depends on C/eps only: (C, eps) and (2C, 2eps) give the same plan; (C, 2eps) does not.
    torch.manual_seed(4)
    cost = torch.randn(10, 5)
    for fn in FNS:
        torch.testing.assert_close(fn(cost, 0.1, 3), fn(2 * cost, 0.2, 3), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(fn(cost, 0.1, 3), fn(cost, 0.2, 3), atol=1e-3)
    # And against the reference at a scale where eps^2 would be visibly different.
    ref = numpy_sinkhorn(cost.double().numpy(), 0.3, 3)
    np.testing.assert_allclose(sinkhorn_log(cost, 0.3, 3).numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("fn", FNS)
def test_padding_rows_excluded(fn):
    torch.manual_seed(5)
    n, e = 10, 4
    cost = torch.randn(n, e)
    valid = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    garbage = cost.clone()
    garbage[~valid] = torch.randn(int((~valid).sum()), e) * 100  # padding content must not matter
    q = fn(garbage, 0.3, 50, valid)
    assert torch.equal(q[~valid], torch.zeros(int((~valid).sum()), e))
    ref = numpy_sinkhorn(cost[valid].double().numpy(), 0.3, 50)  # N counts real tokens only
    np.testing.assert_allclose(q[valid].numpy(), ref, atol=1e-5)
    torch.testing.assert_close(q.sum(0), torch.full((e,), int(valid.sum()) / e), atol=1e-3, rtol=0)


def test_padding_gradients_finite():
    torch.manual_seed(6)
    cost = torch.randn(8, 4, requires_grad=True)
    valid = torch.tensor([0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    for log_domain in (True, False):
        cost.grad = None
        q, log_q = sinkhorn(cost, 0.05, 3, valid, log_domain=log_domain, return_log=True)
        ((log_q.masked_fill(~valid[:, None], 0.0) + q) * torch.randn(8, 4)).sum().backward()
        assert torch.isfinite(cost.grad).all()
        assert torch.equal(cost.grad[~valid], torch.zeros(2, 4))


def test_marginal_error_hand_computed():
    # Column sums [2, 0] against the target N/E = 1: max relative deviation 1.
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert float(marginal_error(q)) == pytest.approx(1.0)
    # Column sums [1.5, 0.5] with one padding row ignored: N=2, target 1 -> 0.5.
    q = torch.tensor([[1.0, 0.0], [0.5, 0.5], [9.0, 9.0]])
    assert float(marginal_error(q, torch.tensor([True, True, False]))) == pytest.approx(0.5)


# ------------------------------------------------------------------ forbidden pairs (cost = +inf)


def masked_numpy_sinkhorn(cost: np.ndarray, eps: float, iters: int, valid: np.ndarray | None = None) -> np.ndarray:
    """Float64 reference for +inf costs: Sinkhorn on the allowed sub-matrix, zeros elsewhere.

    The sub-matrix keeps the real rows and the columns with at least one finite cost in them
    and drops the rest; inside it a forbidden pair has kernel exp(-inf) = 0. Column targets are
    N_sub/E_sub (uniform targets cancel in the next row normalisation, so the plan does not
    depend on which N or E is used).
    """
    valid = np.ones(cost.shape[0], bool) if valid is None else valid
    allowed = np.isfinite(cost) & valid[:, None]
    rows, cols = allowed.any(1), allowed.any(0)
    sub = cost[np.ix_(rows, cols)]
    ok = np.isfinite(sub)
    shift = np.where(ok, sub, np.inf).min(axis=1, keepdims=True)
    kern = np.where(ok, np.exp(-(np.where(ok, sub, 0.0) - shift) / eps), 0.0)
    n, e = sub.shape
    q = kern / kern.sum(axis=1, keepdims=True)
    for _ in range(iters):
        q = q * (n / e) / q.sum(axis=0, keepdims=True)
        q = q / q.sum(axis=1, keepdims=True)
    out = np.zeros(cost.shape)
    out[np.ix_(rows, cols)] = q
    return out


def forbidden_cases():
    """(name, cost [10, 5] with +inf entries, valid) covering the three shapes of forbidding."""
    rng = np.random.default_rng(11)
    base = rng.normal(size=(10, 5))
    single = base.copy()
    single[[0, 3, 3, 7], [1, 0, 4, 2]] = np.inf  # scattered forbidden pairs
    column = base.copy()
    column[:, 3] = np.inf  # expert 3 forbidden for everyone
    row = base.copy()
    row[4] = np.inf  # real token 4 may use no expert
    mixed = column.copy()
    mixed[[1, 6], [0, 2]] = np.inf
    mixed[8] = np.inf
    valid = np.ones(10, bool)
    valid[[2, 9]] = False  # padding rows too
    return [("single", single, None), ("column", column, None), ("row", row, None), ("mixed+padding", mixed, valid)]


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("name, cost, valid", forbidden_cases(), ids=[c[0] for c in forbidden_cases()])
def test_forbidden_pairs_match_submatrix_reference(fn, name, cost, valid):
    # Semantics: a forbidden pair gets Q = 0 (log Q = -inf); a column nobody may use is 0 and the
    # others share the tokens as on the sub-matrix without it; a real token with every expert
    # forbidden gets a zero row (no mass to send anywhere; log Q = -inf), like a padding row.
    v = None if valid is None else torch.tensor(valid)
    q, log_q = fn(torch.tensor(cost, dtype=torch.float32), 0.3, 20, v, return_log=True)
    assert not torch.isnan(q).any() and not torch.isnan(log_q).any()
    ref = masked_numpy_sinkhorn(cost, 0.3, 20, valid)
    np.testing.assert_allclose(q.numpy(), ref, atol=1e-5, rtol=0)
    live = np.isfinite(cost) & (np.ones(10, bool) if valid is None else valid)[:, None]
    assert (q.numpy()[~live] == 0).all() and torch.isneginf(log_q[torch.tensor(~live)]).all()
    assert torch.isfinite(log_q[torch.tensor(live)]).all()
    live_rows = live.any(1)
    np.testing.assert_allclose(q.sum(1).numpy()[live_rows], 1.0, atol=1e-5)


def torch_reference_sinkhorn(cost: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Textbook float64 Sinkhorn with kernel 0 at +inf costs (autograd: the reference gradient).

    Every row and column must keep a finite entry (pass the allowed sub-matrix).
    """
    n, e = cost.shape
    ok = torch.isfinite(cost)
    c = torch.where(ok, cost, torch.zeros_like(cost))
    shift = torch.where(ok, c, torch.full_like(c, float("inf"))).min(1, keepdim=True).values.detach()
    kern = torch.where(ok, torch.exp(-(c - shift) / eps), torch.zeros_like(c))
    q = kern / kern.sum(1, keepdim=True)
    for _ in range(iters):
        q = q * (n / e) / q.sum(0, keepdim=True)
        q = q / q.sum(1, keepdim=True)
    return q


@pytest.mark.parametrize("log_domain", [True, False])
@pytest.mark.parametrize("name, cost, valid", forbidden_cases(), ids=[c[0] for c in forbidden_cases()])
def test_forbidden_pairs_gradients(log_domain, name, cost, valid):
    # The gradient w.r.t. the allowed costs equals the float64 autograd gradient of the
    # sub-matrix problem, and is exactly 0 (not NaN) at forbidden pairs and padding rows.
    eps, iters = 0.3, 4
    v = None if valid is None else torch.tensor(valid)
    c = torch.tensor(cost, dtype=torch.float32, requires_grad=True)
    w = torch.tensor(np.random.default_rng(0).normal(size=cost.shape), dtype=torch.float32)
    q, log_q = sinkhorn(c, eps, iters, v, log_domain=log_domain, return_log=True)
    live = torch.isfinite(c.detach()) & (torch.ones(10, dtype=torch.bool) if v is None else v)[:, None]
    (q * w + log_q.masked_fill(~live, 0.0) * w.flip(0)).sum().backward()
    assert torch.isfinite(c.grad).all()
    assert (c.grad[~live] == 0).all()
    rows, cols = live.any(1), live.any(0)
    sub = torch.tensor(cost, dtype=torch.float64)[rows][:, cols].requires_grad_(True)
    q_ref = torch_reference_sinkhorn(sub, eps, iters)
    ok = torch.isfinite(sub.detach())
    w_sub, w2_sub = w.double()[rows][:, cols], w.flip(0).double()[rows][:, cols]
    log_ref = torch.log(torch.where(ok, q_ref, torch.ones_like(q_ref)))  # log 1 = 0 at forbidden pairs
    (q_ref * w_sub + log_ref * w2_sub).sum().backward()
    torch.testing.assert_close(c.grad[rows][:, cols].double(), sub.grad, atol=1e-4, rtol=1e-4)
    assert sub.grad.abs().sum() > 0
