"""Per-forward routing context shared by the MoE blocks of one model.

A decoder layer calls `self.mlp(hidden_states)` with nothing else, but routers need more:
the padding mask, document starts of packed rows, token ids (Hash), the previous MoE layer's
routing state (SPECTRA depth recurrence) and, while decoding, each layer's cached recurrent
state. A forward pre-hook on the causal LM (`install_context_hook`) captures the model
inputs once per forward; each MoE block reads what it needs from here and records its
`RoutingOutput` so the trainer can add aux losses and log per-layer metrics.

Padding. Routers see `valid` = attention_mask (when given) AND the batch's `routing_mask` (when
given). Packed rows have no attention_mask on purpose (transformers builds the per-document mask
from position_ids only without one), so their pad block is marked by `routing_mask` alone: a
[B, S] 0/1 tensor the collator adds under a key the model never receives -- the pre-hook pops it
from the forward's kwargs before the model runs (spectra.data.sft.ROUTING_MASK, same name).

Why keyed by layer index and not "the last state": with gradient checkpointing a block is
re-run during backward; reading `states[previous_moe_layer]` gives the same tensor the first
forward used, whereas a "last written" slot would hold the final layer's state by then.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from spectra.routing.base import RoutingInputs, RoutingOutput

# The batch key of the real-token mask (spectra.data.sft.ROUTING_MASK; not imported from there:
# spectra.data pulls in `datasets`, which the model side does not need).
ROUTING_MASK = "routing_mask"


@dataclass
class RoutingContext:
    """Mutable state for one model; one instance is shared by all of its MoE blocks."""

    moe_layers: list[int] = field(default_factory=list)  # indices of MoE decoder layers, ascending
    input_ids: torch.Tensor | None = None  # [B, S]
    attention_mask: torch.Tensor | None = None  # [B, S_total] (past + current while decoding)
    position_ids: torch.Tensor | None = None  # [B, S]
    routing_mask: torch.Tensor | None = None  # [B, S] 1 = real token (the batch's ROUTING_MASK), or None
    past_length: int = 0  # tokens already in the KV cache when this forward started
    step: int = 0  # optimizer steps taken (the trainer advances it)
    recording: bool = False  # the trainer turns this on around the forward it wants recorded
    states: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, S, Dh]
    cached_states: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, Dh]
    outputs: dict[int, RoutingOutput] = field(default_factory=dict)  # layer -> last recorded output

    def begin_forward(self, input_ids, attention_mask, position_ids, past_length: int) -> None:
        """Called by the pre-hook at the start of every model forward."""
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.position_ids = position_ids
        self.routing_mask = None  # the pre-hook sets it after this call when the batch has one
        self.past_length = past_length
        self.states = {}
        self.outputs = {}
        if past_length == 0:  # a new prompt: forget the previous sequence's recurrent states
            self.cached_states = {}

    def __deepcopy__(self, memo) -> RoutingContext:
        """A copied model gets its own context with the layout and step, none of the per-forward
        tensors (they may be non-leaf autograd tensors, which cannot be deep-copied)."""
        twin = RoutingContext(moe_layers=list(self.moe_layers), step=self.step, recording=self.recording)
        memo[id(self)] = twin
        return twin

    def routing_inputs(self, layer_idx: int, hidden: torch.Tensor) -> RoutingInputs:
        """Build a router's inputs for MoE layer `layer_idx` from hidden [B, S, H]."""
        B, S, _ = hidden.shape
        device = hidden.device
        valid = self.real_tokens(B, S, device)  # [B, S]
        if self.position_ids is not None and self.position_ids.shape[-1] == S and self.past_length == 0:
            doc_start = self.position_ids.to(device) == 0  # [B, S], packed rows restart at 0
            doc_start = doc_start.expand(B, S)
        else:
            doc_start = torch.zeros(B, S, dtype=torch.bool, device=device)
            if self.past_length == 0:
                doc_start[:, 0] = True
        ids = self.input_ids
        if ids is not None and ids.shape[-1] != S:
            ids = None  # inputs_embeds path or mismatch: routers needing ids will say so
        prev = None
        pos = self.moe_layers.index(layer_idx) if layer_idx in self.moe_layers else 0
        if pos > 0:
            prev = self.states.get(self.moe_layers[pos - 1])
        cached = self.cached_states.get(layer_idx) if self.past_length > 0 else None
        return RoutingInputs(
            hidden=hidden,
            valid=valid,
            doc_start=doc_start,
            input_ids=ids,
            prev_state=prev,
            cached_state=cached,
            step=self.step,
            past_length=self.past_length,
            teacher_forced=self.recording,  # the trainer's and the monitor's scored forwards
        )

    def real_tokens(self, B: int, S: int, device) -> torch.Tensor:
        """[B, S] bool: attention_mask (its last S columns while decoding) AND routing_mask, each
        when present; all True when neither is."""
        valid = torch.ones(B, S, dtype=torch.bool, device=device)
        if self.attention_mask is not None:
            valid = valid & self.attention_mask[:, -S:].to(device=device, dtype=torch.bool)
        if self.routing_mask is not None:
            if tuple(self.routing_mask.shape) != (B, S):
                raise ValueError(f"{ROUTING_MASK} has shape {tuple(self.routing_mask.shape)}, but the forward routes "
                                 f"[B, S] = [{B}, {S}] positions: it must mark every input position")
            valid = valid & self.routing_mask.to(device=device, dtype=torch.bool)
        return valid

    def record(self, layer_idx: int, out: RoutingOutput, training: bool) -> None:
        """Keep the layer's routing state for the next layer / next decoding call, and its output."""
        if out.state is not None:
            self.states[layer_idx] = out.state
            if not training:
                # The router carries state through padding, so the last position holds the state
                # after each row's last real token.
                self.cached_states[layer_idx] = out.state[:, -1].detach()
        if self.recording:
            self.outputs[layer_idx] = out

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Beam search reordered the KV cache's batch rows: reorder the cached GRU states alike."""
        self.cached_states = {
            layer: state.index_select(0, beam_idx.to(state.device)) for layer, state in self.cached_states.items()
        }

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of every recorded layer's aux losses (already scaled by their coefficients)."""
        total = None
        for out in self.outputs.values():
            for v in out.aux_losses.values():
                total = v if total is None else total + v
        return total


# The KV cache's keyword: transformers <= 5.23 passes `past_key_values`, 5.24 and later pass
# `cache` (`past_key_values` is still accepted there, with a deprecation warning). Read both.
CACHE_KWARGS = ("cache", "past_key_values")


def _model_input(signature: inspect.Signature, args: tuple, kwargs: dict, name: str):
    """The value of forward argument `name`, passed by keyword or by position (None if absent)."""
    if name in kwargs:
        return kwargs[name]
    params = list(signature.parameters)
    if name in params and params.index(name) < len(args):
        return args[params.index(name)]
    return None


def install_context_hook(model: torch.nn.Module, ctx: RoutingContext):
    """Register the forward pre-hook that feeds `ctx` from the causal LM's inputs.

    It also removes `routing_mask` (ROUTING_MASK) from the forward's kwargs, so a batch from
    spectra.data.PackedCollator can be passed as `model(**batch)`: the mask marks padding for the
    routers only, and the model's forward never sees the key.

    The hook finds the context on the model (`module.spectra_context`, falling back to `ctx`), not
    in its closure: `copy.deepcopy(model)` copies the hook function as it is, and the copy must
    feed its own context, the one its MoE blocks read.
    """
    signature = inspect.signature(model.forward)

    def hook(module, args, kwargs):
        ctx_now = getattr(module, "spectra_context", ctx)

        def get(name):
            return _model_input(signature, args, kwargs, name)

        cache = next((c for c in map(get, CACHE_KWARGS) if c is not None), None)
        past = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length())
            _follow_beam_reorder(cache, ctx_now)
        routing_mask = kwargs.pop(ROUTING_MASK, None)
        ctx_now.begin_forward(get("input_ids"), get("attention_mask"), get("position_ids"), past)
        ctx_now.routing_mask = routing_mask
        return args, kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _follow_beam_reorder(cache, ctx: RoutingContext) -> None:
    """Make `cache.reorder_cache(beam_idx)` (what `generate` calls between beam-search steps)
    reorder `ctx.cached_states` too.

    Why by hand: the GRU routing state is recurrent state that transformers' Cache classes do not
    know about; wrapping this one cache object's method keeps it in step with the KV cache
    without subclassing every Cache type.
    """
    if getattr(cache, "_spectra_routing_ctx", None) is ctx or not hasattr(cache, "reorder_cache"):
        return
    original = cache.reorder_cache

    def reorder_cache(beam_idx: torch.Tensor):
        out = original(beam_idx)
        ctx.reorder(beam_idx)
        return out

    cache.reorder_cache = reorder_cache
    cache._spectra_routing_ctx = ctx
