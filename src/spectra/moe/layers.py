"""What upcycling and router replacement share: finding the decoder layers, and finishing a
model whose MoE blocks are in place. Below both, so `upcycle` can hand an MoE model to
`replace_routers` without the two modules importing each other.
"""

from __future__ import annotations

from omegaconf import OmegaConf
from torch import nn

from spectra.moe.context import RoutingContext, install_context_hook


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


def moe_spec(cfg) -> dict:
    """What `save_pretrained` records in `config.spectra_moe` so a load can rebuild the blocks."""
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
