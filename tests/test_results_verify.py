"""`python -m spectra.results verify`: re-train committed cells and compare their numbers.

The unit tests check the comparison against hand-written summaries and hand-computed seed noise;
the end-to-end test trains a real (two-step) base and cell, then verifies the cell: the re-run
must be bit-identical, and a committed number changed by hand must be caught.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import ROOT
from spectra.contracts.rundir import write_json_atomic
from spectra.results import runner
from spectra.results.__main__ import main
from spectra.results.plan import PlanError, load_plan
from spectra.results.verify import compare, compared_metrics, seed_noise, select_cells, verify_cells


@pytest.fixture
def lock_dir(tmp_path, monkeypatch):
    """The runner's lock files go under tmp_path (never the repository's outputs/)."""
    d = tmp_path / "locks"
    monkeypatch.setattr(runner, "LOCK_DIR", d)
    return d


def _summary(eval_loss, status="completed", **final):
    return {"status": status, "config_fingerprint": "f00", "final": {"eval_loss": eval_loss, **final}}


def test_compared_metrics_keep_losses_and_routing_and_drop_timings():
    final = {"eval_loss": 3.5, "eval_loss_code": 4.0, "eval/cv_mean": 0.3, "monitor/layer0/router_ms": 1.2,
             "monitor/forward_ms": 100.0, "eval_runtime": 10.1, "eval_samples_per_second": 28.6,
             "eval_steps_per_second": 1.9, "train_time_s": 50.0, "tokens_per_s": 900.0, "epoch": 1,
             "flag": True, "name": "x", "monitor/experts_ms_total": 49.0, "monitor/router_share_mean": 0.1,
             "monitor/layer1/router_share": 0.2}
    assert compared_metrics(final) == {"eval_loss": 3.5, "eval_loss_code": 4.0, "eval/cv_mean": 0.3, "epoch": 1.0}


def test_compare_bit_identical_noise_and_not_reproduced():
    committed = _summary(3.70, **{"eval/cv_mean": 0.40, "eval_runtime": 10.0})
    # equal numbers, different timing: bit-identical
    v = compare("f/c", committed, _summary(3.70, **{"eval/cv_mean": 0.40, "eval_runtime": 99.0}), 0.01, 3, 1e-3)
    assert (v.verdict, v.differing, v.compared, v.ok) == ("bit-identical", 0, 2, True)
    # |Δ| = 0.015 <= 2 x 0.01: within seed noise; the largest difference is the cv's 0.05
    v = compare("f/c", committed, _summary(3.715, **{"eval/cv_mean": 0.45}), 0.01, 3, 1e-3)
    assert v.verdict == "within seed noise" and v.ok
    assert v.allowed == pytest.approx(0.02) and v.differing == 2
    assert v.max_abs_diff[0] == "eval/cv_mean" and v.max_abs_diff[1] == pytest.approx(0.05)
    # |Δ| = 0.025 > 0.02: not reproduced
    v = compare("f/c", committed, _summary(3.725, **{"eval/cv_mean": 0.40}), 0.01, 3, 1e-3)
    assert v.verdict == "NOT reproduced" and not v.ok
    # no seed noise (one seed): the tolerance alone decides
    assert compare("f/c", committed, _summary(3.7009, **{"eval/cv_mean": 0.4}), None, 1, 1e-3).verdict == "within seed noise"
    assert compare("f/c", committed, _summary(3.7011, **{"eval/cv_mean": 0.4}), None, 1, 1e-3).verdict == "NOT reproduced"
    # a tolerance larger than the noise wins
    assert compare("f/c", committed, _summary(3.72, **{"eval/cv_mean": 0.4}), 1e-4, 3, 0.05).verdict == "within seed noise"
    # a NaN re-run, or a metric the re-run lost, is not reproduced
    assert compare("f/c", committed, _summary(math.nan, **{"eval/cv_mean": 0.4}), 0.01, 3, 1.0).verdict == "NOT reproduced"
    v = compare("f/c", committed, _summary(3.70), 0.01, 3, 1.0)
    assert v.verdict == "NOT reproduced" and v.missing == ["eval/cv_mean"]
    with pytest.raises(PlanError, match="no final eval_loss"):
        compare("f/c", {"final": {}}, committed, 0.01, 3, 1e-3)


PLAN = """
seeds: [0, 1, 2]
families:
  f:
    axes:
      router: [topk, dense]
"""


def _plan_with_runs(tmp_path: Path, losses: dict[str, float | None]):
    (tmp_path / "plan.yaml").write_text(PLAN)
    plan = load_plan(tmp_path / "plan.yaml")
    runs = tmp_path / "results" / "runs"
    for name, loss in losses.items():
        if loss is not None:
            write_json_atomic(runs / "f" / name / "summary.json", _summary(loss))
    return plan, runs


def test_seed_noise_is_the_sample_std_of_the_rows_finished_seeds(tmp_path):
    plan, runs = _plan_with_runs(tmp_path, {"router=topk,seed=0": 3.0, "router=topk,seed=1": 3.1,
                                            "router=topk,seed=2": 3.2, "router=dense,seed=0": 9.0,
                                            "router=dense,seed=1": 1.0})
    topk, dense = plan.cells[0], plan.cells[3]  # seeds vary fastest
    assert topk.name == "router=topk,seed=0" and dense.name == "router=dense,seed=0"
    std, n = seed_noise(topk, plan, runs)
    # sample std of 3.0, 3.1, 3.2 = sqrt((0.01 + 0 + 0.01) / 2) = 0.1; the dense row is not in it
    assert n == 3 and std == pytest.approx(0.1)
    std, n = seed_noise(dense, plan, runs)
    assert n == 2 and std == pytest.approx(math.sqrt(32.0))  # mean 5, deviations +-4: (16 + 16) / (2 - 1)


def test_seed_noise_needs_two_seeds(tmp_path):
    plan, runs = _plan_with_runs(tmp_path, {"router=topk,seed=0": 3.0})
    assert seed_noise(plan.cells[0], plan, runs) == (None, 1)


def test_select_cells_by_label_and_pattern_and_clear_errors(tmp_path):
    plan, runs = _plan_with_runs(tmp_path, {"router=topk,seed=0": 3.0, "router=topk,seed=2": 3.2,
                                            "router=dense,seed=0": 3.3})
    got = select_cells(plan, runs, ["f/router=topk,seed=*", "f/router=dense,seed=0", "f/router=topk,seed=0"])
    assert [c.name for c in got] == ["router=topk,seed=0", "router=topk,seed=2", "router=dense,seed=0"]  # plan order
    with pytest.raises(PlanError, match=r"'f/router=topk,seed=1' matches no finished cell .*not finished yet"):
        select_cells(plan, runs, ["f/router=topk,seed=1"])
    with pytest.raises(PlanError, match=r"'g/\*' matches no finished cell .*no cell of the plan"):
        select_cells(plan, runs, ["g/*"])
    assert main(["--plan", str(plan.path), "--root", str(runs.parent), "verify", "nope/*"]) == 2


TINY = ["trainer.max_steps=2", "trainer.eval_steps=2", "trainer.save_steps=2", "trainer.logging_steps=1",
        "data.max_train_samples=16", "data.max_eval_samples=4", "data.max_seq_length=64",
        "trainer.per_device_train_batch_size=2", "trainer.per_device_eval_batch_size=4"]


@pytest.mark.slow
def test_verify_retrains_a_cell_bit_identically_and_catches_a_changed_number(tmp_path, lock_dir, capsys):
    base_root, res, out = tmp_path / "base", tmp_path / "results", tmp_path / "verify"
    cell = ["experiment=results", f"model.pretrained={base_root / 'tiny' / 'model'}", "moe.num_experts=4", *TINY]
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(json.dumps({  # JSON is YAML
        "seeds": [0], "bases": {"tiny": ["experiment=base_model", "model.arch.num_hidden_layers=2", *TINY]},
        "families": {"routers": {"base": "tiny", "fixed": cell, "axes": {"router": ["topk"]}}}}))
    plan = load_plan(plan_path)
    assert runner.run_plan(plan, ROOT, res, workers=1, commit=False, base_root=base_root) == []
    committed = res / "runs" / "routers" / "router=topk,seed=0"
    rerun = out / "routers" / "router=topk,seed=0"

    (v,) = verify_cells(plan, ROOT, res, ["routers/*"], out_root=out, base_root=base_root)
    assert v.verdict == "bit-identical", v
    assert v.compared > 20 and v.differing == 0  # losses per domain and every routing metric
    assert "same resolved config" in v.notes and "same base weights" in v.notes
    a = json.loads((committed / "summary.json").read_text())["final"]
    b = json.loads((rerun / "summary.json").read_text())["final"]
    domains = [k for k in a if k.startswith("eval_loss_")]
    assert domains and a["eval_loss"] == b["eval_loss"] and all(a[k] == b[k] for k in domains)
    assert (rerun / "model").is_dir() and not (committed / "verify").exists()

    # a committed number changed by hand (one seed: the 1e-3 tolerance decides) is caught; the
    # finished re-run is reused, not retrained
    s = json.loads((committed / "summary.json").read_text())
    s["final"]["eval_loss"] += 0.01
    write_json_atomic(committed / "summary.json", s)
    mtime = (rerun / "summary.json").stat().st_mtime_ns
    rc = main(["--plan", str(plan_path), "--root", str(res), "verify", "routers/router=topk,seed=0",
               "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 1 and "NOT reproduced" in printed.out and "routers/router=topk,seed=0" in printed.err
    assert "reusing the re-run" in printed.out
    assert (rerun / "summary.json").stat().st_mtime_ns == mtime
    report = json.loads((out / "verify.json").read_text())
    assert report[0]["verdict"] == "NOT reproduced"
    assert report[0]["eval_loss"][0] - report[0]["eval_loss"][1] == pytest.approx(0.01)
