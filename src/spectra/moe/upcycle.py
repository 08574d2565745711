"""Turn a Hugging Face causal LM's dense MLPs into MoE blocks (sparse upcycling, paper 5.7).

Every routed expert starts as a copy of the dense MLP plus a small symmetry-breaking
perturbation (`moe.upcycle_noise`, relative std; 0 gives bit-identical experts); the shared
expert is an exact copy, frozen by default. Routed weights sum to 1 and the shared expert is
mixed as (1 - a) * routed + a * shared, so with noise 0 the MoE model computes what the dense
model computed (function preservation; tested).

Supported MLPs, detected by their sub-module names:
    gated   gate_proj / up_proj / down_proj   (Llama, Qwen2/3, Mistral, SmolLM, Gemma)
    plain   c_fc / c_proj (GPT-2 Conv1D), fc1 / fc2, dense_h_to_4h / dense_4h_to_h
Anything else raises with the module path and class.

A model that is already MoE (Qwen3-MoE, OLMoE, Mixtral, Qwen2-MoE) is not upcycled: `upcycle`
hands it to `moe.replace.replace_routers`, which keeps its experts and replaces its gates
(METHOD.md §4), so `train.py model=tiny_qwen3_moe router=spectra` needs no special case.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from spectra.moe.block import MoEBlock
from spectra.moe.context import RoutingContext, install_context_hook
from spectra.moe.experts import ExpertsImplConfig, GatedExperts, PlainExperts, resolve_experts_implementation
from spectra.routing.base import build_router


class UnsupportedMLPError(TypeError):
    """The decoder layer's MLP is of a kind upcycling does not recognise."""


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the first whose every element has an `mlp` child."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(hasattr(m, "mlp") for m in module):
            return name, module
    raise UnsupportedMLPError(
        f"{type(model).__name__}: no nn.ModuleList of decoder layers with an `mlp` attribute was found"
    )


@dataclass
class DenseMLPWeights:
    """A dense MLP's weights in experts layout (no expert dimension yet)."""

    gated: bool
    up: torch.Tensor  # gated: [2I, H] = [gate; up]; plain: [I, H]
    down: torch.Tensor  # [H, I]
    up_bias: torch.Tensor | None  # [I] (plain only)
    down_bias: torch.Tensor | None  # [H] (plain only)
    act_fn: nn.Module


def _conv1d_weight(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GPT-2's Conv1D stores [in, out]; return the nn.Linear layout [out, in] and the bias."""
    if type(m).__name__ == "Conv1D":
        return m.weight.t(), m.bias
    return m.weight, getattr(m, "bias", None)


def read_dense_mlp(mlp: nn.Module, path: str) -> DenseMLPWeights:
    """Extract a dense MLP's weights, or raise UnsupportedMLPError naming `path` and its class."""
    names = dict(mlp.named_children())
    if {"gate_proj", "up_proj", "down_proj"} <= names.keys():
        act = getattr(mlp, "act_fn", None) or getattr(mlp, "act", None)
        if any(getattr(names[n], "bias", None) is not None for n in ("gate_proj", "up_proj", "down_proj")):
            raise UnsupportedMLPError(f"{path} ({type(mlp).__name__}): gated MLP with biases is not supported")
        up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
        return DenseMLPWeights(True, up, mlp.down_proj.weight, None, None, act)
    for up_name, down_name in (("c_fc", "c_proj"), ("fc1", "fc2"), ("dense_h_to_4h", "dense_4h_to_h")):
        if {up_name, down_name} <= names.keys():
            up_w, up_b = _conv1d_weight(names[up_name])
            down_w, down_b = _conv1d_weight(names[down_name])
            act = next((getattr(mlp, a) for a in ("act", "act_fn", "activation_fn", "activation") if hasattr(mlp, a)), None)
            if act is None:
                raise UnsupportedMLPError(f"{path} ({type(mlp).__name__}): found {up_name}/{down_name} but no activation")
            if up_b is None:
                up_b = torch.zeros(up_w.shape[0])
            if down_b is None:
                down_b = torch.zeros(down_w.shape[0])
            return DenseMLPWeights(False, up_w, down_w, up_b, down_b, act)
    raise UnsupportedMLPError(
        f"{path} ({type(mlp).__name__}): unrecognised MLP with children {sorted(names)}; expected "
        "gate_proj/up_proj/down_proj, c_fc/c_proj, fc1/fc2 or dense_h_to_4h/dense_4h_to_h"
    )


def _perturbed(w: torch.Tensor, num_experts: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """Stack E copies of w with relative Gaussian noise: w + noise * std(w) * eps, eps ~ N(0, 1)."""
    stacked = w.detach().float().unsqueeze(0).repeat(num_experts, *([1] * w.dim()))  # [E, ...]
    if noise > 0:
        scale = noise * w.detach().float().std().clamp_min(1e-12)
        stacked = stacked + scale * torch.randn(stacked.shape, generator=gen)
    return stacked.to(w.dtype)


def build_experts(dense: DenseMLPWeights, num_experts: int, noise: float, gen: torch.Generator, impl: ExpertsImplConfig):
    """E experts initialised from one dense MLP (copies + noise)."""
    inter, hidden = dense.down.shape[1], dense.down.shape[0]
    if impl._experts_implementation == "grouped_mm" and (inter % 8 or hidden % 8):
        # torch._grouped_mm needs 16-byte aligned strides; odd toy sizes take the batched kernel.
        impl = ExpertsImplConfig("batched_mm")
    cls = GatedExperts if dense.gated else PlainExperts
    experts = cls(impl, num_experts, hidden, inter, dense.act_fn)
    with torch.no_grad():
        if dense.gated:
            experts.gate_up_proj.copy_(_perturbed(dense.up, num_experts, noise, gen))
        else:
            experts.up_proj.copy_(_perturbed(dense.up, num_experts, noise, gen))
            experts.up_proj_bias.copy_(_perturbed(dense.up_bias, num_experts, noise, gen))
            experts.down_proj_bias.copy_(_perturbed(dense.down_bias, num_experts, noise, gen))
        experts.down_proj.copy_(_perturbed(dense.down, num_experts, noise, gen))
    return experts.to(dense.down.device, dense.down.dtype)


def moe_spec(cfg) -> dict:
    """What `save_pretrained` records in `config.spectra_moe` so a load can rebuild the blocks."""
    from omegaconf import OmegaConf

    def plain(x):
        return OmegaConf.to_container(OmegaConf.structured(x), resolve=True) if not isinstance(x, dict) else dict(x)

    return {"moe": plain(cfg.moe), "router": plain(cfg.router), "osr": plain(cfg.osr), "quota": plain(cfg.quota)}


def attach_routing(model: nn.Module, cfg, ctx: RoutingContext, mode: str) -> nn.Module:
    """Finish a model whose MoE blocks are in place (shared by `upcycle` and `replace_routers`).

    Registers the context pre-hook, sets `model.spectra_context` and records the spec in
    `model.config.spectra_moe`; `mode` ('upcycle' | 'replace') tells `load_moe_model` which
    structure to rebuild before loading the weights.
    """
    install_context_hook(model, ctx)
    object.__setattr__(model, "spectra_context", ctx)  # not a submodule: holds per-forward tensors
    model.config.spectra_moe = {**moe_spec(cfg), "mode": mode}
    return model


def upcycle(model: nn.Module, cfg, *, seed: int = 0) -> nn.Module:
    """Replace the MLP of every decoder layer from `moe.first_k_dense_replace` on by an MoEBlock.

    `cfg` carries the `moe`, `router`, `osr` and `quota` groups. Returns the same model, modified
    in place, with `model.spectra_context` (the shared RoutingContext) and
    `model.config.spectra_moe` (the spec that `load_moe_model` rebuilds from).
    An already-MoE model goes to `replace_routers` instead (see the module docstring).
    """
    from spectra.moe.replace import is_moe_model, replace_routers  # lazy: replace imports this module

    if is_moe_model(model):
        return replace_routers(model, cfg, seed=seed)
    moe = cfg.moe
    gen = torch.Generator().manual_seed(seed)
    impl = ExpertsImplConfig(resolve_experts_implementation(moe.experts_implementation))
    path, layers = find_decoder_layers(model)
    hidden_size = model.config.hidden_size
    ctx = RoutingContext()
    for i, layer in enumerate(layers):
        if i < moe.first_k_dense_replace:
            continue
        dense_mlp = layer.mlp
        dense = read_dense_mlp(dense_mlp, f"{path}.{i}.mlp")
        experts = build_experts(dense, moe.num_experts, moe.upcycle_noise, gen, impl)
        shared = None
        if moe.num_shared_experts > 0:
            shared = copy.deepcopy(dense_mlp)
            shared.requires_grad_(moe.shared_expert_trainable)
        router = build_router(cfg, hidden_size=hidden_size, num_experts=moe.num_experts)
        router.to(dense.down.device)
        layer.mlp = MoEBlock(router, experts, shared, moe.shared_expert_weight, i, ctx)
        ctx.moe_layers.append(i)
    if not ctx.moe_layers:
        raise ValueError(
            f"moe.first_k_dense_replace={moe.first_k_dense_replace} leaves no MoE layer "
            f"(the model has {len(layers)} decoder layers)"
        )
    return attach_routing(model, cfg, ctx, mode="upcycle")


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """All MoE blocks of a model, in layer order."""
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def routers(model: nn.Module) -> list[nn.Module]:
    """All routers of a model, in layer order."""
    return [b.router for b in moe_blocks(model)]


def parameter_report(model: nn.Module) -> dict[str, int]:
    """Parameter accounting: total, trainable, frozen, router, routed-expert, and active per token.

    Active per token = everything except routed experts + k/E of the routed experts.
    """
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    router = sum(p.numel() for b in moe_blocks(model) for p in b.router.parameters())
    experts = sum(p.numel() for b in moe_blocks(model) for p in b.experts.parameters())
    active_experts = sum(
        sum(p.numel() for p in b.experts.parameters()) * b.router.top_k / max(b.router.num_experts, 1)
        for b in moe_blocks(model)
    )
    return {
        "total": total,
        "trainable": trainable,
        "frozen": total - trainable,
        "router": router,
        "routed_experts": experts,
        "active_per_token": int(total - experts + active_experts),
    }
