"""Run artifacts beyond the JSON files: routing snapshots and the final model's expert vectors.

Routing snapshots `<run_dir>/routing/step{step:06d}.pt` are written by the routing monitor
(spectra.metrics.monitor, format 1, spectra.contracts.snapshots) on a fixed held-out slice of
N = B·S positions; they are read by the contract's one reader (`read_snapshots`) and parsed here:

    {"format": 1, "step": int, "max_steps", "fingerprint", "num_experts", "top_k",
     "shape": [B, S], "valid": [N] bool, "domain_ids": [N] long (−1 = padding) or None,
     "input_ids": [N] int32 (slice tokens, for TF-IDF keywords), "domain_names": [str],
     "layers": {i: {"expert_index": [N, k], "served": [N, k] bool, "load": [E],
                    "load_before_quota": [E], "load_after_quota": [E]   (quota routers only)}}}

"load" is the eval-mode dispatched load; "load_before_quota" / "load_after_quota" come from the
slice routed as in training (Sinkhorn + quota): plain per-token top-k of the plan vs the quota's
selection. Read as well when present: per layer "expert_repr" [E, D]; top level "positions" [N],
"token_ids" [N] or "token_texts" [N] (instead of "input_ids"). Per-layer entries may also sit
at the top level under `layer{i}` / integer keys, or flat as `layer{i}/<name>`. Everything
becomes numpy arrays; missing pieces make
the figures that need them skip with a note; nothing here raises on a partial snapshot.

`expert_representations(run_dir)` reads one [E, D] matrix per MoE layer from the final model's
safetensors: SPECTRA's `expert_repr_ema` (or `expert_keys` for -Expression), a linear router's
gate rows `gate.weight` [E, H] otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open

from spectra.contracts.snapshots import read_snapshots
from spectra.metrics.stability import SnapshotLayer, snapshot_stability

_LAYER_KEY = re.compile(r"^(?:layer[_]?)?(\d+)$")
_FLAT_KEY = re.compile(r"^layer[_]?(\d+)[/.](.+)$")
_STEP = re.compile(r"step[_-]?(\d+)")
BEFORE_QUOTA_KEYS = ("load_before_quota", "load_before", "prequota_load", "load_prequota", "topk_load")


@dataclass
class RoutingSnapshot:
    step: int
    path: Path
    layers: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    shared: dict = field(default_factory=dict)

    def num_experts(self, layer: int) -> int | None:
        d = self.layers.get(layer, {})
        if "load" in d:
            return int(np.asarray(d["load"]).shape[-1])
        if "expert_repr" in d:
            return int(np.asarray(d["expert_repr"]).shape[0])
        if "expert_index" in d and np.asarray(d["expert_index"]).size:
            return int(np.asarray(d["expert_index"]).max()) + 1
        return None

    def load_after(self, layer: int) -> np.ndarray | None:
        """Served assignments per expert (the dispatched load)."""
        d, e = self.layers.get(layer, {}), self.num_experts(layer)
        if "load" in d:
            return np.asarray(d["load"], dtype=float)
        if "expert_index" in d and e:
            idx = np.asarray(d["expert_index"])
            served = np.asarray(d.get("served", np.ones_like(idx, dtype=bool)), dtype=bool)
            return np.bincount(idx[served].ravel(), minlength=e).astype(float)
        return None

    def load_before(self, layer: int) -> np.ndarray | None:
        """What the router chose before the quota / capacity cut, when the snapshot has it:
        an explicit pre-quota load, else every selected slot of the real tokens (served or not)."""
        d, e = self.layers.get(layer, {}), self.num_experts(layer)
        for k in BEFORE_QUOTA_KEYS:
            if k in d:
                return np.asarray(d[k], dtype=float)
        if "expert_index" in d and "served" in d and e:
            idx = np.asarray(d["expert_index"])
            return np.bincount(idx[self.valid(layer)].ravel(), minlength=e).astype(float)
        return None

    def load_after_quota(self, layer: int) -> np.ndarray | None:
        """[E] load of the quota's selection on the same tokens as `load_before` (None if not stored)."""
        d = self.layers.get(layer, {})
        return np.asarray(d["load_after_quota"], dtype=float) if "load_after_quota" in d else None

    def valid(self, layer: int) -> np.ndarray:
        """[N] bool real tokens (per layer, else the snapshot's, else all)."""
        d = self.layers.get(layer, {})
        v = d.get("valid", self.shared.get("valid"))
        n = np.asarray(d["expert_index"]).shape[0] if "expert_index" in d else 0
        return np.ones(n, dtype=bool) if v is None else np.asarray(v, dtype=bool).ravel()

    def positions(self) -> np.ndarray | None:
        """[N] position of each slice token in its row (from `positions`, or the [B, S] shape)."""
        if self.shared.get("positions") is not None:
            return np.asarray(self.shared["positions"]).ravel()
        shape = self.shared.get("shape", self.shared.get("batch_shape"))
        n = next((np.asarray(d["expert_index"]).shape[0] for d in self.layers.values() if "expert_index" in d), None)
        if shape is not None and n is not None and int(np.prod(shape)) == n:
            return np.tile(np.arange(int(shape[-1])), int(shape[0]))
        return None


def _np(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    if isinstance(x, (list, tuple)) and x and all(isinstance(v, str) for v in x):
        return list(x)
    return np.asarray(x) if isinstance(x, (list, tuple)) else x


def parse_snapshot(obj: dict, path: Path) -> RoutingSnapshot:
    m = _STEP.search(path.stem)
    step = obj.get("step", int(m.group(1)) if m else -1) if isinstance(obj, dict) else -1
    snap = RoutingSnapshot(step=int(step), path=path)
    if not isinstance(obj, dict):
        return snap
    for key, value in obj.items():
        key_s = str(key)
        if key_s == "layers" and isinstance(value, (dict, list)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for i, d in items:
                mi = _LAYER_KEY.match(str(i))
                if mi and isinstance(d, dict):
                    snap.layers.setdefault(int(mi.group(1)), {}).update({k: _np(v) for k, v in d.items()})
        elif (mi := _LAYER_KEY.match(key_s)) and isinstance(value, dict):
            snap.layers.setdefault(int(mi.group(1)), {}).update({k: _np(v) for k, v in value.items()})
        elif mf := _FLAT_KEY.match(key_s):
            snap.layers.setdefault(int(mf.group(1)), {})[mf.group(2)] = _np(value)
        elif key_s != "step":
            snap.shared[key_s] = _np(value)
    return snap


def load_routing_snapshots(run_dir: str | Path) -> list[RoutingSnapshot]:
    """All readable snapshots of a run, by step; an unreadable file is skipped with a warning."""
    out = [parse_snapshot(obj, f) for f, obj in read_snapshots(run_dir, skip_unreadable=True)]
    return sorted(out, key=lambda s: s.step)


def stability_from_snapshots(snaps: list[RoutingSnapshot]) -> dict[str, float]:
    """Table 12 from snapshots, computed as the monitor computes summary.json's "stability"
    (`spectra.metrics.stability.snapshot_stability`): consistency and Kendall τ between
    consecutive snapshots (nan-aware mean over pairs, then over layers), usage variance across
    all snapshots (nan-aware mean over layers). Keys: consistency, usage_variance, kendall_tau."""
    layers = sorted(set().union(*[s.layers for s in snaps])) if snaps else []
    seqs = {layer: [_stability_layer(s, layer) for s in snaps if layer in s.layers] for layer in layers}
    mean = snapshot_stability(seqs)["mean"]
    return {"consistency": mean["consistency_consecutive_mean"], "usage_variance": mean["usage_variance"],
            "kendall_tau": mean["kendall_tau_mean"]}


def _stability_layer(snap: RoutingSnapshot, layer: int) -> SnapshotLayer:
    """What the stability metrics read of one layer of a parsed snapshot."""
    d = snap.layers[layer]
    return SnapshotLayer(valid=snap.valid(layer), expert_index=d.get("expert_index"), chosen=d.get("chosen"),
                         load=snap.load_after(layer))


_REPR_KEY = re.compile(r"layers\.(\d+)\..*router\.(expert_repr_ema|expert_keys|gate\.weight)$")
_REPR_PREFERENCE = ("expert_repr_ema", "expert_keys", "gate.weight")


def expert_representations(run_dir: str | Path) -> dict[int, np.ndarray]:
    """{layer: [E, D]} expert vectors of the run's final model (`<run_dir>/model/*.safetensors`);
    {} when there is no model or no router with per-expert vectors (Hash, Dense)."""
    files = sorted((Path(run_dir) / "model").glob("*.safetensors"))
    if not files:
        return {}
    found: dict[int, dict[str, np.ndarray]] = {}
    for f in files:
        with safe_open(str(f), framework="np") as st:
            keys = list(st.keys())
            ready = {k.rsplit(".", 1)[0] for k in keys if k.endswith("expert_repr_ema_ready") and bool(st.get_tensor(k))}
            for k in keys:
                m = _REPR_KEY.search(k)
                if not m or (m.group(2) == "expert_repr_ema" and k.rsplit(".", 1)[0] not in ready):
                    continue  # an EMA that never updated is all zeros
                found.setdefault(int(m.group(1)), {})[m.group(2)] = st.get_tensor(k).astype(np.float64)
    return {layer: next(v[p] for p in _REPR_PREFERENCE if p in v) for layer, v in sorted(found.items())}
