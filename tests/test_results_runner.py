"""`make results`: the plan (results/plan.yaml -> cells) and the runner (bases first, cells
`workers` at a time, one git commit per finished task, resume, locks), checked against
expectations written out here rather than recomputed with the code under test.

Every run goes to tmp_path: the runner's lock directory is redirected there too, so nothing
touches the repository's results/ or outputs/.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT
from spectra.contracts.rundir import write_json_atomic
from spectra.results import runner
from spectra.results.plan import Cell, PlanError, load_plan


def _write_plan(tmp_path: Path, text: str, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def lock_dir(tmp_path, monkeypatch):
    """The runner's lock files go under tmp_path (never the repository's outputs/)."""
    d = tmp_path / "locks"
    monkeypatch.setattr(runner, "LOCK_DIR", d)
    return d


# --------------------------------------------------------------------------------------------
# 1. Plan expansion


def test_plan_expands_to_the_exact_cells(tmp_path):
    path = _write_plan(tmp_path, """
        common: [experiment=results, trainer.max_steps=3]
        seeds: [0, 1]
        bases:
          tiny: [experiment=base_model, model=tiny]
        families:
          grid:
            base: tiny
            fixed: [router=spectra]
            axes:
              osr.epsilon: [0.05, 0.1]
              quota.enabled: [true, false]
            snapshots: true
          joint:
            seeds: [7]
            axes:
              length: ["data.max_seq_length=16 trainer.per_device_train_batch_size=64",
                       "data.max_seq_length=64  trainer.per_device_train_batch_size=16"]
        """)
    plan = load_plan(path)
    assert plan.path == path
    assert plan.bases == {"tiny": ("experiment=base_model", "model=tiny")}
    assert plan.family_names() == ["grid", "joint"]

    common = ("experiment=results", "trainer.max_steps=3")
    expected = []
    # grid: 2 epsilons x 2 quota settings x 2 (plan-wide) seeds, in itertools.product order,
    # bools lowercase (Hydra's spelling), names: swept keys sorted, seed among them.
    for eps in ("0.05", "0.1"):
        for quota in ("true", "false"):
            for seed in (0, 1):
                expected.append(Cell(
                    "grid", f"osr.epsilon={eps},quota.enabled={quota},seed={seed}",
                    (*common, "router=spectra", f"osr.epsilon={eps}", f"quota.enabled={quota}", f"seed={seed}"),
                    "tiny", True))
    # joint: one value = two overrides varying together; the family's own seeds replace the plan's.
    for length, batch in (("16", "64"), ("64", "16")):
        expected.append(Cell(
            "joint", f"data.max_seq_length={length},seed=7,trainer.per_device_train_batch_size={batch}",
            (*common, f"data.max_seq_length={length}", f"trainer.per_device_train_batch_size={batch}", "seed=7"),
            None, False))
    assert plan.cells == expected
    assert len([c for c in plan.cells if c.family == "grid"]) == 2 * 2 * 2
    assert plan.cells[0].run_dir(tmp_path / "runs") == tmp_path / "runs" / "grid" / "osr.epsilon=0.05,quota.enabled=true,seed=0"


def test_repo_plan_loads_with_seeds_and_known_routers():
    from spectra.routers_catalog import ROUTER_NAMES

    plan = load_plan(ROOT / "results" / "plan.yaml")
    for family in ("baselines", "ablations"):
        seeds = {o for c in plan.cells if c.family == family for o in c.overrides if o.startswith("seed=")}
        assert len(seeds) >= 3, f"{family}: seeds {sorted(seeds)}"
    routers = {o.split("=", 1)[1] for c in plan.cells if c.family == "baselines" for o in c.overrides
               if o.startswith("router=")}
    assert routers and routers <= set(ROUTER_NAMES), sorted(routers - set(ROUTER_NAMES))
    assert set(plan.bases) >= {c.base for c in plan.cells if c.base}


def _same(config_value, override_value: str) -> bool:
    try:
        return float(config_value) == float(override_value)
    except (TypeError, ValueError):
        return str(config_value).lower() == override_value.lower()


def test_every_repo_plan_cell_composes():
    """Each cell's overrides compose with conf/ and pass validation (no model is built). A
    cell's seed is a plain integer, so each distinct set of the other overrides is composed
    once (with one of its seeds) and every seed value once."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from spectra.config import register_configs, validate

    plan = load_plan(ROOT / "results" / "plan.yaml")
    todo: dict[tuple[str, ...], Cell] = {}
    for c in [*plan.cells, *(Cell("base", name, ovs, None, False) for name, ovs in plan.bases.items())]:
        todo.setdefault(tuple(o for o in c.overrides if not o.startswith("seed=")), c)
    seeds = {o for c in plan.cells for o in c.overrides if o.startswith("seed=")}
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf")):
        for cell in todo.values():
            overrides = list(cell.overrides)
            cfg = compose("config", overrides=overrides)
            cfg.output_dir = "composed"  # ${hydra:runtime.output_dir} needs a Hydra app
            try:
                validate(cfg)
            except Exception as e:  # noqa: BLE001 -- name the cell
                pytest.fail(f"{cell.family}/{cell.name}: {overrides}: {e}")
            for o in overrides:
                key, value = o.split("=", 1)
                if key == "router":
                    assert cfg.router.name == value, (cell.family, cell.name)
                elif key == "model":
                    assert cfg.model.name == value, (cell.family, cell.name)
                elif "." in key:  # a plain key=value lands in the config as given
                    assert _same(OmegaConf.select(cfg, key), value), (cell.family, cell.name, o)
        for seed in seeds:
            assert compose("config", overrides=["experiment=results", seed]).seed == int(seed.split("=")[1])


# --------------------------------------------------------------------------------------------
# 2. Bad plans


GOOD_FAMILY = textwrap.dedent("""
    common: [experiment=results]
    seeds: [0]
    bases:
      tiny: [experiment=base_model]
    families:
      g:
        base: tiny
        axes:
          router: [topk, dense]
    """)


@pytest.mark.parametrize("text, key, also", [
    (GOOD_FAMILY + "    colour: red\n", "families.g.colour", "unknown key"),
    (GOOD_FAMILY.replace("base: tiny", "base: huge"), "families.g.base", "huge"),
    (GOOD_FAMILY.replace("seeds: [0]", "seeds: [0, one]"), "seeds", "integers"),
    (GOOD_FAMILY.replace("base: tiny", "base: tiny\n    seeds: [1.5]"), "families.g.seeds", "integers"),
    (GOOD_FAMILY.replace("seeds: [0]", "seeds: [true]"), "seeds", "integers"),
    (GOOD_FAMILY.replace("[topk, dense]", "[]"), "families.g.axes.router", "non-empty"),
    (GOOD_FAMILY.replace("[topk, dense]", "[topk, topk]"), "families.g", "router=topk,seed=0"),
    # a volatile key is left out of the directory name: both values land in seed=0
    (GOOD_FAMILY.replace("router: [topk, dense]", "trainer.resume: [auto, never]"), "families.g", "seed=0"),
    (GOOD_FAMILY + "famlies: {}\n", "famlies", "unknown key"),
])
def test_bad_plan_names_file_and_key(tmp_path, text, key, also):
    path = _write_plan(tmp_path, text)
    with pytest.raises(PlanError) as info:
        load_plan(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: {key}: "), msg
    assert also in msg, msg


def test_cli_status_of_a_bad_plan_exits_2_naming_the_key(tmp_path):
    path = _write_plan(tmp_path, GOOD_FAMILY.replace("base: tiny", "base: huge"))
    proc = subprocess.run([sys.executable, "-m", "spectra.results", "--plan", str(path),
                           "--root", str(tmp_path / "results"), "status"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "families.g.base" in proc.stderr and str(path) in proc.stderr, proc.stderr
    assert not (tmp_path / "results").exists()


# --------------------------------------------------------------------------------------------
# 3./4. The scheduler with train.py replaced by a recorder (fast): locks, races, threads


def _fake_train(calls: list, fail: set[str] = frozenset()):
    """A stand-in for runner.run_task: records (label, threads), writes a completed summary."""
    def run_task(task, threads, repo, bases, *lock_fd):
        calls.append((task.label, threads))
        if task.label in fail:
            return {"exit_code": 1, "wall_time_s": 0.0}
        task.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(task.run_dir / "summary.json", {"status": "completed"})
        return {"exit_code": 0, "wall_time_s": 0.0}
    return run_task


TWO_CELLS = """
        seeds: [0]
        bases:
          tiny: [experiment=base_model]
        families:
          f:
            axes:
              router: [topk, dense]
"""


def test_a_cell_locked_by_another_process_is_left_to_it(tmp_path, lock_dir, monkeypatch):
    plan = load_plan(_write_plan(tmp_path, TWO_CELLS))
    res = tmp_path / "res"
    topk, dense = (runner.cell_task(c, res / "runs") for c in plan.cells)
    assert topk.label == "f/router=topk,seed=0"
    lock_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a');"
         " fcntl.flock(f, fcntl.LOCK_EX); f.write('holder\\n'); f.flush(); print('locked', flush=True);"
         " time.sleep(120)", str(runner._lock_path(topk))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        calls: list = []
        monkeypatch.setattr(runner, "run_task", _fake_train(calls))
        failed = runner.run_plan(plan, ROOT, res, workers=2, commit=False, base_root=tmp_path / "base")
        assert failed == []  # left to the other process: not trained, not failed
        assert [label for label, _ in calls] == [dense.label]
        assert not topk.run_dir.exists()
        # the other process's lock file (its pid line) is left as it was
        assert runner._lock_path(topk).read_text() == "holder\n"
    finally:
        holder.kill()
        holder.wait()
    # once the other process is gone, the cell is this one's to train
    calls.clear()
    assert runner.run_plan(plan, ROOT, res, workers=2, commit=False, base_root=tmp_path / "base") == []
    assert [label for label, _ in calls] == [topk.label]


def test_a_cell_another_process_finished_meanwhile_is_not_retrained(tmp_path, lock_dir, monkeypatch):
    """The plan is scanned once, at the start; a cell another process finishes (and unlocks)
    before this one reaches it must not be trained again."""
    plan = load_plan(_write_plan(tmp_path, TWO_CELLS))
    res = tmp_path / "res"
    topk, dense = (runner.cell_task(c, res / "runs") for c in plan.cells)
    real_lock = runner._try_lock

    def lock_after_the_other_finished(task):
        if task == dense:  # the other process trained it while this one was busy, then let go
            dense.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(dense.run_dir / "summary.json", {"status": "completed", "by": "other"})
        return real_lock(task)

    calls: list = []
    monkeypatch.setattr(runner, "run_task", _fake_train(calls))
    monkeypatch.setattr(runner, "_try_lock", lock_after_the_other_finished)
    assert runner.run_plan(plan, ROOT, res, workers=1, commit=False, base_root=tmp_path / "base") == []
    assert [label for label, _ in calls] == [topk.label]
    assert json.loads((dense.run_dir / "summary.json").read_text())["by"] == "other"


def test_bases_first_then_cells_and_a_failed_base_fails_its_cells(tmp_path, lock_dir, monkeypatch):
    """A base trains before its cells (which then share the cores, `workers` at a time); a failed
    base fails its cells without running them."""
    plan = load_plan(_write_plan(tmp_path, TWO_CELLS.replace("f:\n", "f:\n            base: tiny\n")))
    res = tmp_path / "res"
    per_cell = max(1, (os.cpu_count() or 1) // 2)
    calls: list = []
    monkeypatch.setattr(runner, "run_task", _fake_train(calls, fail={"base tiny"}))
    failed = runner.run_plan(plan, ROOT, res, workers=2, commit=False, base_root=tmp_path / "base")
    assert [label for label, _ in calls] == ["base tiny"]
    assert sorted(failed) == [f"base tiny: exit 1, see {tmp_path / 'base' / 'tiny' / 'stdout.log'}",
                              "f/router=dense,seed=0 (its base tiny failed)", "f/router=topk,seed=0 (its base tiny failed)"]
    calls.clear()
    monkeypatch.setattr(runner, "run_task", _fake_train(calls))
    assert runner.run_plan(plan, ROOT, res, workers=2, commit=False, base_root=tmp_path / "base") == []
    assert calls[0][0] == "base tiny"
    assert sorted(calls[1:]) == [("f/router=dense,seed=0", per_cell), ("f/router=topk,seed=0", per_cell)]
    calls.clear()
    assert runner.run_plan(plan, ROOT, res, workers=2, commit=False, base_root=tmp_path / "base") == []
    assert calls == []  # all done


def _git_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for args in (["init", "-q"], ["config", "user.name", "Test"], ["config", "user.email", "test@example.com"],
                 ["config", "commit.gpgsign", "false"], ["commit", "-q", "--allow-empty", "-m", "init"]):
        subprocess.run(["git", *args], cwd=path, check=True, capture_output=True)
    return path


def test_cell_record_names_the_code_the_training_started_from(tmp_path, lock_dir, monkeypatch):
    """HEAD moves while a cell trains (every finished cell is a commit); cell.json keeps the commit
    the training started from, and says whether src/ had uncommitted edits then."""
    repo = _git_repo(tmp_path / "repo")
    start = _git(repo, "rev-parse", "HEAD").strip()
    task = runner.cell_task(load_plan(_write_plan(tmp_path, TWO_CELLS)).cells[0], tmp_path / "res" / "runs")
    script = textwrap.dedent(f"""
        import json, pathlib, subprocess
        subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "meanwhile"], cwd={str(repo)!r}, check=True)
        pathlib.Path({str(task.run_dir)!r}, "summary.json").write_text(json.dumps({{"status": "completed"}}))
    """)
    monkeypatch.setattr(runner, "command_of", lambda t: [sys.executable, "-c", script])
    rec = runner.run_task(task, 1, repo, {})
    assert _git(repo, "rev-parse", "HEAD").strip() != start
    assert rec["exit_code"] == 0 and rec["versions"]["code_commit"] == start
    assert rec["versions"]["code_dirty"] is False
    assert json.loads((task.run_dir / "cell.json").read_text())["versions"]["code_commit"] == start
    (repo / "src").mkdir()
    (repo / "src" / "m.py").write_text("x = 1\n")
    _git(repo, "add", "src/m.py")
    _git(repo, "commit", "-q", "-m", "code")
    (repo / "src" / "m.py").write_text("x = 2\n")  # an edit the cell runs but no commit holds
    assert runner.run_task(task, 1, repo, {})["versions"]["code_dirty"] is True


def test_an_orphan_is_committed_with_an_unknown_exit_code(tmp_path, lock_dir):
    """A cell whose train.py finished after its driver died: committed at the next start, its
    record marked recorded_after, its exit code unknown (None), not a made-up 0."""
    res = _git_repo(tmp_path / "results")
    plan = load_plan(_write_plan(tmp_path, TWO_CELLS))
    tasks = [runner.cell_task(c, res / "runs") for c in plan.cells]
    tasks[0].run_dir.mkdir(parents=True)
    write_json_atomic(tasks[0].run_dir / "summary.json", {"status": "completed", "started": 100.0, "wall_time_s": 5.0})
    tasks[1].run_dir.mkdir(parents=True)
    write_json_atomic(tasks[1].run_dir / "summary.json", {"status": "running"})  # not finished: left alone
    recorder = runner.GitRecorder(res, True)
    assert runner.record_orphans(tasks, recorder, res, {}) == 1
    rec = json.loads((tasks[0].run_dir / "cell.json").read_text())
    assert rec["exit_code"] is None and rec["recorded_after"] is True and rec["wall_time_s"] == 5.0
    assert "runs/f/router=topk,seed=0/cell.json" in _git(res, "ls-files").split()
    assert runner.record_orphans(tasks, recorder, res, {}) == 0  # already committed


def test_status_counts_every_cell_once(tmp_path, capsys):
    """completed + failed + incomplete (running or stopped) + not started = cells, per family."""
    plan = load_plan(_write_plan(tmp_path, TWO_CELLS.replace("[topk, dense]", "[topk, dense, hash, spectra, aux_free]")))
    root = tmp_path / "res"
    # the fourth cell is training: its run directory has train.py's log but no summary.json yet
    for cell, status in zip(plan.cells, ["completed", "failed", "running", "log only", None]):
        if status:
            d = cell.run_dir(root / "runs")
            d.mkdir(parents=True)
            if status == "log only":
                (d / "stdout.log").write_text("step 10\n")
            else:
                write_json_atomic(d / "summary.json", {"status": status, "wall_time_s": 120.0})
    (row,) = runner.status_rows(plan, root)
    assert row == {"family": "f", "cells": 5, "completed": 1, "failed": 1, "incomplete": 2, "not started": 1,
                   "wall_time_min": 2.0}
    from spectra.results.__main__ import main

    main(["--plan", str(plan.path), "--root", str(root), "status"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["family", "cells", "completed", "failed", "incomplete", "not", "started", "wall_time_min"]
    assert lines[-1].split() == ["all", "5", "1", "1", "2", "1", "2.0"]  # the total row sums every column


# --------------------------------------------------------------------------------------------
# 3. End to end: real train.py runs, real commits


TINY = ["trainer.max_steps=2", "trainer.eval_steps=2", "trainer.save_steps=2", "trainer.logging_steps=1",
        "data.max_train_samples=16", "data.max_eval_samples=4", "data.max_seq_length=64",
        "trainer.per_device_train_batch_size=2", "trainer.per_device_eval_batch_size=4"]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout


def _e2e_plan(tmp_path: Path, broken: bool = False) -> Path:
    base_model = tmp_path / "base" / "tiny" / "model"
    cell = ["experiment=results", f"model.pretrained={base_model}", "moe.num_experts=4", *TINY]
    text = {"seeds": [0],
            "bases": {"tiny": ["experiment=base_model", "model.arch.num_hidden_layers=2", *TINY]},
            "families": {"routers": {"base": "tiny", "fixed": cell, "axes": {"router": ["topk", "dense"]}}}}
    if broken:
        text["families"]["broken"] = {"base": "tiny", "fixed": [*cell, "moe.top_k=99"], "axes": {"router": ["topk"]}}
    path = tmp_path / ("plan_broken.yaml" if broken else "plan.yaml")
    path.write_text(json.dumps(text))  # JSON is YAML
    return path


@pytest.mark.slow
def test_run_plan_end_to_end_commits_resumes_and_reports_failures(tmp_path, lock_dir):
    res = tmp_path / "results"
    res.mkdir()
    for args in (["init", "-q"], ["config", "user.name", "Test"], ["config", "user.email", "test@example.com"],
                 ["config", "commit.gpgsign", "false"], ["commit", "-q", "--allow-empty", "-m", "init"]):
        _git(res, *args)
    init = _git(res, "rev-parse", "HEAD").strip()
    base_root = tmp_path / "base"
    plan = load_plan(_e2e_plan(tmp_path))
    topk_dir = res / "runs" / "routers" / "router=topk,seed=0"
    dense_dir = res / "runs" / "routers" / "router=dense,seed=0"

    assert runner.run_plan(plan, ROOT, res, workers=2, base_root=base_root) == []

    # one commit per finished task (base + 2 cells), each holding only that task's small files
    commits = _git(res, "rev-list", f"{init}..HEAD").split()
    assert len(commits) == 3
    task_dirs = {"base/tiny", "runs/routers/router=topk,seed=0", "runs/routers/router=dense,seed=0"}
    seen = set()
    for c in commits:
        files = _git(res, "show", "--name-only", "--format=", c).split()
        dirs = {d for d in task_dirs if all(f.startswith(d + "/") for f in files)}
        assert len(dirs) == 1, files
        seen |= dirs
        d = dirs.pop()
        assert {f"{d}/summary.json", f"{d}/cell.json", f"{d}/metrics.jsonl", f"{d}/.hydra/config.yaml"} <= set(files)
    assert seen == task_dirs
    tracked = _git(res, "ls-files").split()
    assert not [f for f in tracked if "checkpoints/" in f or "/model/" in f or f.endswith((".safetensors", "stdout.log"))]
    assert (topk_dir / "model").is_dir() and (topk_dir / "checkpoints").is_dir()  # there, just not committed

    # cell.json: the exact command, its exit code, the base's weights by hash
    weights = base_root / "tiny" / "model" / "model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    for cell in plan.cells:
        d = res / "runs" / cell.family / cell.name
        rec = json.loads((d / "cell.json").read_text())
        assert shlex.split(rec["command"]) == ["python", "train.py", *cell.overrides, f"hydra.run.dir='{d}'"]
        assert rec["exit_code"] == 0
        assert rec["base"]["name"] == "tiny" and rec["base"]["model_sha256"] == sha
        assert json.loads((d / "summary.json").read_text())["status"] == "completed"
    base_rec = json.loads((res / "base" / "tiny" / "cell.json").read_text())
    assert base_rec["model_sha256"] == sha and base_rec["exit_code"] == 0
    assert shlex.split(base_rec["command"])[2:] == [*plan.bases["tiny"], f"hydra.run.dir='{base_root / 'tiny'}'"]

    # a second run finds everything done: nothing retrained, nothing committed
    summaries = [base_root / "tiny" / "summary.json", topk_dir / "summary.json", dense_dir / "summary.json"]
    logs = [base_root / "tiny" / "stdout.log", topk_dir / "stdout.log", dense_dir / "stdout.log"]
    before = [p.stat().st_mtime_ns for p in summaries]
    log_sizes = [p.stat().st_size for p in logs]
    head = _git(res, "rev-parse", "HEAD")
    assert runner.run_plan(plan, ROOT, res, workers=2, base_root=base_root) == []
    assert _git(res, "rev-parse", "HEAD") == head
    assert [p.stat().st_mtime_ns for p in summaries] == before
    assert [p.stat().st_size for p in logs] == log_sizes

    # an unfinished cell (no summary) is trained again and committed; a failing cell is reported
    # with its log and not committed; nothing else runs
    (topk_dir / "summary.json").unlink()
    broken = load_plan(_e2e_plan(tmp_path, broken=True))
    bad = [c for c in broken.cells if c.family == "broken"][0]
    bad_log = res / "runs" / "broken" / bad.name / "stdout.log"
    failed = runner.run_plan(broken, ROOT, res, workers=2, base_root=base_root)
    assert len(failed) == 1 and failed[0].startswith(f"broken/{bad.name}: exit "), failed
    assert failed[0].endswith(f", see {bad_log}") and f"broken/{bad.name}: exit 0," not in failed[0], failed
    assert "top_k" in bad_log.read_text()
    new = _git(res, "rev-list", f"{head.strip()}..HEAD").split()
    assert len(new) == 1
    files = _git(res, "show", "--name-only", "--format=", new[0]).split()
    assert files and all(f.startswith("runs/routers/router=topk,seed=0/") for f in files), files
    assert "runs/routers/router=topk,seed=0/summary.json" in files
    assert json.loads((topk_dir / "summary.json").read_text())["status"] == "completed"
    assert [p.stat().st_mtime_ns for p in (summaries[0], summaries[2])] == [before[0], before[2]]
    assert not [f for f in _git(res, "ls-files").split() if f.startswith("runs/broken/")]

    # `results verify`: the committed topk cell trained again (from scratch, elsewhere) is
    # bit-identical in every loss and routing metric, and the committed files are untouched
    from spectra.results.verify import verify_cells

    committed_files = {p: p.read_bytes() for p in topk_dir.rglob("*") if p.is_file()}
    out = tmp_path / "verify"
    (v,) = verify_cells(plan, ROOT, res, ["routers/router=topk,*"], out_root=out, base_root=base_root)
    assert v.verdict == "bit-identical", v
    assert v.compared > 20 and v.differing == 0 and not v.missing
    assert {"same resolved config", "same base weights", "same package versions and lock"} <= set(v.notes), v.notes
    a = json.loads((topk_dir / "summary.json").read_text())["final"]
    b = json.loads((out / "routers" / "router=topk,seed=0" / "summary.json").read_text())["final"]
    domains = [k for k in a if k.startswith("eval_loss_")]
    assert domains and a["eval_loss"] == b["eval_loss"] and all(a[k] == b[k] for k in domains)
    assert {p: p.read_bytes() for p in topk_dir.rglob("*") if p.is_file()} == committed_files
