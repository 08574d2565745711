"""Rebuild a saved MoE model's structure from the `spectra_moe` record of its config.

A saved model's config carries `spectra_moe` (moe/layers.py `attach_routing`): the `moe`,
`router`, `osr` and `quota` groups it was built with and the `mode` ('upcycle': dense MLPs became
MoE blocks; 'replace': an MoE model's gates were replaced). Rebuilding runs the very functions
that built it (`upcycle` / `replace_routers`) on a freshly constructed base model, so the MoE
blocks, experts, routers and shared experts are what training had; the weights are loaded after.

One implementation for both ways a saved model is loaded:
- `spectra.moe.load_moe_model` (spectra installed), and
- the modeling code saved beside the weights (moe/hf_native.py), which a plain
  `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` runs without spectra
  installed: it carries a copy of this module and of everything it imports.

That copy is why the groups are rebuilt here without OmegaConf: they are the typed dataclasses
of spectra.config (defaults filled in for keys older records lack, every value checked), held as
`ConfigGroup` dicts. `attach_routing` records a dict group as it is, where a dataclass would go
through OmegaConf, which a checkpoint's loader need not have installed.
"""

from __future__ import annotations

import dataclasses
import functools
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from torch import nn

from spectra.config import MoEConfig, OSRConfig, QuotaConfig, RouterConfig
from spectra.moe.replace import replace_routers
from spectra.moe.upcycle import upcycle
from spectra.routing.base import ROUTERS

# The groups of a `spectra_moe` record and their schemas.
SPEC_GROUPS = {"moe": MoEConfig, "router": RouterConfig, "osr": OSRConfig, "quota": QuotaConfig}


class ConfigGroup(dict):
    """One config group as a dict whose keys are also attributes (`cfg.moe.num_experts`): what
    `upcycle`, `replace_routers` and `build_router` read, and what `attach_routing` records as is."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value) -> None:
        self[name] = value


def spec_config(spec: dict) -> SimpleNamespace:
    """The run config's `moe`, `router`, `osr` and `quota` groups from a `spectra_moe` record:
    each built (and checked) by its dataclass, so a key the record lacks takes its default."""
    return SimpleNamespace(
        **{name: ConfigGroup(dataclasses.asdict(schema(**spec.get(name, {})))) for name, schema in SPEC_GROUPS.items()}
    )


def rebuild_moe(model: nn.Module, spec: dict) -> nn.Module:
    """Turn the freshly built base model `model` into the MoE model the record `spec` describes
    (in place; returns it). A record with router `dense` leaves the model as it is.

    How each router was constructed is kept on the model (`restore_unsaved_buffers` builds it
    again from exactly that).

    New modules are built under torch's default dtype float32, as training builds them (the base
    model may be bf16; its routers are float32 then): transformers' `from_pretrained` sets the
    default dtype to the model's while the model class is constructed.
    """
    cfg = spec_config(spec)
    builds: dict[int, tuple] = {}
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with _recording_router_builds(builds):
            if spec.get("mode") == "replace":
                replace_routers(model, cfg)
            elif cfg.router.name != "dense":  # records without `mode` predate router replacement: upcycled
                upcycle(model, cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    object.__setattr__(model, "_spectra_router_builds",
                       {path: builds[id(m)] for path, m in model.named_modules() if id(m) in builds})
    return model


@contextmanager
def _recording_router_builds(builds: dict[int, tuple]):
    """While inside, every router `build_router` makes is recorded: id(router) -> (factory, args,
    kwargs). Done by wrapping the registry's factories (and putting them back after): the routers
    are built inside `upcycle` / `replace_routers`, whose arguments to `build_router` (the layer
    index, for one) are theirs to choose; recording them keeps this module from restating them."""
    originals = dict(ROUTERS)

    def recording(factory):
        @functools.wraps(factory)  # build_router reads the factory's signature and config_class
        def build(*args, **kwargs):
            router = factory(*args, **kwargs)
            builds[id(router)] = (factory, args, kwargs)
            return router

        build.config_class = factory.config_class
        return build

    ROUTERS.update({name: recording(factory) for name, factory in originals.items()})
    try:
        yield
    finally:
        ROUTERS.update(originals)


def restore_unsaved_buffers(model: nn.Module) -> None:
    """Recompute the routers' buffers that are not saved (`persistent=False`: Hash's constants).

    Why: transformers' `from_pretrained` builds the model on the meta device, loads the saved
    tensors into it and leaves an unsaved buffer uninitialised (`torch.empty`), for the model
    class's `_init_weights` to fill. `load_moe_model` builds on a real device and needs none of
    this. Each such router is built again, on the CPU, exactly as `rebuild_moe` built it, and its
    unsaved buffers are copied over.
    """
    for path, (factory, args, kwargs) in getattr(model, "_spectra_router_builds", {}).items():
        router = model.get_submodule(path)
        unsaved = [(sub, leaf) for sub, module in router.named_modules() for leaf in module._non_persistent_buffers_set]
        if not unsaved:
            continue
        with torch.device("cpu"):
            fresh = factory(*args, **kwargs)
        for sub, leaf in unsaved:
            module = router.get_submodule(sub)
            value = getattr(fresh.get_submodule(sub), leaf).to(getattr(module, leaf).device)
            module.register_buffer(leaf, value, persistent=False)


def realign_cpu_tensors(model: nn.Module) -> None:
    """Give every CPU parameter and buffer that is not 64-byte aligned memory of its own.

    Why: transformers' `from_pretrained` can leave CPU tensors as views into the memory-mapped
    safetensors file, at the file's offsets (8 bytes past a 64-byte boundary, say); the CPU matmul
    and GRU kernels take another code path on such memory and round differently in the last bit
    (~1e-6 on the logits of a small model), so the model would not compute what it computed when it
    was trained, nor what `load_moe_model` gives. A copy made by torch is aligned. Tied tensors stay
    tied (one Parameter object, changed in place)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.device.type == "cpu" and param.data_ptr() % 64:
                param.data = param.data.clone()
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.device.type == "cpu" and buf.data_ptr() % 64:
                    module._buffers[name] = buf.clone()
