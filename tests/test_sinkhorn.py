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


def test_log_domain_extreme_cost_bf16_is_finite():
    torch.manual_seed(3)
    cost = (torch.randn(64, 8) * 1e4).clamp(-1e4, 1e4).to(torch.bfloat16).requires_grad_(True)
    q, log_q = sinkhorn_log(cost, 0.01, 5, return_log=True)
    assert q.dtype == torch.float32
    assert torch.isfinite(q).all() and torch.isfinite(log_q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(64), atol=1e-4, rtol=0)
    (q * torch.randn(64, 8)).sum().backward()
    assert torch.isfinite(cost.grad.float()).all()


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
