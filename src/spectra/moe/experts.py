"""Stacked expert weights, computed by transformers' experts implementations.

The expert compute is not ours to write: transformers' `@use_experts_implementation` gives a
class with stacked weights the `eager` (loop over hit experts), `grouped_mm` and `batched_mm`
kernels, chosen by name (`moe.experts_implementation`). We only keep the weights in the
layout it expects and write the `eager` forward as the obviously-correct reference.

Gated (SwiGLU/GeGLU: Llama, Qwen, Mistral, SmolLM, Gemma):
    gate_up_proj [E, 2I, H] = concat(gate_proj.weight, up_proj.weight) per expert
    down_proj    [E, H, I]
Ungated (GPT-2 `c_fc/c_proj`, plain two-layer MLPs):
    up_proj [E, I, H] (+ up_proj_bias [E, I]), down_proj [E, H, I] (+ down_proj_bias [E, H])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.integrations.moe import use_experts_implementation


@dataclass
class ExpertsImplConfig:
    """The one config attribute transformers' experts dispatch reads."""

    _experts_implementation: str = "grouped_mm"


def resolve_experts_implementation(name: str, device: torch.device | str | None = None) -> str:
    """Map `moe.experts_implementation` to a kernel name; 'auto' picks grouped_mm.

    grouped_mm is the fused kernel on CUDA (torch._grouped_mm) and a per-expert fallback on CPU;
    benchmarks/ compares it with eager and batched_mm on this machine.
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


@use_experts_implementation(has_gate=True)
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


@use_experts_implementation(has_gate=False, has_bias=True)
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
