"""The GRU token recurrence made faster for issue #23 keeps today's numbers.

`gru_scan`'s training path runs a scan of its own (gates kept for the backward, no recomputation)
and accepts inputs narrower than the GRU (missing trailing columns are zeros). Independent
references only:
- nn.GRU's own forward (ATen's C++ loop), for bitwise-equal fp32 states;
- autograd through nn.GRU in float64 on the zero-padded input, for values and every gradient,
  and in fp32 within fp32 tolerance of that float64 reference;
- a plain per-token Python loop of the GRU equations (segments restarted by hand), in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spectra.routing import gru as gru_module
from spectra.routing.gru import gru_scan, nn_gru_states, token_recurrence


def _masks(b: int, s: int, gen: torch.Generator, padded: bool, resets: bool):
    valid = torch.ones(b, s, dtype=torch.bool)
    doc_start = torch.zeros(b, s, dtype=torch.bool)
    doc_start[:, 0] = torch.rand(b, generator=gen) < 0.5
    if padded:
        valid = torch.rand(b, s, generator=gen) < 0.75
        valid[0, :2] = False
    if resets:
        doc_start |= torch.rand(b, s, generator=gen) < 0.2
    return valid, doc_start


def _gru(d_in: int, dh: int, dtype: torch.dtype) -> nn.GRU:
    gru = nn.GRU(d_in, dh, batch_first=True)
    for p in gru.parameters():
        nn.init.normal_(p, std=0.4)  # biases non-zero too
    return gru.to(dtype)


def _loop_reference(gru: nn.GRU, inp, valid, doc_start, h0):
    """The module docstring's contract, token by token: reset to 0 at a document start since the
    row's previous real token, carry through padding, h0 before the first real token."""
    w_ih, w_hh, b_ih, b_hh = gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0
    inp = F.pad(inp, (0, gru.input_size - inp.shape[-1]))
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
                gi, gh = inp[i, t] @ w_ih.T + b_ih, h @ w_hh.T + b_hh
                r = torch.sigmoid(gi[: gru.hidden_size] + gh[: gru.hidden_size])
                z = torch.sigmoid(gi[gru.hidden_size : 2 * gru.hidden_size] + gh[gru.hidden_size : 2 * gru.hidden_size])
                n = torch.tanh(gi[2 * gru.hidden_size :] + r * gh[2 * gru.hidden_size :])
                h = (1 - z) * n + z * h
            out.append(h)
        rows.append(torch.stack(out))
    return torch.stack(rows)


def _run(fn, gru, inp, valid, doc_start, h0, g):
    leaves = [inp, h0, *gru.parameters()]
    for p in leaves:
        p.grad = None
    y = fn(gru, inp, valid, doc_start, h0)
    (y * g).sum().backward()
    return [y.detach()] + [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in leaves]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("resets", [False, True])
@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("cells", [1024, 8])
def test_scan_equals_nn_gru_autograd_float64(padded, resets, narrow, cells, monkeypatch):
    monkeypatch.setattr(gru_module, "_CHUNK_CELLS", cells)  # 8: several chunks of the backward
    gen = torch.Generator().manual_seed(padded + 2 * resets + 4 * narrow)
    b, s, d_full, dh = 3, 19, 9, 6
    d_in = 5 if narrow else d_full
    torch.manual_seed(1)
    gru = _gru(d_full, dh, torch.float64)
    inp = torch.randn(b, s, d_in, dtype=torch.float64, generator=gen, requires_grad=True)
    h0 = torch.randn(b, dh, dtype=torch.float64, generator=gen, requires_grad=True)
    valid, doc_start = _masks(b, s, gen, padded, resets)
    g = torch.randn(b, s, dh, dtype=torch.float64, generator=gen)

    def reference(gru, x, valid, doc_start, h0):  # autograd through nn.GRU on the zero-padded input
        return nn_gru_states(gru, F.pad(x, (0, d_full - d_in)), valid, doc_start, h0)

    ref = _run(reference, gru, inp, valid, doc_start, h0, g)
    fast = _run(gru_scan, gru, inp, valid, doc_start, h0, g)
    for r, f in zip(ref, fast):
        torch.testing.assert_close(f, r, atol=1e-12, rtol=1e-10)
    with torch.no_grad():  # and the plain token loop agrees on the states
        torch.testing.assert_close(fast[0], _loop_reference(gru, inp, valid, doc_start, h0), atol=1e-12, rtol=1e-10)
    if narrow:  # the weight columns of the absent inputs get exactly zero gradient
        assert torch.count_nonzero(fast[3][:, d_in:]) == 0


@pytest.mark.parametrize("shape", [(8, 64, 16), (4, 40, 128), (1, 33, 32)])
def test_training_states_are_bitwise_nn_grus_forward(shape):
    """fp32: the scan's states are nn.GRU's forward, bit for bit (dense rows, h0 carried)."""
    b, s, dh = shape
    torch.manual_seed(2)
    gru = _gru(dh + 24, dh, torch.float32)
    x = torch.randn(b, s, dh + 24, requires_grad=True)
    h0 = torch.randn(b, dh)
    valid, doc_start = torch.ones(b, s, dtype=torch.bool), torch.zeros(b, s, dtype=torch.bool)
    y = gru_scan(gru, x, valid, doc_start, h0)
    assert y.grad_fn is not None
    with torch.no_grad():
        ref, _ = gru(x, h0.unsqueeze(0))
    assert torch.equal(y.detach(), ref)


def test_float32_gradients_within_fp32_tolerance_of_float64():
    gen = torch.Generator().manual_seed(5)
    b, s, d_full, d_in, dh = 4, 48, 40, 24, 32
    torch.manual_seed(3)
    gru64 = _gru(d_full, dh, torch.float64)
    gru32 = _gru(d_full, dh, torch.float32)
    gru32.load_state_dict({k: v.float() for k, v in gru64.state_dict().items()})
    inp = torch.randn(b, s, d_in, dtype=torch.float64, generator=gen)
    h0 = torch.randn(b, dh, dtype=torch.float64, generator=gen)
    valid, doc_start = _masks(b, s, gen, padded=True, resets=True)
    g = torch.randn(b, s, dh, dtype=torch.float64, generator=gen)

    def reference(gru, x, valid, doc_start, h0):
        return nn_gru_states(gru, F.pad(x, (0, d_full - d_in)), valid, doc_start, h0)

    ref = _run(reference, gru64, inp.clone().requires_grad_(), valid, doc_start, h0.clone().requires_grad_(), g)
    fast = _run(gru_scan, gru32, inp.float().requires_grad_(), valid, doc_start, h0.float().requires_grad_(), g.float())
    for r, f in zip(ref, fast):
        torch.testing.assert_close(f.double(), r, atol=2e-5, rtol=2e-5)


def test_narrow_input_without_autograd_and_on_the_reference_path():
    """Inference (nn.GRU's forward) and fused=False take the narrow input as zero-padded too."""
    torch.manual_seed(4)
    gru = _gru(10, 4, torch.float32)
    x = torch.randn(2, 7, 6)
    valid, doc_start = torch.ones(2, 7, dtype=torch.bool), torch.zeros(2, 7, dtype=torch.bool)
    doc_start[:, 0] = True
    h0 = torch.zeros(2, 4)
    with torch.no_grad():
        want, _ = gru(F.pad(x, (0, 4)))
        assert torch.equal(token_recurrence(gru, x, valid, doc_start, h0), want)
        assert torch.equal(token_recurrence(gru, x, valid, doc_start, h0, fused=False), want)
    with pytest.raises(ValueError, match="features"):
        token_recurrence(gru, torch.randn(2, 7, 11), valid, doc_start, h0)
