"""MoE blocks, upcycling of dense causal LMs, and saving/loading upcycled models."""

from spectra.moe.block import MoEBlock
from spectra.moe.context import RoutingContext
from spectra.moe.loading import WeightsMismatchError, load_base_model, load_moe_model, save_moe_model
from spectra.moe.replace import UnsupportedMoEError
from spectra.moe.upcycle import UnsupportedMLPError, moe_blocks, parameter_report, routers, upcycle

__all__ = [
    "MoEBlock",
    "RoutingContext",
    "UnsupportedMLPError",
    "UnsupportedMoEError",
    "WeightsMismatchError",
    "load_base_model",
    "load_moe_model",
    "moe_blocks",
    "parameter_report",
    "routers",
    "save_moe_model",
    "upcycle",
]
