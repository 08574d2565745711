"""The SPECTRA router's token recurrence: a causal GRU with document resets and padding carry.

    r = σ(W_ir x_t + b_ir + W_hr h + b_hr)        gates in nn.GRU's order (r, z, n)
    z = σ(W_iz x_t + b_iz + W_hz h + b_hz)
    n = tanh(W_in x_t + b_in + r ⊙ (W_hn h + b_hn))
    h' = (1 − z) ⊙ n + z ⊙ h

At a real token the state advances from `h_prev`: 0 where a document began since the row's
previous real token, the previous state otherwise (h0 before the row's first real token). At
padding the state is carried unchanged. So the real tokens fall into independent segments (a row's
run of one document, `segments`), each a plain GRU sequence from 0 or h0.

Two implementations, one contract (`token_recurrence(..., fused=...)`):
- `nn_gru_states`: one `nn.GRU` call. Without padding or mid-row document starts the [B, S]
  batch goes in directly; otherwise every (row, document) segment of real tokens becomes its own
  sequence of a hand-built `PackedSequence` (memory O(N), no [segments × longest] padding).
  Used on GPU (cuDNN) and as the reference.
- `gru_scan` (CPU): without autograd (inference, decoding) the same nn.GRU forward — ATen runs
  the time loop in C++. In training, a scan of its own with a hand-written backward. Why: on CPU,
  nn.GRU's autograd records ~30 nodes per time step, so at the router's sizes (a few rows,
  Dh = 128) backward costs per-node overhead × S, not arithmetic. Both passes work on the segments
  laid out as a time-major grid [L, Ns] (L = the longest segment, so packed rows cost L steps, not
  S). The forward computes all input projections in one matmul (as ATen does), then runs ATen's
  cell step by step — the same ops on the same layouts, so its states are bitwise nn.GRU's — into
  preallocated buffers (one addmm and 10 elementwise ops per step; both time loops are compiled
  by TorchScript where available, which runs the same ATen ops without Python's per-op overhead —
  its CPU fuser is off by default, so nothing is fused), and keeps the gates,
  so the backward recomputes nothing (the earlier version recomputed them: two more matmuls of the
  forward's size). The backward takes the time steps in chunks, latest first (`_CHUNK_CELLS` cells
  each, so the working set stays in cache and the time per token does not grow with S): per chunk
  it computes the coefficients that multiply the incoming gradient for all steps at once, leaving
  4 ops per step in the reverse loop, then the chunk's W_hh gradient in one matmul; the input-side
  gradients (inputs, W_ih, b_ih) are one matmul each over all tokens at the end. It keeps the
  inputs, the states and the gates (r, z, n, r ⊙ (W_hn h + b_hn)): memory linear in S.
- Input width: `inp` may leave out trailing input columns that are zero (In' < In: the first MoE
  layer, which has no previous layer's state), which saves their share of the input-side matmuls
  in both passes; the result is that of the zero-padded input.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

__all__ = ["Segments", "gru_scan", "nn_gru_states", "segments", "token_recurrence"]

_CHUNK_CELLS = 1024  # grid cells (time steps × segments) whose gates the backward recomputes at once


def token_recurrence(
    gru: nn.GRU,
    inp: torch.Tensor,
    valid: torch.Tensor,
    doc_start: torch.Tensor,
    h0: torch.Tensor,
    fused: bool | None = None,
) -> torch.Tensor:
    """Causal GRU over the token axis with document resets and padding carry-through.

    gru: single-layer batch_first nn.GRU; inp: [B, S, In'] with In' ≤ In = gru.input_size: the
    missing trailing In − In' input columns are zeros (the first MoE layer's absent previous-layer
    state: passing x alone skips their share of the input matmuls, forward and backward);
    valid, doc_start: [B, S] bool; h0: [B, Dh] state before the first position of each row
    (cached state or zeros).
    Returns states [B, S, Dh]: at a real token t, h_t = GRU(inp_t, h_prev) where h_prev is the
    state after the previous real token of the row, 0 if a document started in between
    (doc_start at t or at padding since that token), h0 for the row's first real token otherwise.
    At padding positions the state of the last real token (or h0) is carried through.
    fused: True = `gru_scan` (gate-keeping scan, hand-written backward), False = `nn_gru_states`
    (plain autograd); None = `gru_scan` on CPU, nn.GRU elsewhere (cuDNN).
    """
    if fused if fused is not None else inp.device.type == "cpu":
        return gru_scan(gru, inp, valid, doc_start, h0)
    return nn_gru_states(gru, inp, valid, doc_start, h0)


def nn_gru_states(
    gru: nn.GRU, inp: torch.Tensor, valid: torch.Tensor, doc_start: torch.Tensor, h0: torch.Tensor
) -> torch.Tensor:
    """`token_recurrence` by one nn.GRU call (see the module docstring); differentiable by autograd."""
    _check_input_width(gru, inp)
    if inp.shape[-1] < gru.input_size:  # the missing trailing input columns are zeros
        inp = F.pad(inp, (0, gru.input_size - inp.shape[-1]))
    b, s, d_in = inp.shape
    dh = gru.hidden_size
    valid = valid.to(torch.bool)
    doc_start = doc_start.to(torch.bool)
    # One host sync for both checks (the packed path below needs one more, for its batch sizes).
    all_real, later_start = torch.stack([valid.all(), doc_start[:, 1:].any()]).tolist()
    if all_real and not later_start:
        # Fast path: one dense [B, S] call; a document start can only be at position 0.
        h_init = h0.masked_fill(doc_start[:, :1], 0.0)  # [B, Dh]
        out, _ = gru(inp, h_init.unsqueeze(0).contiguous())  # [B, S, Dh]
        return out

    dev = inp.device
    seg = segments(valid, doc_start)
    nv, ns = seg.vidx.numel(), seg.num
    if nv == 0:
        return h0.unsqueeze(1).expand(b, s, dh).clone()
    lengths = torch.bincount(seg.seg_id, minlength=ns)  # [Ns]
    seg_h0 = h0[seg.row] * seg.from_h0.unsqueeze(1).to(h0.dtype)  # [Ns, Dh]

    # Hand-built PackedSequence: segments sorted by length (desc); at time step j the packed data
    # holds the j-th token of the batch_sizes[j] longest segments, in sorted order.
    order = torch.argsort(lengths, descending=True, stable=True)  # [Ns] sorted -> segment
    rank = torch.empty_like(order)
    rank[order] = torch.arange(ns, device=dev)  # [Ns] segment -> sorted position
    lengths_cpu = lengths.cpu()  # host sync: PackedSequence wants its batch sizes on the host
    l_max = int(lengths_cpu.max())
    n_len = torch.bincount(lengths_cpu, minlength=l_max + 1)  # [Lmax+1] segments per length
    batch_sizes = ns - torch.cumsum(n_len, 0)[:l_max]  # [Lmax] segments longer than j
    time_off = (torch.cumsum(batch_sizes, 0) - batch_sizes).to(dev)  # [Lmax] packed offset of step j
    packed_pos = time_off[seg.pos] + rank[seg.seg_id]  # [Nv] where each real token sits in packed data
    inv = torch.empty_like(packed_pos)
    inv[packed_pos] = torch.arange(nv, device=dev)  # packed slot -> real token
    data = inp.reshape(-1, d_in)[seg.vidx][inv]  # [Nv, In] packed order
    packed = PackedSequence(data, batch_sizes, order, rank)
    out, _ = gru(packed, seg_h0.unsqueeze(0).contiguous())
    h_valid = out.data[packed_pos]  # [Nv, Dh] back in row-major order

    full = h_valid.new_zeros(b * s, dh).index_put((seg.vidx,), h_valid)  # [B*S, Dh]
    states = full[seg.shows].reshape(b, s, dh)  # [B, S, Dh] padding takes the last real token's state
    return torch.where(seg.before_first.view(b, s, 1), h0.unsqueeze(1).to(states.dtype), states)


def _check_input_width(gru: nn.GRU, inp: torch.Tensor) -> None:
    if inp.shape[-1] > gru.input_size:
        raise ValueError(f"token_recurrence: input has {inp.shape[-1]} features, the GRU takes {gru.input_size}")


@dataclass
class Segments:
    """The real tokens of a [B, S] batch regrouped as segments on a time-major grid [L, Ns].

    A segment is a maximal run of a row's real tokens with no document start in between (padding
    skipped); the grid's cell (t, j) holds the t-th token of segment j, L = the longest segment.
    """

    vidx: torch.Tensor  # [Nv] flat (row-major) index of each real token
    seg_id: torch.Tensor  # [Nv] its segment j
    pos: torch.Tensor  # [Nv] its place t in the segment
    num: int  # Ns, segments
    row: torch.Tensor  # [Ns] the row of each segment
    from_h0: torch.Tensor  # [Ns] bool: the segment continues the row's h0 (else it starts from 0)
    shows: torch.Tensor  # [B*S] flat index of the real token whose state each position shows
    before_first: torch.Tensor  # [B*S] bool: no real token yet in the row (the position shows h0)

    @property
    def cell(self) -> torch.Tensor:
        """[Nv] each real token's cell in the flattened grid, t * Ns + j."""
        return self.pos * self.num + self.seg_id

    @property
    def length(self) -> int:
        """L, tokens of the longest segment (a host sync on GPU)."""
        return int(self.pos.max()) + 1 if self.pos.numel() else 0


def segments(valid: torch.Tensor, doc_start: torch.Tensor) -> Segments:
    """Segments of real tokens (see `Segments`) for masks valid, doc_start [B, S] bool."""
    b, s = valid.shape
    dev = valid.device
    vidx = valid.reshape(-1).nonzero().squeeze(1)  # [Nv]
    nv = vidx.numel()
    rows = vidx // s  # [Nv]
    starts = doc_start.to(torch.long).cumsum(dim=1).reshape(-1)[vidx]  # [Nv] document starts at positions ≤ t
    first_in_row = torch.ones(nv, dtype=torch.bool, device=dev)
    first_in_row[1:] = rows[1:] != rows[:-1]
    starts_prev = torch.zeros_like(starts)  # [Nv] document starts up to the previous real token of the row
    starts_prev[1:] = starts[:-1]
    reset = starts > starts_prev.masked_fill(first_in_row, 0)  # [Nv] a document began since then
    seg_start = first_in_row | reset  # [Nv]
    seg_id = seg_start.to(torch.long).cumsum(0) - 1  # [Nv]
    seg_first = seg_start.nonzero().squeeze(1)  # [Ns]
    ns = seg_first.numel()
    pos = torch.arange(nv, device=dev) - seg_first[seg_id]  # [Nv] place in the segment
    last = torch.where(valid, torch.arange(s, device=dev), -1).cummax(dim=1).values  # [B, S] last real token ≤ t
    shows = (torch.arange(b, device=dev).unsqueeze(1) * s + last.clamp_min(0)).reshape(-1)  # [B*S]
    return Segments(vidx=vidx, seg_id=seg_id, pos=pos, num=ns, row=rows[seg_first],
                    from_h0=first_in_row[seg_first] & ~reset[seg_first], shows=shows,
                    before_first=(last < 0).reshape(-1))


class _GRUScan(torch.autograd.Function):
    """states = token_recurrence(inp, h0) with a scan forward that keeps its gates, and a
    hand-written backward.

    inp [B, S, In'] (In' ≤ In: missing trailing input columns are zeros); h0 [B, Dh];
    w_ih [3Dh, In], b_ih, w_hh [3Dh, Dh], b_hh: the GRU's parameters (passed explicitly so that
    autograd routes their gradients here); valid, doc_start [B, S] bool. Returns states [B, S, Dh].

    Both passes run on the segment grid [L, Ns] (`segments`): every segment restarts from its own
    initial state, so no reset masks are needed, and packed rows of several documents take L steps
    (the longest document) instead of S. The forward computes every input projection in one matmul
    and runs nn.GRU's cell per step (ATen's ops on ATen's layouts, so the states are bitwise
    nn.GRU's: one addmm into a preallocated buffer, then in-place elementwise ops), keeping the gates: the backward then needs no
    recomputation, and its input-side gradients are one matmul each over all tokens.
    """

    @staticmethod
    def forward(ctx, inp, h0, w_ih, b_ih, w_hh, b_hh, valid, doc_start):
        b, s, d_in = inp.shape
        dh = h0.shape[-1]
        dt = inp.dtype
        seg = segments(valid, doc_start)
        length, ns = seg.length, seg.num
        ctx.seg, ctx.shape, ctx.w_shapes = seg, (b, s, d_in, dh), (w_ih.shape, w_hh.shape)
        if length == 0:  # no real token at all: every position shows h0
            ctx.save_for_backward(None, None, None, None, None, None, None)
            return h0.unsqueeze(1).expand(b, s, dh).clone()
        w_in = w_ih[:, :d_in].to(dt)  # [3Dh, In'] the columns the input has
        w_hh_t = w_hh.to(dt).t()  # [Dh, 3Dh]
        b_hh = b_hh.to(dt)
        cell_pos = torch.full((length * ns,), -1, dtype=torch.long, device=inp.device)
        cell_pos.index_copy_(0, seg.cell, seg.vidx)  # [L*Ns] flat token position per grid cell, -1 empty
        # Empty cells (after a segment's end) read token 0: finite values no gradient ever reaches.
        gi_tok = F.linear(inp.reshape(b * s, d_in), w_in, b_ih.to(dt))  # [B*S, 3Dh] all input projections
        gi = gi_tok.index_select(0, cell_pos.clamp_min(0)).view(length, ns, 3 * dh)  # [L, Ns, 3Dh]
        del gi_tok  # freed before the scan's buffers are allocated (peak memory at long S)
        h = h0.to(dt)[seg.row] * seg.from_h0.unsqueeze(1).to(dt)  # [Ns, Dh] each segment's initial state
        h_init = h
        # gates[t] = [r | z | r ⊙ (W_hn h + b_hn)] of step t: the hidden projection's buffer, which the
        # cell overwrites in place exactly as ATen's does (same ops on the same layouts, so the states
        # are bitwise nn.GRU's).
        gates = inp.new_empty(length, ns, 3 * dh)  # [L, Ns, 3Dh]
        n = inp.new_empty(length, ns, dh)  # [L, Ns, Dh] candidate
        hs = inp.new_empty(length, ns, dh)  # [L, Ns, Dh] state after each step
        with torch.no_grad():
            _loops()[0](gi, h, w_hh_t, b_hh, gates, n, hs)
            full = inp.new_zeros(b * s, dh).index_copy_(0, seg.vidx, hs.view(-1, dh).index_select(0, seg.cell))
            states = full[seg.shows].view(b, s, dh)  # padding shows the last real token's state
            states = torch.where(seg.before_first.view(b, s, 1), h0.to(dt).unsqueeze(1), states)
        ctx.save_for_backward(inp, h_init, w_ih, w_hh, gates, n, hs)
        ctx.cell_pos = cell_pos
        return states

    @staticmethod
    def backward(ctx, grad_states):
        inp, h_init, w_ih, w_hh, gates, n, hs = ctx.saved_tensors
        seg = ctx.seg
        b, s, d_in, dh = ctx.shape
        dt = grad_states.dtype  # computed in the gradient's dtype (autocast is off in backward)
        grad = grad_states.reshape(b * s, dh)  # [B*S, Dh]
        pos_row = torch.arange(b * s, device=grad.device) // s  # [B*S]
        d_h0 = grad.new_zeros(b, dh).index_add_(0, pos_row[seg.before_first], grad[seg.before_first])  # [B, Dh]
        d_w_ih, d_w_hh = (grad.new_zeros(shape) for shape in ctx.w_shapes)  # [3Dh, In], [3Dh, Dh]
        d_b_ih, d_b_hh = grad.new_zeros(3 * dh), grad.new_zeros(3 * dh)  # [3Dh]
        if inp is None:  # no real token at all
            d_inp = grad.new_zeros(b, s, d_in) if ctx.needs_input_grad[0] else None
            return d_inp, d_h0, d_w_ih, d_b_ih, d_w_hh, d_b_hh, None, None
        with torch.no_grad():
            # A padding position shows the state of the row's last real token (or h0): its gradient
            # goes there.
            shown = ~seg.before_first
            g_tok = torch.zeros_like(grad).index_add_(0, seg.shows[shown], grad[shown])  # [B*S, Dh]
            saved = (h_init, gates, n, hs, w_hh.to(dt))
            if dt != gates.dtype:
                saved = tuple(t.to(dt) for t in saved)
            d_gi_tok = grad.new_zeros(b * s, 3 * dh)  # [B*S, 3Dh] gradient of each token's input projection
            length, ns = hs.shape[0], seg.num
            carry = torch.zeros_like(saved[0])  # [Ns, Dh] gradient reaching the chunk's last state from later
            dense = seg.vidx.numel() == length * ns  # every grid cell holds a token: no masks needed
            steps = max(1, _CHUNK_CELLS // ns)  # time steps per chunk
            for hi in range(length, 0, -steps):
                lo = max(hi - steps, 0)
                carry = _backward_chunk(lo, hi, ns, ctx.cell_pos, g_tok, carry, saved, dense,
                                        (d_gi_tok, d_w_hh, d_b_hh))
            # Segments that continue h0 pass their initial state's gradient on to it.
            d_h0.index_add_(0, seg.row, carry * seg.from_h0.unsqueeze(1).to(dt))
            # Input side: one matmul each over all tokens (padding rows of d_gi_tok are 0).
            w_in = w_ih[:, :d_in].to(dt)
            d_inp = (d_gi_tok @ w_in).view(b, s, d_in) if ctx.needs_input_grad[0] else None
            d_w_ih[:, :d_in].addmm_(d_gi_tok.t(), inp.reshape(b * s, d_in).to(dt))
            d_b_ih.add_(d_gi_tok.sum(0))
        return d_inp, d_h0, d_w_ih, d_b_ih, d_w_hh, d_b_hh, None, None


def _scan_forward(gi: torch.Tensor, h: torch.Tensor, w_hh_t: torch.Tensor, b_hh: torch.Tensor, gates: torch.Tensor,
                  n: torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
    """The forward's time loop: aten's GRU cell (RNN.cpp, GRUCell with precomputed input gates), the
    same ops on the same layouts, writing into the preallocated buffers.

    gi [L, Ns, 3Dh] input projections (b_ih included); h [Ns, Dh] initial states; w_hh_t [Dh, 3Dh];
    b_hh [3Dh]. Fills gates [L, Ns, 3Dh] = [r | z | r ⊙ (W_hn h + b_hn)], n [L, Ns, Dh] (candidates)
    and hs [L, Ns, Dh] (states); returns the last state.
    """
    dh = h.shape[1]
    for t in range(gi.shape[0]):
        g, git, nt = gates[t], gi[t], n[t]
        torch.addmm(b_hh, h, w_hh_t, out=g)
        r = g[:, :dh].add_(git[:, :dh]).sigmoid_()
        z = g[:, dh : 2 * dh].add_(git[:, dh : 2 * dh]).sigmoid_()
        torch.add(git[:, 2 * dh :], g[:, 2 * dh :].mul_(r), out=nt).tanh_()
        h = torch.sub(h, nt, out=hs[t]).mul_(z).add_(nt)  # n + z (h − n)
    return h


def _scan_backward(grad: torch.Tensor, carry: torch.Tensor, coef: torch.Tensor, direct: torch.Tensor,
                   d_tot: torch.Tensor, d_gh: torch.Tensor, w_hh: torch.Tensor) -> torch.Tensor:
    """The backward's reverse time loop over one chunk, 4 ops per step.

    grad [T, Ns, Dh] dL/d(state) from outside; carry [Ns, Dh] dL/dh of the chunk's last state from
    later steps; coef [T, Ns, 3, Dh] pre-activation gradients (r, z, W_hn h) per unit of dh';
    direct [T, Ns, Dh] ∂h'/∂h_prev besides W_hh; w_hh [3Dh, Dh]. Fills d_tot [T, Ns, Dh] (total
    gradient of each state) and d_gh [T, Ns, 3Dh] (gradient of W_hh h_prev + b_hh); returns dL/dh_prev
    of the chunk's first step.
    """
    for t in range(grad.shape[0] - 1, -1, -1):
        tot = torch.add(grad[t], carry, out=d_tot[t])  # [Ns, Dh] dL/dh_t
        torch.mul(coef[t], tot.unsqueeze(1), out=d_gh[t].view(coef.shape[1], 3, -1))  # [Ns, 3, Dh]
        carry = torch.addmm(tot * direct[t], d_gh[t], w_hh)  # [Ns, Dh] dL/dh_prev
    return carry


@functools.cache
def _loops():
    """(_scan_forward, _scan_backward), compiled by TorchScript where it is available: the loops then
    run in its C++ interpreter, without Python's overhead per op (at the demo's sizes the forward
    loop takes 25 % less time); the same ATen ops either way, so the same numbers."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.compile
            return torch.jit.script(_scan_forward), torch.jit.script(_scan_backward)
    except Exception:  # TorchScript gone or broken: the plain Python loops
        return _scan_forward, _scan_backward


def _backward_chunk(lo, hi, ns, cell_pos, g_tok, carry, saved, dense, grads):
    """Backward through grid rows lo..hi-1 (time steps of every segment), latest first.

    cell_pos [L*Ns]: flat token position per grid cell (-1 empty); g_tok [B*S, Dh]: dL/d(state)
    per real token; carry [Ns, Dh]: dL/dh at step hi - 1 from the steps after it.
    saved: the forward's (h_init [Ns, Dh], gates [L, Ns, 3Dh] = [r | z | r ⊙ (W_hn h + b_hn)],
    n [L, Ns, Dh], hs [L, Ns, Dh], w_hh [3Dh, Dh]); dense: no empty cell in the grid.
    grads: (d_gi_tok [B*S, 3Dh], d_w_hh, d_b_hh), accumulated in place.
    Returns dL/dh_prev of step lo [Ns, Dh] (the new carry). Per chunk, the coefficients that multiply
    the incoming gradient are computed for all its steps at once, leaving 4 ops per step in the
    reverse loop; the chunk's working set stays in cache, so the cost per token does not grow with S.
    """
    h_init, gates, n_all, hs, w_hh = saved
    d_gi_tok, d_w_hh, d_b_hh = grads
    t_len, dh = hi - lo, h_init.shape[-1]
    pos = cell_pos[lo * ns : hi * ns]  # [T*Ns]
    if dense:
        grad_grid = g_tok.index_select(0, pos).view(t_len, ns, dh)
    else:
        filled = pos >= 0  # [T*Ns] cells holding a token
        grad_grid = g_tok.index_select(0, pos.clamp_min(0)).masked_fill_(~filled.unsqueeze(1), 0.0)
        grad_grid = grad_grid.view(t_len, ns, dh)
    hp = hs[max(lo - 1, 0) : hi - 1]  # states of steps lo-1..hi-2
    if lo == 0:
        hp = torch.cat([h_init.unsqueeze(0), hp], dim=0)  # [T, Ns, Dh] state each step starts from
    r, z, q = gates[lo:hi].split(dh, dim=-1)  # [T, Ns, Dh] each; q = r ⊙ (W_hn h + b_hn)
    n = n_all[lo:hi]  # [T, Ns, Dh]
    # Pre-activation gradients per unit of dh' (so the loop needs one multiply):
    c_n = (1 - z) * (1 - n * n)  # n
    coef = [c_n * q * (1 - r), (hp - n) * z * (1 - z), c_n * r]  # r, z, W_hn h
    direct = z  # [T, Ns, Dh] ∂h'/∂h_prev besides the path through W_hh
    if not dense:  # empty cells (after a segment's end): no gate sees the gradient, h passes through
        vf = filled.view(t_len, ns, 1).to(c_n.dtype)
        c_n = c_n * vf
        coef = [c * vf for c in coef]
        direct = z.masked_fill(~filled.view(t_len, ns, 1), 1.0)
    coef = torch.cat(coef, dim=-1).view(t_len, ns, 3, dh)

    d_gh = hp.new_empty(t_len, ns, 3 * dh)  # [T, Ns, 3Dh] gradient of W_hh h_prev + b_hh
    d_tot = hp.new_empty(t_len, ns, dh)  # [T, Ns, Dh] total gradient of each state
    carry = _loops()[1](grad_grid, carry, coef, direct, d_tot, d_gh, w_hh)
    d_gi = torch.cat([d_gh[..., : 2 * dh], d_tot * c_n], dim=-1).view(-1, 3 * dh)  # [T*Ns, 3Dh]; empty cells 0
    flat_gh = d_gh.view(-1, 3 * dh)  # [T*Ns, 3Dh]
    if dense:
        d_gi_tok.index_copy_(0, pos, d_gi)
    else:
        d_gi_tok.index_copy_(0, pos[filled], d_gi[filled])
    d_w_hh.addmm_(flat_gh.t(), hp.reshape(-1, dh))  # [3Dh, Dh]
    d_b_hh.add_(flat_gh.sum(0))
    return carry


def gru_scan(gru: nn.GRU, inp: torch.Tensor, valid: torch.Tensor, doc_start: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """`token_recurrence` by the gate-keeping scan and the hand-written backward (CPU training);
    without autograd, nn.GRU's forward (ATen's C++ time loop: inference and decoding).

    gru: single-layer, unidirectional, batch_first nn.GRU with biases; inp [B, S, In'] (In' ≤ In,
    missing trailing columns are zeros); valid, doc_start [B, S] bool; h0 [B, Dh].
    Returns states [B, S, Dh].
    """
    _check_input_width(gru, inp)
    valid = valid.to(torch.bool)
    doc_start = doc_start.to(torch.bool)
    if not torch.is_grad_enabled():
        return nn_gru_states(gru, inp, valid, doc_start, h0)
    return _GRUScan.apply(inp, h0, gru.weight_ih_l0, gru.bias_ih_l0, gru.weight_hh_l0, gru.bias_hh_l0,
                          valid, doc_start)
