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

import json
import logging
import time
from pathlib import Path

# Private: Hydra has no public API to expand a multirun's overrides into its jobs; the
# BasicSweeper's own `split_arguments` is what decides how many cells it launches.
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback

from spectra.contracts.rundir import PROGRESS, read_jsonl, write_json_atomic

log = logging.getLogger("spectra")

PLAN = "sweep_plan.json"  # {"cells": N, "started": unix time} of the multirun in progress


def grid_size(config) -> int | None:
    """Number of cells a BasicSweeper multirun will launch (sweeper params x command-line sweeps);
    None for other sweepers (Optuna reports its own progress against `n_trials`)."""
    sweeper = config.hydra.sweeper
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    args = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()] + list(config.hydra.overrides.task)
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
    return sum(len(b) for b in batches)


class SweepProgressCallback(Callback):
    """Hydra callback: after each cell and at the end of a multirun, print skipped/ran/failed
    counts (spectra.analysis.sweep_report.SweepReportCallback adds the comparison table)."""

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
