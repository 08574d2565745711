"""`python -m spectra.results verify` — train committed cells again from their recorded command
and compare the new numbers with the committed ones.

The committed results are only worth what a second run of them gives. A cell's run is
deterministic on CPU for a given thread count, base weights and code, so on the same kind of
machine a re-run is expected to be bit-identical. On another machine (another BLAS, another
thread count) the float sums differ and training drifts; the fair test is then seed noise: the
re-run and the committed run are two draws, so their difference has a standard deviation of
√2 σ (σ: the std of the final eval loss over seeds), and |Δ eval_loss| ≤ 2 √2 σ is "within seed
noise". σ is the committed row's own (its other seeds), or, for a one-seed sweep cell, the
pooled σ of every row of the plan that has several seeds.

The re-run goes to its own directory (outputs/verify/<family>/<cell>), never under results/, is
never committed, and always starts from scratch (trainer.resume=never): a resumed run is not
the recorded one. A finished re-run is reused (its code and versions are reported) unless
--fresh. Timings are not compared (they are the machine's, not the run's).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from spectra.contracts.rundir import is_complete, read_summary, write_json_atomic
from spectra.results.plan import Cell, Plan, PlanError
from spectra.results.runner import BASE_DIR, CELL_RECORD, Task, _try_lock, base_tasks, file_sha256, run_task

VERIFY_DIR = Path("outputs/verify")
# Substrings of summary["final"] keys that measure the machine (wall clock, and the router's
# share of it: Table 9), not the run.
TIMING_MARKERS = ("_ms", "router_share", "runtime", "per_second", "tokens_per_s", "time_s")
NOISE_SIGMAS = 2.0  # "within seed noise": |Δ eval_loss| <= NOISE_SIGMAS x √2 x σ
FROM_SCRATCH = "trainer.resume=never"  # appended to the recorded command: a verify run never resumes

REPRODUCED = ("bit-identical", "within seed noise")
NOT_REPRODUCED = "NOT reproduced"
NOT_RUN = "could not run"


def compared_metrics(final: dict) -> dict[str, float]:
    """The numbers of a summary's `final` block a re-run must reproduce: losses (overall and per
    domain) and routing metrics; timings and strings dropped. null (how a NaN is stored) is NaN."""
    return {k: math.nan if v is None else float(v) for k, v in final.items()
            if (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))
            and not any(m in k for m in TIMING_MARKERS)}


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _without_seed(overrides) -> tuple[str, ...]:
    return tuple(o for o in overrides if not o.startswith("seed="))


def _final_loss(run_dir: Path) -> float | None:
    s = read_summary(run_dir) or {}
    loss = (s.get("final") or {}).get("eval_loss") if s.get("status") == "completed" else None
    return float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None


def _rows(plan: Plan, runs_root: Path) -> dict[tuple, list[float]]:
    """Committed final eval losses per row: (family, overrides without seed) -> one per seed."""
    rows: dict[tuple, list[float]] = {}
    for c in plan.cells:
        loss = _final_loss(c.run_dir(runs_root))
        if loss is not None:
            rows.setdefault((c.family, _without_seed(c.overrides)), []).append(loss)
    return rows


def seed_noise(cell: Cell, plan: Plan, runs_root: Path) -> tuple[float | None, int]:
    """(sample std of the final eval loss over the committed seeds of the cell's row, number of
    seeds); std None when fewer than two seeds are finished. The row: the plan's cells of the
    same family whose overrides equal this cell's but for `seed=`."""
    losses = _rows(plan, runs_root).get((cell.family, _without_seed(cell.overrides)), [])
    return (statistics.stdev(losses) if len(losses) >= 2 else None), len(losses)


def pooled_noise(plan: Plan, runs_root: Path) -> tuple[float | None, int]:
    """(pooled sample std of the final eval loss over every row with >= 2 committed seeds,
    number of such rows): sqrt(Σ (n_i − 1) s_i² / Σ (n_i − 1)); None when no row has two."""
    rows = [v for v in _rows(plan, runs_root).values() if len(v) >= 2]
    if not rows:
        return None, 0
    dof = sum(len(v) - 1 for v in rows)
    return math.sqrt(sum((len(v) - 1) * statistics.variance(v) for v in rows) / dof), len(rows)


def allowed_difference(cell: Cell, plan: Plan, runs_root: Path, tol: float) -> tuple[float, str]:
    """The |Δ eval_loss| accepted as seed noise for this cell, and where it comes from:
    max(NOISE_SIGMAS √2 σ, tol), σ the row's seed std, else the plan's pooled one, else tol alone."""
    sigma, n = seed_noise(cell, plan, runs_root)
    source = f"seed std {sigma:.2e} of this row's {n} committed seeds" if sigma is not None else ""
    if sigma is None:
        sigma, rows = pooled_noise(plan, runs_root)
        source = f"pooled seed std {sigma:.2e} of the plan's {rows} multi-seed rows" if sigma is not None else ""
    if sigma is None:
        return tol, f"--tol {tol:g} (no row of the plan has two committed seeds)"
    return max(NOISE_SIGMAS * math.sqrt(2.0) * sigma, tol), f"{NOISE_SIGMAS:g} x √2 x {source}" + (
        f", at least --tol {tol:g}" if tol > 0 else "")


@dataclass
class Verdict:
    """The comparison of one cell's committed numbers with its re-run."""

    label: str
    verdict: str  # one of REPRODUCED, NOT_REPRODUCED, NOT_RUN
    eval_loss: tuple[float, float] = (math.nan, math.nan)  # (committed, re-run)
    allowed: float = math.nan  # the |Δ eval_loss| accepted as seed noise
    allowed_from: str = ""
    max_abs_diff: tuple[str, float] = ("", 0.0)  # (metric, |Δ|) of the largest difference
    differing: int = 0  # how many compared metrics differ at all
    compared: int = 0
    missing: list[str] = field(default_factory=list)  # committed metrics the re-run lacks
    notes: list[str] = field(default_factory=list)  # same config? same base? same code? why not run?
    rerun_dir: str = ""

    @property
    def ok(self) -> bool:
        """Reproduced: bit-identical or within seed noise."""
        return self.verdict in REPRODUCED


def compare(label: str, committed: dict, rerun: dict, allowed: float, allowed_from: str) -> Verdict:
    """Compare two summaries' final numbers. bit-identical: every compared metric of the
    committed run equal in the re-run (NaN equals NaN); within seed noise: |Δ eval_loss| <=
    allowed and no committed metric missing; else NOT reproduced. Only eval_loss decides beyond
    bitwise; the other metrics' differences are reported."""
    a, b = compared_metrics(committed.get("final") or {}), compared_metrics(rerun.get("final") or {})
    v = Verdict(label, NOT_REPRODUCED, (a.get("eval_loss", math.nan), b.get("eval_loss", math.nan)), allowed,
                allowed_from)
    v.missing = sorted(set(a) - set(b))
    common = [k for k in a if k in b]
    v.compared = len(common)
    diffs = {k: abs(a[k] - b[k]) for k in common if not _same(a[k], b[k])}
    v.differing = len(diffs)
    if diffs:
        v.max_abs_diff = max(diffs.items(), key=lambda kv: (math.isnan(kv[1]), kv[1]))
    if "eval_loss" not in a:
        v.notes.append("the committed summary has no final eval_loss")
    elif not v.missing and not diffs:
        v.verdict = "bit-identical"
    elif not v.missing and abs(a["eval_loss"] - b.get("eval_loss", math.nan)) <= allowed:  # NaN: False
        v.verdict = "within seed noise"
    return v


def select_cells(plan: Plan, runs_root: Path, patterns: list[str]) -> list[Cell]:
    """The plan's committed, completed cells whose label `<family>/<cell>` matches any pattern
    (shell-style: `baselines/router=topk,seed=0`, `sweep_B/*`), in plan order. A pattern that
    matches no completed cell is an error naming it."""
    done = [c for c in plan.cells if is_complete(c.run_dir(runs_root))]
    chosen: set[Cell] = set()
    for p in patterns:
        hits = [c for c in done if fnmatch.fnmatchcase(f"{c.family}/{c.name}", p)]
        if not hits:
            planned = [c for c in plan.cells if fnmatch.fnmatchcase(f"{c.family}/{c.name}", p)]
            why = "its cells are not finished yet" if planned else "no cell of the plan has that label"
            raise PlanError(f"verify: '{p}' matches no finished cell under {runs_root} ({why}; "
                            "labels are <family>/<cell> as `results status` and results/runs/ name them)")
        chosen |= set(hits)
    return [c for c in plan.cells if c in chosen]


def _record(run_dir: Path) -> dict | None:
    path = run_dir / CELL_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def verify_cells(plan: Plan, repo: Path, results_root: Path, patterns: list[str], out_root: Path = VERIFY_DIR,
                 base_root: Path = BASE_DIR, tol: float = 0.0, fresh: bool = False,
                 report: Path | None = None, echo: Callable[[str], None] = print) -> list[Verdict]:
    """Re-train every selected committed cell into out_root/<family>/<cell> (its bases first when
    they are missing) with the overrides and thread count of its cell.json, from scratch, and
    compare. A finished re-run there is reused unless `fresh`. `report`: a JSON file rewritten
    after every cell, so an interrupted verify keeps its verdicts."""
    runs_root = results_root / "runs"
    if out_root.resolve().is_relative_to(results_root.resolve()):
        raise PlanError(f"verify: --out {out_root} is inside the results directory {results_root}; "
                        "re-runs must not touch the committed cells")
    cells = select_cells(plan, runs_root, patterns)
    bases = base_tasks(plan, results_root, base_root)
    failed_bases: set[str] = set()
    verdicts: list[Verdict] = []
    for i, cell in enumerate(cells, 1):
        label = f"{cell.family}/{cell.name}"
        echo(f"verify [{i}/{len(cells)}] {label}")
        base = bases.get(cell.base) if cell.base else None
        if base is not None and cell.base not in failed_bases and not is_complete(base.run_dir):
            echo(f"verify: training base {cell.base} first ({base.run_dir})")
            if _run(base, 1, repo, bases, fresh=False) is not None or not is_complete(base.run_dir):
                failed_bases.add(cell.base)
        if cell.base in failed_bases:
            v = Verdict(label, NOT_RUN, notes=[f"its base {cell.base} did not train: see {base.run_dir / 'stdout.log'}"])
        else:
            v = _verify_one(cell, label, plan, repo, runs_root, out_root, bases, tol, fresh, echo)
        verdicts.append(v)
        echo(format_verdict(v))
        if report is not None:
            write_json_atomic(report, [dataclasses.asdict(x) for x in verdicts])
    return verdicts


def _verify_one(cell: Cell, label: str, plan: Plan, repo: Path, runs_root: Path, out_root: Path, bases: dict,
                tol: float, fresh: bool, echo) -> Verdict:
    committed_dir = cell.run_dir(runs_root)
    record = _record(committed_dir)
    notes = []
    if record is None:
        notes.append(f"no {CELL_RECORD}: the plan's overrides and 1 thread used, the committed base weights unknown")
    overrides = tuple(record["overrides"]) if record else cell.overrides
    if record and overrides != cell.overrides:
        notes.append("the plan's overrides for this cell changed since it was committed; the recorded ones were run")
    threads = int(((record or {}).get("machine") or {}).get("threads_per_cell") or 1)
    task = Task(label, (*overrides, FROM_SCRATCH), cell.run_dir(out_root), cell.run_dir(out_root), cell.base)
    reused = is_complete(task.run_dir) and not fresh
    if reused:
        echo(f"  reusing the finished re-run in {task.run_dir} (--fresh retrains it)")
    else:
        echo(f"  training into {task.run_dir} ({threads} thread(s))")
        busy = _run(task, threads, repo, bases, fresh)
        if busy:
            return Verdict(label, NOT_RUN, notes=[busy], rerun_dir=str(task.run_dir))
    committed, rerun = read_summary(committed_dir) or {}, read_summary(task.run_dir) or {}
    if rerun.get("status") != "completed":
        v = Verdict(label, NOT_REPRODUCED, (compared_metrics(committed.get("final") or {}).get("eval_loss", math.nan),
                                            math.nan))
        v.notes = [*notes, f"the re-run did not finish: see {task.run_dir / 'stdout.log'}"]
    else:
        allowed, allowed_from = allowed_difference(cell, plan, runs_root, tol)
        v = compare(label, committed, rerun, allowed, allowed_from)
        v.notes = [*notes, *_context_notes(committed, rerun, record, _record(task.run_dir),
                                           bases.get(cell.base) if cell.base else None, reused)]
    v.rerun_dir = str(task.run_dir)
    return v


def _run(task: Task, threads: int, repo: Path, bases: dict, fresh: bool) -> str | None:
    """Train a task under its lock (a fresh one: its directory emptied first, under the lock);
    returns why it could not start (another process holds it), else None."""
    lock = _try_lock(task)
    if lock is None:
        return f"another process is training into {task.run_dir}; run again when it is done"
    try:
        if fresh:
            shutil.rmtree(task.run_dir, ignore_errors=True)
        run_task(task, threads, repo, bases, lock.fileno())
    finally:
        lock.close()
    return None


def _context_notes(committed: dict, rerun: dict, record: dict | None, rerun_record: dict | None, base,
                   reused: bool) -> list[str]:
    """What differs between the two runs besides the numbers: the resolved config (fingerprint),
    the base weights, the code and package versions. Each explains a difference beyond bitwise."""
    notes = []
    fa, fb = committed.get("config_fingerprint"), rerun.get("config_fingerprint")
    notes.append("same resolved config" if fa == fb else f"config differs: fingerprint {fa} committed, {fb} re-run")
    if base is not None and record is not None:
        was = (record.get("base") or {}).get("model_sha256")
        now = file_sha256(base.run_dir / "model" / "model.safetensors")
        notes.append("the committed base weights unknown" if was is None else "same base weights" if was == now else
                     f"base weights differ from the committed cell's (sha256 {was[:12]} committed, {str(now)[:12]} now)")
    va, vb = (record or {}).get("versions") or {}, (rerun_record or {}).get("versions") or {}
    if va and vb:
        keys = ("torch", "transformers", "python", "lock_sha256")
        diff = [f"{k} {va.get(k)} vs {vb.get(k)}" for k in keys if va.get(k) != vb.get(k)]
        notes.append("same package versions and lock" if not diff else "versions differ: " + "; ".join(diff))
        ca, cb = va.get("code_commit"), vb.get("code_commit")
        if ca != cb:
            notes.append(f"code: committed cell trained at {str(ca)[:10]}, re-run at {str(cb)[:10]}"
                         + (" (with uncommitted edits)" if vb.get("code_dirty") else ""))
    if reused:
        notes.append("re-run reused from an earlier verify")
    if rerun.get("resumed_from"):
        notes.append(f"the re-run resumed from {rerun['resumed_from']}")
    return notes


def format_verdict(v: Verdict) -> str:
    """One cell's verdict as a few readable lines."""
    lines = [f"{v.label}: {v.verdict}"]
    (a, b), (key, worst) = v.eval_loss, v.max_abs_diff
    if v.verdict != NOT_RUN:
        lines.append(f"  eval_loss committed {a:.10f}  re-run {b:.10f}  |Δ| {abs(a - b):.2e}"
                     + (f"  (allowed {v.allowed:.2e}: {v.allowed_from})" if v.verdict != "bit-identical" and v.allowed_from
                        else ""))
        lines.append(f"  {v.differing} of {v.compared} compared metrics differ"
                     + (f"; largest |Δ| {worst:.2e} ({key})" if v.differing else ""))
    if v.missing:
        lines.append(f"  missing from the re-run: {', '.join(v.missing[:8])}{' ...' if len(v.missing) > 8 else ''}")
    lines += [f"  {n}" for n in v.notes]
    return "\n".join(lines)


def repeated_configs(runs_root: Path) -> list[tuple[str, Verdict]]:
    """Committed cells whose resolved config (summary.json's config_fingerprint) another committed
    cell already has: the sweeps' default points repeat baselines/router=spectra,seed=0, trained
    by other processes and sessions. Each repeat compared with the first of its group (label
    order), where bit-identical is expected; returns (first's label, verdict of the repeat)."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for path in sorted(runs_root.glob("*/*/summary.json")):
        s = read_summary(path.parent) or {}
        if s.get("status") == "completed" and s.get("config_fingerprint"):
            label = f"{path.parent.parent.name}/{path.parent.name}"
            groups.setdefault(s["config_fingerprint"], []).append((label, s))
    pairs = [(first, compare(label, s0, s, 0.0, "the same resolved config: bit-identical expected"))
             for (first, s0), *rest in groups.values() for label, s in rest]
    for _, v in pairs:  # same config, same machine: anything but bitwise equality is a difference
        v.verdict = v.verdict if v.verdict == "bit-identical" else NOT_REPRODUCED
    return pairs


def repeats_markdown(runs_root: Path) -> str | None:
    """results/README.md's reproducibility paragraph: how many committed cells repeat another's
    config and whether every final metric agrees bit for bit; each that does not, with its Δ."""
    pairs = repeated_configs(runs_root)
    if not pairs:
        return None
    same = [v for _, v in pairs if v.verdict == "bit-identical"]
    metrics = min(v.compared for _, v in pairs)
    out = [f"**Reproducibility.** {len(pairs)} committed cell(s) repeat the resolved config of another "
           f"(config fingerprint), trained separately; {len(same)} of them are "
           f"bit-identical to it in every compared final metric (≥ {metrics} each: losses per domain, "
           "routing metrics; timings excluded). `make results-verify CELLS=...` retrains any cell from "
           "scratch and compares it the same way.", ""]
    out += [f"- {v.label} = {first}: {v.verdict}" + (
            f" (eval loss {v.eval_loss[0]:.10f} vs {v.eval_loss[1]:.10f}; {v.differing} of {v.compared} metrics differ)"
            if v.verdict != "bit-identical" else "") for first, v in pairs]
    return "\n".join(out) + "\n"
