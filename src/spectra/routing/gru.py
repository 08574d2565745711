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
- `gru_scan` (CPU): the same forward under no_grad — ATen's GRU runs the time loop in C++ — and a
  hand-written backward. Why: on CPU, nn.GRU's autograd records ~30 nodes per time step, so at the
  router's sizes (a few rows, Dh = 128) backward costs per-node overhead × S, not arithmetic.
  The hand-written backward works on the segments laid out as a time-major grid [L, Ns] (L = the
  longest segment, so packed rows cost L steps, not S), in chunks of time steps taken latest first
  (`_CHUNK_CELLS` cells each, so the working set stays in cache and the time per token does not
  grow with S): per chunk it recomputes every gate from the saved states with two matmuls,
  computes the coefficients that multiply the incoming gradient for all steps at once, and leaves
  4 ops per step in the reverse loop; the chunk's weight gradients are one matmul each after it.
  It keeps only the inputs and the output states: memory linear in S.
"""

from __future__ import annotations

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

    gru: single-layer batch_first nn.GRU; inp: [B, S, In]; valid, doc_start: [B, S] bool;
    h0: [B, Dh] state before the first position of each row (cached state or zeros).
    Returns states [B, S, Dh]: at a real token t, h_t = GRU(inp_t, h_prev) where h_prev is the
    state after the previous real token of the row, 0 if a document started in between
    (doc_start at t or at padding since that token), h0 for the row's first real token otherwise.
    At padding positions the state of the last real token (or h0) is carried through.
    fused: True = `gru_scan` (hand-written backward), False = `nn_gru_states` (plain autograd);
    None = `gru_scan` on CPU, nn.GRU elsewhere (cuDNN).
    """
    if fused if fused is not None else inp.device.type == "cpu":
        return gru_scan(gru, inp, valid, doc_start, h0)
    return nn_gru_states(gru, inp, valid, doc_start, h0)


def nn_gru_states(
    gru: nn.GRU, inp: torch.Tensor, valid: torch.Tensor, doc_start: torch.Tensor, h0: torch.Tensor
) -> torch.Tensor:
    """`token_recurrence` by one nn.GRU call (see the module docstring); differentiable by autograd."""
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
    """states = token_recurrence(inp, h0): nn.GRU's forward, hand-written backward.

    inp [B, S, In]; h0 [B, Dh]; w_ih [3Dh, In], b_ih, w_hh [3Dh, Dh], b_hh: the GRU's parameters
    (passed explicitly so that autograd routes their gradients here); gru: the module itself, for
    the forward call; valid, doc_start [B, S] bool. Returns states [B, S, Dh].

    The backward runs on the segment grid [L, Ns] (`segments`): every segment restarts from its
    own initial state, so no reset masks are needed, and packed rows of several documents take
    L steps (the longest document) instead of S.
    """

    @staticmethod
    def forward(ctx, inp, h0, w_ih, b_ih, w_hh, b_hh, gru, valid, doc_start):
        with torch.no_grad():
            states = nn_gru_states(gru, inp, valid, doc_start, h0)  # [B, S, Dh]
        ctx.save_for_backward(inp, h0, w_ih, b_ih, w_hh, b_hh, states, valid, doc_start)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        inp, h0, w_ih, b_ih, w_hh, b_hh, states, valid, doc_start = ctx.saved_tensors
        b, s, d_in = inp.shape
        dh = h0.shape[-1]
        dt = grad_states.dtype  # computed in the gradient's dtype (autocast is off in backward)
        w_ih, b_ih, w_hh, b_hh, h0 = (t.to(dt) for t in (w_ih, b_ih, w_hh, b_hh, h0))
        seg = segments(valid, doc_start)
        length, ns = seg.length, seg.num
        with torch.no_grad():
            grad = grad_states.reshape(b * s, dh)  # [B*S, Dh]
            # A padding position shows the state of the row's last real token (or h0): its gradient
            # goes there.
            shown = ~seg.before_first
            g_tok = torch.zeros_like(grad).index_add_(0, seg.shows[shown], grad[shown])  # [B*S, Dh]
            pos_row = torch.arange(b * s, device=grad.device) // s  # [B*S]
            d_h0 = torch.zeros_like(h0).index_add_(0, pos_row[seg.before_first], grad[seg.before_first])  # [B, Dh]
            d_inp = inp.new_zeros(b * s, d_in, dtype=dt)  # [B*S, In]
            d_w_ih, d_w_hh = torch.zeros_like(w_ih), torch.zeros_like(w_hh)  # [3Dh, In], [3Dh, Dh]
            d_b_ih, d_b_hh = torch.zeros_like(b_ih), torch.zeros_like(b_hh)  # [3Dh]
            if length == 0:  # no real token at all
                return d_inp.view(b, s, d_in), d_h0, d_w_ih, d_b_ih, d_w_hh, d_b_hh, None, None, None

            # The grid as an index: the flat position of the token in each cell, -1 where empty.
            cell_pos = torch.full((length * ns,), -1, dtype=torch.long, device=grad.device)
            cell_pos.index_copy_(0, seg.cell, seg.vidx)  # [L*Ns]
            inp_flat, states_flat = inp.reshape(b * s, d_in), states.reshape(b * s, dh)
            h_init = h0[seg.row] * seg.from_h0.unsqueeze(1).to(dt)  # [Ns, Dh] each segment's initial state
            carry = torch.zeros_like(h_init)  # [Ns, Dh] gradient reaching the chunk's last state from later
            steps = max(1, _CHUNK_CELLS // ns)  # time steps per chunk
            for hi in range(length, 0, -steps):
                lo = max(hi - steps, 0)
                carry = _backward_chunk(lo, hi, ns, cell_pos, inp_flat, states_flat, g_tok, h_init, carry,
                                        (w_ih, b_ih, w_hh, b_hh), (d_inp, d_w_ih, d_b_ih, d_w_hh, d_b_hh))
            # Segments that continue h0 pass their initial state's gradient on to it.
            d_h0.index_add_(0, seg.row, carry * seg.from_h0.unsqueeze(1).to(dt))
        return d_inp.view(b, s, d_in), d_h0, d_w_ih, d_b_ih, d_w_hh, d_b_hh, None, None, None


def _backward_chunk(lo, hi, ns, cell_pos, inp_flat, states_flat, g_tok, h_init, carry, weights, grads):
    """Backward through grid rows lo..hi-1 (time steps of every segment), latest first.

    cell_pos [L*Ns]: flat token position per grid cell (-1 empty); inp_flat [B*S, In],
    states_flat [B*S, Dh]: the forward's inputs and states; g_tok [B*S, Dh]: dL/d(state) per real
    token; h_init [Ns, Dh]; carry [Ns, Dh]: dL/dh at step hi - 1 from the steps after it.
    weights: (w_ih, b_ih, w_hh, b_hh); grads: (d_inp [B*S, In], d_w_ih, d_b_ih, d_w_hh, d_b_hh),
    accumulated in place. Returns dL/dh_prev of step lo [Ns, Dh] (the new carry).
    Only the chunk's gates are recomputed, so its working set stays in cache and the cost per
    token does not grow with S.
    """
    w_ih, b_ih, w_hh, b_hh = weights
    d_inp, d_w_ih, d_b_ih, d_w_hh, d_b_hh = grads
    t_len, dh = hi - lo, h_init.shape[-1]
    dt = h_init.dtype
    pos = cell_pos[lo * ns : hi * ns]  # [T*Ns]
    filled = pos >= 0  # [T*Ns] cells holding a token
    src = pos.clamp_min(0)  # empty cells read token 0: finite values whose coefficients are masked to 0
    x = inp_flat.index_select(0, src).to(dt).view(t_len, ns, -1)  # [T, Ns, In]
    grad_grid = g_tok.index_select(0, src).masked_fill_(~filled.unsqueeze(1), 0.0).view(t_len, ns, dh)
    prev_pos = cell_pos[max(lo - 1, 0) * ns : (hi - 1) * ns].clamp_min(0)  # cells of steps lo-1..hi-2
    hp = states_flat.index_select(0, prev_pos).to(dt).view(-1, ns, dh)
    if lo == 0:
        hp = torch.cat([h_init.unsqueeze(0), hp], dim=0)  # [T, Ns, Dh] state each step starts from
    vmask = filled.view(t_len, ns, 1)
    # Recompute the chunk's gates at once (two matmuls).
    gi = F.linear(x, w_ih, b_ih)  # [T, Ns, 3Dh]
    gh = F.linear(hp, w_hh, b_hh)  # [T, Ns, 3Dh]
    rz = torch.sigmoid(gi[..., : 2 * dh] + gh[..., : 2 * dh])  # [T, Ns, 2Dh]
    r, z = rz[..., :dh], rz[..., dh:]
    gh_n = gh[..., 2 * dh :]  # [T, Ns, Dh] W_hn h + b_hn
    n = torch.tanh(torch.addcmul(gi[..., 2 * dh :], r, gh_n))  # [T, Ns, Dh]
    vf = vmask.to(dt)  # empty cells (after a segment's end): no gate sees the gradient
    # Pre-activation gradients per unit of dh' (so the loop needs one multiply):
    c_n = (1 - z) * (1 - n * n) * vf  # n
    coef = torch.cat([c_n * gh_n * r * (1 - r), (hp - n) * z * (1 - z) * vf, c_n * r], dim=-1)  # r, z, W_hn h
    coef = coef.view(t_len, ns, 3, dh)
    direct = torch.where(vmask, z, 1.0)  # [T, Ns, Dh] ∂h'/∂h_prev besides the path through W_hh
    del gi, gh, rz, r, z, gh_n, n

    d_gh = x.new_empty(t_len, ns, 3 * dh)  # [T, Ns, 3Dh] gradient of W_hh h_prev + b_hh
    d_tot = x.new_empty(t_len, ns, dh)  # [T, Ns, Dh] total gradient of each state
    # Per-step views made once (unbind is one call), so the loop runs 4 ops per step.
    grad_t, tot_t, tot3_t = grad_grid.unbind(0), d_tot.unbind(0), d_tot.view(t_len, ns, 1, dh).unbind(0)
    gh_t, gh3_t = d_gh.unbind(0), d_gh.view(t_len, ns, 3, dh).unbind(0)
    coef_t, direct_t = coef.unbind(0), direct.unbind(0)
    for t in range(t_len - 1, -1, -1):
        torch.add(grad_t[t], carry, out=tot_t[t])  # [Ns, Dh] dL/dh_t
        torch.mul(coef_t[t], tot3_t[t], out=gh3_t[t])  # [Ns, 3, Dh]
        carry = torch.addmm(tot_t[t] * direct_t[t], gh_t[t], w_hh)  # [Ns, Dh] dL/dh_prev
    d_gi = torch.cat([d_gh[..., : 2 * dh], d_tot * c_n], dim=-1)  # [T, Ns, 3Dh]
    flat_gi, flat_gh = d_gi.view(-1, 3 * dh), d_gh.view(-1, 3 * dh)  # [T*Ns, 3Dh]; empty cells are 0
    d_inp.index_copy_(0, pos[filled], flat_gi[filled] @ w_ih)
    d_w_ih.addmm_(flat_gi.t(), x.view(-1, x.shape[-1]))  # [3Dh, In]
    d_w_hh.addmm_(flat_gh.t(), hp.reshape(-1, dh))  # [3Dh, Dh]
    d_b_ih.add_(flat_gi.sum(0))
    d_b_hh.add_(flat_gh.sum(0))
    return carry


def gru_scan(gru: nn.GRU, inp: torch.Tensor, valid: torch.Tensor, doc_start: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """`token_recurrence` with nn.GRU's forward and the hand-written backward (CPU).

    gru: single-layer, unidirectional, batch_first nn.GRU with biases; inp [B, S, In];
    valid, doc_start [B, S] bool; h0 [B, Dh]. Returns states [B, S, Dh].
    """
    valid = valid.to(torch.bool)
    doc_start = doc_start.to(torch.bool)
    if not torch.is_grad_enabled():
        return nn_gru_states(gru, inp, valid, doc_start, h0)
    return _GRUScan.apply(inp, h0, gru.weight_ih_l0, gru.bias_ih_l0, gru.weight_hh_l0, gru.bias_hh_l0,
                          gru, valid, doc_start)
