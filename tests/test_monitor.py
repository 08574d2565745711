"""Routing monitor (metrics/monitor.py, moe/timing.py): held-out-slice metrics from dispatched
assignments, Table-9 timing, Table-12 snapshots and stability, and the run directory it leaves."""

from __future__ import annotations

import itertools
import json
import math
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import run_cli, tiny_causal_lm
from spectra.config import ConfigError, MonitorConfig, load_config, validate
from spectra.contracts.rundir import read_jsonl
from spectra.data.collate import PackedCollator
from spectra.metrics import expert_load
from spectra.metrics.monitor import (
    RoutingMonitor,
    compare_routing,
    layer_metrics,
    load_snapshot,
    save_snapshot,
    snapshot_path,
    snapshot_steps,
    stability,
)
from spectra.moe import moe_blocks, upcycle
from spectra.routing.base import RoutingInputs, RoutingOutput
from spectra.train.callbacks import RoutingMonitorCallback

S = 16  # sequence length of the fake eval rows


def _rows(n: int = 3) -> list[dict]:
    """Packed-style eval rows: documents of 6 tokens (position_ids restart), domains 0..2, and a
    pad block (domain −1, routing_mask 0) at the tail of the last row, as `iter_packed` makes it."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for r in range(n):
        ids = torch.randint(1, 97, (S,), generator=g).tolist()
        pos = [i % 6 for i in range(S)]
        dom = [(r + i // 6) % 3 for i in range(S)]
        mask = [1] * S
        if r == n - 1:  # the pad block: 5 positions
            ids[-5:], pos[-5:], dom[-5:], mask[-5:] = [0] * 5, list(range(5)), [-1] * 5, [0] * 5
        rows.append({"input_ids": ids, "labels": ids, "position_ids": pos, "domain_ids": dom, "routing_mask": mask})
    return rows


N_REAL = 3 * S - 5  # real tokens of `_rows()`


def _model(*overrides):
    cfg = validate(load_config(["moe.num_experts=4", *overrides]))
    model = tiny_causal_lm("llama", seed=0)
    upcycle(model, cfg, seed=0)
    model.config.use_cache = False
    return model


def _monitor(model, tmp_path, **cfg):
    return RoutingMonitor(model, _rows(), tmp_path, MonitorConfig(**cfg), PackedCollator(include_domain_ids=True),
                          num_domains=3, domain_names=("a", "b", "c"))


def _state(step, max_steps=8):
    return SimpleNamespace(global_step=step, max_steps=max_steps, is_world_process_zero=True)


ARGS = SimpleNamespace(bf16=False)


def _capture(model) -> dict[int, RoutingOutput]:
    """Record each router's RoutingOutput independently of the monitor (forward hooks)."""
    seen: dict[int, RoutingOutput] = {}
    for b in moe_blocks(model):
        b.router.register_forward_hook(lambda m, i, o, layer=b.layer_idx: seen.__setitem__(layer, o))
    return seen


# ---------------------------------------------------------------------------------------------


def test_snapshot_steps_ceil_clamp_dedupe():
    fr = [0.1, 0.25, 0.5, 0.75, 1.0]
    assert snapshot_steps(fr, 8) == [1, 2, 4, 6, 8]  # ceil(0.8)=1, 2, 4, 6, 8
    assert snapshot_steps(fr, 200) == [20, 50, 100, 150, 200]
    assert snapshot_steps(fr, 30) == [3, 8, 15, 23, 30]
    assert snapshot_steps([0.28], 25) == [7]  # 0.28*25 = 7.000000000000001: float error must not give 8
    assert snapshot_steps(fr, 2) == [1, 2]  # 0.1, 0.25, 0.5 all -> 1 (deduped); 0.75, 1.0 -> 2
    assert snapshot_steps([], 10) == []


def test_layer_metrics_read_dispatched_assignment_not_probs_or_counts():
    # N=4 positions, k=2, E=4; token 3 is padding; token 1's second slot was dropped.
    out = RoutingOutput(
        expert_index=torch.tensor([[0, 1], [0, 2], [3, 1], [2, 2]]),
        expert_weight=torch.tensor([[0.6, 0.4], [1.0, 0.0], [0.7, 0.3], [0.5, 0.5]]),
        probs=torch.full((4, 4), 0.25),  # flat: a probs-based load would be perfectly balanced
        dropped=torch.tensor([[False, False], [False, True], [False, False], [False, False]]),
        valid=torch.ones(4, dtype=torch.bool),  # the router saw the pad block as real (packed rows)
        dispatch_counts=torch.tensor([2.0, 2.0, 3.0, 1.0]),  # deliberately wrong: must not be read
    )
    valid = torch.tensor([True, True, True, False])
    m = layer_metrics(out, valid, domain_ids=torch.tensor([0, 1, 1, -1]), num_domains=2)
    # By hand. Served: t0 -> {0, 1}, t1 -> {0} (slot 1 dropped), t2 -> {3, 1}; t3 is padding.
    # load [2, 2, 0, 1], mean 1.25, population variance (0.75² + 0.75² + 1.25² + 0.25²) / 4 = 0.6875.
    p = [0.4, 0.4, 0.2]  # load shares of the used experts
    want = {
        "cv": math.sqrt(0.6875) / 1.25,
        "maxvio": 2 / 1.25 - 1,
        "gini": 14 / (2 * 16 * 1.25),  # Σ_ij |c_i − c_j| = 2 · (1 + 2 + 2 + 1 + 1 + 0) = 14
        "unused_rate": 1 / 4,
        "usage_entropy": -sum(q * math.log(q) for q in p) / math.log(4),
        "collapse_rate": 1 / 4,  # only expert 2 is below 10 % of the uniform load 1.25
        "dropped_token_rate": 0.0,  # no real token lost every slot
        "dropped_slot_rate": 1 / 6,  # 1 of 3 real tokens x 2 slots
        "routing_entropy": math.log(4),  # flat probs
        "confidence": (0.6 + 1.0 + 0.7) / 3,  # max weight of t0, t1, t2
        # token sets {t0, t1}, {t0, t2}, {}, {t2}: pairs (0,1) 1/3, (1,3) 1/2, the other four 0
        "expert_overlap": (1 / 3 + 1 / 2) / 6,
        # expert 0 <- {d0, d1}, expert 1 <- {d0, d1}, expert 3 <- {d1}: (1 + 1 + 1) / 5
        "domain_purity": 3 / 5,
        # P(e | d0) = [1/2, 1/2, 0, 0], P(e | d1) = [1/3, 1/3, 0, 1/3]: peaks 1/2 and 1/3
        "domain_affinity_peak": (1 / 2 + 1 / 3) / 2,
    }
    assert set(m) == set(want)
    for k, v in want.items():
        assert m[k] == pytest.approx(v, abs=1e-7), k  # weights are float32


def _reference_metrics(out, valid, doc_start, dom, num_domains: int) -> dict[str, float]:
    """Every metric the monitor logs for one layer, by loops, numpy and scipy over the captured
    RoutingOutput (METHOD.md §5's definitions), independent of spectra.metrics."""
    idx, drop, v = out.expert_index.tolist(), out.dropped.tolist(), valid.tolist()
    n, k, e = out.expert_index.shape[0], out.expert_index.shape[1], out.num_experts
    served = [[v[t] and not drop[t][j] for j in range(k)] for t in range(n)]
    load, sets = np.zeros(e), [set() for _ in range(e)]
    counts = np.zeros((num_domains, e))  # served assignments of domain d to expert e
    for t in range(n):
        for j in range(k):
            if served[t][j]:
                load[idx[t][j]] += 1
                sets[idx[t][j]].add(t)
                if dom[t] >= 0:
                    counts[dom[t], idx[t][j]] += 1
    real = [t for t in range(n) if v[t]]
    mean = load.mean()
    b, s_len = doc_start.shape
    starts = doc_start.reshape(-1).tolist()
    pairs = [(t, t + 1) for t in range(n - 1) if (t + 1) % s_len and v[t] and v[t + 1] and not starts[t + 1]]
    present = counts.sum(1) > 0
    m = {
        "cv": load.std() / mean,
        "maxvio": load.max() / mean - 1,
        "gini": sum(abs(x - y) for x in load for y in load) / (2 * e * e * mean),
        "unused_rate": float(np.mean(load == 0)),
        "usage_entropy": stats.entropy(load) / np.log(e),
        "collapse_rate": float(np.mean(load < 0.1 * mean)),
        "dropped_token_rate": sum(all(drop[t]) for t in real) / len(real),
        "dropped_slot_rate": sum(sum(drop[t]) for t in real) / (k * len(real)),
        "routing_entropy": np.mean([stats.entropy(out.probs[t].double().numpy()) for t in real]),
        "confidence": np.mean([max(out.expert_weight[t].tolist()) for t in real]),
        "expert_overlap": np.mean([len(x & y) / len(x | y) for x, y in itertools.combinations(sets, 2) if x | y]),
        "sequential_overlap": np.mean([len(set(idx[t]) & set(idx[u])) / k for t, u in pairs]),
        "domain_purity": counts.max(0).sum() / counts.sum(),
        "domain_affinity_peak": np.mean([row.max() / row.sum() for row in counts[present]]),
    }
    if out.gram is not None:
        g = out.gram.double().numpy()
        off = g[~np.eye(e, dtype=bool)]
        m["gram_orthogonality"] = 1 - np.abs(off).mean()
        m["gram_diagonal_quality"] = 1 - np.abs(np.diag(g) - 1).mean()
        m["off_diagonal_sparsity"] = float(np.mean(np.abs(off) < 0.1))
        r = out.expert_repr.double().numpy()
        r = r / np.linalg.norm(r, axis=1, keepdims=True)
        m["expert_similarity_mean"] = (r @ r.T)[~np.eye(e, dtype=bool)].mean()
    if out.scores is not None:
        cos = []
        for t in real:
            a = np.zeros(e)
            a[[idx[t][j] for j in range(k) if served[t][j]]] = 1.0
            sc = out.scores[t].double().numpy()
            cos.append(a @ sc / (np.linalg.norm(a) * np.linalg.norm(sc)))
        m["routing_expression_alignment"] = np.mean(cos)
    return m


TIMING = {"router_ms", "experts_ms", "shared_ms", "router_share"}


# SPECTRA with τ = 0: the hinge term makes the cost −C differ from the scores s even before any
# Gram exists, so an alignment computed on the cost instead of s would not match.
@pytest.mark.parametrize("router", [["router=switch_top2", "router.capacity_factor=0.5"],
                                    ["router=spectra", "osr.hinge_threshold=0.0"]])
def test_monitor_metrics_equal_independent_reference(tmp_path, router):
    model = _model(*router)
    seen = _capture(model)
    mon = _monitor(model, tmp_path)
    logs = mon.evaluation_metrics(model, ARGS, _state(5))
    batch = PackedCollator(include_domain_ids=True)(_rows())
    valid = batch["routing_mask"].bool().reshape(-1)  # the pad block is not a real token
    doc_start = batch["position_ids"] == 0
    dom = batch["domain_ids"].reshape(-1).tolist()
    assert set(seen) == {0, 1}
    for layer, out in seen.items():
        assert torch.equal(out.valid, valid)  # the routers were given the pad block as padding
        if out.scores is not None:
            assert not torch.allclose(out.logits, out.scores, atol=1e-3)  # −C ≠ s here
        want = _reference_metrics(out, valid, doc_start, dom, 3)
        if "router=spectra" in router:  # ‖B̂B̂ᵀ − I‖_F / E over the projector's per-expert blocks
            w = moe_blocks(model)[layer].router.projector.weight.detach().double().reshape(4, -1).numpy()
            w = w / np.linalg.norm(w, axis=1, keepdims=True)
            want["projector_orthogonality"] = np.linalg.norm(w @ w.T - np.eye(4)) / 4
        got = {k.split("/", 2)[2]: v for k, v in logs.items() if k.startswith(f"monitor/layer{layer}/")}
        assert set(got) - TIMING == set(want)
        for k, v in want.items():
            assert math.isfinite(v) and got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (layer, k)
    assert logs["monitor/cv_mean"] == pytest.approx((logs["monitor/layer0/cv"] + logs["monitor/layer1/cv"]) / 2)
    assert logs["monitor/num_tokens"] == N_REAL
    if "router=spectra" not in router:
        assert any(float(seen[i].dropped[valid].sum()) > 0 for i in seen), "capacity 0.5 should drop slots"
        assert any(logs[f"monitor/layer{i}/dropped_token_rate"] > 0 for i in seen), "some token lost both slots"


def test_snapshot_load_counts_only_served_slots(tmp_path):
    model = _model("router=switch_top2", "router.capacity_factor=0.5")
    seen = _capture(model)
    mon = _monitor(model, tmp_path)
    RoutingMonitorCallback(mon).on_train_begin(ARGS, _state(0), None)
    RoutingMonitorCallback(mon).on_step_end(ARGS, _state(1), None, model=model)  # 1 = ceil(0.1 * 8): a snapshot step
    snap = load_snapshot(snapshot_path(tmp_path, 1))
    batch = PackedCollator(include_domain_ids=True)(_rows())
    valid = batch["routing_mask"].bool().reshape(-1)
    assert torch.equal(snap["valid"], valid) and int(valid.sum()) == N_REAL
    assert torch.equal(snap["input_ids"].long(), batch["input_ids"].reshape(-1))
    assert snap["domain_names"] == ["a", "b", "c"]
    for layer, out in seen.items():
        served = valid[:, None] & ~out.dropped
        s = snap["layers"][layer]
        assert torch.equal(s["served"], served)
        assert torch.equal(s["load"], expert_load(out.expert_index, served, 4))
        assert torch.equal(s["expert_index"].long(), out.expert_index)
    dropped_real = sum(int((seen[i].dropped & valid[:, None]).sum()) for i in seen)
    assert dropped_real > 0
    assert sum(float(snap["layers"][i]["load"].sum()) for i in seen) == 2 * 2 * int(valid.sum()) - dropped_real
    RoutingMonitorCallback(mon).on_step_end(ARGS, _state(3), None, model=model)  # not a snapshot step
    assert sorted(p.name for p in (tmp_path / "routing").iterdir()) == ["step000001.pt"]


def test_spectra_router_reports_pre_quota_load_only_when_the_quota_ran():
    # Reference: plain top-k of the same plan, counted by hand over the real tokens.
    model = _model("router=spectra")
    router = moe_blocks(model)[0].router
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 12, model.config.hidden_size, generator=g)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 9:] = False  # padding: counted nowhere
    doc_start = torch.zeros(2, 12, dtype=torch.bool)
    doc_start[:, 0] = True
    inputs = RoutingInputs(hidden=hidden, valid=valid, doc_start=doc_start)
    router.train()
    with torch.no_grad():
        out = router(inputs)
    real = valid.reshape(-1)
    top = out.probs[real].topk(2, dim=-1).indices  # [N_real, 2] top-k of the Sinkhorn plan
    ref = torch.bincount(top.reshape(-1), minlength=4).float()
    assert torch.equal(out.load_before_quota, ref)
    assert out.load_before_quota.sum() == out.dispatch_counts.sum() == 2 * int(real.sum())
    router.eval()  # eval: per-token top-k, no quota -> nothing to report
    with torch.no_grad():
        assert router(inputs).load_before_quota is None
    router.quota_enabled = False
    router.train()
    with torch.no_grad():
        assert router(inputs).load_before_quota is None


def test_snapshot_stores_loads_before_and_after_quota(tmp_path):
    # capacity factor 1 over the 43 real tokens (the 5-position pad block is not counted):
    # cap = ceil(43·2 / 4) = 22 is a hard cap on every expert, whatever plain top-k chose.
    model = _model("router=spectra", "quota.capacity_factor=1.0")
    seen = _capture(model)
    mon = _monitor(model, tmp_path)
    RoutingMonitorCallback(mon).on_train_begin(ARGS, _state(0), None)
    RoutingMonitorCallback(mon).on_step_end(ARGS, _state(1), None, model=model)
    snap = load_snapshot(snapshot_path(tmp_path, 1))
    assert all(not b.router.sinkhorn_inference for b in moe_blocks(model))  # switched back off
    real = snap["valid"]
    assert int(real.sum()) == N_REAL == 43
    assert set(seen) == {0, 1}
    for layer, out in seen.items():  # the last forward hooked: the quota pass
        s = snap["layers"][layer]
        assert float(s["load_after_quota"].sum()) == 2 * N_REAL and float(s["load_after_quota"].max()) <= 22
        # plain top-k of the plan over the real tokens only (pad rows of the plan are not counted)
        ref_before = torch.bincount(out.probs[real].topk(2, dim=-1).indices.reshape(-1), minlength=4).double()
        assert torch.equal(s["load_before_quota"], ref_before)
        assert float(s["load_before_quota"].sum()) == 2 * N_REAL
    assert any(s["load_before_quota"].max() > 22 for s in snap["layers"].values())  # the quota did bind
    # the eval routing (no quota) is what `load` and the monitor metrics still describe
    for layer, out in _monitor(model, tmp_path / "eval").collect(model, 1).outputs.items():
        assert torch.equal(snap["layers"][layer]["expert_index"].long(), out.expert_index)


@pytest.mark.parametrize("router", [["router=spectra", "ablation=no_quota"], ["router=topk"]])
def test_snapshot_without_quota_has_no_pre_quota_load(tmp_path, router):
    model = _model(*router)
    mon = _monitor(model, tmp_path)
    RoutingMonitorCallback(mon).on_train_begin(ARGS, _state(0), None)
    RoutingMonitorCallback(mon).on_step_end(ARGS, _state(1), None, model=model)
    snap = load_snapshot(snapshot_path(tmp_path, 1))
    for s in snap["layers"].values():
        assert "load_before_quota" not in s and "load_after_quota" not in s


def test_monitor_forward_leaves_training_untouched(tmp_path):
    model = _model()
    mon = _monitor(model, tmp_path)
    # a stochastic module in the forward: the monitor must restore the RNG stream afterwards
    model.register_forward_pre_hook(lambda m, a: torch.rand(1) and None)
    model.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    mon.evaluation_metrics(model, ARGS, _state(2))
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training
    assert all(b.stage_timer is None for b in moe_blocks(model))
    assert model.spectra_context.recording is False and model.spectra_context.outputs == {}


def test_timing_keys_and_profiler_ranges(tmp_path):
    model = _model()
    logs = _monitor(model, tmp_path).evaluation_metrics(model, ARGS, _state(2))
    for layer in (0, 1):
        assert logs[f"monitor/layer{layer}/router_ms"] > 0 and logs[f"monitor/layer{layer}/experts_ms"] > 0
        assert 0 < logs[f"monitor/layer{layer}/router_share"] < 1
    assert logs["monitor/forward_ms"] >= logs["monitor/router_ms_total"] + logs["monitor/experts_ms_total"]
    off = _monitor(model, tmp_path, timing=False).evaluation_metrics(model, ARGS, _state(2))
    assert not any(k.endswith("_ms") or "router_share" in k for k in off)
    # profiler-friendly: named ranges show up in a torch.profiler trace
    ids = torch.randint(1, 97, (1, 8))
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(input_ids=ids)
    names = {e.name for e in prof.events()}
    assert {"spectra/layer0/router", "spectra/layer0/experts", "spectra/layer1/router"} <= names


def _snap(step, index, load, fingerprint="x"):
    index = torch.tensor(index)
    return {"step": step, "fingerprint": fingerprint, "valid": torch.ones(index.shape[0], dtype=torch.bool),
            "layers": {0: {"expert_index": index, "served": torch.ones_like(index, dtype=torch.bool),
                           "load": torch.tensor(load, dtype=torch.float64)}}}


def test_stability_table12_by_hand():
    a = _snap(1, [[0, 1], [2, 3]], [1, 2, 3, 4])
    b = _snap(2, [[1, 0], [2, 3]], [1, 2, 3, 4])  # same sets (order within a set does not matter)
    c = _snap(3, [[0, 2], [2, 3]], [4, 3, 2, 1])  # token 0 keeps 1 of 2 experts; ranks reversed
    st = stability([a, b, c])
    lay = st["layers"]["0"]
    assert st["steps"] == [1, 2, 3]
    assert lay["consistency_consecutive"] == pytest.approx([1.0, 0.75])
    assert lay["consistency_last_vs_first"] == pytest.approx(0.75)
    assert lay["kendall_tau_consecutive"] == pytest.approx([1.0, -1.0])
    shares = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [4, 3, 2, 1]], dtype=torch.float64) / 10
    assert lay["usage_variance"] == pytest.approx(float(shares.var(0, correction=0).mean()))
    assert st["mean"]["consistency_consecutive_mean"] == pytest.approx(0.875)
    assert "layers" not in stability([a])


def test_compare_routing_self_other_and_mismatch(tmp_path):
    ra, rb, rc = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    save_snapshot(snapshot_path(ra, 8), _snap(8, [[0, 1], [2, 3]], [1, 2, 3, 4]))
    save_snapshot(snapshot_path(rb, 8), _snap(8, [[0, 2], [2, 3]], [1, 3, 2, 4]))
    save_snapshot(snapshot_path(rc, 8), _snap(8, [[0, 1], [2, 3]], [1, 2, 3, 4], fingerprint="other tokens"))
    assert compare_routing(ra, ra)["consistency"] == 1.0
    assert compare_routing(ra, rb)["consistency"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="different held-out tokens"):
        compare_routing(ra, rc)
    with pytest.raises(ValueError, match="not a snapshot"):
        compare_routing(ra, rb, step=4)
    assert not list(ra.rglob("*.tmp"))


def test_snapshot_write_is_atomic(tmp_path, monkeypatch):
    path = snapshot_path(tmp_path, 3)

    def boom(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_snapshot(path, {"step": 3})
    assert not path.exists() and not list(path.parent.iterdir())  # neither a torn file nor a temp


def test_resume_reloads_earlier_snapshots(tmp_path):
    model = _model()
    mon = _monitor(model, tmp_path)
    RoutingMonitorCallback(mon).on_train_begin(ARGS, _state(0), None)
    for step in (1, 2, 4):
        RoutingMonitorCallback(mon).on_step_end(ARGS, _state(step), None, model=model)
    resumed = _monitor(model, tmp_path)
    RoutingMonitorCallback(resumed).on_train_begin(ARGS, _state(2), None)  # resumed from checkpoint-2: step 4 is in the future
    assert [s["step"] for s in resumed.snapshots] == [1, 2]
    # step 4 is from the abandoned future of that attempt: removed, so it cannot go stale
    assert sorted(p.name for p in (tmp_path / "routing").iterdir()) == ["step000001.pt", "step000002.pt"]
    RoutingMonitorCallback(_monitor(model, tmp_path)).on_train_begin(ARGS, _state(0), None)  # a fresh start: nothing kept
    assert not list((tmp_path / "routing").iterdir())


def test_monitor_config_validation_names_keys():
    with pytest.raises(ConfigError, match="monitor.num_sequences"):
        MonitorConfig(num_sequences=0)
    with pytest.raises(ConfigError, match="monitor.snapshot_fractions"):
        validate(load_config(["monitor.snapshot_fractions=[0.5,1.5]"]))
    cfg = validate(load_config([]))
    assert cfg.monitor.enabled and cfg.monitor.snapshot_fractions == [0.1, 0.25, 0.5, 0.75, 1.0]


# ---------------------------------------------------------------------------------------------
# End to end: train.py twice (seeds 0 and 1) and once with the monitor off.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from spectra.data import load_tokenizer
    from spectra.moe.loading import build_config_model_dir
    from spectra.train.run import cache_root
    from test_train_e2e import SMALL

    # Build the base models into the session cache first: the run that builds a model draws from
    # the global RNG (torch.manual_seed + init) and one that loads it does not, so otherwise the
    # first run would train differently from an identical later one for a reason unrelated to the
    # monitor.
    cfg = validate(load_config(list(SMALL)))
    for seed in (0, 1):
        build_config_model_dir(cfg.model, len(load_tokenizer(cfg.data.tokenizer)), cache_root(), seed)
    base = tmp_path_factory.mktemp("monitor")
    variants = {"s0": ["seed=0"], "s1": ["seed=1"], "off": ["seed=0", "monitor.enabled=false"]}
    dirs = {name: base / name for name in variants}
    # 2 rows a step (the monitor's slice is still the first 16 eval rows); the three runs are
    # independent (own run dirs, the base models built above), so they start together, one thread
    # each (threads would only contend): most of a run is its imports
    small = [*SMALL, "trainer.per_device_train_batch_size=2"]
    with ThreadPoolExecutor(max_workers=len(variants)) as pool:
        procs = {name: pool.submit(run_cli, ["train.py", *small, *extra, f"hydra.run.dir={dirs[name]}"],
                                   env={"OMP_NUM_THREADS": "1"})
                 for name, extra in variants.items()}
        for proc in (f.result() for f in procs.values()):
            assert proc.returncode == 0, proc.stderr[-5000:]
    return dirs


@pytest.mark.slow
def test_e2e_metrics_jsonl_has_monitor_keys_at_every_eval(runs):
    records = read_jsonl(runs["s0"] / "metrics.jsonl")
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 8]  # eval_steps=4, plus the run's final evaluate()
    for r in evals:
        for layer in range(4):  # the tiny model: 4 MoE layers
            for k in ("cv", "gini", "usage_entropy", "routing_entropy", "expert_overlap", "domain_purity",
                      "sequential_overlap", "router_ms", "experts_ms", "router_share"):
                assert f"monitor/layer{layer}/{k}" in r, (r["step"], layer, k)
        assert {"monitor/cv_mean", "monitor/forward_ms", "eval/cv_mean"} <= r.keys()  # recorder keys kept
        assert {"monitor/consistency_prev_mean", "monitor/kendall_tau_prev_mean"} <= r.keys()  # >= 2 snapshots
    assert not any(k.startswith("monitor/") for r in read_jsonl(runs["off"] / "metrics.jsonl") for k in r)


@pytest.mark.slow
def test_e2e_summary_and_snapshots(runs):
    s = json.loads((runs["s0"] / "summary.json").read_text())
    evals = [r for r in read_jsonl(runs["s0"] / "metrics.jsonl") if "eval_loss" in r]
    assert s["monitor"]["step"] == 8
    assert s["monitor"]["metrics"]["cv_mean"] == pytest.approx(evals[-1]["monitor/cv_mean"])
    assert s["monitor"]["snapshot_steps"] == [1, 2, 4, 6, 8]
    assert s["stability"]["steps"] == [1, 2, 4, 6, 8]
    for k in ("consistency_consecutive_mean", "consistency_last_vs_first", "usage_variance", "kendall_tau_mean"):
        v = s["stability"]["mean"][k]
        assert v is not None and math.isfinite(v)
    assert 0 <= s["stability"]["mean"]["consistency_last_vs_first"] <= 1
    files = sorted(p.name for p in (runs["s0"] / "routing").iterdir())
    assert files == [f"step{n:06d}.pt" for n in (1, 2, 4, 6, 8)]  # no temp files left behind
    for n in (1, 2, 4, 6, 8):
        snap = load_snapshot(snapshot_path(runs["s0"], n))
        assert snap["step"] == n and sorted(snap["layers"]) == [0, 1, 2, 3]
        assert snap["layers"][0]["expert_index"].shape == snap["layers"][0]["served"].shape
        assert "load_before_quota" not in snap["layers"][0]  # top-k router: no quota, nothing to compare
    # the monitor does not change training: same seed, monitor off -> same losses
    off = json.loads((runs["off"] / "summary.json").read_text())
    assert off["train_loss"] == pytest.approx(s["train_loss"], rel=1e-6)
    assert "monitor" not in off and not (runs["off"] / "routing").exists()


@pytest.mark.slow
def test_e2e_checkpoint_consistency_self_and_other_seed(runs):
    assert compare_routing(runs["s0"], runs["s0"])["consistency"] == 1.0
    other = compare_routing(runs["s0"], runs["s1"])
    assert other["step"] == 8 and other["consistency"] < 1.0
    assert set(other["per_layer"]) == {0, 1, 2, 3}
