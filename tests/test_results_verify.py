"""`python -m spectra.results verify`: re-train committed cells and compare their numbers.

The unit tests check the comparison against hand-written summaries and hand-computed seed noise;
train.py is replaced by a recorder here; the real re-run (bit-identical to the committed cell) is
checked at the end of tests/test_results_runner.py's end-to-end test, which has trained one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import ROOT
from spectra.contracts.rundir import write_json_atomic
from spectra.results import runner, verify
from spectra.results.__main__ import main
from spectra.results.plan import PlanError, load_plan
from spectra.results.verify import (
    allowed_difference,
    compare,
    compared_metrics,
    format_verdict,
    pooled_noise,
    seed_noise,
    select_cells,
    verify_cells,
)


@pytest.fixture
def lock_dir(tmp_path, monkeypatch):
    """The runner's lock files go under tmp_path (never the repository's outputs/)."""
    d = tmp_path / "locks"
    monkeypatch.setattr(runner, "LOCK_DIR", d)
    return d


def _summary(eval_loss, status="completed", **final):
    return {"status": status, "config_fingerprint": "f00", "final": {"eval_loss": eval_loss, **final}}


def test_compared_metrics_read_null_as_nan():
    got = compared_metrics({"eval_loss": None, "eval/cv_mean": 0.5})
    assert math.isnan(got["eval_loss"]) and got["eval/cv_mean"] == 0.5


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
    v = compare("f/c", committed, _summary(3.70, **{"eval/cv_mean": 0.40, "eval_runtime": 99.0}), 0.02, "x")
    assert (v.verdict, v.differing, v.compared, v.ok) == ("bit-identical", 0, 2, True)
    # |Δ| = 0.015 <= 0.02: within seed noise; the largest difference is the cv's 0.05
    v = compare("f/c", committed, _summary(3.715, **{"eval/cv_mean": 0.45}), 0.02, "x")
    assert v.verdict == "within seed noise" and v.ok and v.differing == 2
    assert v.max_abs_diff[0] == "eval/cv_mean" and v.max_abs_diff[1] == pytest.approx(0.05)
    # |Δ| = 0.025 > 0.02: not reproduced
    v = compare("f/c", committed, _summary(3.725, **{"eval/cv_mean": 0.40}), 0.02, "x")
    assert v.verdict == "NOT reproduced" and not v.ok
    # a NaN re-run (stored as null), or a metric the re-run lost, is not reproduced
    assert compare("f/c", committed, _summary(None, **{"eval/cv_mean": 0.4}), 1.0, "x").verdict == "NOT reproduced"
    v = compare("f/c", committed, _summary(3.70), 0.02, "x")
    assert v.verdict == "NOT reproduced" and v.missing == ["eval/cv_mean"]
    # NaN in both is the same outcome; a committed run without eval_loss cannot be reproduced
    assert compare("f/c", _summary(None), _summary(None), 0.02, "x").verdict == "bit-identical"
    v = compare("f/c", {"final": {"eval/cv_mean": 0.4}}, committed, 0.02, "x")
    assert v.verdict == "NOT reproduced" and "no final eval_loss" in v.notes[0]
    assert "committed nan" in format_verdict(v)  # formatting a NaN does not crash


PLAN = """
seeds: [0, 1, 2]
families:
  f:
    axes:
      router: [topk, dense]
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _plan_with_runs(tmp_path: Path, losses: dict[str, float | None]):
    plan = load_plan(_write(tmp_path / "plan.yaml", PLAN))
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


def test_pooled_noise_and_the_allowed_difference(tmp_path):
    plan, runs = _plan_with_runs(tmp_path, {"router=topk,seed=0": 3.0, "router=topk,seed=1": 3.1,
                                            "router=topk,seed=2": 3.2, "router=dense,seed=0": 9.0,
                                            "router=dense,seed=1": 1.0})
    # pooled variance by hand: (2 x 0.01 + 1 x 32) / (2 + 1)
    pooled = math.sqrt((2 * 0.01 + 32.0) / 3)
    assert pooled_noise(plan, runs) == (pytest.approx(pooled), 2)
    # a row with its own seeds: 2 x sqrt(2) x its std (two draws differ by sqrt(2) sigma)
    allowed, why = allowed_difference(plan.cells[0], plan, runs, tol=0.0)
    assert allowed == pytest.approx(2 * math.sqrt(2) * 0.1) and "this row's 3 committed seeds" in why
    assert allowed_difference(plan.cells[0], plan, runs, tol=5.0)[0] == 5.0  # tol is a floor
    # the one-seed row (a sweep cell) gets the pooled std
    one = load_plan(_write(tmp_path / "one.yaml", PLAN.replace("[topk, dense]", "[topk, dense, hash]")))
    write_json_atomic(runs / "f" / "router=hash,seed=0" / "summary.json", _summary(3.3))
    hash0 = [c for c in one.cells if c.name == "router=hash,seed=0"][0]
    allowed, why = allowed_difference(hash0, one, runs, tol=0.0)
    assert allowed == pytest.approx(2 * math.sqrt(2) * pooled) and "pooled" in why


def test_no_multi_seed_row_leaves_the_tolerance_alone(tmp_path):
    plan, runs = _plan_with_runs(tmp_path, {"router=topk,seed=0": 3.0})
    assert pooled_noise(plan, runs) == (None, 0)
    assert allowed_difference(plan.cells[0], plan, runs, tol=1e-3) == (
        1e-3, "--tol 0.001 (no row of the plan has two committed seeds)")


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


VERSIONS = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "python": "3.11.7", "lock_sha256": "abc",
            "code_commit": "1111111111aaaa", "code_dirty": False}


def _fake_run_task(calls: list, finals: dict):
    """A stand-in for runner.run_task: records (label, overrides, threads) and writes the re-run's
    summary (final numbers from `finals`; a label missing there fails) and cell.json."""
    def run_task(task, threads, repo, bases, *lock_fd):
        calls.append((task.label, task.overrides, threads))
        task.run_dir.mkdir(parents=True, exist_ok=True)
        final = finals.get(task.label)
        write_json_atomic(task.run_dir / "summary.json", {"status": "completed" if final else "failed",
                                                          "config_fingerprint": "f00", "final": final or {}})
        write_json_atomic(task.run_dir / "cell.json", {"versions": {**VERSIONS, "code_commit": "2222222222bbbb"}})
        return {"exit_code": 0 if final else 1}
    return run_task


def test_verify_runs_the_recorded_command_from_scratch_and_keeps_every_verdict(tmp_path, lock_dir, monkeypatch):
    plan, runs = _plan_with_runs(tmp_path, {"router=topk,seed=0": 3.0, "router=dense,seed=0": 3.5})
    topk, dense = "f/router=topk,seed=0", "f/router=dense,seed=0"
    recorded = ["router=topk", "seed=0", "moe.top_k=1"]  # the plan has changed since: no moe.top_k there
    write_json_atomic(runs / "f" / "router=topk,seed=0" / "cell.json",
                      {"overrides": recorded, "machine": {"threads_per_cell": 2}, "versions": VERSIONS})
    calls = []
    monkeypatch.setattr(verify, "run_task", _fake_run_task(calls, {topk: {"eval_loss": 3.0}}))  # dense fails
    out = tmp_path / "outputs" / "verify"
    v_topk, v_dense = verify_cells(plan, ROOT, runs.parent, ["f/*"], out_root=out, report=out / "verify.json",
                                   echo=lambda _: None)
    assert calls == [(topk, (*recorded, "trainer.resume=never"), 2),
                     (dense, ("router=dense", "seed=0", "trainer.resume=never"), 1)]
    assert v_topk.verdict == "bit-identical" and v_topk.rerun_dir == str(out / "f" / "router=topk,seed=0")
    assert any("overrides for this cell changed" in n for n in v_topk.notes)
    assert "same resolved config" in v_topk.notes and "same package versions and lock" in v_topk.notes
    assert "code: committed cell trained at 1111111111, re-run at 2222222222" in v_topk.notes
    # the failed re-run is a verdict of its own, not a crash; the cell without cell.json says so
    assert v_dense.verdict == "NOT reproduced" and v_dense.eval_loss[0] == 3.5 and math.isnan(v_dense.eval_loss[1])
    assert any("did not finish" in n for n in v_dense.notes) and any("no cell.json" in n for n in v_dense.notes)
    report = json.loads((out / "verify.json").read_text())
    assert [r["verdict"] for r in report] == ["bit-identical", "NOT reproduced"]
    assert report[1]["eval_loss"] == [3.5, None]  # NaN stored as null
    # the committed cells are untouched
    assert json.loads((runs / "f" / "router=topk,seed=0" / "summary.json").read_text()) == _summary(3.0)


def test_verify_never_writes_under_results_and_fresh_waits_for_the_lock(tmp_path, lock_dir, monkeypatch):
    plan, runs = _plan_with_runs(tmp_path, {"router=topk,seed=0": 3.0})
    with pytest.raises(PlanError, match="inside the results directory"):
        verify_cells(plan, ROOT, runs.parent, ["f/*"], out_root=runs.parent / "runs")
    calls = []
    monkeypatch.setattr(verify, "run_task", _fake_run_task(calls, {"f/router=topk,seed=0": {"eval_loss": 3.0}}))
    out = tmp_path / "verify"
    rerun = out / "f" / "router=topk,seed=0"
    rerun.mkdir(parents=True)
    (rerun / "partial.bin").write_text("another verify is writing this")
    held = runner._try_lock(runner.Task("x", (), rerun, rerun, None))  # another process trains into it
    try:
        (v,) = verify_cells(plan, ROOT, runs.parent, ["f/*"], out_root=out, fresh=True, echo=lambda _: None)
    finally:
        held.close()
    assert v.verdict == "could not run" and "another process" in v.notes[0] and not v.ok
    assert (rerun / "partial.bin").is_file() and calls == []
    # once it is free, --fresh empties the directory first and retrains
    (v,) = verify_cells(plan, ROOT, runs.parent, ["f/*"], out_root=out, fresh=True, echo=lambda _: None)
    assert v.verdict == "bit-identical" and not (rerun / "partial.bin").exists() and len(calls) == 1


def test_repeated_configs_are_compared_with_the_first_of_their_group(tmp_path):
    runs = tmp_path / "runs"

    def cell(label, fingerprint, loss, cv, status="completed"):
        write_json_atomic(runs / label / "summary.json", {"status": status, "config_fingerprint": fingerprint,
                                                          "final": {"eval_loss": loss, "eval/cv_mean": cv,
                                                                    "eval_runtime": loss * 7}})

    cell("baselines/router=spectra,seed=0", "aaa", 3.5, 0.4)
    cell("sweep_A/capacity=1.25,seed=0", "aaa", 3.5, 0.4)       # same config, same numbers
    cell("sweep_B/eps=0.05,seed=0", "aaa", 3.5, 0.41)           # same config, a routing metric differs
    cell("ablations/no_quota,seed=0", "bbb", 3.6, 0.5)
    cell("sweep_A/quota=false,seed=0", "bbb", 3.7, 0.5)         # same config, another loss
    cell("sweep_A/quota=false,seed=1", "ccc", 3.7, 0.5)         # alone: not a repeat
    cell("sweep_C/failed,seed=0", "aaa", 9.0, 9.0, status="failed")  # not committed as finished
    pairs = [(first, v.label, v.verdict) for first, v in verify.repeated_configs(runs)]
    assert pairs == [("ablations/no_quota,seed=0", "sweep_A/quota=false,seed=0", "NOT reproduced"),
                     ("baselines/router=spectra,seed=0", "sweep_A/capacity=1.25,seed=0", "bit-identical"),
                     ("baselines/router=spectra,seed=0", "sweep_B/eps=0.05,seed=0", "NOT reproduced")]
    md = verify.repeats_markdown(runs)
    assert md.startswith("**Reproducibility.** 3 committed cell(s) repeat") and "; 1 of them are bit-identical" in md
    assert "- sweep_A/capacity=1.25,seed=0 = baselines/router=spectra,seed=0: bit-identical\n" in md
    assert ("- sweep_A/quota=false,seed=0 = ablations/no_quota,seed=0: NOT reproduced "
            "(eval loss 3.6000000000 vs 3.7000000000; 1 of 2 metrics differ)") in md
    assert "(eval loss 3.5000000000 vs 3.5000000000; 1 of 2 metrics differ)" in md
    assert verify.repeats_markdown(tmp_path / "nothing") is None
