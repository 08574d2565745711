"""Routing-stability metrics (METHOD.md §5, "Stability"; paper Table 12 and Sweep E).

Set overlaps compare the *selected* expert sets S_t = {expert_index[t, j]} (the router's
post-selection decision; a capacity drop does not change which experts were chosen) and divide by
k, so 1 = identical sets, 0 = disjoint. Padding is excluded; no eligible token -> nan. Where a
router marks which slots are choices (`RoutingOutput.chosen`, Expert Choice), the sets hold
those slots only (see `checkpoint_consistency`).

`snapshot_stability` is paper Table 12 over a run's routing snapshots, the one computation that
both the routing monitor (summary.json's "stability") and the analysis report (runs without that
block) use: per layer, each metric averaged nan-aware over the consecutive snapshot pairs, then
averaged nan-aware over the layers. A pair with no comparable tokens (nan) is left out of its
layer's mean; a layer with no defined value is left out of the mean over layers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from scipy import stats

from spectra.metrics.balance import _load_vector, _tensor


def _set_intersection_size(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|set(a_t) ∩ set(b_t)| per row for index rows a, b: [M, k] -> [M] float64.

    Counts each distinct element of a_t once (a repeated expert in a row is one set member).
    """
    k = a.shape[-1]
    in_b = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1)  # [M, k]: a_{t,i} ∈ S(b_t)
    earlier = torch.ones(k, k, dtype=torch.bool, device=a.device).tril(-1)  # [i, i'] True where i' < i
    repeat = ((a.unsqueeze(-1) == a.unsqueeze(-2)) & earlier).any(-1)  # [M, k]: seen before in a_t
    return (in_b & ~repeat).sum(-1).to(torch.float64)


def sequential_topk_overlap(expert_index, valid, batch: int, seq: int, doc_start=None) -> float:
    """Mean top-k overlap of adjacent real positions within a row: mean |S_t ∩ S_{t+1}| / k.

    Pairs (t, t+1) count when both positions are real and in the same row of the [batch, seq]
    layout (N = batch · seq, row-major). With `doc_start` ([batch, seq] bool, True at a packed
    document's first token), pairs that cross into a new document are skipped too.
    expert_index: [N, k]; valid: [N] bool.
    """
    idx = _tensor(expert_index, torch.long)
    v = _tensor(valid, torch.bool)
    if idx.dim() != 2 or idx.shape[0] != batch * seq or v.shape != idx.shape[:1]:
        raise ValueError(
            f"expert_index must be [batch·seq, k] = [{batch * seq}, k] and valid [N]; "
            f"got {tuple(idx.shape)} and {tuple(v.shape)}"
        )
    k = idx.shape[1]
    idx, v = idx.reshape(batch, seq, k), v.reshape(batch, seq)
    pair = v[:, :-1] & v[:, 1:]  # [B, S-1]
    if doc_start is not None:
        pair = pair & ~_tensor(doc_start, torch.bool).reshape(batch, seq)[:, 1:]
    if not pair.any():
        return math.nan
    inter = _set_intersection_size(idx[:, :-1][pair], idx[:, 1:][pair])  # [P]
    return float(inter.mean() / k)


def _chosen_membership(index: torch.Tensor, chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[M, k] expert indices + [M, k] chosen mask -> [M, E] bool: e ∈ S(t)."""
    member = torch.zeros(index.shape[0], num_experts, dtype=torch.int8, device=index.device)
    return member.scatter_reduce_(1, index, chosen.to(torch.int8), reduce="amax").bool()


def checkpoint_consistency(index_a, index_b, valid, chosen_a=None, chosen_b=None) -> float:
    """Fraction of top-k sets kept between two checkpoints on the same tokens.

        consistency = mean_{t real} |S_a(t) ∩ S_b(t)| / k

    index_a, index_b: [N, k] selections of the same N held-out positions; valid: [N] bool.

    Routers whose slots are not all choices (Expert Choice: a data-dependent k_max, fillers
    beyond a token's picks) pass `chosen_a` / `chosen_b` ([N, k_a], [N, k_b] bool, widths may
    differ). Then S(t) holds the chosen slots only and the overlap is divided by
    max(|S_a(t)|, |S_b(t)|) (= k for equal full sets); tokens with both sets empty are left out.
    """
    if chosen_a is not None or chosen_b is not None:
        return _consistency_of_chosen(index_a, index_b, valid, chosen_a, chosen_b)
    a, b = _tensor(index_a, torch.long), _tensor(index_b, torch.long)
    v = _tensor(valid, torch.bool)
    if a.dim() != 2 or a.shape != b.shape or v.shape != a.shape[:1]:
        raise ValueError(
            f"index_a, index_b must be the same [N, k] and valid [N]; "
            f"got {tuple(a.shape)}, {tuple(b.shape)}, {tuple(v.shape)}"
        )
    if not v.any():
        return math.nan
    return float(_set_intersection_size(a[v], b[v]).mean() / a.shape[1])


def _consistency_of_chosen(index_a, index_b, valid, chosen_a, chosen_b) -> float:
    """`checkpoint_consistency` over chosen sets of possibly different widths (see there)."""
    a, b = _tensor(index_a, torch.long), _tensor(index_b, torch.long)
    v = _tensor(valid, torch.bool)
    ca = torch.ones_like(a, dtype=torch.bool) if chosen_a is None else _tensor(chosen_a, torch.bool)
    cb = torch.ones_like(b, dtype=torch.bool) if chosen_b is None else _tensor(chosen_b, torch.bool)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0] or v.shape != a.shape[:1] \
            or ca.shape != a.shape or cb.shape != b.shape:
        raise ValueError(
            f"index_a [N, k_a], index_b [N, k_b], chosen masks of the same shapes and valid [N] expected; got "
            f"{tuple(a.shape)}, {tuple(b.shape)}, {tuple(ca.shape)}, {tuple(cb.shape)}, {tuple(v.shape)}"
        )
    e = int(max(int(a.max()) if a.numel() else 0, int(b.max()) if b.numel() else 0)) + 1
    sa, sb = _chosen_membership(a, ca, e), _chosen_membership(b, cb, e)  # [N, E] each
    size = torch.maximum(sa.sum(-1), sb.sum(-1))  # [N]
    keep = v & (size > 0)
    if not keep.any():
        return math.nan
    inter = (sa & sb).sum(-1)  # [N]
    return float((inter[keep].double() / size[keep].double()).mean())


def usage_variance(loads) -> float:
    """Variance across checkpoints of each expert's load share, averaged over experts.

        u_{c,e} = load_{c,e} / Σ_e' load_{c,e'}          (share of checkpoint c's load)
        usage_variance = mean_e Var_c(u_{c,e})          (population variance, ddof = 0)

    Shares, not counts, so checkpoints evaluated on different token budgets compare. 0 = every
    expert kept the same share. loads: [C, E], C >= 2 checkpoints, E >= 2, each row non-zero.
    """
    x = _tensor(loads)
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"loads must be [C, E] with C >= 2 checkpoints, got shape {tuple(x.shape)}")
    for row in x:
        _load_vector(row)  # E >= 2, finite, non-negative
    totals = x.sum(-1, keepdim=True)
    if (totals == 0).any():
        raise ValueError("every checkpoint's load must be non-zero (no share is defined otherwise)")
    shares = x / totals  # [C, E]
    return float(shares.var(dim=0, correction=0).mean())


def expert_rank_kendall_tau(load_a, load_b) -> float:
    """Kendall τ-b between two checkpoints' expert loads (rank agreement of experts).

    `scipy.stats.kendalltau` (τ-b, ties corrected). 1 = same ranking, −1 = reversed.
    If either load is constant (e.g. perfectly balanced), τ-b is 0/0 and this returns nan —
    there is no ranking to agree on; aggregate with nanmean. load_a, load_b: [E], E >= 2.
    """
    a, b = _load_vector(load_a), _load_vector(load_b)
    if a.shape != b.shape:
        raise ValueError(f"loads differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if (a == a[0]).all() or (b == b[0]).all():
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.kendalltau(a.cpu().numpy(), b.cpu().numpy()).statistic)


# ----------------------------------------------------------------------------- across snapshots


def nanmean(values: Iterable[float | None]) -> float:
    """Mean of the values that are neither None nor nan; nan when none is left."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _or_nan(fn, *args) -> float:
    """fn(*args), or nan where the inputs define no value (an all-zero load, mismatched shapes)."""
    try:
        return fn(*args)
    except ValueError:
        return math.nan


@dataclass(frozen=True)
class SnapshotLayer:
    """One MoE layer of one routing snapshot, as the stability metrics read it (torch or numpy)."""

    valid: Any  # [N] bool: real tokens of the held-out slice
    expert_index: Any = None  # [N, k] selected experts; None when not stored
    chosen: Any = None  # [N, k] bool slots that are choices (Expert Choice); None = every slot
    load: Any = None  # [E] dispatched load; None when not stored


def pair_consistency(a: SnapshotLayer, b: SnapshotLayer) -> float:
    """`checkpoint_consistency` of two snapshots of a layer over the tokens real in both;
    nan when they have no comparable tokens or selections (missing, different shapes)."""
    if a.expert_index is None or b.expert_index is None:
        return math.nan
    va, vb = _tensor(a.valid, torch.bool), _tensor(b.valid, torch.bool)  # [N] each
    if va.shape != vb.shape:
        return math.nan
    return _or_nan(checkpoint_consistency, a.expert_index, b.expert_index, va & vb, a.chosen, b.chosen)


def pair_kendall_tau(a: SnapshotLayer, b: SnapshotLayer) -> float:
    """`expert_rank_kendall_tau` of two snapshots' loads; nan when a load is missing or flat."""
    if a.load is None or b.load is None:
        return math.nan
    return _or_nan(expert_rank_kendall_tau, a.load, b.load)


def snapshots_usage_variance(seq: list[SnapshotLayer]) -> float:
    """`usage_variance` over the snapshots that store a load; nan with fewer than 2 or a zero load."""
    loads = [_tensor(x.load) for x in seq if x.load is not None]  # each [E]
    if len({tuple(x.shape) for x in loads}) > 1:
        return math.nan  # snapshots of different expert counts: no share compares
    return _or_nan(usage_variance, torch.stack(loads) if loads else torch.zeros(0, 0))  # [C, E]


def layer_stability(seq: list[SnapshotLayer]) -> dict:
    """Table 12 for one layer from its step-ordered snapshots (at least 2):

        consistency_consecutive   [C−1] fraction of top-k sets kept between consecutive snapshots
        consistency_consecutive_mean   nan-aware mean of those
        consistency_last_vs_first      the last snapshot against the first
        usage_variance            mean over experts of the variance of their load share
        kendall_tau_consecutive   [C−1] Kendall τ-b of expert loads between consecutive snapshots
        kendall_tau_mean          nan-aware mean (τ is nan when a load is perfectly flat)
    """
    if len(seq) < 2:
        raise ValueError(f"stability needs at least 2 snapshots of a layer, got {len(seq)}")
    cons = [pair_consistency(a, b) for a, b in zip(seq, seq[1:])]
    taus = [pair_kendall_tau(a, b) for a, b in zip(seq, seq[1:])]
    return {
        "consistency_consecutive": cons,
        "consistency_consecutive_mean": nanmean(cons),
        "consistency_last_vs_first": pair_consistency(seq[-1], seq[0]),
        "usage_variance": snapshots_usage_variance(seq),
        "kendall_tau_consecutive": taus,
        "kendall_tau_mean": nanmean(taus),
    }


STABILITY_SCALARS = ("consistency_consecutive_mean", "consistency_last_vs_first", "usage_variance", "kendall_tau_mean")


def snapshot_stability(layers: dict[int, list[SnapshotLayer]]) -> dict:
    """Table 12 over a run's snapshots: {layer: step-ordered snapshots of that layer} ->
    {"layers": {"<layer>": layer_stability(...)}, "mean": {scalar: nan-aware mean over layers}}.

    Layers with fewer than 2 snapshots have nothing to compare and are left out; with none left,
    "layers" is {} and every mean is nan.
    """
    per_layer = {str(i): layer_stability(seq) for i, seq in sorted(layers.items()) if len(seq) >= 2}
    return {"layers": per_layer, "mean": {k: nanmean(lv[k] for lv in per_layer.values()) for k in STABILITY_SCALARS}}
