"""Sweep cells: how many a multirun has, and its progress as the cells finish.

Hydra multirun has no resume (hydra #1407): re-running a sweep restarts every job. Our sweeps
use a deterministic directory per cell (sweeps/_common.yaml: named by the cell's overrides,
seed included), and `spectra.train.run` asks `cached_objective` first (spectra.contracts.rundir):
a cell whose `summary.json` says "completed" for the same resolved config returns its recorded
objective without training. A failed or interrupted cell has no complete summary, so it runs
again (resuming from its newest checkpoint). Each cell appends one line to
`<sweep_dir>/sweep_progress.jsonl`; `SweepProgressCallback` prints how many cells were skipped,
ran and failed (spectra.analysis.sweep_report adds the comparison table at the end).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path

# Private: Hydra has no public API to expand a multirun's overrides into its jobs; the
# BasicSweeper's own `split_arguments` is what decides how many cells it launches.
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback

from spectra.config import cell_dirname
from spectra.contracts.rundir import PROGRESS, read_jsonl, write_json_atomic

log = logging.getLogger("spectra")

PLAN = "sweep_plan.json"  # {"cells": N, "started": unix time, "planned": [{"dir", "overrides"}]}
WORKER_ENV = "SPECTRA_SWEEP_WORKER"  # this multirun driver's id; run.py tags its progress records with it
_STATUSES = ("skipped", "completed", "failed")


def grid_jobs(config) -> list[list[str]] | None:
    """The override list of every job a BasicSweeper multirun launches (None for other sweepers)."""
    sweeper = config.hydra.sweeper
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    args = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()] + list(config.hydra.overrides.task)
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
    return [list(job) for batch in batches for job in batch]


def grid_size(config) -> int | None:
    """Number of cells a BasicSweeper multirun will launch (sweeper params x command-line sweeps);
    None for other sweepers (Optuna reports its own progress against `n_trials`)."""
    jobs = grid_jobs(config)
    return None if jobs is None else len(jobs)


def planned_cells(config) -> list[dict] | None:
    """{"dir": cell directory name, "overrides": [...]} of every cell of a BasicSweeper multirun,
    named as the `cell_dirname` resolver names them inside each job (conf/config.yaml
    hydra.sweep.subdir): its axes are the sweeper's params, seed, and the keys swept on the
    command line (which the resolver reads back from multirun.yaml, not yet written here)."""
    jobs = grid_jobs(config)
    if jobs is None:
        return None
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    axes = {k: None for k in (config.hydra.sweeper.get("params") or {})}
    axes.update({o.key_or_group: None for o in parsed if o.is_sweep_override()})
    return [{"dir": cell_dirname(job, axes, None), "overrides": job} for job in jobs]


def read_plan(sweep_dir) -> dict | None:
    """The sweep's plan (sweep_plan.json), or None."""
    try:
        return json.loads((Path(sweep_dir) / PLAN).read_text())
    except (OSError, ValueError):
        return None


def _new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _first_line(text) -> str:
    text = str(text).strip()
    return text.splitlines()[0] if text else ""


class SweepProgressCallback(Callback):
    """Hydra callback: after each cell and at the end of a multirun, print skipped/ran/failed
    counts of *this* driver's cells (spectra.analysis.sweep_report.SweepReportCallback adds the
    comparison table); a multirun with failed cells ends with one summary line and exit status 1.

    Several drivers (workers) may share one sweep directory: each gets an id, exported as
    $SPECTRA_SWEEP_WORKER to its jobs (inherited by local and submitit jobs, SLURM's sbatch
    exports the environment), and counts only the progress records carrying its id."""

    def __init__(self) -> None:
        self.started = 0.0
        self.worker: str | None = None
        self.total: int | None = None  # this worker's grid size

    def __init_subclass__(cls, **kwargs) -> None:
        """A subclass's own `on_multirun_end` (e.g. the comparison table) runs in full before the
        failure summary ends the process."""
        super().__init_subclass__(**kwargs)
        end = cls.__dict__.get("on_multirun_end")
        if end is None:
            return

        @functools.wraps(end)
        def on_multirun_end(self, config, **kw):
            self._depth = getattr(self, "_depth", 0) + 1
            try:
                end(self, config, **kw)
            finally:
                self._depth -= 1
            if self._depth == 0:
                self.end_failed_sweep(config)

        cls.on_multirun_end = on_multirun_end

    def on_multirun_start(self, config, **kwargs) -> None:
        self.started = time.time()
        self.worker = _new_worker_id()
        os.environ[WORKER_ENV] = self.worker
        cells = planned_cells(config)
        if cells is not None:  # read by on_job_end, which may run in another process (submitit)
            self.total = len(cells)
            sweep = Path(config.hydra.sweep.dir)
            sweep.mkdir(parents=True, exist_ok=True)
            old = read_plan(sweep) or {}
            known = {c["dir"] for c in cells}  # another worker's cells of a different grid stay listed
            cells += [c for c in old.get("planned") or [] if isinstance(c, dict) and c.get("dir") not in known]
            write_json_atomic(sweep / PLAN, {"cells": len(cells), "started": self.started, "planned": cells})

    def _mine(self, sweep: Path) -> list[dict]:
        """This worker's progress records (records without a worker id: by start time, as before)."""
        worker = self.worker or os.environ.get(WORKER_ENV)
        out = []
        for r in read_jsonl(sweep / PROGRESS):
            if "worker" in r:
                if r["worker"] == worker:
                    out.append(r)
            elif r.get("time", 0) >= self.started:
                out.append(r)
        return out

    def on_job_end(self, config, job_return=None, **kwargs) -> None:
        """After each cell: `[spectra] sweep progress: 3/12 cells (1 skipped, 2 ran, 0 failed)`."""
        try:
            sweep = Path(config.hydra.sweep.dir)
        except AttributeError:
            return
        plan = read_plan(sweep)
        if plan is None:
            return
        records = self._mine(sweep)
        c = {s: sum(r["status"] == s for r in records) for s in _STATUSES}
        print(f"[spectra] sweep progress: {len(records)}/{self.total or plan['cells']} cells ({c['skipped']} skipped, "
              f"{c['completed']} ran, {c['failed']} failed)", flush=True)

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        records = self._mine(sweep)
        counts = {s: sum(r["status"] == s for r in records) for s in _STATUSES}
        print(
            f"[spectra] sweep {sweep}: {len(records)} cells — {counts['skipped']} skipped (already complete), "
            f"{counts['completed']} ran, {counts['failed']} failed"
        )
        if type(self).on_multirun_end is SweepProgressCallback.on_multirun_end:
            self.end_failed_sweep(config)

    def end_failed_sweep(self, config) -> None:
        """When the multirun is ending with a failed cell's exception (Hydra re-raises the first
        one, then prints its traceback): print one line naming the failed cells and their errors
        instead, and exit with status 1. Called last in `on_multirun_end`; any other exception
        (Ctrl-C, a launcher error) is left alone."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, Exception):
            return
        failed = [r for r in self._mine(Path(config.hydra.sweep.dir)) if r["status"] == "failed"]
        if failed:
            shown = "; ".join(f"{Path(r['cell']).name}: {_first_line(r.get('error', ''))}" for r in failed[:3])
            more = f" (+{len(failed) - 3} more)" if len(failed) > 3 else ""
            line = f"{len(failed)} cell{'s' if len(failed) != 1 else ''} failed — {shown}{more}"
        else:
            line = f"{type(exc).__name__}: {_first_line(exc)}"
        print(f"error: sweep {config.hydra.sweep.dir}: {line} (errors in each cell's summary.json)",
              file=sys.stderr, flush=True)
        raise SystemExit(1)
