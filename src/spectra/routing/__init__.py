"""Routers. Importing this package registers every router module in it (see `base.ROUTERS`).

Each router lives in its own module and returns a `RoutingOutput`; pure building blocks
(Sinkhorn, selection, orthogonality) are modules of their own so they can be tested alone.
"""

import importlib
import pkgutil

from spectra.routing.base import (
    ROUTERS,
    Router,
    RoutingInputs,
    RoutingOutput,
    build_router,
    check_registry_matches_catalog,
    register_router,
)

# Import every sibling module so its @register_router decorators run; new router files need no
# edit here.
for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
check_registry_matches_catalog()

__all__ = ["ROUTERS", "Router", "RoutingInputs", "RoutingOutput", "build_router", "register_router"]
