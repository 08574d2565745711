"""Accumulate per-layer routing statistics over steps and report them once per log step.

Megatron-style: `add()` is called after every recorded forward with the layers' RoutingOutputs;
`report(prefix)` turns the accumulated *dispatched* loads into metrics and resets. Loads and
counts are summed across data-parallel ranks before any ratio is computed (METHOD.md §2b).
Everything counts real tokens only (`RoutingOutput.valid`): padding, including the pad block of
packed rows, is in no load, no denominator and no diagnostic.

Which routing a key describes is said by its prefix (the Trainer's phase) and its name:

    train/layer{i}/cv, maxvio      training routing *after selection*: the load dispatched by the
                                   forward that trained (SPECTRA: Sinkhorn + quota, i.e. post-quota;
                                   Switch: after capacity drops; Expert Choice: the experts' picks)
    train/layer{i}/cv_before_quota, maxvio_before_quota
                                   the same forward's *pre-selection* load: the router's own plain
                                   top-k of the plan the quota then corrected (`load_before_quota`;
                                   routers that applied a quota only, i.e. SPECTRA with quota)
    eval/layer{i}/cv, maxvio       *inference* routing (eval mode: SPECTRA's per-token top-k of −C
                                   without quota unless osr.sinkhorn_inference; Expert Choice's
                                   token-choice fallback) over the whole eval set
    {prefix}layer{i}/dropped_token_rate   real tokens with every slot dropped / real tokens
    {prefix}layer{i}/dropped_slot_rate    dropped slots / real slots (k slots per real token)
    {prefix}layer{i}/<diagnostic>  the router's diagnostics (e.g. sinkhorn_marginal_error), mean per forward
    {prefix}layer{i}/aux_<loss>    its aux losses as added to the training loss (times their
                                   coefficient), mean per forward
    {prefix}<name>_mean            each of the above averaged over MoE layers

The routing monitor's `monitor/...` keys (metrics/monitor.py) are inference routing of a fixed
held-out slice.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from spectra.metrics.balance import coefficient_of_variation, max_violation

if TYPE_CHECKING:  # metrics read RoutingOutput's fields; they never import a router
    from spectra.routing.base import RoutingOutput


def _accumulate(store: dict, key, value: torch.Tensor) -> None:
    """store[key] += value, starting from a copy (never an alias of the router's tensor)."""
    store[key] = value.clone() if key not in store else store[key] + value


class RoutingRecorder:
    """Running sums of dispatched load, drops and router diagnostics, per MoE layer."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        # Sums are tensors on the routers' device between reports, Python floats after `_to_host`.
        self.load: dict[int, torch.Tensor] = {}  # layer -> [E] dispatched real tokens (after selection)
        self.load_before_quota: dict[int, torch.Tensor] = {}  # layer -> [E] plain top-k before the quota
        self.dropped: dict[int, float | torch.Tensor] = defaultdict(float)  # layer -> real tokens with every slot dropped
        self.dropped_slots: dict[int, float | torch.Tensor] = defaultdict(float)  # layer -> dropped slots of real tokens
        self.assignments: dict[int, float | torch.Tensor] = defaultdict(float)  # layer -> real tokens
        self.slots: dict[int, float | torch.Tensor] = defaultdict(float)  # layer -> slots of real tokens (k each)
        self.diag_sum: dict[int, dict[str, float | torch.Tensor]] = defaultdict(lambda: defaultdict(float))
        self.aux_sum: dict[int, dict[str, float | torch.Tensor]] = defaultdict(lambda: defaultdict(float))
        self.calls: dict[int, int] = defaultdict(int)

    @torch.no_grad()
    def add(self, outputs: dict[int, RoutingOutput]) -> None:
        """Accumulate one forward's outputs (layer index -> RoutingOutput).

        The sums stay tensors on the routers' device: no host sync per step (on GPU each
        `float(tensor)` would wait for the queued kernels); `report()` reads them back at once.
        Token counts are summed exactly (int64), diagnostics in float64 like the Python floats
        they replace, so the reported values are unchanged.
        """
        for layer, out in outputs.items():
            valid = out.valid.reshape(-1).bool()  # [N] real tokens
            real_drops = out.dropped & valid.unsqueeze(-1)  # [N, k]; padding is never "dropped"
            _accumulate(self.load, layer, out.dispatch_counts.detach().float())  # [E]
            if out.load_before_quota is not None:
                _accumulate(self.load_before_quota, layer, out.load_before_quota.detach().float())  # [E]
            # A token is dropped when no routed expert served it (it passes through the shared
            # expert / residual only); a slot is dropped when that one assignment was.
            _accumulate(self.dropped, layer, (real_drops.all(-1) & valid).sum())
            _accumulate(self.dropped_slots, layer, real_drops.sum())
            _accumulate(self.assignments, layer, valid.sum())
            _accumulate(self.slots, layer, valid.sum() * out.dropped.shape[-1])
            for k, v in out.diagnostics.items():
                _accumulate(self.diag_sum[layer], k, v.detach().float().mean().double())
            for k, v in out.aux_losses.items():
                _accumulate(self.aux_sum[layer], k, v.detach().float().double())
            self.calls[layer] += 1

    def _counts(self) -> list[dict]:
        """The per-layer scalar count sums, in a fixed order (host transfer, all-reduce)."""
        return [self.dropped, self.dropped_slots, self.assignments, self.slots]

    def _to_host(self) -> None:
        """Turn every accumulated scalar tensor into a float and the loads into CPU tensors (one sync)."""
        slots = [(store, layer) for store in self._counts() for layer in store]
        slots += [(d, k) for per_layer in (self.diag_sum, self.aux_sum) for d in per_layer.values() for k in d]
        slots = [(store, key) for store, key in slots if torch.is_tensor(store[key])]
        if slots:
            device = slots[0][0][slots[0][1]].device
            values = torch.stack([store[key].reshape(()).double().to(device) for store, key in slots]).tolist()
            for (store, key), value in zip(slots, values):
                store[key] = value
        self.load = {layer: counts.float().cpu() for layer, counts in self.load.items()}
        self.load_before_quota = {layer: counts.float().cpu() for layer, counts in self.load_before_quota.items()}

    def _all_reduce_loads(self) -> None:
        """Sum loads and counts over data-parallel ranks (every rank runs the same routers)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        counts = self._counts()
        for layer in sorted(self.load):
            e = self.load[layer].numel()
            before = self.load_before_quota.get(layer)
            parts = [self.load[layer], torch.tensor([float(store[layer]) for store in counts])]
            if before is not None:
                parts.append(before)
            t = torch.cat(parts).to(backend_device)
            dist.all_reduce(t)
            t = t.cpu()
            self.load[layer] = t[:e]
            for i, store in enumerate(counts):
                store[layer] = float(t[e + i])
            if before is not None:
                self.load_before_quota[layer] = t[e + len(counts):]

    def report(self, prefix: str = "") -> dict[str, float]:
        """Metrics since the last report, per layer and averaged over layers; then reset."""
        if not self.load:
            return {}
        self._to_host()
        self._all_reduce_loads()
        logs: dict[str, float] = {}
        per_metric: dict[str, list[float]] = defaultdict(list)
        for layer in sorted(self.load):
            real, slots = self.assignments[layer], self.slots[layer]
            vals = {
                "cv": coefficient_of_variation(self.load[layer]),
                "maxvio": max_violation(self.load[layer]),
                "dropped_token_rate": self.dropped[layer] / real if real > 0 else math.nan,
                "dropped_slot_rate": self.dropped_slots[layer] / slots if slots > 0 else math.nan,
            }
            if layer in self.load_before_quota:
                vals["cv_before_quota"] = coefficient_of_variation(self.load_before_quota[layer])
                vals["maxvio_before_quota"] = max_violation(self.load_before_quota[layer])
            n = max(self.calls[layer], 1)
            vals.update({k: v / n for k, v in self.diag_sum[layer].items()})
            vals.update({f"aux_{k}": v / n for k, v in self.aux_sum[layer].items()})
            for k, v in vals.items():
                logs[f"{prefix}layer{layer}/{k}"] = float(v)
                per_metric[k].append(float(v))
        for k, vs in per_metric.items():
            logs[f"{prefix}{k}_mean"] = sum(vs) / len(vs)
        self.reset()
        return logs
