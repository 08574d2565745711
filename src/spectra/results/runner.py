"""Run a results plan: the dense bases first, then every cell, `workers` at a time, each cell a
plain `train.py` process; a finished cell's small outputs are committed to git as it finishes.

Why a driver of its own and not one Hydra multirun: the plan spans many sweeps and two base
models, and a multirun has no notion of "this cell needs that base first", one progress bar
with an ETA over everything, or a commit per finished cell (a machine may not outlive a session:
the next one resumes from the repository). Each cell is still an ordinary run directory, so
`spectra.analysis` reads results/runs like any sweep.

Resuming: a cell is done when its summary.json says completed; anything else is (re)started with
trainer.resume=auto, so an interrupted cell continues from its last checkpoint on this machine
and starts over on a fresh clone. A cell another `make results` process is running (a lock file
under outputs/results_locks) is left to it, so two processes can share one plan.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from spectra.contracts.rundir import METRICS, SUMMARY, is_complete, read_summary, write_json_atomic
from spectra.results.plan import Cell, Plan

CELL_RECORD = "cell.json"  # who ran the cell, how, where, with which versions and base weights
BASE_DIR = Path("outputs/base")  # where experiment=base_model writes <model.name>/
CODE_PATHS = ("src", "conf", "train.py", "requirements", "pyproject.toml")  # what a cell executes (code_dirty)
LOCK_DIR = Path("outputs/results_locks")
# The small files a finished cell commits (never checkpoints or the saved model).
SMALL_FILES = (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", SUMMARY, METRICS,
               "train.log", "eval_harness.json", CELL_RECORD)


@dataclass(frozen=True)
class Task:
    """A base model or a cell: what to run, where, and what it waits for."""

    label: str  # e.g. "base tiny", "baselines/router=spectra,seed=0"
    overrides: tuple[str, ...]
    run_dir: Path  # where train.py writes (for a base: outputs/base/<name>)
    record_dir: Path  # where the committed small files go (a base copies them to results/base/<name>)
    needs: str | None  # the base it upcycles from
    snapshots: bool = False


def base_tasks(plan: Plan, results_root: Path, base_root: Path = BASE_DIR) -> dict[str, Task]:
    """One task per base: train.py with the base's overrides into <base_root>/<name> (where the
    cells' model.pretrained points: conf/experiment/results.yaml); its small files are recorded
    in <results_root>/base/<name>."""
    return {name: Task(f"base {name}", ovs, base_root / name, results_root / "base" / name, None)
            for name, ovs in plan.bases.items()}


def cell_task(cell: Cell, runs_root: Path) -> Task:
    """A cell as a task: its overrides plus the run directory it must write."""
    d = cell.run_dir(runs_root)
    return Task(f"{cell.family}/{cell.name}", cell.overrides, d, d, cell.base, cell.snapshots)


def _lock_path(task: Task) -> Path:
    return LOCK_DIR / (hashlib.sha256(str(task.run_dir.resolve()).encode()).hexdigest()[:16] + ".lock")


def _try_lock(task: Task):
    """An open, exclusively flocked file (released when closed or the process dies), or None when
    another process holds this task."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    # "a", not "w": opening must not empty the holder's "<pid> <label>" line before the flock has
    # said whether there is a holder; the file is emptied once the lock is ours.
    f = open(_lock_path(task), "a")  # noqa: SIM115 -- kept open while the task runs
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    f.truncate(0)
    f.write(f"{os.getpid()} {task.label}\n")
    f.flush()
    return f


def file_sha256(path: Path) -> str | None:
    """sha256 of a file (the base's weights), None when absent."""
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions(repo: Path) -> dict:
    import torch
    import transformers

    lock = repo / "requirements" / "lock.txt"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    # Uncommitted edits to what a run executes (results/ commits are the runner's own, not code).
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
                           cwd=repo, capture_output=True, text=True)
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "lock_sha256": file_sha256(lock), "code_commit": commit.stdout.strip() or None,
            "code_dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}


def _machine(threads: int) -> dict:
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "threads_per_cell": threads}


def command_of(task: Task) -> list[str]:
    """The exact train.py command of a task (recorded in cell.json). The run directory is quoted:
    cell names hold '=' and ',', which Hydra's override grammar reads as syntax otherwise."""
    return [sys.executable, "train.py", *task.overrides, f"hydra.run.dir='{task.run_dir}'"]


def _record(task: Task, threads: int, repo: Path, bases: dict[str, Task], rc: int | None, started: float, finished: float,
            versions: dict | None = None) -> dict:
    """The cell record (cell.json): what ran, how, where, with which versions and base weights.
    versions: taken when the training started (HEAD moves while cells train: each finished cell
    is a commit); None = now (an orphan recorded after the fact)."""
    base = bases.get(task.needs) if task.needs else None
    record = {"task": task.label, "overrides": list(task.overrides),
              "command": shlex.join(["python", *command_of(task)[1:]]),
              "exit_code": rc, "started": started, "finished": finished, "wall_time_s": finished - started,
              "machine": _machine(threads), "versions": versions or _versions(repo),
              "base": None if base is None else {"name": task.needs, "run_dir": str(base.run_dir),
                                                  "model_sha256": file_sha256(base.run_dir / "model" / "model.safetensors")}}
    if task.needs is None and (task.run_dir / "model" / "model.safetensors").is_file():
        record["model_sha256"] = file_sha256(task.run_dir / "model" / "model.safetensors")
    return record


def run_task(task: Task, threads: int, repo: Path, bases: dict[str, Task], lock_fd: int | None = None) -> dict:
    """Run one task's train.py to completion; returns its cell record (written to cell.json).
    lock_fd: the task's flocked lock file, inherited by train.py, so the lock lasts as long as the
    training does even when this process is killed first."""
    task.run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "TOKENIZERS_PARALLELISM": "false"}
    versions = _versions(repo)  # the code this training runs, before later commits move HEAD
    started = time.time()
    with open(task.run_dir / "stdout.log", "ab") as log:
        rc = subprocess.run(command_of(task), cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                            pass_fds=() if lock_fd is None else (lock_fd,)).returncode
    record = _record(task, threads, repo, bases, rc, started, time.time(), versions)
    if rc == 0 and is_complete(task.run_dir):
        write_json_atomic(task.run_dir / CELL_RECORD, record)
    return record


def record_orphans(tasks: list[Task], recorder: GitRecorder, repo: Path, bases: dict[str, Task]) -> int:
    """Commit the finished tasks whose files never were: a cell that completed after its `make
    results` process was killed (the train.py child ran on). Without cell.json, one is written
    from the summary (its wall time) and marked recorded_after; returns how many were committed."""
    if not recorder.enabled:
        return 0
    listed = subprocess.run(["git", "ls-files"], cwd=recorder.repo, capture_output=True, text=True).stdout.split("\n")
    tracked = set(listed)
    n = 0
    for task in tasks:
        if not is_complete(task.run_dir):
            continue
        if str((task.record_dir / SUMMARY).resolve().relative_to(recorder.repo)) in tracked:
            continue
        lock = _try_lock(task)
        if lock is None:  # its own process (or train.py) still holds it and will commit it
            continue
        try:
            if not (task.run_dir / CELL_RECORD).is_file():
                s = read_summary(task.run_dir) or {}
                started = float(s.get("started") or 0.0)
                # exit code unknown (its train.py outlived the driver); versions as of now, not its start
                record = _record(task, 0, repo, bases, None, started, started + float(s.get("wall_time_s") or 0.0))
                write_json_atomic(task.run_dir / CELL_RECORD, {**record, "machine": None, "recorded_after": True})
            n += recorder.commit(task, _summary_line(task, json.loads((task.run_dir / CELL_RECORD).read_text())))
        finally:
            lock.close()
    return n


def _record_files(task: Task) -> list[Path]:
    """The small files of a finished task, copied to its record dir when that differs (bases)."""
    files = [task.run_dir / f for f in SMALL_FILES if (task.run_dir / f).is_file()]
    if task.snapshots and "seed=0" in task.overrides:  # the report draws a variant's figures from its lowest seed
        files += sorted((task.run_dir / "routing").glob("step*.pt"))
    if task.record_dir == task.run_dir:
        return files
    out = []
    for f in files:
        dest = task.record_dir / f.relative_to(task.run_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(f.read_bytes())
        out.append(dest)
    return out


class GitRecorder:
    """Commits each finished task's small files (only those paths), one commit per task, in the
    git work tree that holds the results directory (none: nothing is committed)."""

    def __init__(self, results_root: Path, enabled: bool):
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=results_root, capture_output=True, text=True)
        self.enabled = enabled and top.returncode == 0
        self.repo = Path(top.stdout.strip()).resolve() if self.enabled else None
        self._lock = threading.Lock()

    def commit(self, task: Task, message: str) -> bool:
        """git add -f + git commit -- <those paths>; retried while another git holds the index."""
        if not self.enabled:
            return False
        paths = [str(p.resolve().relative_to(self.repo)) for p in _record_files(task)]
        if not paths:
            return False
        with self._lock:
            for attempt in range(20):
                add = subprocess.run(["git", "add", "-f", "--", *paths], cwd=self.repo, capture_output=True, text=True)
                cm = add if add.returncode else subprocess.run(
                    ["git", "commit", "-q", "--no-verify", "-m", message, "--", *paths],
                    cwd=self.repo, capture_output=True, text=True)
                if cm.returncode == 0:
                    return True
                if "index.lock" not in cm.stderr + cm.stdout:
                    tqdm.write(f"warning: could not commit {task.label}: {(cm.stderr or cm.stdout).strip()[-300:]}")
                    return False
                time.sleep(0.5 + attempt * 0.5)
        tqdm.write(f"warning: could not commit {task.label}: git index stayed locked")
        return False


def _summary_line(task: Task, record: dict) -> str:
    s = read_summary(task.run_dir) or {}
    loss = (s.get("final") or {}).get("eval_loss")
    loss_txt = f"eval_loss {loss:.4f}" if isinstance(loss, (int, float)) else "no eval_loss"
    return f"results: {task.label} ({loss_txt}, {record['wall_time_s']:.0f} s)"


def run_plan(plan: Plan, repo: Path, results_root: Path, workers: int = 2, commit: bool = True,
             families: list[str] | None = None, on_done: Callable[[Task, dict], None] | None = None,
             bases_only: bool = False, base_root: Path = BASE_DIR) -> list[str]:
    """Train every unfinished cell of the plan (bases first, each cell after its base), `workers`
    at a time; returns the labels of the tasks that failed (empty when all finished).
    bases_only: train (or find finished) every base of the plan and no cell (`make base-model`)."""
    runs_root = results_root / "runs"
    results_root.mkdir(parents=True, exist_ok=True)
    bases = base_tasks(plan, results_root, base_root)
    cells = [cell_task(c, runs_root) for c in plan.cells if families is None or c.family in families]
    todo_cells = [t for t in cells if not is_complete(t.run_dir)]
    needed = {t.needs for t in todo_cells if t.needs}
    if bases_only:
        cells, todo_cells, needed = [], [], set(plan.bases)
    todo = [bases[b] for b in plan.bases if b in needed and not is_complete(bases[b].run_dir)] + todo_cells
    done_before = len(cells) - len(todo_cells)
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    recorder = GitRecorder(results_root, commit)
    orphans = record_orphans([*bases.values(), *cells], recorder, repo, bases)
    if orphans:
        print(f"results: committed {orphans} finished task(s) no earlier run had committed", flush=True)
    print(f"results: {len(cells)} cells, {done_before} done, {len(todo_cells)} to train"
          f"{f' (+{len(todo) - len(todo_cells)} base model(s) first)' if len(todo) > len(todo_cells) else ''};"
          f" {workers} worker(s) x {threads} thread(s)", flush=True)
    failed: list[str] = []
    left: list[str] = []  # tasks another driver holds: not failed, not done by this one
    failed_bases: set[str] = set()
    running: dict[Future, tuple[Task, object]] = {}
    queue = list(todo)
    bar = tqdm(total=len(todo), desc="results", unit="cell", dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while queue or running:
            for task in list(queue):
                if len(running) >= workers:
                    break
                if task.needs in failed_bases:
                    queue.remove(task)
                    failed.append(f"{task.label} (its base {task.needs} failed)")
                    bar.update(1)
                    continue
                if task.needs and not is_complete(bases[task.needs].run_dir):
                    continue  # waits for its base
                lock = _try_lock(task)
                queue.remove(task)
                if lock is None:
                    tqdm.write(f"{task.label}: another process is running it, left to it")
                    left.append(task.label)
                    bar.update(1)
                    continue
                if is_complete(task.run_dir):
                    # The plan was scanned at the start: another process has finished this task
                    # (and let go of its lock) since. Training it again would redo it for nothing
                    # and overwrite its record and commit.
                    lock.close()
                    tqdm.write(f"{task.label}: finished by another process meanwhile")
                    bar.update(1)
                    continue
                # A base always trains on one thread: bit-reproducible on a fresh clone of the same
                # kind of machine (the cells record its weights' sha256; the report checks they agree).
                n = threads if task.needs else 1
                running[pool.submit(run_task, task, n, repo, bases, lock.fileno())] = (task, lock)
            if not running:
                left += [t.label for t in queue]  # every remaining task waits for a base another process is training
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                task, lock = running.pop(fut)
                try:
                    record = fut.result()
                    bar.update(1)
                    if record["exit_code"] == 0 and is_complete(task.run_dir):
                        # committed before the lock goes: another driver's record_orphans never sees
                        # it finished-but-uncommitted and commits it a second time
                        recorder.commit(task, _summary_line(task, record))
                        tqdm.write(_summary_line(task, record).removeprefix("results: "))
                        if on_done is not None:
                            on_done(task, record)
                finally:
                    lock.close()
                if not (record["exit_code"] == 0 and is_complete(task.run_dir)):
                    failed.append(f"{task.label}: exit {record['exit_code']}, see {task.run_dir / 'stdout.log'}")
                    if task.needs is None and task in bases.values():
                        failed_bases.add(task.label.removeprefix("base "))
                    tqdm.write(f"FAILED {failed[-1]}")
                bar.set_postfix_str(f"{done_before + bar.n - len(failed)}/{len(cells)} cells done")
    bar.close()
    if left:
        print(f"results: {len(left)} task(s) left to another process (run again when it is done): "
              + ", ".join(left), flush=True)
    return failed


def status_rows(plan: Plan, results_root: Path) -> list[dict]:
    """Per family: cells, completed, failed, incomplete (running, or stopped before the end), not
    started, total wall time of the completed ones."""
    rows: dict[str, dict] = {}
    for c in plan.cells:
        d = c.run_dir(results_root / "runs")
        r = rows.setdefault(c.family, {"family": c.family, "cells": 0, "completed": 0, "failed": 0, "incomplete": 0,
                                       "not started": 0,
                                       "wall_time_min": 0.0})
        r["cells"] += 1
        s = read_summary(d)
        if s and s.get("status") == "completed":
            r["completed"] += 1
            # train.py's own wall time: cell.json's also counts the driver's waiting (a paused driver)
            rec = d / CELL_RECORD
            wall = s.get("wall_time_s") or (json.loads(rec.read_text()).get("wall_time_s") if rec.is_file() else 0.0)
            r["wall_time_min"] += (wall or 0.0) / 60
        elif s and s.get("status") == "failed":
            r["failed"] += 1
        elif not s and not (d / "stdout.log").is_file():  # train.py writes summary.json only at the end
            r["not started"] += 1
        else:
            r["incomplete"] += 1
    return list(rows.values())
