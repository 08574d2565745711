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


class RoutingRecorder:
    """Running sums of dispatched load, drops and router diagnostics, per MoE layer."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.load: dict[int, torch.Tensor] = {}  # layer -> [E] dispatched tokens
        self.dropped: dict[int, float] = defaultdict(float)  # layer -> real tokens with every slot dropped
        self.assignments: dict[int, float] = defaultdict(float)  # layer -> real tokens
        self.diag_sum: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.aux_sum: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.calls: dict[int, int] = defaultdict(int)

    @torch.no_grad()
    def add(self, outputs: dict[int, RoutingOutput]) -> None:
        """Accumulate one forward's outputs (layer index -> RoutingOutput)."""
        for layer, out in outputs.items():
            counts = out.dispatch_counts.detach().float().cpu()
            self.load[layer] = counts if layer not in self.load else self.load[layer] + counts
            # A token is dropped when no routed expert served it (it passes through the shared
            # expert / residual only). Per-slot drop rates, which differ by router (Expert Choice
            # pads unpicked slots), stay in each router's diagnostics.
            self.dropped[layer] += float((out.dropped.all(-1) & out.valid).sum())
            self.assignments[layer] += float(out.valid.sum())
            for k, v in out.diagnostics.items():
                self.diag_sum[layer][k] += float(v.detach().float().mean())
            for k, v in out.aux_losses.items():
                self.aux_sum[layer][k] += float(v.detach().float())
            self.calls[layer] += 1

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
