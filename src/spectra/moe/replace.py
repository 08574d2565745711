"""Router replacement for models that are already MoE (METHOD.md §4, paper Table 10).

A Qwen3-MoE, OLMoE, Mixtral or Qwen2-MoE model keeps its experts exactly as they are (same
module, same weights, same transformers experts kernels) and every sparse MoE block's gate is
replaced by a router of this project:

    HF block:   gate (linear softmax top-k) -> experts(x, top_k_index, top_k_weights)
    ours:       MoEBlock(router=build_router(cfg, H, E), experts=<the block's own experts>)

transformers 5's experts classes (`@use_experts_implementation`: eager / grouped_mm /
batched_mm) take `(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`, the same
call our MoEBlock makes, so the experts module is reused as is. A Qwen2-MoE-style shared expert
(`shared_expert` + `shared_expert_gate`) is kept with its own combination
`routed + sigmoid(g(x)) * shared` (MoEBlock's `shared_expert_gate` option).

What the run config means here (and is recorded in `config.spectra_moe`, mode 'replace'):
- E is the model's: `cfg.moe.num_experts` is overwritten with it (logged if it differed), and
  `cfg.moe.num_shared_experts` with 1 / 0 (the model has / lacks a shared expert).
- k is the router's (`router.top_k`), not the model's `num_experts_per_tok`.
- `moe.upcycle_noise` and `moe.shared_expert_weight` do not apply (nothing is copied; the
  model's own shared-expert gate is kept); `moe.shared_expert_trainable` freezes or unfreezes
  the model's shared expert and its gate, as for upcycling.
- `moe.first_k_dense_replace` must be 0: the model's own layout says which layers are sparse.
- `moe.experts_implementation` selects the transformers kernel of the kept experts.
- The removed gates' HF load-balancing loss is switched off (`output_router_logits=False`);
  baseline routers bring their own aux losses.

Other MoE families (GraniteMoe, JetMoe, DeepSeek, GPT-OSS, Phi-MoE, ...) raise
UnsupportedMoEError naming the family and the supported ones: their blocks route, combine or
lay out experts differently, and neither replacing their gates nor upcycling them (they have
no dense MLP) would be the model they are. `SUPPORTED_MOE` is the list, by `model_type`.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from spectra.config import ConfigError
from spectra.moe.block import MoEBlock
from spectra.moe.context import RoutingContext
from spectra.moe.experts import resolve_experts_implementation
from spectra.moe.layers import UnsupportedMLPError, attach_routing, find_decoder_layers
from spectra.routing.base import build_router

log = logging.getLogger(__name__)

# The children of the sparse MoE blocks whose forward we know how to reproduce: plain
# (Qwen3-MoE, OLMoE, Mixtral) and with a sigmoid-gated shared expert (Qwen2-MoE). A block with
# anything else (DeepSeek's grouped routing and `shared_experts`, ...) is refused, not guessed.
_PLAIN = frozenset({"gate", "experts"})
_WITH_SHARED = frozenset({"gate", "experts", "shared_expert", "shared_expert_gate"})

# The MoE families router replacement is written and tested for: model_type -> name.
SUPPORTED_MOE = {"qwen3_moe": "Qwen3-MoE", "olmoe": "OLMoE", "mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE"}
# transformers names the parts of its MoE models so: GraniteMoeMoE, JetMoeParallelExperts,
# DbrxRouter, DeepseekV3MoE, Llama4TextMoe, MixtralSparseMoeBlock, GptOssExperts, ...
_MOE_CLASS = re.compile(r"(MoE|Moe|MoeBlock|Experts|Router)$")


class UnsupportedMoEError(TypeError):
    """The model is already MoE, of a family router replacement does not support."""


def is_sparse_moe_block(mlp: nn.Module) -> bool:
    """True for a transformers sparse MoE block: an `experts` child with stacked 3-D
    `gate_up_proj` / `down_proj` parameters (and not already one of our MoEBlocks)."""
    if isinstance(mlp, MoEBlock):
        return False
    experts = getattr(mlp, "experts", None)
    if not isinstance(experts, nn.Module):
        return False
    params = [getattr(experts, n, None) for n in ("gate_up_proj", "down_proj")]
    return all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in params)


def moe_evidence(model: nn.Module) -> str | None:
    """Why `model` is a Mixture-of-Experts model (its first MoE part, by path and class), or None
    for a dense one. Looks at transformers' modules only (our MoEBlocks are not evidence)."""
    for name, module in model.named_modules():
        if not type(module).__module__.startswith("transformers."):
            continue
        if is_sparse_moe_block(module) or (name and _MOE_CLASS.search(type(module).__name__)):
            return f"{name} ({type(module).__name__})"
    return None


def is_moe_model(model: nn.Module) -> bool:
    """True when the model has MoE parts (a sparse MoE block, experts, a router; `moe_evidence`)."""
    return moe_evidence(model) is not None


def check_supported_moe(model: nn.Module) -> None:
    """Raise UnsupportedMoEError when `model` is MoE but not of a family in SUPPORTED_MOE."""
    evidence = moe_evidence(model)
    model_type = getattr(model.config, "model_type", None)
    if evidence is None or model_type in SUPPORTED_MOE:
        return
    supported = ", ".join(f"{name} ({t})" for t, name in SUPPORTED_MOE.items())
    raise UnsupportedMoEError(
        f"MoE not supported: {type(model).__name__} (model_type {model_type!r}) is already a Mixture-of-Experts "
        f"model ({evidence}); router replacement supports {supported}, and upcycling needs dense MLPs"
    )


def _num_experts(block: nn.Module, where: str) -> int:
    """E of one block, from its stacked weights (the ground truth), checked against the module."""
    e = block.experts.down_proj.shape[0]  # [E, H, I] (or transposed): E leads either way
    declared = getattr(block.experts, "num_experts", e)
    if declared != e:
        raise UnsupportedMLPError(f"{where}: experts.num_experts={declared} but down_proj has {e} experts")
    return e


def _check_block(block: nn.Module, where: str) -> bool:
    """Raise unless the block's children are a known layout; return whether it has a shared expert."""
    children = frozenset(name for name, _ in block.named_children())
    if children not in (_PLAIN, _WITH_SHARED):
        raise UnsupportedMLPError(
            f"{where} ({type(block).__name__}): sparse MoE block with children {sorted(children)}; router "
            f"replacement supports {sorted(_PLAIN)} or {sorted(_WITH_SHARED)}"
        )
    return children == _WITH_SHARED


def _sync_config(cfg, num_experts: int, has_shared: bool) -> None:
    """Make `cfg.moe` describe the model that is actually built (E, shared expert) and re-check k."""
    if cfg.moe.first_k_dense_replace != 0:
        raise ConfigError(
            f"moe.first_k_dense_replace: must be 0 for router replacement (got {cfg.moe.first_k_dense_replace}); "
            "the MoE model's own layers decide which are sparse"
        )
    if cfg.moe.num_experts != num_experts:
        log.info(f"router replacement: moe.num_experts={cfg.moe.num_experts} -> {num_experts} (the model's E)")
    cfg.moe.num_experts = num_experts
    cfg.moe.num_shared_experts = int(has_shared)
    if cfg.router.top_k > num_experts:
        raise ConfigError(f"router.top_k: k={cfg.router.top_k} exceeds the model's {num_experts} experts")


def replace_routers(model: nn.Module, cfg, seed: int = 0) -> nn.Module:
    """Replace the gate of every sparse MoE block of `model` by `build_router(cfg, H, E)`.

    The experts modules (and a Qwen2-MoE shared expert with its gate) are moved into our
    MoEBlocks untouched; dense layers (e.g. Qwen3-MoE `mlp_only_layers`) stay dense. New router
    weights are drawn from a generator seeded with `seed` (the global RNG is left as it was).
    `cfg.moe` is updated in place (see the module docstring). Returns the same model, with
    `model.spectra_context` and `model.config.spectra_moe` set as `upcycle` sets them.
    """
    check_supported_moe(model)
    path, layers = find_decoder_layers(model)
    found = [(i, layer.mlp) for i, layer in enumerate(layers) if is_sparse_moe_block(layer.mlp)]
    if not found:
        raise UnsupportedMLPError(f"{type(model).__name__}: no sparse MoE block (experts with stacked gate_up_proj/down_proj)")
    shared = {i: _check_block(b, f"{path}.{i}.mlp") for i, b in found}
    sizes = {_num_experts(b, f"{path}.{i}.mlp") for i, b in found}
    if len(sizes) != 1 or len(set(shared.values())) != 1:
        raise UnsupportedMLPError(f"{type(model).__name__}: MoE layers differ in E {sorted(sizes)} or in having a shared expert")
    num_experts, has_shared = sizes.pop(), next(iter(shared.values()))
    _sync_config(cfg, num_experts, has_shared)

    # The kept experts run on the model's own transformers kernel; pick it like upcycling does.
    impl = resolve_experts_implementation(cfg.moe.experts_implementation)
    exp0 = found[0][1].experts
    if impl == "grouped_mm" and (getattr(exp0, "hidden_dim", 0) % 8 or getattr(exp0, "intermediate_dim", 0) % 8):
        impl = "batched_mm"  # torch._grouped_mm needs 16-byte aligned strides (toy sizes)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(impl)

    hidden_size = model.config.hidden_size
    ctx = RoutingContext()
    with torch.random.fork_rng(devices=[]):  # seeded router init without moving the global RNG
        torch.manual_seed(seed)
        for i, block in found:
            shared_expert = getattr(block, "shared_expert", None)
            shared_gate = getattr(block, "shared_expert_gate", None)
            for m in (shared_expert, shared_gate):
                if m is not None:
                    m.requires_grad_(cfg.moe.shared_expert_trainable)
            router = build_router(cfg, hidden_size=hidden_size, num_experts=num_experts)
            router.to(block.experts.down_proj.device)
            # shared_expert_weight 0: unused when the model's own shared_expert_gate mixes.
            new = MoEBlock(router, block.experts, shared_expert, 0.0, i, ctx, shared_expert_gate=shared_gate)
            layers[i].mlp = new.train(block.training)  # the new router starts in training mode: keep the block's
            ctx.moe_layers.append(i)

    # The HF aux loss reads the removed gates' logits (none are left to record).
    model.config.output_router_logits = False
    # save_pretrained would otherwise "revert" the experts to the legacy per-expert checkpoint
    # layout (transformers' conversion mapping for qwen2_moe/qwen3_moe/olmoe/mixtral); an empty
    # list keeps the module's own keys, which `load_moe_model` and Trainer resume load directly.
    model._weight_conversions = []
    return attach_routing(model, cfg, ctx, mode="replace")
