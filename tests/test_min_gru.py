"""router.state_cell=mingru (routing/min_gru.py): the chunked parallel scan equals a plain
token-by-token loop of the minGRU recurrence (resets, padding, chunk boundaries, gradients),
cached decoding equals the full forward, a SPECTRA router with the cell trains, and the config
key is checked. The default cell (gru) is covered by test_gru_speed_numerics / test_spectra_router."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import ConfigCompositionException
from torch import nn

from spectra.config import ConfigError, SpectraRouterConfig, load_config, validate
from spectra.routing import build_router
from spectra.routing.base import RoutingInputs
from spectra.routing.min_gru import MinGRU, linear_scan, min_gru_states
from spectra.routing.spectra import SpectraRouter

H, E, DH, D = 16, 6, 8, 4


def _masks(b: int, s: int, gen: torch.Generator, padded: bool, resets: bool):
    valid = torch.ones(b, s, dtype=torch.bool)
    doc_start = torch.zeros(b, s, dtype=torch.bool)
    doc_start[:, 0] = torch.rand(b, generator=gen) < 0.5
    if padded:
        valid = torch.rand(b, s, generator=gen) < 0.75
        valid[0, :2] = False  # left padding
        if s > 4:
            valid[-1, -3:] = False  # right padding
    if resets:
        doc_start |= torch.rand(b, s, generator=gen) < 0.2
        if padded and s > 4:
            doc_start[0, 1] = True  # a document start at padding: the next real token restarts
    return valid, doc_start


def _reference(cell: MinGRU, inp, valid, doc_start, h0):
    """The minGRU recurrence token by token, in plain Python (the contract of routing/gru.py):
    z = σ(W_z u + b_z), h̃ = W_h u + b_h, h = (1 − z) h_prev + z h̃ at a real token, h_prev = 0
    where a document started since the row's previous real token (h0 before the first one);
    padding carries the state."""
    dh = cell.hidden_size
    u_all = F.pad(inp, (0, cell.input_size - inp.shape[-1]))  # missing trailing columns are zeros
    b, s, _ = inp.shape
    rows = []
    for i in range(b):
        h, started, out = h0[i], False, []
        for t in range(s):
            started |= bool(doc_start[i, t])
            if valid[i, t]:
                if started:
                    h = torch.zeros_like(h)
                    started = False
                pre = cell.weight @ u_all[i, t] + cell.bias
                z, h_cand = torch.sigmoid(pre[:dh]), pre[dh:]
                h = (1 - z) * h + z * h_cand
            out.append(h)
        rows.append(torch.stack(out))
    return torch.stack(rows)


def _cell(d_in: int, dh: int, dtype: torch.dtype, seed: int = 0) -> MinGRU:
    torch.manual_seed(seed)
    cell = MinGRU(d_in, dh)
    for p in cell.parameters():
        nn.init.normal_(p, std=0.5)  # biases non-zero too; some z near 0 and 1
    return cell.to(dtype)


def _run(fn, cell, inp, h0, g):
    leaves = [inp, h0, *cell.parameters()]
    for p in leaves:
        p.grad = None
    y = fn()
    (y * g).sum().backward()
    return [y.detach()] + [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in leaves]


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padded, resets", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("s, chunk", [(1, None), (23, None), (50, 8), (50, 7), (17, 64), (40, 1)])
@pytest.mark.parametrize("narrow", [False, True])
def test_scan_equals_sequential_loop_with_gradients(dtype, padded, resets, s, chunk, narrow):
    gen = torch.Generator().manual_seed(s * 7 + (chunk or 0) + 2 * padded + resets)
    b, d_in, dh = 3, 6, 5
    cell = _cell(d_in, dh, dtype)
    inp = torch.randn(b, s, d_in - 2 if narrow else d_in, generator=gen, dtype=dtype).requires_grad_()
    h0 = torch.randn(b, dh, generator=gen, dtype=dtype).requires_grad_()
    valid, doc_start = _masks(b, s, gen, padded, resets)
    g = torch.randn(b, s, dh, generator=gen, dtype=dtype)
    got = _run(lambda: min_gru_states(cell, inp, valid, doc_start, h0, chunk=chunk), cell, inp, h0, g)
    ref = _run(lambda: _reference(cell, inp, valid, doc_start, h0), cell, inp, h0, g)
    tol = TOL[dtype]
    for name, x, y in zip(["states", "inp", "h0", "weight", "bias"], got, ref):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol, msg=name)
    assert got[0].dtype == dtype


@pytest.mark.parametrize("s, chunk", [(1, None), (64, None), (61, 8), (61, 5), (30, 1), (9, 100)])
def test_linear_scan_equals_loop_across_chunk_boundaries(s, chunk):
    gen = torch.Generator().manual_seed(s + (chunk or 0))
    a = torch.rand(2, s, 4, generator=gen, dtype=torch.float64)
    a[torch.rand(2, s, 4, generator=gen) < 0.1] = 0.0  # resets
    a[torch.rand(2, s, 4, generator=gen) < 0.1] = 1.0  # carries
    a.requires_grad_()
    b = torch.randn(2, s, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, s, 4, generator=gen, dtype=torch.float64)
    a_in, b_in = a.detach().clone(), b.detach().clone()
    y = linear_scan(a, b, h0, chunk)
    got = [y, *torch.autograd.grad((y * g).sum(), (a, b, h0))]
    h, out = h0, []
    for t in range(s):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    y_ref = torch.stack(out, 1)
    ref = [y_ref, *torch.autograd.grad((y_ref * g).sum(), (a, b, h0))]
    for x, r in zip(got, ref):
        torch.testing.assert_close(x, r, atol=1e-12, rtol=1e-12)
    assert torch.equal(a.detach(), a_in) and torch.equal(b.detach(), b_in)  # inputs untouched


def test_long_rows_stay_within_fp32_tolerance_of_float64():
    """S = 1024 at the demo's state size: the chunked scan in fp32 vs the same scan in fp64."""
    gen = torch.Generator().manual_seed(0)
    b, s, d_in, dh = 2, 1024, 24, 16
    cell = _cell(d_in, dh, torch.float64)
    inp = torch.randn(b, s, d_in, generator=gen, dtype=torch.float64)
    h0 = torch.randn(b, dh, generator=gen, dtype=torch.float64)
    valid, doc_start = _masks(b, s, gen, padded=True, resets=True)
    ref = min_gru_states(cell, inp, valid, doc_start, h0)
    got = min_gru_states(cell.float(), inp.float(), valid, doc_start, h0.float())
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_decoding_token_by_token_equals_the_full_forward():
    gen = torch.Generator().manual_seed(3)
    b, s, d_in, dh = 3, 29, 7, 5
    cell = _cell(d_in, dh, torch.float32)
    inp = torch.randn(b, s, d_in, generator=gen)
    h0 = torch.randn(b, dh, generator=gen)
    valid, doc_start = _masks(b, s, gen, padded=True, resets=True)
    # Decoding sees document starts at real tokens (position id 0): a start at padding is seen by
    # the call that holds it only (as on the GRU path, whose segments are per call).
    doc_start &= valid
    with torch.no_grad():
        full = min_gru_states(cell, inp, valid, doc_start, h0)
        # a prompt of 11 tokens, a 4-token chunk, then one token per call from the cached state
        cuts = [0, 11, 15, *range(16, s + 1)]
        parts, h = [], h0
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            out = min_gru_states(cell, inp[:, lo:hi], valid[:, lo:hi], doc_start[:, lo:hi], h)
            parts.append(out)
            h = out[:, -1]  # the decoding cache: the state after the call's last position
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------- the router


def _router(seed: int = 0, **router) -> SpectraRouter:
    overrides = ["router=spectra", f"moe.num_experts={E}", "moe.top_k=2", f"router.gru_hidden_size={DH}",
                 f"router.router_dim={D}", *[f"router.{k}={v}" for k, v in router.items()]]
    torch.manual_seed(seed)
    r = build_router(validate(load_config(overrides)), hidden_size=H, num_experts=E)
    assert isinstance(r, SpectraRouter)
    return r


def _inputs(hidden, valid=None, doc_start=None, **kw) -> RoutingInputs:
    b, s, _ = hidden.shape
    valid = torch.ones(b, s, dtype=torch.bool) if valid is None else valid
    if doc_start is None:
        doc_start = torch.zeros(b, s, dtype=torch.bool)
        doc_start[:, 0] = True
    return RoutingInputs(hidden=hidden, valid=valid, doc_start=doc_start, **kw)


def test_default_cell_is_the_papers_gru_and_mingru_is_a_choice():
    assert isinstance(_router().gru, nn.GRU)
    assert SpectraRouterConfig().state_cell == "gru"
    assert SpectraRouterConfig.from_router_keys({"name": "spectra", "top_k": 2}).state_cell == "gru"  # saved before the key
    r = _router(state_cell="mingru")
    assert isinstance(r.gru, MinGRU) and r.gru.weight.shape == (2 * DH, H + DH)
    assert isinstance(_router(state_cell="mingru", recurrence="depth").gru, MinGRU)
    assert _router(state_cell="mingru", recurrence="none").gru is None


def test_config_rejects_an_unknown_state_cell_naming_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        load_config(["router=spectra", "router.state_cell=lstm"])
    msg = str(e.value.__cause__ or e.value)
    assert "state_cell" in msg and "gru" in msg and "mingru" in msg
    with pytest.raises(ConfigError, match=r"router\.state_cell: unknown 'lstm'.*mingru"):
        SpectraRouterConfig(state_cell="lstm")


def test_mingru_router_trains_one_step_end_to_end():
    """Two chained layers (token and depth recurrence), packed documents and padding: one SGD
    step moves every minGRU parameter, through the depth link too."""
    first, second = _router(0, state_cell="mingru").train(), _router(1, state_cell="mingru").train()
    torch.manual_seed(7)
    b, s = 3, 10
    x1, x2 = torch.randn(b, s, H, requires_grad=True), torch.randn(b, s, H)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[0, :2] = False
    valid[2, 7:] = False
    doc_start = torch.zeros(b, s, dtype=torch.bool)
    doc_start[:, 0] = True
    doc_start[1, 4] = True
    out1 = first(_inputs(x1, valid, doc_start))
    out2 = second(_inputs(x2, valid, doc_start, prev_state=out1.state))
    assert out1.state.shape == out2.state.shape == (b, s, DH)
    target = torch.randn(b * s, 2)
    loss = sum((o.expert_weight * target).sum() + sum(o.aux_losses.values()) for o in (out1, out2))
    params = [*first.parameters(), *second.parameters()]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    opt.zero_grad()
    loss.backward()
    for r in (first, second):
        for name, p in r.gru.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x1.grad is not None and x1.grad[valid].abs().sum() > 0
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert not torch.equal(first.gru.weight, before[[id(p) for p in params].index(id(first.gru.weight))])


def test_mingru_router_cached_decoding_equals_full_pass():
    router = _router(2, state_cell="mingru").train()
    with torch.no_grad():
        router(_inputs(torch.randn(4, 12, H)))  # fills the running Gram used at inference
    router.eval()
    torch.manual_seed(3)
    b, s, cut = 2, 11, 7
    x, prev = torch.randn(b, s, H), torch.randn(b, s, DH)
    full = router(_inputs(x, prev_state=prev))
    first = router(_inputs(x[:, :cut], prev_state=prev[:, :cut]))
    parts, state = [first], first.state[:, -1]
    for lo, hi in ((cut, cut + 3), (cut + 3, cut + 4)):
        out = router(_inputs(x[:, lo:hi], doc_start=torch.zeros(b, hi - lo, dtype=torch.bool),
                             prev_state=prev[:, lo:hi], cached_state=state))
        parts.append(out)
        state = out.state[:, -1]
    states = torch.cat([o.state for o in parts], 1)
    torch.testing.assert_close(states, full.state, atol=1e-5, rtol=0)
    idx = torch.cat([o.expert_index.reshape(b, -1, 2) for o in parts], 1)
    assert torch.equal(idx, full.expert_index.reshape(b, s, 2))


def test_mingru_depth_recurrence_is_the_per_token_cell():
    router = _router(3, state_cell="mingru", recurrence="depth").eval()
    x, prev = torch.randn(1, 4, H), torch.randn(1, 4, DH)
    out = router(_inputs(x, prev_state=prev))
    z, h_cand = router.gru.gates(x[0])
    torch.testing.assert_close(out.state[0], (1 - z) * prev[0] + z * h_cand, atol=1e-6, rtol=0)
