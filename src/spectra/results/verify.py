"""`python -m spectra.results verify` — train committed cells again from their recorded command
and compare the new numbers with the committed ones.

The committed results are only worth what a second run of them gives. A cell's run is
deterministic on CPU for a given thread count, base weights and code, so on the same kind of
machine a re-run is expected to be bit-identical; on another machine (another BLAS, another
thread count) the float sums differ and training drifts, and the fair test is then the row's
seed noise: |Δ eval_loss| within two standard deviations of the committed seeds of that row.

The re-run goes to its own directory (outputs/verify/<family>/<cell>), never over the committed
cell, and nothing is committed. Timings are not compared (they are the machine's, not the run's).
"""

from __future__ import annotations

import fnmatch
import json
import math
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from spectra.contracts.rundir import is_complete, read_summary
from spectra.results.plan import Cell, Plan, PlanError
from spectra.results.runner import BASE_DIR, CELL_RECORD, _try_lock, base_tasks, cell_task, file_sha256, run_task

VERIFY_DIR = Path("outputs/verify")
# Substrings of summary["final"] keys that measure the machine (wall clock, and the router's
# share of it: Table 9), not the run.
TIMING_MARKERS = ("_ms", "router_share", "runtime", "per_second", "tokens_per_s", "time_s")
NOISE_SIGMAS = 2.0  # "within seed noise": |Δ eval_loss| <= NOISE_SIGMAS x the row's seed std


def compared_metrics(final: dict) -> dict[str, float]:
    """The numbers of a summary's `final` block a re-run must reproduce: losses (overall and per
    domain) and routing metrics; timings and non-numbers dropped."""
    return {k: float(v) for k, v in final.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and not any(m in k for m in TIMING_MARKERS)}


def _without_seed(overrides: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(o for o in overrides if not o.startswith("seed="))


def seed_noise(cell: Cell, plan: Plan, runs_root: Path) -> tuple[float | None, int]:
    """(sample std of the final eval loss over the committed seeds of the cell's row, number of
    seeds); std None when fewer than two seeds are finished. The row: the plan's cells of the
    same family whose overrides equal this cell's but for `seed=`."""
    row = _without_seed(cell.overrides)
    losses = []
    for c in plan.cells:
        if c.family == cell.family and _without_seed(c.overrides) == row:
            s = read_summary(c.run_dir(runs_root)) or {}
            loss = (s.get("final") or {}).get("eval_loss") if s.get("status") == "completed" else None
            if isinstance(loss, (int, float)):
                losses.append(float(loss))
    return (statistics.stdev(losses) if len(losses) >= 2 else None), len(losses)


@dataclass
class Verdict:
    """The comparison of one cell's committed numbers with its re-run."""

    label: str
    verdict: str  # "bit-identical" | "within seed noise" | "NOT reproduced"
    eval_loss: tuple[float, float]  # (committed, re-run)
    allowed: float  # the |Δ eval_loss| accepted as seed noise
    noise_from: str  # where `allowed` comes from
    max_abs_diff: tuple[str, float]  # (metric, |Δ|) of the largest difference over every compared metric
    differing: int  # how many compared metrics differ at all
    compared: int
    missing: list[str] = field(default_factory=list)  # committed metrics the re-run lacks
    notes: list[str] = field(default_factory=list)  # same config? same base? same threads?

    @property
    def ok(self) -> bool:
        """Reproduced: bit-identical or within seed noise."""
        return self.verdict != "NOT reproduced"


def compare(label: str, committed: dict, rerun: dict, noise: float | None, n_seeds: int, tol: float) -> Verdict:
    """Compare two summaries' final numbers. bit-identical: every compared metric equal; within
    seed noise: |Δ eval_loss| <= max(NOISE_SIGMAS x noise, tol) (noise None: tol alone) and no
    committed metric missing; else NOT reproduced."""
    a, b = compared_metrics(committed.get("final") or {}), compared_metrics(rerun.get("final") or {})
    if "eval_loss" not in a:
        raise PlanError(f"{label}: the committed summary.json has no final eval_loss to compare")
    missing = sorted(set(a) - set(b))
    diffs = {k: abs(a[k] - b[k]) for k in a if k in b}
    differing = sum(1 for k, d in diffs.items() if d != 0 or math.isnan(d))
    worst = max(diffs.items(), key=lambda kv: (math.isnan(kv[1]), kv[1])) if diffs else ("(nothing in common)", math.nan)
    if noise is None:
        allowed, noise_from = tol, f"--tol {tol:g} (fewer than 2 committed seeds in the row)"
    else:
        allowed = max(NOISE_SIGMAS * noise, tol)
        noise_from = f"{NOISE_SIGMAS:g} x seed std {noise:.2e} over {n_seeds} committed seeds"
    d_loss = diffs.get("eval_loss", math.nan)
    if not missing and differing == 0:
        verdict = "bit-identical"
    elif not missing and d_loss <= allowed:  # NaN compares False: a NaN re-run is not reproduced
        verdict = "within seed noise"
    else:
        verdict = "NOT reproduced"
    return Verdict(label, verdict, (a["eval_loss"], b.get("eval_loss", math.nan)), allowed, noise_from, worst,
                   differing, len(diffs), missing)


def select_cells(plan: Plan, runs_root: Path, patterns: list[str]) -> list[Cell]:
    """The plan's committed, completed cells whose label `<family>/<cell>` matches any pattern
    (shell-style: `baselines/router=topk,seed=0`, `sweep_B/*`), in plan order. A pattern that
    matches no completed cell is an error naming it."""
    done = [c for c in plan.cells if is_complete(c.run_dir(runs_root))]
    chosen = []
    for p in patterns:
        hits = [c for c in done if fnmatch.fnmatchcase(f"{c.family}/{c.name}", p)]
        if not hits:
            planned = [c for c in plan.cells if fnmatch.fnmatchcase(f"{c.family}/{c.name}", p)]
            why = "its cells are not finished yet" if planned else "no cell of the plan has that label"
            raise PlanError(f"verify: '{p}' matches no finished cell under {runs_root} ({why}; "
                            "labels are <family>/<cell> as `results status` and results/runs/ name them)")
        chosen += [c for c in hits if c not in chosen]
    return [c for c in plan.cells if c in chosen]


def _committed_threads(record_dir: Path) -> int:
    """The threads the committed cell trained with (cell.json), 1 when unrecorded: the thread
    count changes float summation order, so a bitwise re-run needs the same one."""
    rec = record_dir / CELL_RECORD
    machine = (json.loads(rec.read_text()).get("machine") or {}) if rec.is_file() else {}
    return int(machine.get("threads_per_cell") or 1)


def _committed_base_sha(record_dir: Path) -> str | None:
    rec = record_dir / CELL_RECORD
    return ((json.loads(rec.read_text()).get("base") or {}).get("model_sha256")) if rec.is_file() else None


def verify_cells(plan: Plan, repo: Path, results_root: Path, patterns: list[str], out_root: Path = VERIFY_DIR,
                 base_root: Path = BASE_DIR, tol: float = 1e-3, fresh: bool = False, echo=print) -> list[Verdict]:
    """Re-train every selected committed cell into out_root/<family>/<cell> (its bases first when
    they are missing) with the committed cell's command and thread count, and compare. A re-run
    already complete there is reused unless `fresh`; a half-finished one resumes."""
    runs_root = results_root / "runs"
    cells = select_cells(plan, runs_root, patterns)
    bases = base_tasks(plan, results_root, base_root)
    verdicts = []
    for i, cell in enumerate(cells, 1):
        label = f"{cell.family}/{cell.name}"
        committed_dir = cell.run_dir(runs_root)
        task = cell_task(cell, out_root)
        if cell.base and not is_complete(bases[cell.base].run_dir):
            echo(f"verify: training base {cell.base} first ({bases[cell.base].run_dir})")
            _run_locked(bases[cell.base], 1, repo, bases)
        if fresh:
            shutil.rmtree(task.run_dir, ignore_errors=True)
        threads = _committed_threads(committed_dir)
        if is_complete(task.run_dir):
            echo(f"verify [{i}/{len(cells)}] {label}: reusing the re-run in {task.run_dir} (--fresh retrains it)")
        else:
            echo(f"verify [{i}/{len(cells)}] {label}: training into {task.run_dir} ({threads} thread(s))")
            _run_locked(task, threads, repo, bases)
        committed, rerun = read_summary(committed_dir) or {}, read_summary(task.run_dir) or {}
        if rerun.get("status") != "completed":
            v = Verdict(label, "NOT reproduced", ((committed.get("final") or {}).get("eval_loss", math.nan), math.nan),
                        0.0, "", ("(the re-run did not finish)", math.nan), 0, 0,
                        notes=[f"the re-run failed: see {task.run_dir / 'stdout.log'}"])
        else:
            noise, n = seed_noise(cell, plan, runs_root)
            v = compare(label, committed, rerun, noise, n, tol)
            v.notes += _context_notes(committed, rerun, committed_dir, bases.get(cell.base) if cell.base else None)
        verdicts.append(v)
        echo(format_verdict(v))
    return verdicts


def _run_locked(task, threads: int, repo: Path, bases: dict) -> None:
    lock = _try_lock(task)
    if lock is None:
        raise PlanError(f"verify: {task.label} ({task.run_dir}) is being trained by another process; run again later")
    try:
        run_task(task, threads, repo, bases, lock.fileno())
    finally:
        lock.close()


def _context_notes(committed: dict, rerun: dict, committed_dir: Path, base) -> list[str]:
    """What differs between the two runs besides the numbers: the resolved config (fingerprint)
    and the base weights. Either explains a difference beyond bitwise."""
    notes = []
    fa, fb = committed.get("config_fingerprint"), rerun.get("config_fingerprint")
    notes.append("same resolved config" if fa == fb else f"config differs: fingerprint {fa} committed, {fb} re-run")
    if base is not None:
        was, now = _committed_base_sha(committed_dir), file_sha256(base.run_dir / "model" / "model.safetensors")
        notes.append("same base weights" if was == now else
                     f"base weights differ from the committed cell's (sha256 {str(was)[:12]} vs {str(now)[:12]})")
    return notes


def format_verdict(v: Verdict) -> str:
    """One cell's verdict as a few readable lines."""
    (a, b), (key, worst) = v.eval_loss, v.max_abs_diff
    lines = [f"{v.label}: {v.verdict}",
             f"  eval_loss committed {a:.10f}  re-run {b:.10f}  |Δ| {abs(a - b):.2e}"
             + (f"  (allowed {v.allowed:.2e}: {v.noise_from})" if v.verdict != "bit-identical" and v.noise_from else ""),
             f"  {v.differing} of {v.compared} compared metrics differ; largest |Δ| {worst:.2e} ({key})"]
    if v.missing:
        lines.append(f"  missing from the re-run: {', '.join(v.missing[:8])}{' ...' if len(v.missing) > 8 else ''}")
    lines += [f"  {n}" for n in v.notes]
    return "\n".join(lines)
