"""Load-balance metrics on the *dispatched* load vector (METHOD.md §5, "Balance").

The load vector `c` ([E]) counts the assignments each expert actually served: real tokens
(`valid`) whose slot was not dropped (capacity overflow, Expert-Choice leftovers). It is never
computed from pre-selection probabilities or from combine weights (the reference code's defect,
METHOD.md §7).

Conventions shared by every function here:
    * inputs may be torch tensors or numpy arrays; arithmetic is done in float64;
    * scalars come back as Python floats, vectors as float64 torch tensors;
    * E < 2 raises ValueError (balance between experts is undefined for one expert);
    * an all-zero load (no token dispatched) gives nan for every ratio to the mean load.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: Paper Table 7: an expert has "collapsed" when its load is below 10 % of the uniform load.
COLLAPSE_THRESHOLD = 0.1


def _tensor(x, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """A torch tensor view of `x` (torch or numpy), cast to `dtype` unless `dtype` is None."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.detach()
    return t if dtype is None else t.to(dtype)


def _load_vector(load) -> torch.Tensor:
    """Validate a load vector: 1-D, E >= 2, finite, non-negative. Returns it as float64."""
    c = _tensor(load)
    if c.dim() != 1:
        raise ValueError(f"load must be a 1-D [E] vector, got shape {tuple(c.shape)}")
    if c.numel() < 2:
        raise ValueError(f"balance metrics need E >= 2 experts, got E={c.numel()}")
    if not torch.isfinite(c).all() or (c < 0).any():
        raise ValueError("load must be finite and non-negative")
    return c


def served_mask(valid, dropped) -> torch.Tensor:
    """Assignments that were actually served: `valid[:, None] & ~dropped`.

    valid: [N] bool (real tokens); dropped: [N, k] bool. Returns [N, k] bool.
    """
    v = _tensor(valid, torch.bool)
    d = _tensor(dropped, torch.bool)
    if d.dim() != 2 or v.shape != d.shape[:1]:
        raise ValueError(f"valid must be [N] and dropped [N, k]; got {tuple(v.shape)} and {tuple(d.shape)}")
    return v.unsqueeze(-1) & ~d


def expert_load(expert_index, served, num_experts: int) -> torch.Tensor:
    """Dispatched load per expert: c_e = #{(t, j) : expert_index[t, j] = e and served[t, j]}.

    expert_index: [N, k] integer; served: [N, k] bool (or [N], broadcast over the k slots).
    Returns [E] float64 counts.
    """
    idx = _tensor(expert_index, torch.long)
    s = _tensor(served, torch.bool)
    if s.dim() == 1 and idx.dim() == 2:
        s = s.unsqueeze(-1).expand_as(idx)
    if idx.shape != s.shape:
        raise ValueError(f"expert_index {tuple(idx.shape)} and served {tuple(s.shape)} differ in shape")
    idx, s = idx.reshape(-1), s.reshape(-1)
    if s.any() and (idx[s].min() < 0 or idx[s].max() >= num_experts):
        raise ValueError(f"expert_index out of range [0, {num_experts})")
    load = torch.zeros(num_experts, dtype=torch.float64, device=idx.device)
    return load.index_add_(0, idx[s], torch.ones_like(idx[s], dtype=torch.float64))


def coefficient_of_variation(load) -> float:
    """CV = std(c) / mean(c), population std (ddof = 0). 0 = perfectly balanced.

    load: [E], E >= 2. All-zero load -> nan.
    """
    c = _load_vector(load)
    mean = c.mean()
    if mean == 0:
        return math.nan
    return float(c.std(correction=0) / mean)


def max_violation(load) -> float:
    """MaxVio = max_e c_e / mean(c) − 1. 0 = perfectly balanced; E − 1 = everything on one expert.

    load: [E], E >= 2. All-zero load -> nan.
    """
    c = _load_vector(load)
    mean = c.mean()
    if mean == 0:
        return math.nan
    return float(c.max() / mean - 1.0)


def gini(load) -> float:
    """Gini coefficient of the load, mean-absolute-difference form, *without* small-sample correction.

        G = Σ_i Σ_j |c_i − c_j| / (2 E² mean(c)) = Σ_i (2i − E − 1) c_(i) / (E Σ_i c_i)

    with c_(1) <= ... <= c_(E) sorted ascending (the second form is the O(E log E) evaluation of
    the first). 0 = equal load; all load on one expert gives (E − 1) / E (not 1: the
    normalisation E / (E − 1) that would stretch it to 1 is deliberately not applied, and there
    is no "+1" index offset — METHOD.md §7). load: [E], E >= 2. All-zero load -> nan.
    """
    c = _load_vector(load)
    total = c.sum()
    if total == 0:
        return math.nan
    e = c.numel()
    ranks = torch.arange(1, e + 1, dtype=torch.float64, device=c.device)  # i = 1..E
    return float(((2 * ranks - e - 1) * c.sort().values).sum() / (e * total))


def unused_expert_rate(load) -> float:
    """Share of experts that served no assignment: #{e : c_e = 0} / E. load: [E], E >= 2."""
    c = _load_vector(load)
    return float((c == 0).to(torch.float64).mean())


def usage_entropy(load) -> float:
    """Expert-usage entropy normalised by log E: H(c / Σc) / log E ∈ [0, 1] (1 = uniform).

    Natural log, 0 · log 0 = 0. load: [E], E >= 2. All-zero load -> nan.
    """
    c = _load_vector(load)
    total = c.sum()
    if total == 0:
        return math.nan
    p = c / total
    ent = -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum()
    return float(ent / math.log(c.numel()))


def _real_drops(dropped, valid) -> tuple[torch.Tensor, torch.Tensor]:
    """dropped [N, k] and valid [N] as bool tensors, drops of padding cleared (they never count)."""
    d = _tensor(dropped, torch.bool)
    v = _tensor(valid, torch.bool)
    if d.dim() != 2 or v.shape != d.shape[:1]:
        raise ValueError(f"dropped must be [N, k] and valid [N]; got {tuple(d.shape)} and {tuple(v.shape)}")
    return d & v.unsqueeze(-1), v


def dropped_token_rate(dropped, valid) -> float:
    """Real tokens with *every* slot dropped / real tokens (METHOD.md §5's dropped-token rate).

        rate = #{t : valid_t and dropped[t, j] for all j} / Σ_t valid_t

    Such a token reaches no routed expert (only the shared expert / residual). A token that lost
    some but not all of its slots is not counted here (see `dropped_slot_rate`).
    dropped: [N, k] bool; valid: [N] bool (padding never counts). No real token -> nan.
    """
    d, v = _real_drops(dropped, valid)
    real = int(v.sum())
    if real == 0:
        return math.nan
    return float((d.all(-1) & v).sum()) / real


def dropped_slot_rate(dropped, valid) -> float:
    """Dropped assignments (slots) of real tokens / assignments of real tokens.

        rate = Σ_t valid_t · #{j : dropped[t, j]} / (k · Σ_t valid_t)

    dropped: [N, k] bool; valid: [N] bool (padding never counts). No real token -> nan.
    """
    d, v = _real_drops(dropped, valid)
    real_slots = int(v.sum()) * d.shape[1]
    if real_slots == 0:
        return math.nan
    return float(d.sum()) / real_slots


def collapse_rate(load, threshold: float = COLLAPSE_THRESHOLD) -> float:
    """Share of experts whose load is below `threshold` × the uniform load Σc / E.

        rate = #{e : c_e < threshold · Σc / E} / E

    Default threshold 0.1 = "below 10 % of uniform load" (paper Table 7). Unused experts count
    as collapsed. load: [E], E >= 2. All-zero load -> nan.
    """
    c = _load_vector(load)
    total = c.sum()
    if total == 0:
        return math.nan
    uniform = total / c.numel()
    return float((c < threshold * uniform).to(torch.float64).mean())
