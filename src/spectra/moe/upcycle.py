"""Turn a Hugging Face causal LM's dense MLPs into MoE blocks (sparse upcycling, paper 5.7).

Every routed expert starts as a copy of the dense MLP plus a small symmetry-breaking
perturbation (`moe.upcycle_noise`, relative std; 0 gives bit-identical experts); the shared
expert is an exact copy, frozen by default. Routed weights sum to 1 and the shared expert is
mixed as (1 - a) * routed + a * shared, so with noise 0 the MoE model computes what the dense
model computed (function preservation; tested).

Supported MLPs, detected by their sub-module names:
    gated   gate_proj / up_proj / down_proj   (Llama, Qwen2/3, Mistral, SmolLM, Gemma)
    plain   c_fc / c_proj (GPT-2 Conv1D), fc1 / fc2, dense_h_to_4h / dense_4h_to_h (GPT-NeoX)
An MLP is upcycled only when everything in it is understood: the projections (nn.Linear or
GPT-2's Conv1D, weight and bias only), an activation without weights, and dropout (off at eval;
the experts have none). Anything else (BitNet's `ffn_sub_norm`, a weight held by the MLP itself,
a quantised projection) raises UnsupportedMLPError naming the module path, its class and the
unknown child. A last check runs the dense MLP and the experts' formula on a fixed random input
and refuses an MLP whose forward computes something else with the same children (e.g. Gemma3n's
activation sparsity). The experts would otherwise silently compute another function.

The new blocks take the mode of the MLP they replace (`train()` / `eval()`): upcycling a model in
eval mode leaves it entirely in eval mode.

A model that is already MoE (Qwen3-MoE, OLMoE, Mixtral, Qwen2-MoE, DeepSeek-V2/V3, GLM-4.5,
GraniteMoe) is not upcycled: `upcycle` hands it to `moe.replace.replace_routers`, which keeps its
experts and replaces its gates (METHOD.md §4), so `train.py model=tiny_qwen3_moe router=spectra`
needs no special case. Any other MoE family (JetMoe, GPT-OSS, ...) raises
`moe.replace.UnsupportedMoEError` (a ValueError: "MoE family not supported: <model_type> (why);
supported: [...]"), not a dense-MLP error.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from spectra.moe.block import MoEBlock
from spectra.moe.context import RoutingContext
from spectra.moe.experts import ExpertsImplConfig, GatedExperts, PlainExperts, resolve_experts_implementation
from spectra.moe.layers import UnsupportedMLPError, attach_routing, find_decoder_layers
from spectra.moe.replace import is_moe_model, replace_routers
from spectra.routing.base import build_router


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


_GATED = ("gate_proj", "up_proj", "down_proj")
_PLAIN = (("c_fc", "c_proj"), ("fc1", "fc2"), ("dense_h_to_4h", "dense_4h_to_h"))
_ACTIVATIONS = ("act_fn", "act", "activation_fn", "activation")


def _holds_tensors(m: nn.Module) -> list[str]:
    """Names of the parameters and persistent buffers held by `m` or anything below it."""
    return list(m.state_dict().keys())


def _check_projection(m: nn.Module, name: str, where: str) -> None:
    """A projection must be a plain linear map: nn.Linear (or a subclass) or GPT-2's Conv1D,
    holding `weight` (and `bias`) and nothing else."""
    linear = isinstance(m, (nn.Linear, Conv1D))
    extra = sorted(set(_holds_tensors(m)) - {"weight", "bias"})
    if not linear or extra or any(True for _ in m.children()):
        raise UnsupportedMLPError(
            f"{where}: projection {name!r} is a {type(m).__name__}"
            + (f" holding {extra}" if extra else "")
            + "; upcycling copies plain nn.Linear / Conv1D weights only"
        )


def _check_understood(mlp: nn.Module, where: str, projections: tuple[str, ...], act_name: str | None) -> None:
    """Refuse an MLP holding anything the experts would not reproduce, naming it."""
    own = sorted(k for k in _holds_tensors(mlp) if "." not in k)  # the MLP's own, not its children's
    if own:
        raise UnsupportedMLPError(f"{where}: the MLP itself holds {own}, which the experts would not have")
    for name, child in mlp.named_children():
        if name in projections:
            _check_projection(child, name, where)
        elif name == act_name or isinstance(child, nn.Dropout):
            # An activation (or dropout) is reused as is; one with weights would be a learned
            # function shared by all experts, which upcycling does not do.
            if _holds_tensors(child):
                raise UnsupportedMLPError(
                    f"{where}: {name!r} ({type(child).__name__}) holds weights {_holds_tensors(child)}"
                )
        else:
            raise UnsupportedMLPError(
                f"{where}: unknown child {name!r} ({type(child).__name__})"
                + (f" holding {_holds_tensors(child)}" if _holds_tensors(child) else "")
                + f"; upcycling understands {'/'.join(projections)}, an activation and dropout only"
            )


def _activation(mlp: nn.Module) -> tuple[str | None, nn.Module | None]:
    """The MLP's activation and the attribute it is under (the first of _ACTIVATIONS it has)."""
    for name in _ACTIVATIONS:
        act = getattr(mlp, name, None)
        if act is not None:
            return name, act
    return None, None


def read_dense_mlp(mlp: nn.Module, path: str) -> DenseMLPWeights:
    """Extract a dense MLP's weights, or raise UnsupportedMLPError naming `path`, its class and
    what was not understood (see the module docstring)."""
    where = f"{path} ({type(mlp).__name__})"
    names = dict(mlp.named_children())
    act_name, act = _activation(mlp)
    if set(_GATED) <= names.keys():
        pair = _GATED
    else:
        pair = next((p for p in _PLAIN if set(p) <= names.keys()), None)
    if pair is None:
        raise UnsupportedMLPError(
            f"{where}: unrecognised MLP with children {sorted(names)}; expected "
            "gate_proj/up_proj/down_proj, c_fc/c_proj, fc1/fc2 or dense_h_to_4h/dense_4h_to_h"
        )
    if act is None:
        raise UnsupportedMLPError(f"{where}: found {'/'.join(pair)} but no activation ({'/'.join(_ACTIVATIONS)})")
    _check_understood(mlp, where, pair, act_name)
    if pair == _GATED:
        if any(names[n].bias is not None for n in _GATED):
            raise UnsupportedMLPError(f"{where}: gated MLP with biases is not supported")
        up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
        dense = DenseMLPWeights(True, up, mlp.down_proj.weight, None, None, act)
    else:
        up_w, up_b = _conv1d_weight(names[pair[0]])
        down_w, down_b = _conv1d_weight(names[pair[1]])
        up_b = torch.zeros(up_w.shape[0], dtype=up_w.dtype, device=up_w.device) if up_b is None else up_b
        down_b = torch.zeros(down_w.shape[0], dtype=down_w.dtype, device=down_w.device) if down_b is None else down_b
        dense = DenseMLPWeights(False, up_w, down_w, up_b, down_b, act)
    _check_same_function(mlp, dense, where)
    return dense


def expert_function(dense: DenseMLPWeights, x: torch.Tensor) -> torch.Tensor:
    """What every upcycled expert computes (before noise), written from the weights alone:
    gated down(act(gate x) * up x); plain down(act(up x + b1)) + b2."""
    f = nn.functional
    if dense.gated:
        gate, up = f.linear(x, dense.up).chunk(2, dim=-1)
        return f.linear(dense.act_fn(gate) * up, dense.down)
    return f.linear(dense.act_fn(f.linear(x, dense.up, dense.up_bias)), dense.down, dense.down_bias)


def _check_same_function(mlp: nn.Module, dense: DenseMLPWeights, where: str) -> None:
    """Refuse an MLP whose forward is not `expert_function` of its own weights (same children,
    another computation), on a fixed random input with the MLP in eval mode (dropout off)."""
    w = dense.down
    if w.is_meta or w.numel() == 0:  # no values to compare (meta init, ZeRO-3 partitioned)
        return
    x = torch.randn(2, 3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    was_training = mlp.training
    mlp.eval()
    try:
        with torch.no_grad():
            want = mlp(x).float()
            got = expert_function(dense, x).float()
    except Exception as e:  # a forward that takes more than the hidden states is not a plain MLP
        raise UnsupportedMLPError(f"{where}: its forward fails on hidden states alone ({type(e).__name__}: {e})") from e
    finally:
        mlp.train(was_training)
    # Same operations on the same weights: equal up to the kernels' rounding in this dtype.
    tol = (1e-4 if w.dtype == torch.float32 else 2e-2) * want.abs().max().item() + 1e-6
    err = (got - want).abs().max().item()
    if not err <= tol:
        raise UnsupportedMLPError(
            f"{where}: its forward does not compute the {'gated' if dense.gated else 'plain'} MLP of its weights "
            f"(max difference {err:.3g} on a test input); upcycled experts would compute something else"
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


def upcycle(model: nn.Module, cfg, *, seed: int = 0) -> nn.Module:
    """Replace the MLP of every decoder layer from `moe.first_k_dense_replace` on by an MoEBlock.

    `cfg` carries the `moe`, `router`, `osr` and `quota` groups. Returns the same model, modified
    in place, with `model.spectra_context` (the shared RoutingContext) and
    `model.config.spectra_moe` (the spec that `load_moe_model` rebuilds from).
    An already-MoE model goes to `replace_routers` instead (see the module docstring).
    """
    if is_moe_model(model):
        return replace_routers(model, cfg, seed=seed)
    moe = cfg.moe
    gen = torch.Generator().manual_seed(seed)
    impl = ExpertsImplConfig(resolve_experts_implementation(moe.experts_implementation))
    path, layers = find_decoder_layers(model)
    todo = [i for i in range(len(layers)) if i >= moe.first_k_dense_replace]
    if not todo:
        raise ValueError(
            f"moe.first_k_dense_replace={moe.first_k_dense_replace} leaves no MoE layer "
            f"(the model has {len(layers)} decoder layers)"
        )
    for i in todo:  # refuse before changing anything: no half-upcycled model is left behind
        read_dense_mlp(layers[i].mlp, f"{path}.{i}.mlp")
    hidden_size = model.config.hidden_size
    ctx = RoutingContext()
    for i in todo:
        dense_mlp = layers[i].mlp
        dense = read_dense_mlp(dense_mlp, f"{path}.{i}.mlp")
        experts = build_experts(dense, moe.num_experts, moe.upcycle_noise, gen, impl)
        shared = None
        if moe.num_shared_experts > 0:
            shared = copy.deepcopy(dense_mlp)
            shared.requires_grad_(moe.shared_expert_trainable)
        router = build_router(cfg, hidden_size=hidden_size, num_experts=moe.num_experts, layer_idx=i)
        router.to(dense.down.device)
        block = MoEBlock(router, experts, shared, moe.shared_expert_weight, i, ctx)
        layers[i].mlp = block.train(dense_mlp.training)  # new modules start in training mode: keep the MLP's
        ctx.moe_layers.append(i)
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
