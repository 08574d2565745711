"""The router names a run may choose (`router.name`) and how tables print them: stated once.

Standard library only, at the bottom of the package, so that the config schema (validates
`router.name` at composition time) and the analysis layer (prints table rows, reads only run
directories) can read it without importing torch or any router module. The router registry
(`spectra.routing.base.ROUTERS`, filled by `@register_router`) binds each name to its class and
checks, when `spectra.routing` is imported, that it registers exactly the routers named here
other than `NO_ROUTER`.
"""

from __future__ import annotations

# `router=dense`: keep the dense model, no MoE conversion and no router module (the baseline
# that the MoE variants are compared against).
NO_ROUTER = "dense"

# router.name -> the name tables and figures print, in the order tables list them.
DISPLAY_NAMES: dict[str, str] = {
    "topk": "Top-k",
    "spectra": "SPECTRA",
    "switch_top1": "Switch Top-1",
    "switch_top2": "Switch Top-2",
    "expert_choice": "Expert Choice",
    "hash": "Hash",
    "aux_free": "Aux-Loss-Free",
    "seq_aux": "Seq-Aux",
    "global_aux": "Global-Aux",
    "sinkhorn_base": "S-BASE",
    NO_ROUTER: "Dense",
}

# Every valid `router.name`.
ROUTER_NAMES: tuple[str, ...] = tuple(DISPLAY_NAMES)


def display_name(name: str) -> str:
    """The printed name of router `name`; unknown names print as they are."""
    return DISPLAY_NAMES.get(name, name)
