"""The contract between routers and everything else: `RoutingInputs` in, `RoutingOutput` out.

Naming (as in Megatron-Core's router):
    logits   raw router output, [N, E]
    probs    the routing distribution the router selects from (softmax, Sinkhorn plan, ...), [N, E]
    expert_index / expert_weight   the *dispatched* selection, [N, k]
    dispatch_counts   tokens actually sent to each expert after selection, capacity and drops, [E]

N = number of token positions in the forward pass (batch x sequence, padding included; `valid`
says which are real tokens), E = routed experts, k = experts per token.

Every router returns a `RoutingOutput`; the MoE block and the metrics consume nothing else.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from spectra.config import ROUTER_GROUPS
from spectra.routers_catalog import NO_ROUTER, ROUTER_NAMES


@dataclass
class RoutingInputs:
    """What a router may look at for one MoE layer's forward pass.

    hidden:        [B, S, H] hidden states entering the MoE layer.
    valid:         [B, S] bool, False at padding (attention_mask == 0). Padding is excluded
                   from balancing, losses and metrics, and recurrent state does not advance on it.
    doc_start:     [B, S] bool, True where a new document starts (position_ids == 0 in packed
                   rows); recurrent routers reset their state there.
    input_ids:     [B, S] token ids or None (the Hash router needs them).
    prev_state:    [B, S, Dh] routing state of the previous MoE layer (SPECTRA depth recurrence)
                   or None for the first MoE layer.
    cached_state:  [B, Dh] this layer's recurrent state after the previous decoding call, or None
                   when the call starts a new sequence.
    step:          optimizer steps taken so far (schedules such as the SRIP warm-up read it).
    past_length:   tokens already in the KV cache when this forward started (> 0 while decoding
                   incrementally with a cache; 0 for a full forward).
    teacher_forced: True for a forward the framework scores as a whole (the trainer's training and
                   evaluation forwards, the routing monitor: `RoutingContext.recording`), False for
                   any other call (generation, a plain forward of a saved model). Routers whose
                   training selection looks at the whole batch (Expert Choice) may route an eval-mode
                   teacher-forced forward the way they train; every other call must stay causal.
    """

    hidden: torch.Tensor
    valid: torch.Tensor
    doc_start: torch.Tensor
    input_ids: torch.Tensor | None = None
    prev_state: torch.Tensor | None = None
    cached_state: torch.Tensor | None = None
    step: int = 0
    past_length: int = 0
    teacher_forced: bool = False

    @property
    def flat_hidden(self) -> torch.Tensor:
        """[N, H] hidden states, N = B * S."""
        return self.hidden.reshape(-1, self.hidden.shape[-1])

    @property
    def flat_valid(self) -> torch.Tensor:
        """[N] bool mask of real tokens."""
        return self.valid.reshape(-1)


@dataclass
class RoutingOutput:
    """A router's decision for N token positions.

    expert_index:     [N, k] long, selected experts (k distinct per token for token-choice routers).
    expert_weight:    [N, k] float, combine weights; 0 where the assignment was dropped or the
                      position is padding.
    probs:            [N, E] float, the distribution the selection was made from.
    dropped:          [N, k] bool, True where an assignment of a real token was dropped
                      (capacity overflow, Expert-Choice leftovers). Dropped slots carry weight 0;
                      padding is never "dropped" (see `valid`).
    valid:            [N] bool, real tokens (padding excluded everywhere downstream).
    dispatch_counts:  [E] float, tokens dispatched to each expert (valid, not dropped).
    aux_losses:       name -> scalar loss, *already multiplied by its coefficient*; summed into
                      the training loss. Unscaled values for logging go in `diagnostics`.
    diagnostics:      name -> scalar tensor, logged per layer (e.g. Sinkhorn marginal error).
    logits:           [N, E] raw router output, when the router has one.
    scores:           [N, E] the router's similarity scores before any cost or plan, when it has
                      them (SPECTRA: s = cos(r_e, p_e) ∈ [-1, 1]; the alignment metric reads these).
    gram:             [E, E] Gram matrix of expert representations (SPECTRA).
    expert_repr:      [E, D] expert representations (SPECTRA).
    state:            [B, S, Dh] routing state handed to the next MoE layer (SPECTRA GRU).
    chosen:           [N, k] bool or None: which slots are the router's choices. None = every slot
                      of a real token (token-choice routers: a capacity drop does not change what
                      was chosen). Expert Choice sets it: its k_max slots are data-dependent and
                      only the picked ones are choices; the rest are fillers. Stability metrics
                      compare the chosen sets.
    load_before_quota: [E] float, real tokens per expert under plain per-token top-k of the same
                      scores the quota selected from, i.e. the load the quota corrected; set only
                      by routers whose forward applied a quota (SPECTRA), None otherwise.
    """

    expert_index: torch.Tensor
    expert_weight: torch.Tensor
    probs: torch.Tensor
    dropped: torch.Tensor
    valid: torch.Tensor
    dispatch_counts: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    expert_repr: torch.Tensor | None = None
    state: torch.Tensor | None = None
    chosen: torch.Tensor | None = None
    load_before_quota: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def top_k(self) -> int:
        return self.expert_index.shape[-1]


def dispatch_counts_of(expert_index: torch.Tensor, served: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert, counting only served assignments.

    expert_index: [N, k] long; served: [N, k] bool (valid and not dropped). Returns [E] float.
    """
    counts = torch.zeros(num_experts, dtype=torch.float32, device=expert_index.device)
    return counts.index_add_(0, expert_index.reshape(-1), served.reshape(-1).to(torch.float32))


class Router(nn.Module):
    """Base class: subclasses implement `forward(inputs: RoutingInputs) -> RoutingOutput`.

    `num_experts` and `top_k` are fixed at construction. `recurrent` routers produce a `state`
    that the MoE model passes to the next MoE layer and caches between decoding calls.
    """

    recurrent: bool = False
    # The typed config group (spectra.config) the router's constructor receives; `build_router`
    # builds it from the run config's flat keys.
    config_class: type = type(None)

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k

    def forward(self, inputs: RoutingInputs) -> RoutingOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_optimizer_step(self, step: int) -> None:
        """Called after each optimizer step (routers with schedules override it)."""

    def on_skipped_step(self) -> None:
        """Called when the numerics guard skips an optimizer step (non-finite values): routers
        that collect state over a step's forwards (SPECTRA's running Gram) drop what they collected."""


# name -> factory(config group, hidden_size, num_experts) -> Router; filled by @register_router. The names
# themselves (and their printed names) are listed once, in `spectra.routers_catalog`.
ROUTERS: dict[str, Callable[..., Router]] = {}


def register_router(*names: str):
    """Class decorator: make a router constructible by `build_router(name, ...)`.

    Each name must be listed in `spectra.routers_catalog` (which the config schema and the tables
    read), so a router cannot be registered under a name the config would refuse.
    """
    for name in names:
        if name not in ROUTER_NAMES or name == NO_ROUTER:
            raise ValueError(f"router name {name!r} is not listed in spectra.routers_catalog.DISPLAY_NAMES; add it there")

    def wrap(factory):
        for name in names:
            ROUTERS[name] = factory
        return factory

    return wrap


def check_registry_matches_catalog() -> None:
    """Every router the catalog lists (other than `dense`, which has no router module) is
    registered. Called once `spectra.routing` has imported every router module."""
    missing = set(ROUTER_NAMES) - {NO_ROUTER} - set(ROUTERS)
    if missing:
        raise RuntimeError(f"spectra.routers_catalog lists routers no module registers: {sorted(missing)}")
    # The group a router receives is the one config validation checks (spectra.config.ROUTER_GROUPS).
    wrong = {name: f.config_class.__name__ for name, f in ROUTERS.items() if ROUTER_GROUPS.get(name) is not f.config_class}
    if wrong:
        raise RuntimeError(f"routers whose config_class is not spectra.config.ROUTER_GROUPS[name]: {wrong}")


def build_router(cfg, hidden_size: int, num_experts: int, layer_idx: int | None = None) -> Router:
    """Build the router named `cfg.router.name` for one MoE layer.

    `cfg` is the run config (or anything with its `router`, `osr`, `quota` groups); the router
    receives only its own typed group (`factory.config_class`, see spectra.config), built from
    those flat keys and checked there. Unknown names raise with the list. `layer_idx` (the decoder
    layer the router serves) reaches only factories that take a `layer_idx` argument (Hash salts
    its hash with it); the others never see it.
    """
    from spectra import routing  # noqa: F401  (importing the package registers every router)

    name = cfg.router.name
    if name not in ROUTERS:
        raise KeyError(f"router.name={name!r} is not a known router; choose one of {sorted(ROUTERS)}")
    factory = ROUTERS[name]
    kwargs = {}
    if layer_idx is not None and "layer_idx" in inspect.signature(factory).parameters:
        kwargs["layer_idx"] = layer_idx
    return factory(factory.config_class.from_run_config(cfg), hidden_size=hidden_size, num_experts=num_experts, **kwargs)
