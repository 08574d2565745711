"""spectra.metrics against straightforward references written here (numpy / scipy / sets / loops)."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from spectra import metrics as M
from spectra.metrics.stability import SnapshotLayer, snapshot_stability
from spectra.routing.base import RoutingOutput

SEEDS = [0, 1, 2, 3]
TOL = 1e-6


# ----------------------------------------------------------------------------- random routing


def random_routing(seed: int, n: int = 60, k: int = 3, e: int = 8, pad: float = 0.2, drop: float = 0.15):
    """Token-choice assignment with k distinct experts per token, padding and dropped slots."""
    rng = np.random.default_rng(seed)
    expert_index = np.argsort(rng.random((n, e)), axis=1)[:, :k]  # [N, k] distinct
    valid = rng.random(n) > pad  # [N]
    dropped = (rng.random((n, k)) < drop) & valid[:, None]  # padding is never "dropped"
    probs = rng.dirichlet(np.ones(e), size=n)  # [N, E]
    weights = rng.random((n, k)) * ~dropped * valid[:, None]
    return expert_index, valid, dropped, probs, weights


def ref_served(valid, dropped):
    return valid[:, None] & ~dropped


def ref_load(expert_index, served, e):
    load = [0] * e
    for t in range(expert_index.shape[0]):
        for j in range(expert_index.shape[1]):
            if served[t, j]:
                load[expert_index[t, j]] += 1
    return np.array(load, dtype=float)


def ref_gini(x):
    x = np.asarray(x, dtype=float)
    pair = sum(abs(a - b) for a in x for b in x)
    return pair / (2 * len(x) ** 2 * x.mean())


def token_sets(expert_index, served, e):
    sets = [set() for _ in range(e)]
    for t in range(expert_index.shape[0]):
        for j in range(expert_index.shape[1]):
            if served[t, j]:
                sets[expert_index[t, j]].add(t)
    return sets


# ----------------------------------------------------------------------------- balance


@pytest.mark.parametrize("seed", SEEDS)
def test_balance_metrics_match_numpy_references(seed):
    idx, valid, dropped, _, _ = random_routing(seed)
    e = 8
    served = ref_served(valid, dropped)
    ref = ref_load(idx, served, e)
    load = M.expert_load(torch.from_numpy(idx), torch.from_numpy(served), e)
    np.testing.assert_allclose(load.numpy(), ref)
    # numpy inputs are accepted too
    np.testing.assert_allclose(M.expert_load(idx, served, e).numpy(), ref)

    assert M.coefficient_of_variation(load) == pytest.approx(np.std(ref, ddof=0) / np.mean(ref), abs=TOL)
    assert M.max_violation(load) == pytest.approx(ref.max() / ref.mean() - 1, abs=TOL)
    assert M.gini(load) == pytest.approx(ref_gini(ref), abs=TOL)
    assert M.unused_expert_rate(load) == pytest.approx(np.mean(ref == 0), abs=TOL)
    assert M.usage_entropy(load) == pytest.approx(stats.entropy(ref) / np.log(e), abs=TOL)
    uniform = ref.sum() / e
    assert M.collapse_rate(load) == pytest.approx(np.mean(ref < 0.1 * uniform), abs=TOL)
    assert M.collapse_rate(load, threshold=0.9) == pytest.approx(np.mean(ref < 0.9 * uniform), abs=TOL)

    n_drop = sum(dropped[t, j] for t in range(len(valid)) for j in range(3) if valid[t])
    assert M.dropped_slot_rate(torch.from_numpy(dropped), torch.from_numpy(valid)) == pytest.approx(
        n_drop / (valid.sum() * 3), abs=TOL
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_dropped_token_and_slot_rates_match_loops(seed):
    # many drops, so some real tokens lose every slot and the two rates differ
    idx, valid, dropped, _, _ = random_routing(seed, drop=0.6)
    dropped[~valid] = True  # a buggy router flagging padding "dropped": it must still not count
    real = [t for t in range(len(valid)) if valid[t]]
    whole = sum(all(dropped[t]) for t in real)
    slots = sum(int(dropped[t, j]) for t in real for j in range(3))
    assert 0 < whole < slots
    token_rate = M.dropped_token_rate(torch.from_numpy(dropped), torch.from_numpy(valid))
    slot_rate = M.dropped_slot_rate(dropped, valid)
    assert token_rate == pytest.approx(whole / len(real), abs=TOL)
    assert slot_rate == pytest.approx(slots / (3 * len(real)), abs=TOL)
    assert token_rate != pytest.approx(slot_rate)


@pytest.mark.parametrize("seed", SEEDS)
def test_gini_matches_pairwise_formula_on_random_loads(seed):
    x = np.random.default_rng(seed).integers(0, 50, size=13).astype(float)
    x[seed] = 0.0  # an unused expert
    assert M.gini(torch.from_numpy(x)) == pytest.approx(ref_gini(x), abs=TOL)


@pytest.mark.parametrize("e", [2, 5, 32])
def test_all_tokens_on_one_expert(e):
    load = torch.zeros(e)
    load[e // 2] = 100.0
    assert M.gini(load) == pytest.approx((e - 1) / e, abs=TOL)
    assert M.coefficient_of_variation(load) == pytest.approx(math.sqrt(e - 1), abs=TOL)
    assert M.max_violation(load) == pytest.approx(e - 1, abs=TOL)
    assert M.unused_expert_rate(load) == pytest.approx((e - 1) / e, abs=TOL)
    assert M.collapse_rate(load) == pytest.approx((e - 1) / e, abs=TOL)
    assert M.usage_entropy(load) == pytest.approx(0.0, abs=TOL)


def test_uniform_load_is_perfectly_balanced():
    load = torch.full((16,), 7.0)
    assert M.gini(load) == pytest.approx(0.0, abs=TOL)
    assert M.coefficient_of_variation(load) == pytest.approx(0.0, abs=TOL)
    assert M.max_violation(load) == pytest.approx(0.0, abs=TOL)
    assert M.usage_entropy(load) == pytest.approx(1.0, abs=TOL)
    assert M.unused_expert_rate(load) == 0.0
    assert M.collapse_rate(load) == 0.0


@pytest.mark.parametrize(
    "fn",
    [
        M.coefficient_of_variation,
        M.max_violation,
        M.gini,
        M.unused_expert_rate,
        M.usage_entropy,
        M.collapse_rate,
    ],
)
def test_balance_rejects_single_expert_and_handles_zero_load(fn):
    with pytest.raises(ValueError):
        fn(torch.tensor([5.0]))
    with pytest.raises(ValueError):
        fn(torch.tensor([1.0, -1.0]))
    if fn is M.unused_expert_rate:
        assert fn(torch.zeros(4)) == 1.0
    else:
        assert math.isnan(fn(torch.zeros(4)))


def test_padding_and_drops_are_excluded_from_load():
    idx = torch.tensor([[0, 1], [0, 2], [3, 1], [3, 3]])
    valid = torch.tensor([True, True, True, False])  # last row padding (garbage indices)
    dropped = torch.tensor([[False, False], [False, True], [False, False], [False, False]])
    served = M.served_mask(valid, dropped)
    assert M.expert_load(idx, served, 4).tolist() == [2.0, 2.0, 0.0, 1.0]
    assert M.dropped_slot_rate(dropped, valid) == pytest.approx(1 / 6)
    assert M.dropped_token_rate(dropped, valid) == 0.0  # t1 lost one of its two slots only
    # a padding row flagged "dropped" by a buggy router still does not count
    assert M.dropped_slot_rate(torch.ones(4, 2, dtype=torch.bool), valid) == pytest.approx(1.0)
    only_pad = torch.tensor([[False, False], [False, False], [False, False], [True, True]])
    assert M.dropped_token_rate(only_pad, valid) == 0.0
    assert M.dropped_token_rate(dropped | only_pad | torch.tensor([[True, True]] + [[False, False]] * 3), valid) == (
        pytest.approx(1 / 3))  # t0 lost both slots: 1 of 3 real tokens
    for fn in (M.dropped_slot_rate, M.dropped_token_rate):
        assert math.isnan(fn(dropped, torch.zeros(4, dtype=torch.bool)))  # no real token
    with pytest.raises(ValueError):
        M.expert_load(torch.tensor([[4]]), torch.tensor([[True]]), 4)


# ----------------------------------------------------------------------------- specialization


@pytest.mark.parametrize("seed", SEEDS)
def test_gram_metrics_match_loops(seed):
    rng = np.random.default_rng(seed)
    e = 6
    m = rng.normal(size=(e, 4))
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    g = m @ m.T + rng.normal(scale=0.01, size=(e, e))  # diagonal not exactly 1
    off = [g[i, j] for i in range(e) for j in range(e) if i != j]
    assert M.gram_orthogonality(torch.from_numpy(g)) == pytest.approx(1 - np.mean(np.abs(off)), abs=TOL)
    assert M.gram_diagonal_quality(g) == pytest.approx(1 - np.mean([abs(g[i, i] - 1) for i in range(e)]), abs=TOL)
    for tol in (0.1, 0.5):
        assert M.off_diagonal_sparsity(g, tol=tol) == pytest.approx(np.mean(np.abs(off) < tol), abs=TOL)


def test_gram_metrics_edge_cases():
    eye = torch.eye(5)
    assert M.gram_orthogonality(eye) == 1.0
    assert M.gram_diagonal_quality(eye) == 1.0
    assert M.off_diagonal_sparsity(eye) == 1.0
    ones = torch.ones(5, 5)
    assert M.gram_orthogonality(ones) == pytest.approx(0.0)
    assert M.off_diagonal_sparsity(ones) == 0.0
    with pytest.raises(ValueError):
        M.gram_orthogonality(torch.ones(1, 1))
    with pytest.raises(ValueError):
        M.gram_orthogonality(torch.ones(2, 3))


@pytest.mark.parametrize("seed", SEEDS)
def test_expert_similarity_mean_matches_loop(seed):
    r = np.random.default_rng(seed).normal(size=(7, 5))
    r[3] = 0.0  # a zero representation counts as cosine 0
    cos = []
    for i, j in itertools.permutations(range(7), 2):
        ni, nj = np.linalg.norm(r[i]), np.linalg.norm(r[j])
        cos.append(0.0 if ni == 0 or nj == 0 else r[i] @ r[j] / (ni * nj))
    assert M.expert_similarity_mean(torch.from_numpy(r)) == pytest.approx(np.mean(cos), abs=TOL)
    with pytest.raises(ValueError):
        M.expert_similarity_mean(torch.ones(1, 5))


@pytest.mark.parametrize("seed", SEEDS)
def test_jaccard_matches_set_arithmetic(seed):
    idx, valid, dropped, _, _ = random_routing(seed, e=6)
    served = ref_served(valid, dropped)
    sets = token_sets(idx, served, 6)
    ref = [len(a & b) / len(a | b) for a, b in itertools.combinations(sets, 2) if a | b]
    got = M.expert_overlap_jaccard(torch.from_numpy(idx), torch.from_numpy(served), 6)
    assert got == pytest.approx(np.mean(ref), abs=TOL)


def test_jaccard_edge_cases():
    # all tokens on expert 0: pairs (0, j) have overlap 0, pairs of two unused experts are skipped
    idx = torch.zeros(5, 1, dtype=torch.long)
    served = torch.ones(5, 1, dtype=torch.bool)
    assert M.expert_overlap_jaccard(idx, served, 4) == 0.0
    # identical token sets -> 1
    idx = torch.tensor([[0, 1]] * 4)
    assert M.expert_overlap_jaccard(idx, torch.ones(4, 2, dtype=torch.bool), 2) == 1.0
    assert math.isnan(M.expert_overlap_jaccard(idx, torch.zeros(4, 2, dtype=torch.bool), 2))


def test_jaccard_leaves_out_pairs_of_two_unused_experts():
    # E = 4: experts 0 and 1 serve the same tokens {0, 1, 2}; experts 2 and 3 serve nothing.
    # Pairs: (0,1) = 1; (0,2), (0,3), (1,2), (1,3) = 0/3 = 0; (2,3) = 0/0.
    # Leaving (2,3) out gives 1/5; counting it as 0 would give 1/6, as 1 would give 2/6.
    idx = torch.tensor([[0, 1]] * 3)
    served = torch.ones(3, 2, dtype=torch.bool)
    assert M.expert_overlap_jaccard(idx, served, 4) == pytest.approx(1 / 5)
    # the same with a dropped slot that would have touched expert 2: still unused, still left out
    idx2 = torch.tensor([[0, 1, 2]] * 3)
    served2 = torch.tensor([[True, True, False]] * 3)
    assert M.expert_overlap_jaccard(idx2, served2, 4) == pytest.approx(1 / 5)
    with pytest.raises(ValueError):
        M.expert_overlap_jaccard(idx[:, :1] * 0, torch.ones(4, 1, dtype=torch.bool), 1)


@pytest.mark.parametrize("seed", SEEDS)
def test_routing_expression_alignment_matches_loop(seed):
    idx, valid, dropped, _, _ = random_routing(seed, drop=0.4)
    scores = np.random.default_rng(seed + 100).uniform(-1, 1, size=(len(valid), 8))
    served = ref_served(valid, dropped)
    cos = []
    for t in range(len(valid)):
        chosen = {int(idx[t, j]) for j in range(3) if served[t, j]}
        if not valid[t] or not chosen:
            continue
        a = np.array([1.0 if e in chosen else 0.0 for e in range(8)])
        cos.append(a @ scores[t] / (np.linalg.norm(a) * np.linalg.norm(scores[t])))
    got = M.routing_expression_alignment(torch.from_numpy(scores), idx, served, valid)
    assert got == pytest.approx(np.mean(cos), abs=TOL)


def test_routing_expression_alignment_extremes():
    scores = torch.tensor([[0.0, 0.9, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    idx = torch.tensor([[1], [2]])
    ones = torch.ones(2, 1, dtype=torch.bool)
    got = M.routing_expression_alignment(scores, idx, ones, torch.tensor([True, False]))
    assert got == pytest.approx(1.0)
    got = M.routing_expression_alignment(scores, idx, ones, torch.tensor([False, True]))
    assert got == pytest.approx(math.sqrt(1 / 4))  # uniform scores: sqrt(|S| / E)


@pytest.mark.parametrize("seed", SEEDS)
def test_projector_orthogonality_matches_loop(seed):
    rng = np.random.default_rng(seed)
    e, d, h = 4, 3, 10
    w = rng.normal(size=(e * d, h))
    blocks = [w[i * d : (i + 1) * d].ravel() for i in range(e)]
    blocks = [b / np.linalg.norm(b) for b in blocks]
    g = np.array([[a @ b for b in blocks] for a in blocks])
    ref = np.sqrt(((g - np.eye(e)) ** 2).sum()) / e
    assert M.projector_orthogonality(torch.from_numpy(w), e) == pytest.approx(ref, abs=TOL)


def test_projector_orthogonality_extremes():
    e, d, h = 4, 2, 16
    q, _ = torch.linalg.qr(torch.randn(h, e * d, generator=torch.Generator().manual_seed(0)))
    w = 0.1 * q.T  # [E·D, H] with orthonormal rows, as the orthogonal × 0.1 init
    assert M.projector_orthogonality(w, e) == pytest.approx(0.0, abs=TOL)
    same = torch.randn(d, h).repeat(e, 1)  # every expert's block identical
    assert M.projector_orthogonality(same, e) == pytest.approx(math.sqrt(e * (e - 1)) / e, abs=TOL)
    with pytest.raises(ValueError):
        M.projector_orthogonality(torch.randn(7, h), e)
    with pytest.raises(ValueError):
        M.projector_orthogonality(torch.randn(3, h), 1)


# ----------------------------------------------------------------------------- decision


@pytest.mark.parametrize("seed", SEEDS)
def test_decision_metrics_match_scipy(seed):
    _, valid, _, probs, weights = random_routing(seed)
    probs[0] = 0.0
    probs[0, 2] = 1.0  # a one-hot row (0 log 0 = 0)
    valid[0] = True
    ref_ent = np.mean([stats.entropy(probs[t]) for t in range(len(valid)) if valid[t]])
    assert M.token_routing_entropy(torch.from_numpy(probs), torch.from_numpy(valid)) == pytest.approx(ref_ent, abs=TOL)
    unnormalised = probs * 3.0  # rows renormalised like scipy.stats.entropy
    assert M.token_routing_entropy(unnormalised, valid) == pytest.approx(ref_ent, abs=TOL)
    ref_conf = np.mean([weights[t].max() for t in range(len(valid)) if valid[t]])
    assert M.routing_confidence(torch.from_numpy(weights), valid) == pytest.approx(ref_conf, abs=TOL)


def test_decision_metrics_without_real_tokens_are_nan():
    none = torch.zeros(3, dtype=torch.bool)
    assert math.isnan(M.token_routing_entropy(torch.full((3, 4), 0.25), none))
    assert math.isnan(M.routing_confidence(torch.ones(3, 2), none))


# ----------------------------------------------------------------------------- stability


def ref_sequential(idx, valid, b, s, doc_start=None):
    idx, valid = idx.reshape(b, s, -1), valid.reshape(b, s)
    k = idx.shape[-1]
    vals = []
    for r in range(b):
        for t in range(s - 1):
            if valid[r, t] and valid[r, t + 1] and (doc_start is None or not doc_start[r, t + 1]):
                vals.append(len(set(idx[r, t].tolist()) & set(idx[r, t + 1].tolist())) / k)
    return np.mean(vals) if vals else math.nan


@pytest.mark.parametrize("seed", SEEDS)
def test_sequential_topk_overlap_matches_sets(seed):
    b, s = 4, 15
    rng = np.random.default_rng(seed)
    idx = np.argsort(rng.random((b * s, 4)), axis=1)[:, :2]  # E=4, k=2: overlaps are common
    valid = rng.random(b * s) > 0.2
    doc_start = rng.random((b, s)) < 0.2
    assert M.sequential_topk_overlap(torch.from_numpy(idx), valid, b, s) == pytest.approx(
        ref_sequential(idx, valid, b, s), abs=TOL
    )
    assert M.sequential_topk_overlap(idx, valid, b, s, doc_start=doc_start) == pytest.approx(
        ref_sequential(idx, valid, b, s, doc_start), abs=TOL
    )


def test_sequential_overlap_does_not_cross_rows_or_padding():
    # row 0 ends on experts {0,1}, row 1 starts on {0,1}: not adjacent. Left padding in row 1.
    idx = torch.tensor([[2, 3], [0, 1], [0, 1], [0, 1], [2, 3], [2, 0]])
    valid = torch.tensor([True, True, False, True, True, True])
    # pairs: row0 (t0,t1) -> 0; row1 (t1,t2) -> 0, (t2 of row1 is index 5: {2,0} vs {2,3}) -> 1/2
    got = M.sequential_topk_overlap(idx, valid, 2, 3)
    assert got == pytest.approx(np.mean([0.0, 0.0, 0.5]))
    assert math.isnan(M.sequential_topk_overlap(idx, torch.zeros(6, dtype=torch.bool), 2, 3))


@pytest.mark.parametrize("seed", SEEDS)
def test_checkpoint_consistency_matches_sets(seed):
    rng = np.random.default_rng(seed)
    a = np.argsort(rng.random((50, 6)), axis=1)[:, :3]
    b = np.argsort(rng.random((50, 6)), axis=1)[:, :3]
    valid = rng.random(50) > 0.3
    ref = np.mean([len(set(a[t]) & set(b[t])) / 3 for t in range(50) if valid[t]])
    assert M.checkpoint_consistency(torch.from_numpy(a), b, valid) == pytest.approx(ref, abs=TOL)
    assert M.checkpoint_consistency(a, a[:, ::-1].copy(), valid) == 1.0  # order within a set is irrelevant


@pytest.mark.parametrize("seed", SEEDS)
def test_usage_variance_matches_numpy(seed):
    loads = np.random.default_rng(seed).integers(1, 100, size=(5, 8)).astype(float)
    shares = loads / loads.sum(1, keepdims=True)
    assert M.usage_variance(torch.from_numpy(loads)) == pytest.approx(np.var(shares, axis=0).mean(), abs=TOL)
    assert M.usage_variance(np.stack([loads[0], 3 * loads[0]])) == pytest.approx(0.0, abs=TOL)
    with pytest.raises(ValueError):
        M.usage_variance(loads[:1])
    with pytest.raises(ValueError):
        M.usage_variance(np.stack([loads[0], 0 * loads[0]]))


@pytest.mark.parametrize("seed", SEEDS)
def test_kendall_tau_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 6, size=12).astype(float)  # ties on purpose (tau-b)
    b = a + rng.integers(-2, 3, size=12)
    b = np.clip(b, 0, None)
    ref = stats.kendalltau(a, b).statistic
    assert M.expert_rank_kendall_tau(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, abs=TOL)
    assert M.expert_rank_kendall_tau(a, a) == pytest.approx(1.0)
    assert M.expert_rank_kendall_tau(a, a.max() - a) == pytest.approx(-1.0)


def test_kendall_tau_constant_load_is_nan():
    assert math.isnan(M.expert_rank_kendall_tau(torch.full((4,), 3.0), torch.tensor([1.0, 2.0, 3.0, 4.0])))
    assert math.isnan(M.expert_rank_kendall_tau(torch.full((4,), 3.0), torch.full((4,), 3.0)))
    with pytest.raises(ValueError):
        M.expert_rank_kendall_tau(torch.tensor([1.0]), torch.tensor([1.0]))


def test_snapshot_stability_averages_pairs_per_layer_then_layers():
    """Table 12 over snapshots, by hand. Layer 0: the third snapshot has no real token, so the
    pair (2, 3) and last-vs-first have no comparable tokens (nan) and its load is all zero
    (no shares, a flat load: no τ, no usage variance). Layer 1: every pair defined.
    Per layer, each metric is the nan-aware mean over pairs; then the nan-aware mean over layers
    (a pooled mean over all (layer, pair) values would give 7/12 and 1/3 instead)."""
    yes, no = torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)
    lay0 = [SnapshotLayer(yes, torch.tensor([[0, 1], [2, 3]]), load=torch.tensor([1.0, 2, 3, 4])),
            SnapshotLayer(yes, torch.tensor([[0, 2], [2, 3]]), load=torch.tensor([1.0, 2, 3, 4])),
            SnapshotLayer(no, torch.tensor([[0, 1], [2, 3]]), load=torch.zeros(4))]
    lay1 = [SnapshotLayer(yes, np.array([[0, 1], [2, 3]]), load=np.array([1.0, 2, 3, 4])),
            SnapshotLayer(yes, np.array([[1, 0], [3, 2]]), load=np.array([1.0, 2, 3, 4])),
            SnapshotLayer(yes, np.array([[2, 3], [0, 1]]), load=np.array([4.0, 3, 2, 1]))]
    st = snapshot_stability({0: lay0, 1: lay1, 2: lay1[:1]})  # layer 2: one snapshot, nothing to compare
    l0, l1 = st["layers"]["0"], st["layers"]["1"]
    assert set(st["layers"]) == {"0", "1"}
    # layer 0, pair (1, 2): token 0 keeps {0} of {0, 1}, token 1 keeps {2, 3}: (1/2 + 1) / 2
    assert l0["consistency_consecutive"][0] == pytest.approx(0.75) and math.isnan(l0["consistency_consecutive"][1])
    assert l0["consistency_consecutive_mean"] == pytest.approx(0.75)
    assert math.isnan(l0["consistency_last_vs_first"])
    assert l0["kendall_tau_consecutive"][0] == pytest.approx(1.0) and math.isnan(l0["kendall_tau_consecutive"][1])
    assert math.isnan(l0["usage_variance"])
    # layer 1: same sets, then disjoint sets; ranks kept, then reversed
    assert l1["consistency_consecutive"] == pytest.approx([1.0, 0.0])
    assert l1["consistency_last_vs_first"] == pytest.approx(0.0)
    assert l1["kendall_tau_consecutive"] == pytest.approx([1.0, -1.0])
    # shares .1 .2 .3 .4 (twice), .4 .3 .2 .1: per-expert population variances .02, 1/450, 1/450, .02
    assert l1["usage_variance"] == pytest.approx((0.02 + 0.02 + 2 / 450) / 4)
    assert st["mean"]["consistency_consecutive_mean"] == pytest.approx((0.75 + 0.5) / 2)
    assert st["mean"]["consistency_last_vs_first"] == pytest.approx(0.0)
    assert st["mean"]["kendall_tau_mean"] == pytest.approx((1.0 + 0.0) / 2)
    assert st["mean"]["usage_variance"] == pytest.approx(1 / 90)
    empty = snapshot_stability({0: lay0[:1]})
    assert empty["layers"] == {} and all(math.isnan(v) for v in empty["mean"].values())


# ----------------------------------------------------------------------------- domain


@pytest.mark.parametrize("seed", SEEDS)
def test_domain_affinity_and_purity_match_loops(seed):
    idx, valid, dropped, _, _ = random_routing(seed)
    e, n_dom = 8, 3
    domains = np.random.default_rng(seed).integers(0, n_dom, size=len(valid))
    domains[~valid] = -1  # padding may carry any id
    served = ref_served(valid, dropped)
    counts = np.zeros((n_dom, e))
    for t in range(len(valid)):
        for j in range(3):
            if served[t, j]:
                counts[domains[t], idx[t, j]] += 1
    aff = M.domain_affinity(torch.from_numpy(idx), served, torch.from_numpy(domains), e, n_dom)
    np.testing.assert_allclose(aff.numpy(), counts / counts.sum(1, keepdims=True), atol=TOL)
    np.testing.assert_allclose(aff.sum(1).numpy(), 1.0, atol=TOL)

    pur = M.expert_purity(idx, served, domains, e, n_dom)
    with np.errstate(invalid="ignore"):
        ref_per_expert = counts.max(0) / counts.sum(0)
    np.testing.assert_allclose(pur.per_expert.numpy(), ref_per_expert, atol=TOL)
    used = counts.sum(0) > 0
    ref_mean = np.average(ref_per_expert[used], weights=counts.sum(0)[used])
    assert pur.weighted_mean == pytest.approx(ref_mean, abs=TOL)


def test_domain_edge_cases():
    idx = torch.tensor([[0], [0], [1], [1]])
    served = torch.tensor([[True], [True], [True], [False]])
    domains = torch.tensor([0, 0, 1, 1])
    aff = M.domain_affinity(idx, served, domains, 3, 3)
    assert aff[0].tolist() == [1.0, 0.0, 0.0]
    assert aff[1].tolist() == [0.0, 1.0, 0.0]
    assert torch.isnan(aff[2]).all()  # a domain that was never served
    pur = M.expert_purity(idx, served, domains, 3, 3)
    assert pur.per_expert[:2].tolist() == [1.0, 1.0] and torch.isnan(pur.per_expert[2])
    assert pur.weighted_mean == 1.0
    with pytest.raises(ValueError):
        M.domain_affinity(idx, served, torch.tensor([0, 0, 5, 1]), 3, 3)


def test_expert_top_keywords_match_manual_tfidf():
    texts = {
        0: ["def", "return", "def", " import ", "the"],
        1: ["the", "cat", "the", "sat", ""],
        2: ["the", "the"],
        3: [],
    }
    docs = {e: [t.strip() for t in toks if t.strip()] for e, toks in texts.items() if toks}
    n_docs = len(docs)
    vocab = sorted({t for d in docs.values() for t in d})
    df = {w: sum(w in d for d in docs.values()) for w in vocab}
    ref = {}
    for e, d in docs.items():
        score = {w: d.count(w) * (math.log((1 + n_docs) / (1 + df[w])) + 1) for w in vocab}
        norm = math.sqrt(sum(v * v for v in score.values()))
        ref[e] = sorted(((w, v / norm) for w, v in score.items() if v > 0), key=lambda p: (-p[1], p[0]))
    got = M.expert_top_keywords(texts, top_n=2, with_scores=True)
    assert set(got) == {0, 1, 2, 3} and got[3] == []
    for e in docs:
        assert [w for w, _ in got[e]] == [w for w, _ in ref[e][:2]]
        np.testing.assert_allclose([s for _, s in got[e]], [s for _, s in ref[e][:2]], atol=TOL)
    assert M.expert_top_keywords(texts, top_n=1)[0] == ["def"]
    assert M.expert_top_keywords({0: [], 1: [" "]}) == {0: [], 1: []}


# ----------------------------------------------------------------------------- routing_metrics


def hand_built_output(**extra) -> RoutingOutput:
    """B=2, S=3, E=4, k=2. Row 1 is left-padded by one position; one dropped slot."""
    expert_index = torch.tensor([[0, 1], [0, 1], [0, 2], [3, 3], [1, 2], [1, 2]])
    valid = torch.tensor([True, True, True, False, True, True])
    dropped = torch.tensor(
        [[False, False], [False, True], [False, False], [False, False], [False, False], [True, False]]
    )
    expert_weight = torch.tensor([[0.6, 0.4], [1.0, 0.0], [0.5, 0.5], [0.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1]] * 6)
    served = valid[:, None] & ~dropped
    counts = torch.zeros(4).index_add_(0, expert_index[served], torch.ones(int(served.sum())))
    return RoutingOutput(
        expert_index=expert_index,
        expert_weight=expert_weight,
        probs=probs,
        dropped=dropped,
        valid=valid,
        dispatch_counts=counts,
        **extra,
    )


def test_routing_metrics_on_hand_built_output():
    out = hand_built_output()
    # served assignments: t0 {0,1}, t1 {0}, t2 {0,2}, t4 {1,2}, t5 {2}; t3 is padding (its expert 3
    # must not count), the dropped slots (t1 -> 1, t5 -> 1) must not count either.
    load = np.array([3.0, 2.0, 3.0, 0.0])
    assert out.dispatch_counts.tolist() == load.tolist()
    m = M.routing_metrics(out)
    assert set(m) == {
        "cv",
        "maxvio",
        "gini",
        "unused_rate",
        "usage_entropy",
        "dropped_token_rate",
        "dropped_slot_rate",
        "collapse_rate",
        "routing_entropy",
        "confidence",
        "expert_overlap",
    }
    assert m["cv"] == pytest.approx(np.std(load) / np.mean(load), abs=TOL)
    assert m["maxvio"] == pytest.approx(3.0 / 2.0 - 1, abs=TOL)
    assert m["gini"] == pytest.approx(ref_gini(load), abs=TOL)
    assert m["unused_rate"] == pytest.approx(0.25)
    assert m["collapse_rate"] == pytest.approx(0.25)
    assert m["usage_entropy"] == pytest.approx(stats.entropy(load) / np.log(4), abs=TOL)
    assert m["dropped_slot_rate"] == pytest.approx(2 / 10)  # 2 dropped slots of 5 real tokens x 2
    assert m["dropped_token_rate"] == 0.0  # t1 and t5 each kept one slot
    assert m["routing_entropy"] == pytest.approx(stats.entropy([0.5, 0.3, 0.1, 0.1]), abs=TOL)
    assert m["confidence"] == pytest.approx(np.mean([0.6, 1.0, 0.5, 0.9, 1.0]), abs=TOL)
    sets = [{0, 1, 2}, {0, 4}, {2, 4, 5}, set()]
    ref_j = [len(a & b) / len(a | b) for a, b in itertools.combinations(sets, 2) if a | b]
    assert m["expert_overlap"] == pytest.approx(np.mean(ref_j), abs=TOL)
    assert all(isinstance(v, float) for v in m.values())


def test_routing_metrics_optional_inputs():
    rng = torch.Generator().manual_seed(0)
    repr_ = torch.nn.functional.normalize(torch.randn(4, 3, generator=rng), dim=-1)
    gram = repr_ @ repr_.T
    scores = torch.rand(6, 4, generator=rng) * 2 - 1
    cost = -scores + 0.5 * scores.abs() ** 2  # a cost that is not −s: the alignment must read s
    out = hand_built_output(gram=gram, expert_repr=repr_, logits=-cost, scores=scores)
    m = M.routing_metrics(out, batch_shape=(2, 3))
    assert m["gram_orthogonality"] == pytest.approx(M.gram_orthogonality(gram))
    assert m["gram_diagonal_quality"] == pytest.approx(1.0, abs=TOL)
    assert m["off_diagonal_sparsity"] == pytest.approx(M.off_diagonal_sparsity(gram))
    assert m["expert_similarity_mean"] == pytest.approx(M.expert_similarity_mean(repr_))
    # cos(onehot of the served experts, s_t) by hand over the real tokens with a served slot:
    # t0 {0, 1}, t1 {0}, t2 {0, 2}, t4 {1, 2}, t5 {2} (t3 padding)
    served_sets = {0: [0, 1], 1: [0], 2: [0, 2], 4: [1, 2], 5: [2]}
    s = scores.double()
    ref = np.mean([float(s[t, es].sum()) / (math.sqrt(len(es)) * float(s[t].norm())) for t, es in served_sets.items()])
    assert m["routing_expression_alignment"] == pytest.approx(ref, abs=TOL)
    on_cost = np.mean([float(-cost[t, es].sum()) / (math.sqrt(len(es)) * float(cost[t].norm()))
                       for t, es in served_sets.items()])
    assert abs(on_cost - ref) > 1e-3  # so reading the cost would fail the line above
    # adjacent real pairs: (t0,t1) {0,1}&{0,1}=2, (t1,t2) {0,1}&{0,2}=1, (t4,t5) {1,2}&{1,2}=2; k=2
    assert m["sequential_overlap"] == pytest.approx(np.mean([1.0, 0.5, 1.0]))
    doc_start = torch.tensor([[True, False, True], [False, True, False]])
    m = M.routing_metrics(out, doc_start=doc_start)
    assert m["sequential_overlap"] == pytest.approx(np.mean([1.0, 1.0]))
    # logits without scores (a softmax router): no expression alignment
    assert "routing_expression_alignment" not in M.routing_metrics(hand_built_output(logits=scores, gram=gram))


def test_routing_metrics_rejects_single_expert():
    out = RoutingOutput(
        expert_index=torch.zeros(3, 1, dtype=torch.long),
        expert_weight=torch.ones(3, 1),
        probs=torch.ones(3, 1),
        dropped=torch.zeros(3, 1, dtype=torch.bool),
        valid=torch.ones(3, dtype=torch.bool),
        dispatch_counts=torch.tensor([3.0]),
    )
    with pytest.raises(ValueError):
        M.routing_metrics(out)


# ----------------------------------------------------------------------------- recorder keys


def _recorded(valid, dropped, counts, before=None) -> RoutingOutput:
    n, k = dropped.shape
    return RoutingOutput(
        expert_index=torch.zeros(n, k, dtype=torch.long), expert_weight=torch.zeros(n, k),
        probs=torch.full((n, 4), 0.25), dropped=dropped, valid=valid,
        dispatch_counts=torch.tensor(counts, dtype=torch.float32),
        load_before_quota=None if before is None else torch.tensor(before, dtype=torch.float32),
    )


def test_recorder_dropped_token_and_slot_rates_and_pre_quota_load_by_hand():
    from spectra.metrics.recorder import RoutingRecorder

    t, f = True, False
    rec = RoutingRecorder()
    # step 1: t0 lost both slots, t1 one slot; t3 is padding that a buggy router flagged "dropped"
    rec.add({0: _recorded(torch.tensor([t, t, t, f]), torch.tensor([[t, t], [f, t], [f, f], [t, t]]),
                          [1, 1, 1, 0], before=[3, 1, 1, 1]),
             1: _recorded(torch.tensor([t, t, t, f]), torch.zeros(4, 2, dtype=torch.bool), [2, 2, 1, 1])})
    # step 2: three real tokens, nothing dropped
    rec.add({0: _recorded(torch.ones(3, dtype=torch.bool), torch.zeros(3, 2, dtype=torch.bool),
                          [2, 2, 1, 1], before=[2, 2, 1, 1]),
             1: _recorded(torch.ones(3, dtype=torch.bool), torch.zeros(3, 2, dtype=torch.bool), [2, 2, 1, 1])})
    logs = rec.report("train/")
    assert logs["train/layer0/dropped_token_rate"] == pytest.approx(1 / 6)  # t0 of 6 real tokens
    assert logs["train/layer0/dropped_slot_rate"] == pytest.approx(3 / 12)  # 2 + 1 of 6 · 2 real slots
    # pre-quota load summed over both steps: [5, 3, 2, 2], mean 3, population variance (4 + 0 + 1 + 1) / 4
    assert logs["train/layer0/cv_before_quota"] == pytest.approx(math.sqrt(1.5) / 3)
    assert logs["train/layer0/maxvio_before_quota"] == pytest.approx(5 / 3 - 1)
    # post-quota load [3, 3, 2, 1]: mean 2.25, variance (0.5625 · 2 + 0.0625 + 1.5625) / 4
    assert logs["train/layer0/cv"] == pytest.approx(math.sqrt(2.75 / 4) / 2.25)
    assert "train/layer1/cv_before_quota" not in logs  # layer 1's router applied no quota
    assert logs["train/layer1/dropped_token_rate"] == 0.0 and logs["train/layer1/dropped_slot_rate"] == 0.0
    assert logs["train/dropped_slot_rate_mean"] == pytest.approx((3 / 12 + 0) / 2)
    assert "dropped_rate" not in " ".join(logs)


def test_analysis_metric_names_never_mix_routings():
    """`cv` in a table is the inference routing's; the training routing has its own names."""
    import pandas as pd

    from spectra.analysis.columns import missing_note, resolve

    train_only = pd.DataFrame({"counted": [True], "last:train/cv_mean": [0.3], "last:train/cv_before_quota_mean": [0.9]})
    assert resolve(train_only, "cv") is None  # no fallback to the post-quota training load
    assert resolve(train_only, "train_cv") == "last:train/cv_mean"
    assert resolve(train_only, "train_cv_before_quota") == "last:train/cv_before_quota_mean"
    both = train_only.assign(**{"final:eval/cv_mean": [0.5]})
    assert resolve(both, "cv") == "final:eval/cv_mean" and resolve(both, "train_cv") == "last:train/cv_mean"
    assert "last:train/cv_mean" in missing_note("train_cv")  # a one-candidate metric's note


def test_metrics_do_not_import_routers():
    code = "import sys, spectra.metrics; assert 'spectra.routing' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_checkpoint_consistency_over_chosen_sets_of_different_widths():
    """Hand-computed: S = chosen slots only, |S_a ∩ S_b| / max(|S_a|, |S_b|), both-empty tokens out."""
    from spectra.metrics import checkpoint_consistency

    index_a = torch.tensor([[0, 1, 2], [3, 0, 0], [2, 1, 0], [1, 2, 3]])
    chosen_a = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    index_b = torch.tensor([[1, 3], [3, 2], [0, 1], [0, 1]])
    chosen_b = torch.tensor([[1, 1], [1, 1], [0, 0], [0, 0]], dtype=torch.bool)
    valid = torch.ones(4, dtype=torch.bool)
    # t0: {0,1} vs {1,3} -> 1/2; t1: {3} vs {3,2} -> 1/2; t2: {2} vs {} -> 0; t3: both empty -> left out
    got = checkpoint_consistency(index_a, index_b, valid, chosen_a, chosen_b)
    assert got == pytest.approx((0.5 + 0.5 + 0.0) / 3, abs=1e-12)
    # without masks, equal widths: the plain |S_a ∩ S_b| / k
    assert checkpoint_consistency(index_b, index_b.flip(-1), valid) == 1.0
    # a padding row is left out even when its sets differ
    assert checkpoint_consistency(index_a, index_b, torch.tensor([1, 1, 0, 1], dtype=torch.bool),
                                  chosen_a, chosen_b) == pytest.approx(0.5, abs=1e-12)
