"""Fast implementations written for speed (issue #10) against their plain references.

- routing/gru.py `gru_scan` (own scan, hand-written backward) vs `nn_gru_states` (autograd
  through nn.GRU), values and every gradient, in float64;
- routing/scores.py (cosines without normalised copies) vs F.normalize + orthogonality's
  `expert_representations`;
- moe/experts.py `grouped_mm` on CPU for SwiGLU experts (`_SortedSwiGLU`, hand-written backward)
  vs a float64 loop over (token, slot) pairs and vs transformers' grouped_mm (autograd), issue #23;
- metrics/recorder.py accumulating on device vs hand-computed reports, across a checkpoint
  round trip as train/checkpoint.py does it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import grouped_mm_experts_forward

from spectra.metrics.recorder import RoutingRecorder
from spectra.moe.experts import ExpertsImplConfig, GatedExperts, PlainExperts
from spectra.routing import gru as gru_module
from spectra.routing.base import RoutingOutput
from spectra.routing.gru import gru_scan, nn_gru_states, segments, token_recurrence
from spectra.routing.orthogonality import expert_representations
from spectra.routing.scores import cosine_scores, expert_directions
from spectra.train.checkpoint import _merge, _plain


def _masks(b: int, s: int, layout: str, gen: torch.Generator):
    valid = torch.ones(b, s, dtype=torch.bool)
    doc_start = torch.zeros(b, s, dtype=torch.bool)
    doc_start[:, 0] = torch.rand(b, generator=gen) < 0.5
    if layout in ("padded", "both"):
        valid = torch.rand(b, s, generator=gen) < 0.7
        valid[0, :3] = False  # left padding
        valid[-1] = False  # a row with no real token: h0 carried throughout
    if layout in ("resets", "both"):
        doc_start |= torch.rand(b, s, generator=gen) < 0.15
    if layout == "empty":  # no real token anywhere: every state is h0
        valid[:] = False
    return valid, doc_start


@pytest.mark.parametrize("layout", ["dense", "resets", "padded", "both", "both, chunks of 4", "both, chunks of 24",
                                    "dense, chunks of 24", "empty"])
def test_gru_scan_equals_autograd_through_nn_gru(layout, monkeypatch):
    if ", chunks of " in layout:  # the backward runs per chunk of time steps (cells // segments steps each)
        layout, cells = layout.split(", chunks of ")
        monkeypatch.setattr(gru_module, "_CHUNK_CELLS", int(cells))
    gen = torch.Generator().manual_seed(len(layout))
    b, s, d_in, dh = 4, 23, 5, 6
    torch.manual_seed(0)
    gru = nn.GRU(d_in, dh, batch_first=True).double()
    inp = torch.randn(b, s, d_in, dtype=torch.float64, generator=gen, requires_grad=True)
    h0 = torch.randn(b, dh, dtype=torch.float64, generator=gen, requires_grad=True)
    valid, doc_start = _masks(b, s, layout, gen)
    g = torch.randn(b, s, dh, dtype=torch.float64, generator=gen)
    leaves = [inp, h0, *gru.parameters()]
    results = []
    for fn in (nn_gru_states, gru_scan):
        for p in leaves:
            p.grad = None
        y = fn(gru, inp, valid, doc_start, h0)
        (y * g).sum().backward()
        results.append([y.detach()] + [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in leaves])
    for ref, fast in zip(*results):
        torch.testing.assert_close(fast, ref, atol=1e-12, rtol=1e-10)


def test_cpu_training_uses_the_hand_written_backward():
    gru = nn.GRU(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3, requires_grad=True)
    ones, start = torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.bool)
    assert "GRUScan" in type(token_recurrence(gru, x, ones, start, torch.zeros(2, 4)).grad_fn).__name__
    with torch.no_grad():  # inference: nn.GRU's forward only
        torch.testing.assert_close(token_recurrence(gru, x, ones, start, torch.zeros(2, 4)),
                                   token_recurrence(gru, x, ones, start, torch.zeros(2, 4), fused=False))


def test_segments_by_hand():
    valid = torch.tensor([[0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    start = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    # row 0: the start at padding position 0 reaches token 1, the one at padding 3 reaches token 4:
    # segments {1, 2} and {4, 5}, both from 0. row 1: {0, 1} continues h0, {10, 11} starts at 10.
    seg = segments(valid, start)
    assert seg.num == 4 and seg.length == 2
    assert seg.vidx.tolist() == [1, 2, 4, 5, 6, 7, 10, 11]
    assert seg.cell.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]  # t * Ns + j
    assert seg.row.tolist() == [0, 0, 1, 1] and seg.from_h0.tolist() == [False, False, True, False]
    assert seg.shows.tolist() == [0, 1, 2, 2, 4, 5, 6, 7, 7, 7, 10, 11]
    assert seg.before_first.tolist() == [True] + [False] * 11


def test_cosine_scores_equal_normalise_first_reference():
    torch.manual_seed(0)
    n, e, d = 37, 5, 4
    r = torch.randn(n, e, d, dtype=torch.float64, requires_grad=True)
    p = torch.randn(n, e, d, dtype=torch.float64, requires_grad=True)
    valid = torch.rand(n) < 0.8
    gs, gm = torch.randn(n, e, dtype=torch.float64), torch.randn(e, d, dtype=torch.float64)

    def reference():
        s = (F.normalize(r, dim=-1) * F.normalize(p, dim=-1)).sum(-1)
        return s, expert_representations(p, valid).double()

    def fast():
        s, p_norm = cosine_scores(r.double(), p.double())
        return s, expert_directions(p.double(), p_norm, valid)

    outs = []
    for fn in (reference, fast):
        r.grad = p.grad = None
        s, m = fn()
        ((s * gs).sum() + (m * gm).sum()).backward()
        outs.append((s.detach(), m.detach(), r.grad.clone(), p.grad.clone()))
    for ref, got in zip(*outs):
        torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=0)  # fp32 inside


def _output(counts, dropped, valid, entropy, aux):
    n = valid.shape[0]
    return RoutingOutput(
        expert_index=torch.zeros(n, 1, dtype=torch.long), expert_weight=torch.zeros(n, 1),
        probs=torch.full((n, 4), 0.25), dropped=dropped, valid=valid,
        dispatch_counts=torch.tensor(counts, dtype=torch.float32),
        aux_losses={"lb": torch.tensor(aux)}, diagnostics={"routing_entropy": torch.tensor(entropy)},
    )


def test_recorder_sums_on_device_and_reports_hand_values_across_a_checkpoint():
    valid = torch.tensor([True, True, True, False])
    no_drop = torch.zeros(4, 1, dtype=torch.bool)
    one_drop = torch.tensor([[True], [False], [False], [False]])
    steps = [{0: _output([1, 1, 1, 0], no_drop, valid, 0.5, 0.25)}, {0: _output([2, 0, 1, 0], one_drop, valid, 1.0, 0.75)}]

    rec = RoutingRecorder()
    rec.add(steps[0])
    assert all(torch.is_tensor(v) for v in (rec.dropped[0], rec.assignments[0], rec.diag_sum[0]["routing_entropy"]))
    saved = _plain(vars(rec))  # what a checkpoint between two logs holds
    resumed = RoutingRecorder()
    _merge(vars(resumed), saved)
    for r in (rec, resumed):
        r.add(steps[1])

    load = [3.0, 1.0, 2.0, 0.0]  # mean 1.5, population std sqrt(1.25)
    want = {"layer0/cv": math.sqrt(1.25) / 1.5, "layer0/maxvio": 3.0 / 1.5 - 1.0, "layer0/dropped_token_rate": 1 / 6,
            "layer0/dropped_slot_rate": 1 / 6,  # k = 1: a dropped slot is a dropped token
            "layer0/routing_entropy": 0.75, "layer0/aux_lb": 0.5}
    for r in (rec, resumed):
        got = r.report()
        assert sum(load) == 6.0
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-12), key
        assert got["cv_mean"] == pytest.approx(want["layer0/cv"])
        assert r.report() == {}  # reset after reporting


# ------------------------------------------------------------------ experts: grouped_mm on CPU


def _swiglu_experts(e: int, h: int, i: int, dtype: torch.dtype, act: nn.Module | None = None) -> GatedExperts:
    experts = GatedExperts(ExpertsImplConfig("grouped_mm"), e, h, i, act or nn.SiLU()).to(dtype)
    nn.init.normal_(experts.gate_up_proj, std=0.4)
    nn.init.normal_(experts.down_proj, std=0.4)
    return experts


def _routing(n: int, e: int, k: int, dtype: torch.dtype, gen: torch.Generator):
    index = torch.rand(n, e, generator=gen).argsort(dim=1)[:, :k]  # [N, k] distinct experts per token
    index[index == e - 1] = 0  # expert e-1 gets no token
    index[:3] = torch.arange(k)  # ... and expert 0 does, in every slot position
    index = torch.where(index.sort(dim=1).values.diff(dim=1).eq(0).any(dim=1, keepdim=True), torch.arange(k), index)
    weights = torch.softmax(torch.randn(n, k, generator=gen, dtype=dtype), dim=-1)
    weights[5, 1] = 0.0  # a dropped slot
    return index, weights


def _experts_loop(experts: GatedExperts, x, index, weights):
    """Σ_slots w · down_e(silu(gate_e x) ⊙ up_e x), one (token, slot) pair at a time."""
    i = experts.intermediate_dim
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(index.shape[1]):
            e = int(index[t, j])
            gu = experts.gate_up_proj[e] @ x[t]  # [2I]
            acc = acc + weights[t, j] * (experts.down_proj[e] @ (F.silu(gu[:i]) * gu[i:]))
        rows.append(acc)
    return torch.stack(rows)


def _experts_grads(fn, experts, x, weights, g):
    leaves = [x, weights, experts.gate_up_proj, experts.down_proj]
    for p in leaves:
        p.grad = None
    y = fn()
    (y * g).sum().backward()
    return [y.detach()] + [p.grad.clone() for p in leaves]


def test_cpu_grouped_swiglu_equals_a_float64_slot_loop():
    gen = torch.Generator().manual_seed(0)
    n, h, i, e, k = 23, 7, 5, 6, 3
    experts = _swiglu_experts(e, h, i, torch.float64)
    x = torch.randn(n, h, dtype=torch.float64, generator=gen, requires_grad=True)
    index, weights = _routing(n, e, k, torch.float64, gen)
    weights.requires_grad_()
    g = torch.randn(n, h, dtype=torch.float64, generator=gen)
    fast = _experts_grads(lambda: experts(x, index, weights), experts, x, weights, g)
    assert "SortedSwiGLU" in type(experts(x, index, weights).grad_fn).__name__
    ref = _experts_grads(lambda: _experts_loop(experts, x, index, weights), experts, x, weights, g)
    for r, f in zip(ref, fast):
        torch.testing.assert_close(f, r, atol=1e-12, rtol=1e-10)
    assert torch.count_nonzero(fast[3][e - 1]) == 0 and torch.count_nonzero(fast[4][e - 1]) == 0  # unused expert


def test_cpu_grouped_swiglu_is_transformers_grouped_mm_bit_for_bit():
    """fp32: the same values and gradients as transformers' grouped_mm kernel under autograd."""
    gen = torch.Generator().manual_seed(1)
    n, h, i, e, k = 64, 16, 24, 8, 2
    experts = _swiglu_experts(e, h, i, torch.float32)
    x = torch.randn(n, h, generator=gen, requires_grad=True)
    index, weights = _routing(n, e, k, torch.float32, gen)
    weights.requires_grad_()
    g = torch.randn(n, h, generator=gen)
    ours = _experts_grads(lambda: experts(x, index, weights), experts, x, weights, g)
    theirs = _experts_grads(lambda: grouped_mm_experts_forward(experts, x, index, weights), experts, x, weights, g)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_grouped_mm_falls_back_to_transformers_outside_cpu_swiglu():
    """Other activations and biased experts keep transformers' kernel (autograd through it)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(10, 8, generator=gen, requires_grad=True)  # sizes: multiples of 16 bytes for torch's kernel
    index, weights = torch.randint(0, 4, (10, 1), generator=gen), torch.ones(10, 1)
    gelu = _swiglu_experts(4, 8, 4, torch.float32, act=nn.GELU())
    plain = PlainExperts(ExpertsImplConfig("grouped_mm"), 4, 8, 4, nn.GELU())
    nn.init.normal_(plain.up_proj)
    nn.init.normal_(plain.down_proj)
    for experts in (gelu, plain):
        y = experts(x, index, weights)
        assert "SortedSwiGLU" not in type(y.grad_fn).__name__
        torch.testing.assert_close(y, grouped_mm_experts_forward(experts, x, index, weights), atol=0, rtol=0)
