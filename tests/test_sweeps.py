"""Sweeps: grids as Hydra multirun, deterministic cell directories, resume after a kill,
SLURM launcher config -> sbatch script, submitit local executor, several processes per trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainerCallback

from conftest import ROOT, TINY_TRAIN, assert_ok, run_cli
from spectra.config import cell_dirname, load_config, validate
from spectra.contracts.rundir import read_jsonl

TESTS = Path(__file__).resolve().parent

# cpu_tiny shrunk to seconds per cell (the sweep's scale stays cpu_tiny).
TINY = [*TINY_TRAIN, "trainer.save_steps=2"]


_ok = assert_ok


def _summaries(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}


# ---------------------------------------------------------------- fast: configs and names


@pytest.mark.parametrize("sweep", ["A", "B", "C", "D", "E", "ablations", "baselines"])
@pytest.mark.parametrize("scale", ["cpu_tiny", "paper"])
def test_every_sweep_composes_at_every_scale(sweep, scale):
    cfg = validate(load_config([f"+sweep={sweep}", f"scale={scale}"]))
    assert cfg.sweep_name == sweep and cfg.scale_name == scale
    if scale == "paper":
        assert cfg.moe.num_experts == 32 and cfg.moe.top_k == 4 and cfg.router.router_dim == 32


def test_sweep_grids_match_the_paper():
    from hydra import compose, initialize_config_dir

    from spectra.config import config_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir())):
        a = compose("config", ["+sweep=A"], return_hydra_config=True).hydra.sweeper.params
        b = compose("config", ["+sweep=B"], return_hydra_config=True).hydra.sweeper.params
        e = compose("config", ["+sweep=E", "seeds=[3,4]"], return_hydra_config=True).hydra.sweeper.params
    assert a["quota.capacity_factor"] == "1.0,1.25,1.5,2.0" and a["quota.enabled"] == "false,true"
    assert b["osr.epsilon"] == "0.03,0.05,0.1,0.2" and b["osr.iterations"] == "2,3,5,8"
    # cpu_tiny keeps the paper's 2k:8k:32k:128k ratios; seeds feed the seed axis
    assert e["data.max_seq_length"] == "16,64,256,1024" and e["seed"] == "3,4"


def test_grid_size_counts_every_cell_of_a_sweep():
    """The progress line's denominator: sweep A is 2 (quota) x 4 (alpha) x len(seeds) cells,
    times any extra command-line sweep."""
    from hydra import compose, initialize_config_dir

    from spectra.config import config_dir, register_configs
    from spectra.sweep.cells import grid_size

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir())):
        a = compose("config", ["+sweep=A", "seeds=[0,1]"], return_hydra_config=True)
        a_x = compose("config", ["+sweep=A", "seeds=[0]"], return_hydra_config=True)
        opt = compose("config", ["+sweep=search_quota"], return_hydra_config=True)
    assert grid_size(a) == 2 * 4 * 2
    a_x.hydra.overrides.task.append("moe.top_k=1,2,4")  # as `python train.py -m +sweep=A moe.top_k=1,2,4`
    assert grid_size(a_x) == 2 * 4 * 1 * 3
    assert grid_size(opt) is None  # Optuna counts against n_trials itself


def test_cell_dirname_is_deterministic_readable_and_bounded():
    ovr = ["+sweep=C", "osr.repulsion_weight=0.3", "seed=1", "trainer.max_steps=4"]
    name = cell_dirname(ovr, {"osr.repulsion_weight": "0,0.3"})
    assert name == "osr.repulsion_weight=0.3,seed=1,trainer.max_steps=4"  # axes first, sweep key dropped
    assert cell_dirname(list(reversed(ovr)), {"osr.repulsion_weight": "x"}) == name
    long = [f"data.key{i}=value{i}" for i in range(40)] + ["seed=0"]
    n1, n2 = cell_dirname(long), cell_dirname(long[:-1] + ["seed=1"])
    assert len(n1) <= 120 and n1 != n2 and n1.startswith("seed=0")


def test_sbatch_script_has_the_requested_resources():
    from spectra.sweep.slurm import launcher_params, sbatch_preview

    params = launcher_params(["hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
                              "hydra.launcher.nodes=2", "hydra.launcher.timeout_min=90",
                              "hydra.launcher.account=proj42", "hydra.launcher.constraint=a100",
                              "hydra.launcher.mem_gb=128"])
    script = sbatch_preview(params)
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=4", "#SBATCH --nodes=2", "#SBATCH --time=90",
                 "#SBATCH --account=proj42", "#SBATCH --constraint=a100", "#SBATCH --mem=128GB"):
        assert line in script, f"{line!r} missing from:\n{script}"


# ---------------------------------------------------------------- slow: real multiruns

@pytest.mark.slow
def test_repulsion_multirun_three_cells_with_different_gram_metrics(tmp_path):
    sweep = tmp_path / "c"
    proc = run_cli(["train.py", "-m", "router=spectra", "osr.repulsion_weight=0,0.3,1.0", *TINY,
                    f"hydra.sweep.dir={sweep}"])
    _ok(proc)
    sums = _summaries(sweep)
    assert len(sums) == 3 and all(s["status"] == "completed" for s in sums.values())
    weights = sorted(float(n.split("osr.repulsion_weight=")[1].split(",")[0]) for n in sums)
    assert weights == [0.0, 0.3, 1.0]
    for name in sums:  # the weight is recorded in the run's resolved config
        cfg = (sweep / name / ".hydra" / "config.yaml").read_text()
        assert f"repulsion_weight: {name.split('osr.repulsion_weight=')[1].split(',')[0]}" in cfg
    gram = {n: (s.get("monitor") or {}).get("gram_orthogonality_mean", s["final"].get("eval/ortho_loss_mean"))
            for n, s in sums.items()}
    assert all(v is not None for v in gram.values()) and len(set(gram.values())) == 3
    assert "3 cells" in proc.stdout and "0 skipped" in proc.stdout  # the end-of-sweep report
    # the plan names the cells as the jobs' own cell_dirname resolver did (an axis swept on the command line)
    plan = json.loads((sweep / "sweep_plan.json").read_text())
    assert sorted(c["dir"] for c in plan["planned"]) == sorted(sums)
    for i in (1, 2, 3):  # progress after every cell
        assert f"sweep progress: {i}/3 cells (0 skipped, {i} ran, 0 failed)" in proc.stdout


class KillDriverInTheSecondCell(TrainerCallback):
    """Test instrument (a `trainer.callbacks` entry): SIGKILL this process, the sweep driver (the
    basic launcher runs each cell in it), after the training log of step 2 of a cell that started
    once another cell of the sweep was complete (its metrics.jsonl already holds step 1). Once: the
    `marker` file it writes first disarms it, so a re-run with the very same command line trains on."""

    def __init__(self, marker: str):
        self.marker = Path(marker)
        self.armed = False

    def on_train_begin(self, args, state, control, **kwargs):
        sweep = Path(args.output_dir).parents[1]  # <sweep>/<cell>/checkpoints
        self.armed = not self.marker.exists() and any(sweep.glob("*/summary.json"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.armed and logs and "loss" in logs and state.global_step == 2:
            self.marker.write_text(f"killed at step {state.global_step}\n")
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_killed_sweep_rerun_completes_only_the_missing_cells(tmp_path):
    """SIGKILL the driver while the second of three cells trains; the re-run skips the first."""
    sweep = tmp_path / "sweeps"
    killer = f"trainer.callbacks=[{{_target_:test_sweeps.KillDriverInTheSecondCell,marker:{tmp_path / 'killed'}}}]"
    args = [sys.executable, "train.py", "-m", "+sweep=C", "osr.repulsion_weight=0,0.5,1.0", "seeds=[0]", *TINY,
            "trainer.max_steps=4", killer, f"hydra.sweep.dir={sweep}"]
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)}
    driver = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == -signal.SIGKILL, driver.returncode
    assert (tmp_path / "killed").read_text() == "killed at step 2\n"
    assert len([r for r in read_jsonl(sweep / "sweep_progress.jsonl") if r["status"] == "completed"]) == 1
    assert len(list(sweep.glob("*/metrics.jsonl"))) == 2  # the second cell had started training
    first = next(sweep.glob("*/summary.json"))
    first_mtime = first.stat().st_mtime
    assert len(list(sweep.glob("*/summary.json"))) == 1  # the killed cell has no summary: not done

    proc = run_cli(args[1:], env=env)
    _ok(proc)
    assert "3 cells" in proc.stdout and "1 skipped" in proc.stdout and "2 ran" in proc.stdout
    sums = _summaries(sweep)
    assert len(sums) == 3 and all(s["status"] == "completed" for s in sums.values())
    assert first.stat().st_mtime == first_mtime  # the finished cell was not touched


@pytest.mark.slow
def test_sweep_runs_through_submitit_local_executor(tmp_path):
    sweep = tmp_path / "local"
    proc = run_cli(["train.py", "-m", "hydra/launcher=local", "router=topk", "moe.top_k=1,2", *TINY,
                    f"hydra.sweep.dir={sweep}"])
    _ok(proc)
    sums = _summaries(sweep)
    assert len(sums) == 2 and all(s["status"] == "completed" for s in sums.values())
    assert list(sweep.glob(".submitit/*/*_log.out"))  # it really went through submitit


@pytest.mark.slow
def test_trial_with_two_processes_reports_one_objective(tmp_path):
    run_dir = tmp_path / "np2"
    proc = run_cli(["train.py", "experiment=demo", *TINY, "monitor.enabled=false", "trainer.nproc_per_node=2",
                    f"hydra.run.dir={run_dir}"], env={"OMP_NUM_THREADS": "1"})
    _ok(proc)
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["world_size"] == 2
    a, b = s["param_checksum_per_rank"]
    assert a == pytest.approx(b, rel=1e-9)
    assert len(list(tmp_path.iterdir())) == 1  # one run directory, not one per rank


# ---------------------------------------------------------------- sweep reporting


def _multirun_config(sweep: Path, task: list[str], params: dict | None = None):
    from omegaconf import OmegaConf

    return OmegaConf.create({"hydra": {
        "sweep": {"dir": str(sweep)},
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": params or {}},
        "overrides": {"task": task}}})


def test_workers_sharing_a_sweep_directory_each_count_their_own_cells(tmp_path, monkeypatch, capsys):
    """Two drivers on one sweep directory, their cells interleaved in time: each end-of-sweep line
    counts the 2 cells it launched, not all 4 (records carry the driver's $SPECTRA_SWEEP_WORKER)."""
    import importlib

    from spectra.sweep.cells import WORKER_ENV, SweepProgressCallback

    run_mod = importlib.import_module("spectra.train.run")  # the module (spectra.train.run is also a function)
    monkeypatch.setenv(WORKER_ENV, "")  # restored after the test (on_multirun_start exports the id)
    sweep = tmp_path / "shared"
    monkeypatch.setattr(run_mod, "_sweep_dir", lambda: sweep)
    a, b = SweepProgressCallback(), SweepProgressCallback()
    cfg_a = _multirun_config(sweep, ["router=topk", "moe.top_k=1,2"])
    cfg_b = _multirun_config(sweep, ["router=topk", "moe.top_k=3,4"])
    a.on_multirun_start(cfg_a)
    b.on_multirun_start(cfg_b)
    assert a.worker != b.worker
    for worker, cell, status in [(a, "k1", "completed"), (b, "k3", "completed"), (a, "k2", "failed"), (b, "k4", "skipped")]:
        monkeypatch.setenv(WORKER_ENV, worker.worker)  # what each driver's job process inherits
        run_mod.record_progress(sweep / cell, status)
    capsys.readouterr()
    a.on_job_end(cfg_a)
    assert "sweep progress: 2/2 cells (0 skipped, 1 ran, 1 failed)" in capsys.readouterr().out
    a.on_multirun_end(cfg_a)
    b.on_multirun_end(cfg_b)
    out = capsys.readouterr().out
    assert "2 cells — 0 skipped (already complete), 1 ran, 1 failed" in out
    assert "2 cells — 1 skipped (already complete), 1 ran, 0 failed" in out
    # the plan lists both workers' cells (for the analysis' "not started" rows)
    from spectra.sweep.cells import read_plan

    assert sorted(c["dir"] for c in read_plan(sweep)["planned"]) == [f"moe.top_k={k},router=topk" for k in (1, 2, 3, 4)]


def test_cells_of_the_plan_that_never_started_are_listed_as_not_started(tmp_path, monkeypatch):
    """sweep_plan.json lists 3 cells; one completed, one failed, one never started: the runs frame,
    the problems list and the comparison table all show the third."""
    import yaml

    from spectra.analysis.collect import collect, problems
    from spectra.analysis.tables import comparison_frame
    from spectra.sweep.cells import WORKER_ENV, SweepProgressCallback

    monkeypatch.setenv(WORKER_ENV, "")
    sweep = tmp_path / "sw"
    cfg = _multirun_config(sweep, ["router=topk", "seed=0", "moe.top_k=1,2,4"])
    SweepProgressCallback().on_multirun_start(cfg)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for k, status in ((1, "completed"), (2, "failed")):
        d = sweep / f"moe.top_k={k},seed=0,router=topk"
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["router=topk", "seed=0", f"moe.top_k={k}"]))
        (d / "summary.json").write_text(json.dumps({"status": status, "final": {"eval_loss": 3.0}, "error": "boom"}))
    runs, _ = collect([sweep])
    by_status = dict(zip(runs["variant"], runs["status"]))
    assert by_status == {"moe.top_k=1,router=topk": "completed", "moe.top_k=2,router=topk": "failed",
                         "moe.top_k=4,router=topk": "not started"}
    missing = runs[runs["status"] == "not started"].iloc[0]
    assert missing["run_dir"] == str((sweep / "moe.top_k=4,seed=0,router=topk").resolve()) and missing["seed"] == 0
    p = problems(runs)
    assert "not started" in set(p["problem"]) and "sweep_plan.json" in p[p["problem"] == "not started"].iloc[0]["reason"]
    frame = comparison_frame(runs)
    row = next(i for i in frame.index if "moe.top_k=4" in str(i))
    assert frame.loc[row, "not started"] == "1" and frame.loc[row, "completed"] == "0"


@pytest.mark.slow
def test_a_sweep_with_failed_cells_ends_with_one_summary_line(tmp_path):
    """Both cells fail (a missing data file): the table is printed, then one `error:` line naming
    the cells and their errors instead of Hydra's traceback; exit status 1."""
    sweep = tmp_path / "fail"
    proc = run_cli(["train.py", "-m", "router=topk", "data.path=/nonexistent/a.txt,/nonexistent/b.txt",
                    f"hydra.sweep.dir={sweep}"], timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: sweep")]
    assert len(errors) == 1 and "2 cells failed" in errors[0]
    assert "data.path=_nonexistent_a.txt" in errors[0] and "FileNotFoundError: data.path: no such file: /nonexistent/a.txt" in errors[0]
    assert "| failed |" in proc.stdout or "failed" in proc.stdout  # the table came first


def _noop(x):
    return x


def test_sbatch_preview_is_what_submitit_submits_for_a_grid(tmp_path, monkeypatch, capsys):
    """A 3-cell grid with array_parallelism=2: the preview's script equals the one submitit's own
    `map_array` hands to sbatch (a stand-in sbatch records it), array line, job name and the
    `_submit` command included; the preview then lists each array task's overrides."""
    import submitit

    import slurm_stub
    from spectra.sweep.slurm import _executor, launcher_params, main, sbatch_preview

    env = slurm_stub.install(tmp_path / "bin", tmp_path / "state")
    for k, v in {**env, slurm_stub.RECORD_ONLY: "1"}.items():
        monkeypatch.setenv(k, v)
    overrides = ["router=topk", "moe.top_k=1,2,4", "hydra.launcher.array_parallelism=2", "hydra.launcher.partition=gpu",
                 "hydra.launcher.setup=[module load cuda]", f"hydra.sweep.dir={tmp_path / 'sw'}"]
    params = launcher_params(overrides)
    executor = _executor(params, params["submitit_folder"])  # as SlurmLauncher.launch builds it
    assert isinstance(executor, submitit.AutoExecutor)
    executor.map_array(_noop, [1, 2, 3])  # submitit's real submission path (sbatch is the stand-in)
    (submitted,) = (tmp_path / "state").glob("*.sbatch")
    script = sbatch_preview(params, 3)
    assert script == submitted.read_text()
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --job-name=train", "#SBATCH --partition=gpu", "module load cuda",
                 "-u -m submitit.core._submit"):
        assert line in script, line
    capsys.readouterr()
    assert main(["sbatch", *overrides]) == 0
    out = capsys.readouterr().out
    assert out.startswith(script.rstrip("\n"))
    assert out.splitlines()[-3:] == [f"#   {i}: python train.py router=topk moe.top_k={k}" for i, k in enumerate((1, 2, 4))]


# ---------------------------------------------------------------- the job's environment


def test_slurm_jobs_activate_the_drivers_environment(monkeypatch):
    """launchers/slurm.yaml's default setup sources the active virtualenv, else <cwd>/.venv."""
    from spectra.sweep.slurm import launcher_params, sbatch_preview

    monkeypatch.setenv("VIRTUAL_ENV", "/opt/envs/spectra")
    assert "\nsource /opt/envs/spectra/bin/activate || " in sbatch_preview(launcher_params([]))
    monkeypatch.delenv("VIRTUAL_ENV")
    monkeypatch.chdir(ROOT)
    assert f"\nsource {ROOT}/.venv/bin/activate || " in sbatch_preview(launcher_params([]))


@pytest.mark.parametrize("scale, preset, expected", [("paper", None, "0"), ("cpu_tiny", None, "1"), (None, None, "1"),
                                                      ("paper", "1", "1")])
def test_makefile_turns_the_hub_on_for_the_paper_scale_only(scale, preset, expected):
    """`make … SCALE=paper` may download SmolLM2 / smoltalk; everything else stays offline, and an
    HF_HUB_OFFLINE set by the user wins (read back from a recipe's environment)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    if preset is not None:
        env["HF_HUB_OFFLINE"] = preset
    cmd = ["make", "--no-print-directory", "-s", "--eval", "hubprobe: ; @echo $$HF_HUB_OFFLINE", "hubprobe"]
    proc = subprocess.run(cmd + ([f"SCALE={scale}"] if scale else []), cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


def test_offline_and_not_cached_says_how_to_get_the_model(monkeypatch, tmp_path):
    from spectra.train.guards import preflight

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = validate(load_config(["scale=paper", "model.pretrained=spectra-test/never-cached-model"]))
    with pytest.raises(FileNotFoundError) as e:
        preflight(cfg)
    msg = str(e.value)
    assert "model.pretrained='spectra-test/never-cached-model' is not in the local Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in msg and "HF_HUB_OFFLINE=0" in msg


def test_a_planned_cell_run_under_another_directory_name_is_not_listed_as_not_started(tmp_path):
    """The demo names its cells by router (hydra.sweep.subdir=${router.name}), not by the plan's
    predicted directory: a run with the planned cell's overrides counts as that cell."""
    import yaml

    from spectra.analysis.collect import collect

    sweep = tmp_path / "demo"
    sweep.mkdir()
    plan = {"cells": 2, "planned": [{"dir": f"router={r},experiment=demo", "overrides": ["experiment=demo", f"router={r}"]}
                                    for r in ("topk", "hash")]}
    (sweep / "sweep_plan.json").write_text(json.dumps(plan))
    d = sweep / "topk"  # the planned topk cell, under the demo's own directory name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["experiment=demo", "router=topk"]))
    (d / "summary.json").write_text(json.dumps({"status": "completed", "final": {"eval_loss": 3.0}}))
    runs, _ = collect([sweep])
    assert sorted(zip(runs["ov:router"], runs["status"])) == [("hash", "not started"), ("topk", "completed")]
