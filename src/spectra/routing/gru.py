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
  longest segment, so packed rows cost L steps, not S), recomputes every gate from the saved
  states with two matmuls, computes the coefficients that multiply the incoming gradient for all
  steps at once, and leaves 4 ops per step in the reverse loop; the weight gradients are one
  matmul each after it. It keeps only the inputs and the output states: memory linear in S.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

__all__ = ["Segments", "gru_scan", "nn_gru_states", "segments", "token_recurrence"]

_CHUNK = 1024  # time steps whose per-step views the backward loop creates at once


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
    vidx = valid.reshape(-1).nonzero().squeeze(1)  # [Nv] real tokens, row-major order
    nv = vidx.numel()
    if nv == 0:
        return h0.unsqueeze(1).expand(b, s, dh).clone()
    rows = vidx // s  # [Nv]
    starts_so_far = doc_start.to(torch.long).cumsum(dim=1).reshape(-1)[vidx]  # [Nv] doc starts at ≤ t
    first_in_row = torch.ones(nv, dtype=torch.bool, device=dev)  # [Nv]
    first_in_row[1:] = rows[1:] != rows[:-1]
    prev = torch.zeros_like(starts_so_far)  # [Nv] doc starts up to the previous real token
    prev[1:] = starts_so_far[:-1]
    prev = prev.masked_fill(first_in_row, 0)
    reset = starts_so_far > prev  # [Nv] a document began since the previous real token
    seg_start = first_in_row | reset  # [Nv]
    seg_id = seg_start.to(torch.long).cumsum(0) - 1  # [Nv] segment of each real token
    seg_first = seg_start.nonzero().squeeze(1)  # [Ns] first token of each segment
    ns = seg_first.numel()
    lengths = torch.bincount(seg_id, minlength=ns)  # [Ns]
    carry = first_in_row[seg_first] & ~reset[seg_first]  # [Ns] continues the row's h0
    seg_h0 = h0[rows[seg_first]] * carry.unsqueeze(1).to(h0.dtype)  # [Ns, Dh]

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
    pos = torch.arange(nv, device=dev) - seg_first[seg_id]  # [Nv] position inside the segment
    packed_pos = time_off[pos] + rank[seg_id]  # [Nv] where each real token sits in packed data
    inv = torch.empty_like(packed_pos)
    inv[packed_pos] = torch.arange(nv, device=dev)  # packed slot -> real token
    data = inp.reshape(-1, d_in)[vidx][inv]  # [Nv, In] packed order
    packed = PackedSequence(data, batch_sizes, order, rank)
    out, _ = gru(packed, seg_h0.unsqueeze(0).contiguous())
    h_valid = out.data[packed_pos]  # [Nv, Dh] back in row-major order

    full = h_valid.new_zeros(b * s, dh).index_put((vidx,), h_valid)  # [B*S, Dh]
    last = torch.where(valid, torch.arange(s, device=dev), -1).cummax(dim=1).values  # [B, S]
    src = (torch.arange(b, device=dev).unsqueeze(1) * s + last.clamp_min(0)).reshape(-1)  # [B*S]
    states = full[src].reshape(b, s, dh)  # [B, S, Dh] padding takes the last real token's state
    return torch.where((last < 0).unsqueeze(-1), h0.unsqueeze(1).to(states.dtype), states)


@dataclass
class Segments:
    """The real tokens of a [B, S] batch regrouped as segments on a time-major grid [L, Ns].

    A segment is a maximal run of a row's real tokens with no document start in between (padding
    skipped); the grid's cell (t, j) holds the t-th token of segment j, L = the longest segment.
    """

    vidx: torch.Tensor  # [Nv] flat (row-major) index of each real token
    cell: torch.Tensor  # [Nv] its cell in the flattened grid, t * Ns + j
    num: int  # Ns, segments
    length: int  # L, tokens of the longest segment
    row: torch.Tensor  # [Ns] the row of each segment
    from_h0: torch.Tensor  # [Ns] bool: the segment continues the row's h0 (else it starts from 0)
    shows: torch.Tensor  # [B*S] flat index of the real token whose state each position shows
    before_first: torch.Tensor  # [B*S] bool: no real token yet in the row (the position shows h0)


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
    length = int(pos.max()) + 1 if nv else 0  # host sync (free on CPU): the grid's size
    last = torch.where(valid, torch.arange(s, device=dev), -1).cummax(dim=1).values  # [B, S] last real token ≤ t
    shows = (torch.arange(b, device=dev).unsqueeze(1) * s + last.clamp_min(0)).reshape(-1)  # [B*S]
    return Segments(vidx=vidx, cell=pos * ns + seg_id, num=ns, length=length, row=rows[seg_first],
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
        g = 3 * dh
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
            if length == 0:  # no real token at all
                zero = torch.zeros_like
                return zero(inp), d_h0, zero(w_ih), zero(b_ih), zero(w_hh), zero(b_hh), None, None, None

            def to_grid(rows_of_tokens: torch.Tensor) -> torch.Tensor:
                """[Nv, F] per real token -> [L, Ns, F] on the segment grid (zeros in empty cells)."""
                out = rows_of_tokens.new_zeros(length * ns, rows_of_tokens.shape[-1])
                return out.index_copy_(0, seg.cell, rows_of_tokens).view(length, ns, -1)

            cells = torch.zeros(length * ns, dtype=torch.bool, device=grad.device)
            vmask = cells.index_fill_(0, seg.cell, True).view(length, ns, 1)  # [L, Ns, 1] cells holding a token
            x = to_grid(inp.to(dt).reshape(-1, d_in)[seg.vidx])  # [L, Ns, In]
            out = to_grid(states.to(dt).reshape(-1, dh)[seg.vidx])  # [L, Ns, Dh]
            grad_grid = to_grid(g_tok[seg.vidx])  # [L, Ns, Dh]
            h_init = h0[seg.row] * seg.from_h0.unsqueeze(1).to(dt)  # [Ns, Dh] each segment's initial state
            hp = torch.cat([h_init.unsqueeze(0), out[:-1]], dim=0)  # [L, Ns, Dh] state each step starts from
            # Recompute every gate at once (two matmuls).
            gi = F.linear(x, w_ih, b_ih)  # [L, Ns, 3Dh]
            gh = F.linear(hp, w_hh, b_hh)  # [L, Ns, 3Dh]
            rz = torch.sigmoid(gi[..., : 2 * dh] + gh[..., : 2 * dh])  # [L, Ns, 2Dh]
            r, z = rz[..., :dh], rz[..., dh:]
            gh_n = gh[..., 2 * dh :]  # [L, Ns, Dh] W_hn h + b_hn
            n = torch.tanh(torch.addcmul(gi[..., 2 * dh :], r, gh_n))  # [L, Ns, Dh]
            vf = vmask.to(dt)  # empty cells (after a segment's end): no gate sees the gradient
            # Pre-activation gradients per unit of dh' (so the loop needs one multiply):
            c_n = (1 - z) * (1 - n * n) * vf  # n
            coef = torch.cat([c_n * gh_n * r * (1 - r), (hp - n) * z * (1 - z) * vf, c_n * r], dim=-1)  # r, z, W_hn h
            coef = coef.view(length, ns, 3, dh)
            direct = torch.where(vmask, z, 1.0)  # [L, Ns, Dh] ∂h'/∂h_prev besides the path through W_hh
            del gi, gh, rz, r, z, gh_n, n  # free the recomputed gates before the loop: lower peak memory

            d_gh = grad.new_empty(length, ns, g)  # [L, Ns, 3Dh] gradient of W_hh h_prev + b_hh
            d_tot = grad.new_empty(length, ns, dh)  # [L, Ns, Dh] total gradient of each state
            d_tot3, d_gh3 = d_tot.view(length, ns, 1, dh), d_gh.view(length, ns, 3, dh)
            carry = torch.zeros_like(h_init)  # [Ns, Dh] gradient reaching state t from step t + 1
            for hi in range(length, 0, -_CHUNK):
                # Per-step views made once per chunk (unbind is one call), so the loop runs 4 ops per
                # step; chunks keep the number of live view objects bounded for long sequences.
                c = slice(max(hi - _CHUNK, 0), hi)
                grad_t, tot_t, tot3_t = grad_grid[c].unbind(0), d_tot[c].unbind(0), d_tot3[c].unbind(0)
                gh_t, gh3_t, coef_t, direct_t = d_gh[c].unbind(0), d_gh3[c].unbind(0), coef[c].unbind(0), direct[c].unbind(0)
                for t in range(len(grad_t) - 1, -1, -1):
                    torch.add(grad_t[t], carry, out=tot_t[t])  # [Ns, Dh] dL/dh_t
                    torch.mul(coef_t[t], tot3_t[t], out=gh3_t[t])  # [Ns, 3, Dh]
                    carry = torch.addmm(tot_t[t] * direct_t[t], gh_t[t], w_hh)  # [Ns, Dh] dL/dh_prev
            # Segments that continue h0 pass their initial state's gradient on to it.
            d_h0.index_add_(0, seg.row, carry * seg.from_h0.unsqueeze(1).to(dt))
            d_gi = torch.cat([d_gh[..., : 2 * dh], d_tot * c_n], dim=-1)  # [L, Ns, 3Dh]
            flat_gi, flat_gh = d_gi.reshape(-1, g), d_gh.reshape(-1, g)  # [L·Ns, 3Dh]; empty cells are 0
            d_inp = inp.new_zeros(b * s, d_in, dtype=dt).index_copy_(0, seg.vidx, flat_gi[seg.cell] @ w_ih)
            d_w_ih = flat_gi.t() @ x.reshape(-1, d_in)  # [3Dh, In]
            d_w_hh = flat_gh.t() @ hp.reshape(-1, dh)  # [3Dh, Dh]
        return d_inp.view(b, s, d_in), d_h0, d_w_ih, flat_gi.sum(0), d_w_hh, flat_gh.sum(0), None, None, None


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
