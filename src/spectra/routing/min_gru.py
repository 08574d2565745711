"""The minimal GRU routing state (`router.state_cell=mingru`): a cheaper recurrence than the
paper's GRU, for small routers where the GRU's sequential scan dominates (issue #23).

minGRU (Feng et al. 2024, "Were RNNs All We Needed?"): the gates see the input only, never the
state, so the recurrence is linear in the state:

    z = σ(W_z u_t + b_z),  h̃ = W_h u_t + b_h           u_t: the GRU's input at token t
    h_t = (1 − z) ⊙ h_{t−1} + z ⊙ h̃                     (= a_t ⊙ h_{t−1} + b_t)

This is NOT the paper's GRU (no reset gate, no tanh, no state-dependent gates): a different
routing state, chosen in the config, never a silent replacement. `router.state_cell=gru` (the
default) is the paper's method, unchanged.

Same contract as `routing.gru.token_recurrence` (same state size, same output [B, S, Dh]):
at a real token the state advances from h_prev = 0 where a document began since the row's
previous real token (a doc start at that token or at padding in between), from the previous
state otherwise (h0 before the row's first real token); padding carries the state unchanged
(positions before the first real token show h0). In the linear form that is a_t = 0 at such a
reset token, a_t = 1 and b_t = 0 at padding: one scan over the whole row, resets included.

The scan (`linear_scan`): h_t = Σ_{j≤t} (Π_{j<i≤t} a_i) b_j + (Π_{i≤t} a_i) h0, in chunks of
C ≈ √S steps: (1) inside every chunk at once, the local states from 0 (C − 1 sequential steps on
[B, S/C, Dh]) and the running products Π a; (2) the chunks' starting states,
chunk by chunk (S/C steps on [B, Dh]); (3) h = local + products ⊙ start, all positions at once.
So ~2√S small sequential steps instead of S GRU steps, no logarithms: every product is of values in
[0, 1] (an underflow to 0 is the exact product's own rounding), so the result is the sequential
loop's to fp32 rounding, resets (a = 0) included. The backward is the same scan run backwards
(g_t = dL/dh_t + a_{t+1} g_{t+1}; dL/db_t = g_t, dL/da_t = g_t ⊙ h_{t−1}), hand-written together
with the gates' derivatives in one autograd node (`_MinGRUScan`). The scan runs in at least fp32
(bf16 inputs are upcast), returns the input's dtype. Decoding one token (S = 1) is
h = a ⊙ h0 + b: the same recurrence, so cached decoding equals the full forward to rounding.

Depth-only recurrence (`router.recurrence=depth`): h^l_t = (1 − z) ⊙ h^{l−1}_t + z ⊙ h̃, gates
from x^l_t (`MinGRU.forward`, per token, no scan).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MinGRU", "doc_resets", "linear_scan", "min_gru_states"]


class MinGRU(nn.Module):
    """minGRU parameters: weight [2Dh, In] = [W_z ; W_h], bias [2Dh] = [b_z ; b_h].

    `forward(u, h)` is one step for a batch of tokens (the depth recurrence): u [N, In], h [N, Dh]
    -> (1 − z) ⊙ h + z ⊙ h̃, [N, Dh]. The token recurrence is `min_gru_states`.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight = nn.Parameter(torch.empty(2 * hidden_size, input_size))
        self.bias = nn.Parameter(torch.zeros(2 * hidden_size))
        nn.init.xavier_uniform_(self.weight)

    def gates(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, h̃) for inputs u [..., In'] (In' ≤ In: missing trailing columns are zeros)."""
        pz, ph = F.linear(u, self.weight[:, : u.shape[-1]], self.bias).chunk(2, dim=-1)
        return torch.sigmoid(pz), ph

    def forward(self, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        z, h_cand = self.gates(u)
        return torch.lerp(h, h_cand, z)  # h + z (h̃ − h) = (1 − z) h + z h̃

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


def doc_resets(valid: torch.Tensor, doc_start: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: real tokens whose state restarts from 0 — a document started at the token or
    since the row's previous real token (any start up to the row's first real token counts)."""
    starts = doc_start.to(torch.long).cumsum(dim=1)  # [B, S] document starts at positions ≤ t
    seen = torch.where(valid, starts, 0).cummax(dim=1).values  # [B, S] the count at the last real token ≤ t
    before = F.pad(seen[:, :-1], (1, 0))  # [B, S] at the last real token < t (0: none)
    return valid & (starts > before)


def _chunk_len(s: int) -> int:
    """C ≈ √S: the scan's sequential steps, (C − 1) + S/C, are then fewest."""
    return max(1, math.isqrt(max(s - 1, 0)) + 1)


def _scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, chunk: int | None = None,
          reverse: bool = False) -> torch.Tensor:
    """h_t = a_t ⊙ h_{t−1} + b_t over t (h_{−1} = h0) by the chunked scan (module docstring);
    reverse: h_t = a_t ⊙ h_{t+1} + b_t from the end (h_S = h0).

    a, b [B, S, D]; h0 [B, D]; returns h [B, S, D]. No autograd; a and b are not modified.
    """
    bsz, s, d = a.shape
    c = chunk or _chunk_len(s)
    n = -(-s // c)  # chunks
    pad = n * c - s
    if pad:  # steps past the end carry the state (a = 1, b = 0); dropped below
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
        b = F.pad(b, (0, 0, 0, pad))
    a_c = a.reshape(bsz, n, c, d)  # [B, n, C, D]: step t of every chunk is the slice [:, :, t]
    loc = b.reshape(bsz, n, c, d).clone()  # the local states (from 0 in each chunk), computed in place
    prod = torch.empty_like(loc)  # Π a within the chunk, from its first step (in scan order) to t
    first, last = (c - 1, 0) if reverse else (0, c - 1)
    step = -1 if reverse else 1
    prod[:, :, first] = a_c[:, :, first]
    for t in range(first + step, last + step, step):
        loc[:, :, t].addcmul_(a_c[:, :, t], loc[:, :, t - step])
        torch.mul(prod[:, :, t - step], a_c[:, :, t], out=prod[:, :, t])
    start = loc.new_empty(bsz, n, 1, d)  # the state each chunk starts from
    end_loc, end_prod = loc[:, :, last], prod[:, :, last]  # [B, n, D] each chunk's totals
    h = h0
    for i in reversed(range(n)) if reverse else range(n):
        start[:, i, 0] = h
        h = torch.addcmul(end_loc[:, i], end_prod[:, i], h)
    out = loc.addcmul_(prod, start).view(bsz, n * c, d)  # h = local + (Π a) ⊙ start
    return out[:, :s] if pad else out


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Differentiable h_t = a_t ⊙ h_{t−1} + b_t (h_{−1} = h0): a, b [B, S, D], h0 [B, D] -> [B, S, D]."""
    return _LinearScan.apply(a, b, h0, chunk)


def _scan_back(a: torch.Tensor, grad: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """g_t = grad_t + a_{t+1} ⊙ g_{t+1} (g past the end = 0): the scan, backwards in time."""
    a_next = F.pad(a[:, 1:], (0, 0, 0, 1))  # [B, S, D] a_{t+1}; 0 after the last step
    return _scan(a_next, grad, torch.zeros_like(grad[:, 0]), chunk, reverse=True)


def _times_prev(g: torch.Tensor, h: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """g_t ⊙ h_{t−1} (h_{−1} = h0): [B, S, D]."""
    out = torch.empty_like(g)
    torch.mul(g[:, 0], h0, out=out[:, 0])
    torch.mul(g[:, 1:], h[:, :-1], out=out[:, 1:])
    return out


class _LinearScan(torch.autograd.Function):
    """`linear_scan` with its backward as a reverse scan (used by the tests and for plain a, b)."""

    @staticmethod
    def forward(ctx, a, b, h0, chunk):
        h = _scan(a, b, h0, chunk)
        ctx.save_for_backward(a, h0, h)
        ctx.chunk = chunk
        return h

    @staticmethod
    def backward(ctx, grad):
        a, h0, h = ctx.saved_tensors
        g = _scan_back(a, grad, ctx.chunk)
        return _times_prev(g, h, h0), g, a[:, 0] * g[:, 0], None


class _MinGRUScan(torch.autograd.Function):
    """states from the gates' pre-activations: one node for the gates and the scan.

    pre [B, S, 2Dh] = W u + b ([z | h̃] pre-activations); h0 [B, Dh]; valid, reset [B, S] bool.
    a = 1 − z at real tokens (0 at a reset), 1 at padding; b = z ⊙ h̃ at real tokens, 0 at padding.
    Computes in at least fp32; returns pre's dtype.
    """

    @staticmethod
    def forward(ctx, pre, h0, valid, reset, chunk):
        dt = torch.promote_types(pre.dtype, torch.float32)
        dh = pre.shape[-1] // 2
        pz, h_cand = pre.to(dt).split(dh, dim=-1)  # [B, S, Dh] each
        z = torch.sigmoid(pz)
        v = valid.unsqueeze(-1).to(dt)  # [B, S, 1]
        keep = (valid & ~reset).unsqueeze(-1).to(dt)  # [B, S, 1] real tokens that continue a state
        a = torch.addcmul(1.0 - v, keep, 1.0 - z)  # 1 − z | 0 at a reset | 1 at padding
        b = z * h_cand * v
        h = _scan(a, b, h0.to(dt), chunk)
        ctx.save_for_backward(z, h_cand, a, h, h0, v, keep)
        ctx.chunk, ctx.dtypes = chunk, (pre.dtype, h0.dtype)
        return h.to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, h_cand, a, h, h0, v, keep = ctx.saved_tensors
        g = _scan_back(a, grad.to(a.dtype), ctx.chunk)  # [B, S, Dh] dL/dh_t, all paths
        d_b = g * v
        d_a = _times_prev(g, h, h0.to(a.dtype)).mul_(keep)  # dL/d(1 − z) at tokens that continue
        d_pre = torch.empty(*z.shape[:-1], 2 * z.shape[-1], dtype=z.dtype, device=z.device)
        d_z = torch.mul(d_b, h_cand).sub_(d_a)  # through b = z h̃ and a = 1 − z
        torch.mul(d_z, z * (1.0 - z), out=d_pre[..., : z.shape[-1]])
        torch.mul(d_b, z, out=d_pre[..., z.shape[-1] :])
        d_h0 = (a[:, 0] * g[:, 0]).to(ctx.dtypes[1])
        return d_pre.to(ctx.dtypes[0]), d_h0, None, None, None


def min_gru_states(cell: MinGRU, inp: torch.Tensor, valid: torch.Tensor, doc_start: torch.Tensor,
                   h0: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The token recurrence of `cell` over rows, with document resets and padding carry.

    inp [B, S, In'] (In' ≤ In: missing trailing columns are zeros, e.g. the first MoE layer's
    absent previous-layer state); valid, doc_start [B, S] bool; h0 [B, Dh] state before each
    row's first position (cache or zeros). Returns states [B, S, Dh] (see the module docstring);
    chunk: the scan's chunk length (None: ≈ √S).
    """
    if inp.shape[-1] > cell.input_size:
        raise ValueError(f"min_gru_states: input has {inp.shape[-1]} features, the cell takes {cell.input_size}")
    valid = valid.to(torch.bool)
    reset = doc_resets(valid, doc_start.to(torch.bool))
    pre = F.linear(inp, cell.weight[:, : inp.shape[-1]], cell.bias)  # [B, S, 2Dh] one matmul, all tokens
    return _MinGRUScan.apply(pre, h0, valid, reset, chunk)
