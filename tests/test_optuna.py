"""Optuna sweeps: storage, stale-trial recovery, target counting, re-seeding (fast, on real Optuna
storages) and end to end through `train.py -m hydra/sweeper=spectra_optuna` (slow): resume after a
killed driver, NaN trials, all-failed, multi-objective Pareto front, two workers on PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from transformers import TrainerCallback

import faults
from conftest import ROOT, TINY_TRAIN, assert_ok, run_cli
from spectra.sweep import study_hygiene as hygiene

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sqlite_study(tmp_path, name="s", **kw) -> optuna.Study:
    storage = hygiene.open_storage(None, tmp_path)
    return optuna.create_study(study_name=name, storage=storage, load_if_exists=True, **kw)


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------------------ storage


def test_default_storage_is_an_sqlite_file_in_the_sweep_dir(tmp_path):
    s = _sqlite_study(tmp_path)
    s.tell(s.ask(), 1.0)
    assert (tmp_path / "optuna.db").is_file()
    again = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.value for t in again.trials] == [1.0]


def test_journal_url_gives_a_journal_file_storage(tmp_path):
    from optuna.storages import JournalStorage

    st = hygiene.open_storage(f"journal://{tmp_path / 'j' / 'study.log'}")
    assert isinstance(st, JournalStorage)
    s = optuna.create_study(study_name="j", storage=st)
    s.tell(s.ask(), 2.0)
    assert (tmp_path / "j" / "study.log").stat().st_size > 0


def test_bad_storage_url_names_the_key():
    with pytest.raises(ValueError, match=r"hydra\.sweeper\.storage.*not a storage URL"):
        hygiene.open_storage("my-study.db")


def test_describe_storage_hides_the_password():
    assert hygiene.describe_storage("postgresql://bob:secret@db:5432/x") == "postgresql://bob:***@db:5432/x"


# --------------------------------------------------------------------------- staleness


def _running(study, owner=None, beat=None) -> optuna.Trial:
    t = study.ask()
    t.suggest_float("x", 0.0, 1.0)
    if owner is not None:
        study._storage.set_trial_user_attr(t._trial_id, hygiene.OWNER, owner)
    if beat is not None:
        study._storage.set_trial_user_attr(t._trial_id, hygiene.HEARTBEAT, beat)
    return t


def test_a_trial_whose_local_owner_died_is_failed_and_requeued_once(tmp_path):
    s = _sqlite_study(tmp_path)
    now = time.time()
    pid = _dead_pid()
    dead = _running(s, {"host": socket.gethostname(), "pid": pid}, beat=now)  # fresh beat, dead pid
    alive = _running(s, {"host": socket.gethostname(), "pid": os.getpid()}, beat=now)
    assert hygiene.recover_stale_trials(s, grace_period=300, now=now) == [dead.number]
    frozen = {t.number: t for t in s.get_trials()}
    assert frozen[dead.number].state == TrialState.FAIL and frozen[dead.number].user_attrs[hygiene.STALE]
    assert frozen[alive.number].state == TrialState.RUNNING
    # the error text says why, and reaches optuna_trials.csv (the sweeper writes this very frame)
    error = frozen[dead.number].user_attrs[hygiene.ERROR]
    assert "stale" in error and "gone" in error and f"process {pid} " in error
    df = s.trials_dataframe(attrs=("number", "state", "user_attrs"))
    assert df.set_index("number").loc[dead.number, f"user_attrs_{hygiene.ERROR}"] == error
    waiting = [t for t in s.get_trials() if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].system_attrs["fixed_params"] == {"x": frozen[dead.number].params["x"]}
    assert waiting[0].user_attrs[hygiene.RETRY_OF] == dead.number
    assert hygiene.recover_stale_trials(s, grace_period=300, now=now) == []  # nothing twice
    retry = s.ask()  # the queue hands the same parameters back
    assert retry.suggest_float("x", 0.0, 1.0) == frozen[dead.number].params["x"]


def test_a_remote_owner_is_judged_by_its_heartbeat(tmp_path):
    s = _sqlite_study(tmp_path)
    now = time.time()
    fresh = _running(s, {"host": "other-node", "pid": 1}, beat=now - 10)
    old = _running(s, {"host": "other-node", "pid": 1}, beat=now - 1000)
    assert hygiene.recover_stale_trials(s, grace_period=300, now=now) == [old.number]
    assert s._storage.get_trial(fresh._trial_id).state == TrialState.RUNNING
    error = s._storage.get_trial(old._trial_id).user_attrs[hygiene.ERROR]
    assert "heartbeat" in error and "other-node" in error and "grace_period=300" in error and "1000 s" in error


def test_target_counts_finished_trials_not_stale_or_surplus(tmp_path):
    s = _sqlite_study(tmp_path)
    s.tell(s.ask(), 1.0)  # complete: counts
    s.tell(s.ask(), state=TrialState.FAIL)  # failed on its own (crash / NaN): counts
    stale = s.ask()
    s._storage.set_trial_user_attr(stale._trial_id, hygiene.STALE, True)
    s.tell(stale, state=TrialState.FAIL)  # failed by hygiene and re-queued: does not count
    running = s.ask()  # running: not finished, but nobody should start its slot again
    p = hygiene.progress(s)
    assert (p["counted"], p["running"], p["complete"], p["failed"]) == (2, 1, 1, 1)
    assert hygiene.remaining(s, 5) == 5 - 2 - 1
    assert hygiene.remaining(s, 2) == 0
    # trials below `running` already meet a target of 2 (+ itself would be 3): it is surplus
    assert hygiene.is_surplus(s, running.number, 2) and not hygiene.is_surplus(s, running.number, 3)


def test_dropping_a_surplus_retry_hands_its_parameters_back(tmp_path):
    s = _sqlite_study(tmp_path)
    s.enqueue_trial({"x": 0.25}, user_attrs={hygiene.RETRY_OF: 7})
    t = s.ask()
    assert t.suggest_float("x", 0.0, 1.0) == 0.25
    hygiene.drop_surplus(s, t)
    assert s._storage.get_trial(t._trial_id).user_attrs[hygiene.SURPLUS]
    assert not hygiene.counts_toward_target(s._storage.get_trial(t._trial_id))
    waiting = [w for w in s.get_trials() if w.state == TrialState.WAITING]
    assert [w.system_attrs["fixed_params"] for w in waiting] == [{"x": 0.25}]


def test_heartbeat_thread_refreshes_claimed_trials(tmp_path):
    s = _sqlite_study(tmp_path)
    t = s.ask()
    with hygiene.Heartbeat(s, interval=0.05) as hb:
        hb.claim([t])
        first = s._storage.get_trial(t._trial_id).user_attrs[hygiene.HEARTBEAT]
        time.sleep(0.4)
        later = s._storage.get_trial(t._trial_id).user_attrs[hygiene.HEARTBEAT]
        hb.release([t])
    assert later > first
    assert s._storage.get_trial(t._trial_id).user_attrs[hygiene.OWNER]["pid"] == os.getpid()


@pytest.mark.parametrize("make", [lambda seed: optuna.samplers.TPESampler(seed=seed),
                                  lambda seed: optuna.samplers.RandomSampler(seed=seed)])
def test_reseeding_a_sampler_equals_constructing_it_with_that_seed(make):
    def draws(sampler):
        st = optuna.create_study(sampler=sampler)
        return [st.ask().suggest_float("x", 0, 1) for _ in range(4)]

    reseeded = make(123)
    hygiene.reseed_sampler(reseeded, 7)
    assert draws(reseeded) == draws(make(7))
    assert draws(make(7)) != draws(make(8))


# ------------------------------------------------------------------------- end to end

TINY = [*TINY_TRAIN, "data.max_train_samples=32"]


def _trials(sweep: Path) -> list[optuna.trial.FrozenTrial]:
    """The trials of the one study in a sweep's default SQLite storage."""
    url = f"sqlite:///{sweep / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(url)
    return optuna.load_study(study_name=name, storage=url).get_trials()


def _cells(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir())


class KillDriverAfterACheckpointOfTheSecondTrial(TrainerCallback):
    """Test instrument (a `trainer.callbacks` entry): SIGKILL this process, the sweep driver (the
    basic launcher runs each trial in it), right after a checkpoint is committed (the Trainer's
    on_save event comes after spectra's commit) in a trial that started once another trial of the
    sweep was complete, i.e. during trial 1. Once: the `marker` file it writes first disarms it, so
    a re-run with the very same command line trains on."""

    def __init__(self, marker: str):
        self.marker = Path(marker)
        self.armed = False

    def on_train_begin(self, args, state, control, **kwargs):
        sweep = Path(args.output_dir).parents[1]  # <sweep>/<cell>/checkpoints
        self.armed = not self.marker.exists() and any(sweep.glob("*/summary.json"))

    def on_save(self, args, state, control, **kwargs):
        if self.armed:
            self.marker.write_text(f"killed at checkpoint-{state.global_step}\n")
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_killed_optuna_sweep_resumes_to_exactly_the_target(tmp_path):
    """Target 3 trials; SIGKILL the driver during trial 1 (after its checkpoint-2); the re-run
    fails the stale trial, retries its parameters in the same cell directory (resuming from that
    checkpoint), and stops at exactly 3 complete trials."""
    sweep = tmp_path / "opt"
    killer = f"trainer.callbacks=[{{_target_:test_optuna.KillDriverAfterACheckpointOfTheSecondTrial,marker:{tmp_path / 'killed'}}}]"
    args = [sys.executable, "train.py", "-m", "+sweep=search_quota", "hydra.sweeper.n_trials=3", *TINY,
            "trainer.max_steps=4", "trainer.save_steps=2", killer, f"hydra.sweep.dir={sweep}"]
    driver = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **faults.ENV}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == -signal.SIGKILL, driver.returncode
    assert (tmp_path / "killed").read_text() == "killed at checkpoint-2\n"
    assert len(list(sweep.glob("*/summary.json"))) == 1  # trial 0 finished, trial 1 had not
    killed = [t for t in _trials(sweep) if t.state == TrialState.RUNNING]
    assert len(killed) == 1  # the killed driver left its trial RUNNING, as upstream would forever

    proc = run_cli(args[1:], env=faults.ENV)
    assert_ok(proc)
    trials = _trials(sweep)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.RUNNING) == 0
    stale = [t for t in trials if t.user_attrs.get(hygiene.STALE)]
    assert [t.number for t in stale] == [killed[0].number]
    retry = next(t for t in trials if t.user_attrs.get(hygiene.RETRY_OF) == killed[0].number)
    assert retry.state == TrialState.COMPLETE and retry.params == killed[0].params
    assert len(_cells(sweep)) == 3  # the retry reused the killed trial's cell: no duplicate dir
    assert "resumed" in proc.stdout + proc.stderr or any(
        json.loads((c / "summary.json").read_text()).get("resumed_from") for c in _cells(sweep))
    proc = run_cli(args[1:], env=faults.ENV)  # a third start finds the target met and runs nothing
    assert_ok(proc)
    assert len(_trials(sweep)) == len(trials)


@pytest.mark.slow
def test_nan_trial_fails_and_the_sweep_goes_on(tmp_path):
    """Grid over max_steps {2, 4} with a NaN injected at step 3: one trial fails, one completes."""
    sweep = tmp_path / "nan"
    tiny = [a for a in TINY if not a.startswith("trainer.max_steps=")]  # a fixed value would win
    proc = run_cli(["train.py", "-m", "hydra/sweeper=spectra_optuna", "hydra/sweeper/sampler=grid", *tiny,
                    "trainer.max_steps=choice(2,4)", "hydra.sweeper.n_trials=2", "trainer.eval_steps=1",
                    faults.poison(3), f"hydra.sweep.dir={sweep}"], env=faults.ENV)
    assert_ok(proc)
    by_steps = {t.params["trainer.max_steps"]: t for t in _trials(sweep)}
    assert by_steps[2].state == TrialState.COMPLETE
    assert by_steps[4].state == TrialState.FAIL and "step 3" in by_steps[4].user_attrs[hygiene.ERROR]
    res = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert res["best_params"] == {"trainer.max_steps": 2}


@pytest.mark.slow
def test_all_trials_failing_exits_non_zero_with_a_readable_message(tmp_path):
    sweep = tmp_path / "allnan"
    proc = run_cli(["train.py", "-m", "+sweep=search_quota", "hydra.sweeper.n_trials=2", *TINY, faults.poison(1),
                    f"hydra.sweep.dir={sweep}"], env=faults.ENV)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "no trial completed" in out and "NonFiniteError" in out and "Record does not exist" not in out
    assert [t.state for t in _trials(sweep)] == [TrialState.FAIL, TrialState.FAIL]


@pytest.mark.slow
def test_multi_objective_search_writes_the_pareto_front(tmp_path):
    """eval_loss vs eval/cv_mean: the written front equals a brute-force front of the cells' own
    summary.json objectives."""
    sweep = tmp_path / "pareto"
    proc = run_cli(["train.py", "-m", "+sweep=search_pareto", "hydra.sweeper.n_trials=4", *TINY,
                    "trainer.max_steps=6", f"hydra.sweep.dir={sweep}"])
    assert_ok(proc)
    points = []
    for cell in _cells(sweep):
        s = json.loads((cell / "summary.json").read_text())
        points.append(tuple(s["objective"][k] for k in ("eval_loss", "eval/cv_mean")))
    assert len(points) == 4

    def dominated(p):
        return any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)

    front = sorted({p for p in points if not dominated(p)})
    res = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert sorted({tuple(sol["values"]) for sol in res["solutions"]}) == front  # same floats, via JSON


# ---------------------------------------------------------------- PostgreSQL, two workers


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if found:
        return found[-1].parent
    exe = shutil.which("pg_ctl")
    return Path(exe).parent if exe else None


@pytest.fixture
def postgres(tmp_path_factory):
    """A throw-away PostgreSQL server on a Unix socket (run as the `postgres` user: the server
    refuses root). Yields a SQLAlchemy URL."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server not installed (apt-get install postgresql; .ci/run does it)")
    base = Path(f"/tmp/spectra-pg-{os.getpid()}")  # short: a socket path must fit in 107 bytes
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(mode=0o755)
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_pg:
        shutil.chown(base, "postgres", "postgres")
    subprocess.run([*as_pg, str(bindir / "initdb"), "-D", f"{base}/db", "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", f"{base}/db", "-o",
                    f"-k {base} -c listen_addresses=''", "-l", f"{base}/log", "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={base}"
    finally:
        subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", f"{base}/db", "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


TARGET = 4  # two workers, n_jobs=1: each claims one trial at a time


def _two_workers_share_one_study(tmp_path, url: str) -> None:
    """Two sweeper processes, one study, target 4: unique trial numbers, exactly 4 complete
    trials, and the trials each worker ran add up to the study's total. Bookkeeping only: 2 steps a
    trial and no routing monitor; a worker starting up to ~3 trials behind the other still gets one."""
    common = ["train.py", "-m", "+sweep=search_osr", f"hydra.sweeper.n_trials={TARGET}", *TINY, "trainer.max_steps=2",
              "monitor.enabled=false", f"hydra.sweeper.storage='{url}'", "hydra.sweeper.study_name=two_workers"]
    # one thread a worker: the two run side by side, and more threads would only contend for the cores
    procs = [subprocess.Popen([sys.executable, *common, f"hydra.sweep.dir={tmp_path / f'w{i}'}"], cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
        assert "database is locked" not in out
    trials = optuna.load_study(study_name="two_workers", storage=hygiene.open_storage(url)).get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == TARGET
    per_worker = [len(_cells(tmp_path / f"w{i}")) for i in range(2)]
    assert sum(per_worker) == len(complete) and min(per_worker) >= 1
    owners = {t.user_attrs[hygiene.OWNER]["pid"] for t in complete}
    assert owners == {p.pid for p in procs}


@pytest.mark.slow
def test_two_workers_share_one_postgres_study(tmp_path, postgres):
    _two_workers_share_one_study(tmp_path, postgres)


@pytest.mark.slow
def test_workers_starting_together_on_an_empty_postgres_all_connect(postgres):
    """Four processes open the storage and the study at the same instant on a fresh database:
    the race to create Optuna's schema must not fail any of them."""
    code = ("import sys, time, optuna; from spectra.sweep.study_hygiene import open_storage; "
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); "
            "s = optuna.create_study(study_name='race', storage=open_storage(sys.argv[1]), load_if_exists=True); "
            "s.tell(s.ask(), 1.0)")
    start = time.time() + 4.0  # after every interpreter has imported optuna
    procs = [subprocess.Popen([sys.executable, "-c", code, postgres, str(start)], stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-1500:] for e in errs)
    trials = optuna.load_study(study_name="race", storage=postgres).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]


@pytest.mark.slow
def test_two_workers_share_one_journal_file_study(tmp_path):
    _two_workers_share_one_study(tmp_path, f"journal://{tmp_path / 'shared' / 'study.log'}")


# ------------------------------------------------------------------ search-space configs


@pytest.mark.parametrize("space", ["search_osr", "search_quota", "search_router", "search_pareto"])
def test_every_search_space_is_valid_optuna_and_valid_config(space):
    """Each sweeps/search_*.yaml selects our sweeper, parses as Optuna distributions, and every
    point of its space (both ends of each range, every choice) is a valid training config."""
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import CategoricalDistribution

    from spectra.config import config_dir, load_config, register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir())):
        hc = compose("config", [f"+sweep={space}"], return_hydra_config=True).hydra
    assert hc.sweeper._target_.endswith("SpectraOptunaSweeper")
    dists, fixed, _ = create_params_from_overrides([f"{k}={v}" for k, v in hc.sweeper.params.items()])
    assert dists and not fixed
    cfg0 = validate(load_config([f"+sweep={space}"]))
    directions = hc.sweeper.direction
    assert len([directions] if isinstance(directions, str) else directions) == len(cfg0.objectives)
    for corner in ("low", "high"):
        point = [f"{k}={(d.choices[0] if corner == 'low' else d.choices[-1]) if isinstance(d, CategoricalDistribution) else getattr(d, corner)}"
                 for k, d in dists.items()]
        validate(load_config([f"+sweep={space}", *point]))


@pytest.mark.slow
def test_sweeps_run_from_another_working_directory(tmp_path):
    """`sweeps/` and the sweeper plugin are found from train.py's location and the installed
    package, not the current directory (SWEEPS.md: a relative searchpath breaks on SLURM)."""
    proc = run_cli([str(ROOT / "train.py"), "-m", "+sweep=search_quota", "hydra.sweeper.n_trials=1", *TINY,
                    "trainer.max_steps=2"], cwd=tmp_path)
    assert_ok(proc)
    sweep = tmp_path / "outputs" / "sweeps" / "search_quota" / "cpu_tiny"  # relative to the caller's cwd
    assert [t.state for t in _trials(sweep)] == [TrialState.COMPLETE]


def test_spectra_sweeper_has_its_own_name_and_upstream_optuna_is_not_shadowed():
    from hydra import compose, initialize_config_dir

    from spectra.config import config_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir())):
        ours = compose("config", ["hydra/sweeper=spectra_optuna"], return_hydra_config=True).hydra.sweeper
        upstream = compose("config", ["hydra/sweeper=optuna"], return_hydra_config=True).hydra.sweeper
        search = compose("config", ["+sweep=search_osr"], return_hydra_config=True).hydra.sweeper
    assert ours._target_ == "hydra_plugins.spectra_sweeper.spectra_optuna_sweeper.SpectraOptunaSweeper"
    assert upstream._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert search._target_ == ours._target_ and "grace_period" in ours and "grace_period" not in upstream
