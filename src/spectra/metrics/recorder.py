"""Accumulate per-layer routing statistics over steps and report them once per log step.

Megatron-style: `add()` is called after every recorded forward with the layers' RoutingOutputs;
`report(prefix)` turns the accumulated *dispatched* loads into metrics (keys
`{prefix}layer{i}/cv`, ..., plus `{prefix}cv_mean` over layers) and resets. Loads are summed
across data-parallel ranks before CV is computed (METHOD.md §2b).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import torch

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
        self.load: dict[int, torch.Tensor] = {}  # layer -> [E] dispatched tokens
        self.dropped: dict[int, float | torch.Tensor] = defaultdict(float)  # layer -> real tokens with every slot dropped
        self.assignments: dict[int, float | torch.Tensor] = defaultdict(float)  # layer -> real tokens
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
            _accumulate(self.load, layer, out.dispatch_counts.detach().float())  # [E]
            # A token is dropped when no routed expert served it (it passes through the shared
            # expert / residual only). Per-slot drop rates, which differ by router (Expert Choice
            # pads unpicked slots), stay in each router's diagnostics.
            _accumulate(self.dropped, layer, (out.dropped.all(-1) & out.valid).sum())
            _accumulate(self.assignments, layer, out.valid.sum())
            for k, v in out.diagnostics.items():
                _accumulate(self.diag_sum[layer], k, v.detach().float().mean().double())
            for k, v in out.aux_losses.items():
                _accumulate(self.aux_sum[layer], k, v.detach().float().double())
            self.calls[layer] += 1

    def _to_host(self) -> None:
        """Turn every accumulated scalar tensor into a float and the loads into CPU tensors (one sync)."""
        slots = [(self.dropped, layer) for layer in self.dropped] + [(self.assignments, layer) for layer in self.assignments]
        slots += [(d, k) for per_layer in (self.diag_sum, self.aux_sum) for d in per_layer.values() for k in d]
        slots = [(store, key) for store, key in slots if torch.is_tensor(store[key])]
        if slots:
            device = slots[0][0][slots[0][1]].device
            values = torch.stack([store[key].reshape(()).double().to(device) for store, key in slots]).tolist()
            for (store, key), value in zip(slots, values):
                store[key] = value
        self.load = {layer: counts.float().cpu() for layer, counts in self.load.items()}

    def _all_reduce_loads(self) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for layer in sorted(self.load):
            t = torch.cat([self.load[layer], torch.tensor([self.dropped[layer], self.assignments[layer]])])
            backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            t = t.to(backend_device)
            dist.all_reduce(t)
            t = t.cpu()
            self.load[layer], self.dropped[layer], self.assignments[layer] = t[:-2], float(t[-2]), float(t[-1])

    def report(self, prefix: str = "") -> dict[str, float]:
        """Metrics since the last report, per layer and averaged over layers; then reset."""
        if not self.load:
            return {}
        self._to_host()
        self._all_reduce_loads()
        logs: dict[str, float] = {}
        per_metric: dict[str, list[float]] = defaultdict(list)
        for layer in sorted(self.load):
            vals = {
                "cv": coefficient_of_variation(self.load[layer]),
                "maxvio": max_violation(self.load[layer]),
                "dropped_rate": self.dropped[layer] / max(self.assignments[layer], 1.0),
            }
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
