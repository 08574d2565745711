"""Router replacement for models that are already MoE (METHOD.md §4, paper Table 10).

A Qwen3-MoE, OLMoE, Mixtral, Qwen2-MoE, DeepSeek-V3 (and -V2, GLM-4.5) or GraniteMoe model keeps
its experts exactly as they are (same module, same weights, same transformers experts kernels) and every
sparse MoE block's gate is replaced by a router of this project:

    HF block:   gate (linear, scores, top-k) -> experts(x, top_k_index, top_k_weights) [+ shared]
    ours:       MoEBlock(router=build_router(cfg, H, E), experts=<the block's own experts>)

transformers 5's experts classes (`@use_experts_implementation`: eager / grouped_mm /
batched_mm) take `(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`, the same
call our MoEBlock makes, so the experts module is reused as is. What each family keeps besides
(`_FAMILIES`, by `model_type`):
- Qwen3-MoE, OLMoE, Mixtral: `gate` + `experts`; y = routed.
- Qwen2-MoE: a shared expert (`shared_expert` + `shared_expert_gate`) kept with its own
  combination y = routed + sigmoid(g(x)) * shared (MoEBlock's `shared_expert_gate`).
- DeepSeek-V3 (`deepseek_v3`): `gate` + `experts` + `shared_experts` (the model's
  n_shared_experts experts, one MLP of width n_shared * moe_intermediate_size). Kept with the
  model's combination y = s * sum_e w_e(x) Expert_e(x) + shared(x): the shared experts' output is
  added unweighted, and the new router's combine weights are multiplied by the model's
  `routed_scaling_factor` s (2.5 in DeepSeek-V3), exactly where the removed gate applied it, so
  the routed part keeps the scale the pretrained layers after it expect (s = 1 leaves them as
  the router gives them). What leaves with the gate: its sigmoid scores, group-limited
  selection (n_group / topk_group), norm_topk_prob and the aux-free `e_score_correction_bias`
  buffer; the new router scores, selects and balances by its own rules (`router.*`;
  `router=aux_free router.num_groups=... router.group_topk=...` is DeepSeek-V3's own rule, and
  given the old gate's weight and bias it reproduces the original model). The first
  `first_k_dense_replace` layers are dense MLPs (DeepseekV3MLP) and stay dense.
  DeepSeek-V2 (`deepseek_v2`, softmax gate, groups by their best score) and GLM-4.5
  (`glm4_moe`, DeepSeek-V3's gate) have this very block and are replaced the same way.
- GraniteMoe (`granitemoe`): the block is the decoder layer's `block_sparse_moe` (not `mlp`),
  children `router` + `experts`; y = routed. Its residual / embedding / logits multipliers are
  outside the block and stay.

What the run config means here (and is recorded in `config.spectra_moe`, mode 'replace'):
- E is the model's: `cfg.moe.num_experts` is overwritten with it (logged if it differed), and
  `cfg.moe.num_shared_experts` with 1 / 0 (the model has / lacks a shared expert).
- k is the router's (`router.top_k`), not the model's `num_experts_per_tok`.
- `moe.upcycle_noise` and `moe.shared_expert_weight` do not apply (nothing is copied; the
  model's own shared-expert combination is kept); `moe.shared_expert_trainable` freezes or
  unfreezes the model's shared expert(s) and its gate, as for upcycling.
- `moe.first_k_dense_replace` must be 0: the model's own layout says which layers are sparse.
- `moe.experts_implementation` selects the transformers kernel of the kept experts.
- The removed gates' HF load-balancing loss is switched off (`output_router_logits=False`);
  baseline routers bring their own aux losses.

Any other MoE family raises UnsupportedMoEError (a ValueError), "MoE family not supported:
<model_type> (why); supported: [...]": its blocks route, combine or lay out experts in a way the
above does not reproduce, and neither replacing its gates nor upcycling it (it has no dense MLP)
would be the model it is. JetMoe is one, for a stated reason (`_REFUSED`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from spectra.config import ConfigError
from spectra.moe.block import MoEBlock
from spectra.moe.context import RoutingContext
from spectra.moe.experts import resolve_experts_implementation
from spectra.moe.layers import UnsupportedMLPError, attach_routing
from spectra.routing.base import build_router

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Family:
    """How one MoE family lays out its sparse blocks, and what we keep of them.

    name:      the family's printed name.
    attr:      the decoder layer's attribute that holds the MLP / sparse MoE block.
    gate:      the block's child that routes (removed).
    shared:    None (no shared expert), "gated" (Qwen2-MoE: `shared_expert` mixed by its own
               `shared_expert_gate`), "added" (DeepSeek-V3: `shared_experts` added unweighted).
    scaled:    the routed weights are multiplied by `config.routed_scaling_factor` (DeepSeek-V3).
    """

    name: str
    attr: str = "mlp"
    gate: str = "gate"
    shared: str | None = None
    scaled: bool = False

    @property
    def shared_children(self) -> tuple[str, ...]:
        return {None: (), "gated": ("shared_expert", "shared_expert_gate"), "added": ("shared_experts",)}[self.shared]

    @property
    def children(self) -> frozenset[str]:
        """The block's children whose forward we know how to reproduce (anything else is refused)."""
        return frozenset({self.gate, "experts", *self.shared_children})


# The MoE families router replacement is written and tested for, by model_type.
_FAMILIES: dict[str, _Family] = {
    "qwen3_moe": _Family("Qwen3-MoE"),
    "olmoe": _Family("OLMoE"),
    "mixtral": _Family("Mixtral"),
    "qwen2_moe": _Family("Qwen2-MoE", shared="gated"),
    "deepseek_v3": _Family("DeepSeek-V3", shared="added", scaled=True),
    # DeepSeek-V3's block in its predecessor and in GLM-4.5 (their gates differ; they are removed).
    "deepseek_v2": _Family("DeepSeek-V2", shared="added", scaled=True),
    "glm4_moe": _Family("GLM-4.5 (Glm4Moe)", shared="added", scaled=True),
    "granitemoe": _Family("GraniteMoe", attr="block_sparse_moe", gate="router"),
}
SUPPORTED_MOE = {t: f.name for t, f in _FAMILIES.items()}
# MoE families refused for a reason worth stating (any other unsupported family gets a generic one).
_REFUSED = {
    "jetmoe": "its MLP experts are JetMoeParallelExperts (input_linear / output_linear with a separate output "
    "bias), not a transformers experts module, and its attention is a mixture of experts as well (JetMoeMoA, "
    "with its own top-k router), which replacing the MLP gates would leave as it is",
}
# transformers names the parts of its MoE models so: GraniteMoeMoE, JetMoeParallelExperts,
# DbrxRouter, DeepseekV3MoE, Llama4TextMoe, MixtralSparseMoeBlock, GptOssExperts, ...
_MOE_CLASS = re.compile(r"(MoE|Moe|MoeBlock|Experts|Router)$")


class UnsupportedMoEError(ValueError):
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
    """Raise UnsupportedMoEError when `model` is MoE but not of a family in SUPPORTED_MOE:
    "MoE family not supported: <model_type> (why); supported: [...]"."""
    evidence = moe_evidence(model)
    model_type = getattr(model.config, "model_type", None)
    if evidence is None or model_type in _FAMILIES:
        return
    why = _REFUSED.get(
        model_type,
        "its MoE blocks route, combine or lay out their experts in a way router replacement does not reproduce",
    )
    supported = ", ".join(f"{f.name} ({t})" for t, f in _FAMILIES.items())
    raise UnsupportedMoEError(
        f"MoE family not supported: {model_type} ({type(model).__name__} is already a Mixture-of-Experts model, "
        f"{evidence}; {why}; upcycling needs dense MLPs); supported: [{supported}]"
    )


def _decoder_layers(model: nn.Module, attr: str) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the first whose every element has an `attr` child."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(hasattr(m, attr) for m in module):
            return name, module
    raise UnsupportedMLPError(f"{type(model).__name__}: no nn.ModuleList of decoder layers with an `{attr}` attribute was found")


def _num_experts(block: nn.Module, where: str) -> int:
    """E of one block, from its stacked weights (the ground truth), checked against the module."""
    e = block.experts.down_proj.shape[0]  # [E, H, I] (or transposed): E leads either way
    declared = getattr(block.experts, "num_experts", e)
    if declared != e:
        raise UnsupportedMLPError(f"{where}: experts.num_experts={declared} but down_proj has {e} experts")
    return e


def _check_block(block: nn.Module, family: _Family, where: str) -> None:
    """Raise unless the block's children are the family's known layout."""
    children = frozenset(name for name, _ in block.named_children())
    if children != family.children:
        raise UnsupportedMLPError(
            f"{where} ({type(block).__name__}): sparse MoE block with children {sorted(children)}; router "
            f"replacement of {family.name} supports {sorted(family.children)}"
        )


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

    The experts modules (and a shared expert with its own combination: Qwen2-MoE's sigmoid gate,
    DeepSeek-V3's unweighted sum and routed scaling factor) are moved into our MoEBlocks
    untouched; dense layers (Qwen3-MoE `mlp_only_layers`, DeepSeek-V3's first
    `first_k_dense_replace` layers) stay dense. New router weights are drawn from a generator
    seeded with `seed` (the global RNG is left as it was). `cfg.moe` is updated in place (see the
    module docstring). Returns the same model, with `model.spectra_context` and
    `model.config.spectra_moe` set as `upcycle` sets them.
    """
    check_supported_moe(model)
    # (a model of no known family got here only if it is not MoE: "no sparse MoE block" below)
    family = _FAMILIES.get(getattr(model.config, "model_type", None), _Family("?"))
    path, layers = _decoder_layers(model, family.attr)
    found = [(i, getattr(layer, family.attr)) for i, layer in enumerate(layers)]
    found = [(i, block) for i, block in found if is_sparse_moe_block(block)]
    if not found:
        raise UnsupportedMLPError(f"{type(model).__name__}: no sparse MoE block (experts with stacked gate_up_proj/down_proj)")
    for i, block in found:
        _check_block(block, family, f"{path}.{i}.{family.attr}")
    sizes = {_num_experts(b, f"{path}.{i}.{family.attr}") for i, b in found}
    if len(sizes) != 1:
        raise UnsupportedMLPError(f"{type(model).__name__}: MoE layers differ in E {sorted(sizes)}")
    num_experts = sizes.pop()
    _sync_config(cfg, num_experts, family.shared is not None)
    scale = float(model.config.routed_scaling_factor) if family.scaled else 1.0

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
            kept = {name: getattr(block, name) for name in family.shared_children}
            for m in kept.values():
                m.requires_grad_(cfg.moe.shared_expert_trainable)
            router = build_router(cfg, hidden_size=hidden_size, num_experts=num_experts, layer_idx=i)
            router.to(block.experts.down_proj.device)
            # shared_expert_weight 0: unused when the model's own combination mixes the shared expert.
            shared_expert = kept.get("shared_expert", kept.get("shared_experts"))
            new = MoEBlock(
                router, block.experts, shared_expert, 0.0, i, ctx,
                shared_expert_gate=kept.get("shared_expert_gate"),
                shared_expert_added=family.shared == "added",
                routed_scaling_factor=scale,
            )
            setattr(layers[i], family.attr, new.train(block.training))  # a new router starts in training mode
            ctx.moe_layers.append(i)

    # The HF aux loss reads the removed gates' logits (none are left to record).
    model.config.output_router_logits = False
    # save_pretrained would otherwise "revert" the experts to the legacy per-expert checkpoint
    # layout (transformers' conversion mapping for qwen2_moe/qwen3_moe/olmoe/mixtral/deepseek_v3,
    # granitemoe's input_linear/output_linear); an empty list keeps the module's own keys, which
    # `load_moe_model` and Trainer resume load directly.
    model._weight_conversions = []
    return attach_routing(model, cfg, ctx, mode="replace")
