"""Stacked expert weights, computed by transformers' experts implementations.

The expert compute is transformers': `@use_experts_implementation` gives a class with stacked
weights the `eager` (loop over hit experts), `grouped_mm` and `batched_mm` kernels, chosen by
name (`moe.experts_implementation`). We keep the weights in the layout it expects and write the
`eager` forward as the obviously-correct reference. One exception, on CPU: `grouped_mm` of the
gated SiLU experts (SwiGLU: Llama, Qwen, Mistral, SmolLM) is `_SortedSwiGLU` below — the same
sort by expert and the same per-expert GEMMs as transformers' grouped_mm (on CPU a loop of mm),
with a hand-written backward that writes every gradient into its place (no gate/up
concatenation, no autograd bookkeeping per op) and fewer passes over the [N·k, I] activations.
Anything else (CUDA, biases, other activations, expert parallelism) runs transformers' kernel.

Gated (SwiGLU/GeGLU: Llama, Qwen, Mistral, SmolLM, Gemma):
    gate_up_proj [E, 2I, H] = concat(gate_proj.weight, up_proj.weight) per expert
    down_proj    [E, H, I]
Ungated (GPT-2 `c_fc/c_proj`, plain two-layer MLPs):
    up_proj [E, I, H] (+ up_proj_bias [E, I]), down_proj [E, H, I] (+ down_proj_bias [E, H])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ExpertsInterface, grouped_mm_experts_forward, use_experts_implementation


@dataclass
class ExpertsImplConfig:
    """The one config attribute transformers' experts dispatch reads."""

    _experts_implementation: str = "grouped_mm"


def resolve_experts_implementation(name: str, device: torch.device | str | None = None) -> str:
    """Map `moe.experts_implementation` to a kernel name; 'auto' picks grouped_mm.

    grouped_mm is the fused kernel on CUDA (torch._grouped_mm) and per-expert GEMMs on CPU
    (`_SortedSwiGLU` for SwiGLU experts); benchmarks/ compares it with eager and batched_mm.
    """
    valid = ("auto", "eager", "grouped_mm", "batched_mm")
    if name not in valid:
        raise ValueError(f"moe.experts_implementation={name!r} is unknown; choose one of {list(valid)}")
    return "grouped_mm" if name == "auto" else name


def _eager_experts_forward(module: nn.Module, hidden_states, top_k_index, top_k_weights, up_fn) -> torch.Tensor:
    """Reference: loop over the experts that received tokens, computing served slots only.

    hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H].

    A slot of weight exactly 0 (a dropped assignment, padding, an Expert Choice filler slot) is
    skipped: it would add 0 * Expert_e(x) = 0 to the fp32 sum, so the output is bit-identical
    without it, and so are the gradients of the experts' weights and of hidden_states (a skipped
    slot sends them w * (...) = 0). The one gradient it changes is that of the zero weight itself
    (0 instead of <grad, Expert_e(x)>); every router here makes such weights constants
    (`torch.where(served, w, 0)`), so nothing upstream receives it. Expert Choice's [N, k_max]
    layout is mostly such slots (k_max ~ E at E = 32 vs ~cf served per token).
    """
    out = torch.zeros_like(hidden_states, dtype=torch.float32)
    computed = top_k_weights != 0  # [T, k] slots worth computing
    hit = top_k_index[computed]  # [S] experts of the computed slots
    for e in hit.unique().tolist():
        token_idx, slot = torch.where((top_k_index == e) & computed)  # [M], [M]
        y = up_fn(module, hidden_states[token_idx], e)  # [M, I]
        y = nn.functional.linear(y, module.down_proj[e])  # [M, H]
        if module.has_bias:
            y = y + module.down_proj_bias[e]
        out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).float())
    return out.to(hidden_states.dtype)


class _SortedSwiGLU(torch.autograd.Function):
    """Gated SiLU experts over tokens sorted by expert: out = Σ_slots w · down_e(silu(g) ⊙ u).

    x [N, H]; index, weights [N, k]; gate_up [E, 2I, H]; down [E, H, I] -> [N, H]. The forward is
    transformers' grouped_mm forward step for step (sort the N·k slots by expert, gather, one mm per
    expert for gate/up and for down, weight, unsort, sum over the k slots), so it returns the same
    values. The backward is written by hand: one mm per expert and gradient, written in place
    (d_gate and d_up straight into one [N·k, 2I] buffer, each expert's weight gradient into its slice).
    """

    @staticmethod
    def forward(ctx, x, index, weights, gate_up, down):
        n, h = x.shape
        k = index.shape[1]
        i_dim = down.shape[2]
        ids, perm = torch.sort(index.reshape(-1))  # [N·k] slots by expert
        counts = torch.bincount(ids, minlength=gate_up.shape[0]).tolist()  # one host sync (CPU: free)
        tok = perm // k  # [N·k] token of each sorted slot
        xs = x.index_select(0, tok)  # [N·k, H]
        gu = x.new_empty(perm.numel(), 2 * i_dim)  # [N·k, 2I]
        spans = []
        start = 0
        for e, c in enumerate(counts):
            if c:
                spans.append((e, start, start + c))
                torch.mm(xs[start : start + c], gate_up[e].t(), out=gu[start : start + c])
            start += c
        gate, up = gu[:, :i_dim], gu[:, i_dim:]
        silu = F.silu(gate)  # [N·k, I]
        act = silu * up  # [N·k, I]
        y = x.new_empty(perm.numel(), h)  # [N·k, H]
        for e, a, b in spans:
            torch.mm(act[a:b], down[e].t(), out=y[a:b])
        ws = weights.reshape(-1).index_select(0, perm)  # [N·k]
        slots = torch.empty_like(y).index_copy_(0, perm, y * ws.unsqueeze(-1))  # back in [N, k] slot order
        ctx.save_for_backward(xs, tok, perm, ws, gu, silu, act, y, gate_up, down)
        ctx.spans, ctx.n = spans, n
        return slots.view(n, k, h).sum(dim=1)

    @staticmethod
    def backward(ctx, grad_out):
        xs, tok, perm, ws, gu, silu, act, y, gate_up, down = ctx.saved_tensors
        spans, n = ctx.spans, ctx.n
        i_dim = down.shape[2]
        need_x, _, need_w, need_gu, need_down = ctx.needs_input_grad
        g_slot = grad_out.index_select(0, tok)  # [N·k, H] gradient of each sorted slot's weighted output
        d_weights = None
        if need_w:
            d_ws = (g_slot * y).sum(dim=-1)  # [N·k]
            d_weights = torch.zeros_like(d_ws).index_copy_(0, perm, d_ws).view(n, -1)
        d_y = g_slot.mul_(ws.unsqueeze(-1))  # [N·k, H] (g_slot is not needed any more)
        d_act = torch.empty_like(act)  # [N·k, I]
        # Weight gradients: each used expert's slice is written by its mm; only unused ones are zeroed.
        unused = [e for e in range(down.shape[0]) if e not in {sp[0] for sp in spans}]
        d_down = torch.empty_like(down) if need_down else None
        for e, a, b in spans:
            torch.mm(d_y[a:b], down[e], out=d_act[a:b])
            if need_down:
                torch.mm(d_y[a:b].t(), act[a:b], out=d_down[e])
        gate, up = gu[:, :i_dim], gu[:, i_dim:]
        d_gu = torch.empty_like(gu)  # [N·k, 2I]
        torch.ops.aten.silu_backward.grad_input(d_act * up, gate, grad_input=d_gu[:, :i_dim])
        torch.mul(d_act, silu, out=d_gu[:, i_dim:])
        d_x = d_gate_up = None
        d_xs = torch.empty_like(xs) if need_x else None  # [N·k, H]
        if need_gu:
            d_gate_up = torch.empty_like(gate_up)
        for e, a, b in spans:
            if need_x:
                torch.mm(d_gu[a:b], gate_up[e], out=d_xs[a:b])
            if need_gu:
                torch.mm(d_gu[a:b].t(), xs[a:b], out=d_gate_up[e])
        for grad in (d_down, d_gate_up):
            if grad is not None and unused:
                grad[unused] = 0.0
        if need_x:
            d_x = torch.zeros(n, xs.shape[1], dtype=xs.dtype, device=xs.device).index_add_(0, tok, d_xs)
        return d_x, None, d_weights, d_gate_up, d_down


def _grouped_mm_forward(module: nn.Module, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """`grouped_mm`: `_SortedSwiGLU` for gated SiLU experts on CPU, transformers' kernel otherwise."""
    if (hidden_states.device.type == "cpu" and module.has_gate and not module.has_bias
            and not module._is_expert_parallel and isinstance(module.act_fn, (nn.SiLU, SiLUActivation))
            and hidden_states.dtype == module.gate_up_proj.dtype):
        return _SortedSwiGLU.apply(hidden_states, top_k_index, top_k_weights, module.gate_up_proj, module.down_proj)
    return grouped_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights)


_EXPERTS_INTERFACE = ExpertsInterface()  # transformers' kernels, grouped_mm as above (this instance only)
_EXPERTS_INTERFACE["grouped_mm"] = _grouped_mm_forward


@use_experts_implementation(has_gate=True, experts_interface=_EXPERTS_INTERFACE)
class GatedExperts(nn.Module):
    """E gated MLP experts: down(act(gate(x)) * up(x)), weights stacked over experts."""

    def __init__(self, config: ExpertsImplConfig, num_experts: int, hidden_size: int, intermediate_size: int, act_fn):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))  # [E, H, I]
        self.act_fn = act_fn

    @staticmethod
    def _up(module, x, e):
        gate, up = nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)  # [M, I] each
        return module.act_fn(gate) * up

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H] (eager)."""
        return _eager_experts_forward(self, hidden_states, top_k_index, top_k_weights, self._up)


@use_experts_implementation(has_gate=False, has_bias=True, experts_interface=_EXPERTS_INTERFACE)
class PlainExperts(nn.Module):
    """E two-layer MLP experts with biases: down(act(up(x) + b1)) + b2 (GPT-2 style)."""

    def __init__(self, config: ExpertsImplConfig, num_experts: int, hidden_size: int, intermediate_size: int, act_fn):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))  # [E, I, H]
        self.up_proj_bias = nn.Parameter(torch.zeros(num_experts, intermediate_size))  # [E, I]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))  # [E, H, I]
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))  # [E, H]
        self.act_fn = act_fn

    @staticmethod
    def _up(module, x, e):
        return module.act_fn(nn.functional.linear(x, module.up_proj[e], module.up_proj_bias[e]))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H] (eager)."""
        return _eager_experts_forward(self, hidden_states, top_k_index, top_k_weights, self._up)
