"""Sweep cells: skip what is complete, record progress, report at the end of a multirun.

Hydra multirun has no resume (hydra #1407): re-running a sweep restarts every job. Our sweeps
use a deterministic directory per cell (sweeps/_common.yaml: named by the cell's overrides,
seed included), and `run()` asks `cached_objective` first: a cell whose `summary.json` says
"completed" for the same resolved config returns its recorded objective without training.
A failed or interrupted cell has no complete summary, so it runs again (resuming from its
newest checkpoint). Each cell appends one line to `<sweep_dir>/sweep_progress.jsonl`, and
`SweepReportCallback` prints how many cells were skipped, ran and failed, then the table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from hydra.experimental.callback import Callback

from spectra.train.rundir import METRICS, SUMMARY, append_jsonl, read_jsonl, read_summary, write_json_atomic

log = logging.getLogger("spectra")

PROGRESS = "sweep_progress.jsonl"
PLAN = "sweep_plan.json"  # {"cells": N, "started": unix time} of the multirun in progress
# Keys that do not change what a cell computes (where it writes, how it resumes, its labels).
VOLATILE_KEYS = ("output_dir", "skip_complete", "tags", "sweep_name", "scale_name", "seeds", "sweep_values")
VOLATILE_TRAINER_KEYS = ("resume",)


def config_fingerprint(cfg) -> str:
    """sha256 of the resolved config without volatile keys: equal fingerprints train the same."""
    d = dataclasses.asdict(cfg)
    for k in VOLATILE_KEYS:
        d.pop(k, None)
    for k in VOLATILE_TRAINER_KEYS:
        d["trainer"].pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_objective(run_dir: Path, fingerprint: str):
    """The recorded objective of a complete cell with this fingerprint, else None."""
    s = read_summary(run_dir)
    if not s or s.get("status") != "completed" or s.get("config_fingerprint") != fingerprint:
        return None
    values = tuple((s.get("objective") or {}).values())
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def reset_run_dir(run_dir: Path) -> None:
    """Start a run from scratch (trainer.resume=never): drop a previous attempt's outputs."""
    for name in (METRICS, SUMMARY):
        (run_dir / name).unlink(missing_ok=True)
    for name in ("checkpoints", "routing", "model"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def sweep_dir_of(run_dir: Path) -> Path | None:
    """The multirun's sweep directory when this run is a Hydra multirun job, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return Path(hc.sweep.dir)
    except (ValueError, ImportError):  # not inside a Hydra app
        pass
    return None


def record_progress(run_dir: Path, status: str, **extra) -> None:
    """Append `{cell, status, time}` to the sweep's progress file (multirun jobs only)."""
    sweep = sweep_dir_of(run_dir)
    if sweep is None:
        return
    sweep.mkdir(parents=True, exist_ok=True)
    append_jsonl(sweep / PROGRESS, {"cell": str(run_dir), "status": status, "time": time.time(), **extra})


def grid_size(config) -> int | None:
    """Number of cells a BasicSweeper multirun will launch (sweeper params x command-line sweeps);
    None for other sweepers (Optuna reports its own progress against `n_trials`)."""
    sweeper = config.hydra.sweeper
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    # Private: Hydra has no public API to expand a multirun's overrides into its jobs; the
    # BasicSweeper's own `split_arguments` is what decides how many cells it launches.
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()] + list(config.hydra.overrides.task)
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
    return sum(len(b) for b in batches)


class SweepReportCallback(Callback):
    """Hydra callback: at the end of a multirun, print skipped/ran/failed counts and the
    comparison table of the sweep directory (through spectra.analysis)."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config, **kwargs) -> None:
        self.started = time.time()
        total = grid_size(config)
        if total is not None:  # read by on_job_end, which may run in another process (submitit)
            sweep = Path(config.hydra.sweep.dir)
            sweep.mkdir(parents=True, exist_ok=True)
            write_json_atomic(sweep / PLAN, {"cells": total, "started": self.started})

    def on_job_end(self, config, job_return=None, **kwargs) -> None:
        """After each cell: `[spectra] sweep progress: 3/12 cells (1 skipped, 2 ran, 0 failed)`."""
        try:
            sweep = Path(config.hydra.sweep.dir)
            plan = json.loads((sweep / PLAN).read_text())
        except (OSError, ValueError, AttributeError):
            return
        records = [r for r in read_jsonl(sweep / PROGRESS) if r.get("time", 0) >= plan["started"]]
        c = {s: sum(r["status"] == s for r in records) for s in ("skipped", "completed", "failed")}
        print(f"[spectra] sweep progress: {len(records)}/{plan['cells']} cells ({c['skipped']} skipped, "
              f"{c['completed']} ran, {c['failed']} failed)", flush=True)

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        records = [r for r in read_jsonl(sweep / PROGRESS) if r.get("time", 0) >= self.started]
        counts = {s: sum(r["status"] == s for r in records) for s in ("skipped", "completed", "failed")}
        print(
            f"[spectra] sweep {sweep}: {len(records)} cells — {counts['skipped']} skipped (already complete), "
            f"{counts['completed']} ran, {counts['failed']} failed"
        )
        try:
            from spectra.analysis import collect, comparison_table, to_markdown

            runs, _ = collect([sweep])
            if not runs.empty:
                print(to_markdown(comparison_table(runs)))
        except Exception as e:  # a report must never turn a finished sweep into a failure
            print(f"[spectra] could not build the summary table: {e}")
