"""Run directories -> pandas. Analysis reads only run directories (see spectra/contracts/rundir.py).

A run directory is any directory holding `.hydra/config.yaml`, `summary.json` or
`metrics.jsonl`. `collect(paths)` returns `(runs, steps)`:

runs: one row per run directory
    run_dir, sweep (the sweep directory it belongs to), sweep_name, status
    (completed | failed | incomplete | not started: a cell sweep_plan.json lists that has no
    run directory), variant (the overrides minus seed and volatile keys),
    seed, router, error, steps, tokens_per_s, started, wall_time_s,
    ov:<key>        every override (`ov:router`, `ov:osr.epsilon`, ...)
    cfg:<a.b.c>     the resolved config, flattened (`cfg:moe.num_experts`)
    final:<key>     final evaluation metrics (summary.json "final")
    best:<key>      best metrics; objective:<name> the objective value(s)
    <block>:<key>   any other mapping in summary.json, flattened (`stability:consistency`)
    last:<key>      the last logged value of every numeric metrics.jsonl key
    duplicate       True for a run that repeats another run's (variant, seed)
    duplicate_of    the run directory kept instead of a duplicate ('' for the others)
    duplicate_reason why that run is kept instead ('' for runs that are not duplicates)
    counted         completed and not a duplicate: the runs that enter means and tests
steps: one row per metrics.jsonl record (run_dir, sweep, variant, seed, router, kind, step, ...)

Failed, incomplete, not started and duplicate runs are kept and flagged, never dropped silently; `problems()`
lists them with a reason. Of several runs with the same (variant, seed), the counted one is a
completed one, the most recently started (a re-run after a failure wins); the others are
duplicates.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import yaml

from spectra.contracts.rundir import METRICS, SUMMARY, is_volatile_override, read_eval_harness, read_jsonl, read_summary
from spectra.sweep.cells import PLAN, read_plan

NOT_STARTED = "not started"  # a cell of the sweep's plan without a run directory

# summary.json keys that are not metric blocks (kept as plain columns or ignored)
_SUMMARY_SCALARS = ("status", "error", "steps", "tokens_per_s", "started", "wall_time_s", "train_time_s",
                    "train_loss", "world_size", "router", "seed", "resumed_from")
_SKIP_DIRS = ("checkpoints", "model", "routing", ".hydra", "tensorboard", "wandb")


def find_run_dirs(paths) -> list[Path]:
    """Every run directory under the given paths (a path may itself be a run directory)."""
    found: set[Path] = set()
    for p in [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]:
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such sweep or run directory")
        for d, dirnames, filenames in os.walk(p):
            dirnames[:] = sorted(n for n in dirnames if n not in _SKIP_DIRS)
            d = Path(d)
            if SUMMARY in filenames or METRICS in filenames or (d / ".hydra" / "config.yaml").exists():
                found.add(d.resolve())
    return sorted(found)


def find_sweep_dirs(root, count: int | None = None) -> list[Path]:
    """Sweep directories (holding Hydra's `multirun.yaml`) under `root`, newest first."""
    root = Path(root)
    if not root.exists():
        return []
    sweeps = {f.parent.resolve() for f in root.rglob("multirun.yaml") if ".hydra" not in f.parts}
    ordered = sorted(sweeps, key=lambda d: (d.stat().st_mtime, str(d)), reverse=True)
    return ordered[:count] if count else ordered


def _sweep_of(run_dir: Path, roots: list[Path]) -> Path:
    """The nearest ancestor holding `multirun.yaml`, else the path the run was found under."""
    for parent in [run_dir, *run_dir.parents]:
        if (parent / "multirun.yaml").exists():
            return parent
    for root in roots:
        if run_dir == root or root in run_dir.parents:
            return root if root != run_dir else run_dir.parent
    return run_dir.parent


def _sweep_name(row: dict, sweep: Path) -> str:
    """`sweep_name` (+ `/scale_name`) from the config (conf/sweep/*.yaml), else the override
    `+sweep=...`, else the sweep directory's name."""
    name = row.get("cfg:sweep_name")
    if name in (None, "", "adhoc"):  # the schema's default: not launched as a named sweep
        name = row.get("ov:sweep")
    if not name:
        return sweep.name
    scale = row.get("cfg:scale_name")
    return f"{name}/{scale}" if scale and scale != "custom" else str(name)


def _overrides(run_dir: Path) -> dict[str, str]:
    f = run_dir / ".hydra" / "overrides.yaml"
    if not f.exists():
        return {}
    out = {}
    for item in yaml.safe_load(f.read_text()) or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def _config(run_dir: Path) -> dict:
    f = run_dir / ".hydra" / "config.yaml"
    try:
        return (yaml.safe_load(f.read_text()) or {}) if f.exists() else {}
    except yaml.YAMLError:
        return {}


def _flatten(prefix: str, d, sep: str = "/", _path: str = "") -> dict:
    """Nested mappings -> {prefix + 'a/b': leaf}; lists become strings (one cell each)."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{_path}{sep}{k}" if _path else str(k)
        if isinstance(v, dict):
            out.update(_flatten(prefix, v, sep, key))
        else:
            out[f"{prefix}{key}"] = str(v) if isinstance(v, (list, tuple)) else v
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(value) -> str:
    """An override value for a label: Optuna's floats (0.5488135039273248) to 6 significant digits."""
    text = str(value)
    try:
        f = float(text)
    except ValueError:
        return text
    return f"{f:.6g}" if len(text) > 8 and "." in text and math.isfinite(f) else text


def _names_variant(key: str) -> bool:
    """Whether an override is part of a run's variant label: not a volatile key (the contract's
    list, the same the cell fingerprint leaves out), and not `seed`, which does change what a run
    computes but is the replicate axis: a variant's runs differ only in seed."""
    return key != "seed" and not is_volatile_override(key)


def _variant(ovr: dict[str, str]) -> str:
    return ",".join(f"{k}={_short(v)}" for k, v in sorted(ovr.items()) if _names_variant(k))


def _override_set(ovr: dict) -> frozenset:
    """A run's command-line overrides as a comparable set of (key, value) strings."""
    return frozenset((str(k), str(v)) for k, v in ovr.items())


def not_started_runs(sweep: Path, found: set[Path], found_overrides: set[frozenset] = frozenset()) -> list[dict]:
    """Rows (status "not started") for the cells the sweep's plan lists (sweep_plan.json, written
    by spectra.sweep.cells at the start of a grid multirun) that have no run directory among `found`
    and whose overrides no found run has (a sweep may name its cell directories its own way, e.g.
    `hydra.sweep.subdir=${router.name}` in the demo)."""
    rows = []
    for cell in (read_plan(sweep) or {}).get("planned") or []:
        try:
            run_dir = (sweep / cell["dir"]).resolve()
            ovr = {k.lstrip("+~"): v for k, _, v in (str(o).partition("=") for o in cell["overrides"])}
        except (KeyError, TypeError):
            continue
        if run_dir in found or _override_set(ovr) in found_overrides:
            continue
        try:
            seed = int(ovr["seed"]) if "seed" in ovr else None
        except ValueError:
            seed = ovr["seed"]
        row = {"run_dir": str(run_dir), "status": NOT_STARTED, "variant": _variant(ovr) or "(defaults)",
               "seed": seed, "router": ovr.get("router"), "steps": None, "tokens_per_s": None, "started": None,
               "wall_time_s": None, "error": f"never started: listed in {sweep / PLAN}, no run directory"}
        row.update({f"ov:{k}": v for k, v in ovr.items()})
        rows.append(row)
    return rows


def collect_run(run_dir: Path, records: list[dict] | None = None) -> dict:
    """One row describing one run directory (see the module docstring for the columns)."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    cfg = _config(run_dir)
    ovr = _overrides(run_dir)
    s = summary or {}
    status = s.get("status", "incomplete")
    if status not in ("completed", "failed"):
        status = "incomplete"  # no summary, an unreadable one, or "running" (killed mid-run)
    variant = _variant(ovr)
    seed = cfg.get("seed", s.get("seed"))
    if seed is None and "seed" in ovr:
        seed = ovr["seed"]
    try:
        seed = int(seed) if seed is not None else None
    except (TypeError, ValueError):
        pass
    row = {
        "run_dir": str(run_dir),
        "status": status,
        "variant": variant or "(defaults)",
        "seed": seed,
        "router": (cfg.get("router") or {}).get("name", s.get("router")),
        "error": s.get("error") if summary else "no summary.json (still running, killed, or never started)",
        "steps": s.get("steps"),
        "tokens_per_s": s.get("tokens_per_s"),
        "started": s.get("started"),
        "wall_time_s": s.get("wall_time_s"),
    }
    row.update({f"ov:{k}": v for k, v in ovr.items()})
    row.update(_flatten("cfg:", cfg, sep="."))
    for block, value in s.items():
        if isinstance(value, dict):
            row.update(_flatten(f"{block}:", value))
    row.update(_harness_columns(read_eval_harness(run_dir)))
    if records is None:
        records = read_jsonl(run_dir / METRICS)
    last: dict = {}
    for rec in records:
        last.update({f"last:{k}": v for k, v in rec.items() if _is_number(v)})
    row.update(last)
    return row


def _harness_columns(h: dict | None) -> dict:
    """`harness:` columns from a run's eval_harness.json: avg_score (a fraction), limit (documents
    per task; set = a partial evaluation), each task's score and every task metric."""
    if not h:
        return {}
    out = {"harness:avg_score": h.get("avg_score"), "harness:limit": h.get("limit")}
    out.update({f"harness:{t}": v for t, v in (h.get("scores") or {}).items()})
    for t, ms in (h.get("metrics") or {}).items():
        out.update({f"harness:{t}/{m}": v for m, v in (ms or {}).items() if _is_number(v)})
    return out


def seed_text(seed) -> str:
    """A seed as text: '–' when unknown (not 'nan'), '3' not '3.0' (a seed column with gaps is float)."""
    if seed is None or (isinstance(seed, float) and math.isnan(seed)):
        return "–"
    try:
        return str(int(seed)) if float(seed).is_integer() else str(seed)
    except (TypeError, ValueError):
        return str(seed)


def _mark_duplicates(runs: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.Series]:
    """(duplicate, duplicate_of, duplicate_reason): True for every run but the kept one of its
    (variant, seed) group; the kept run's directory; why that one was kept and not this one."""
    rank = runs.assign(
        _ok=(runs["status"] == "completed").astype(int),
        _started=pd.to_numeric(runs["started"], errors="coerce").fillna(-math.inf),
        _seed=runs["seed"].astype(str),  # None and NaN seeds group together, as drop_duplicates does
    ).sort_values(["_ok", "_started", "run_dir"], ascending=[False, False, True])
    kept = rank.drop_duplicates(subset=["variant", "_seed"], keep="first").set_index(["variant", "_seed"])
    dup = ~runs.index.isin(rank.drop_duplicates(subset=["variant", "_seed"], keep="first").index)
    of, reason = pd.Series("", index=runs.index), pd.Series("", index=runs.index)
    for i in runs.index[dup]:
        r = rank.loc[i]
        k = kept.loc[(r["variant"], r["_seed"])]
        if k["_ok"] and not r["_ok"]:
            why = f"this run is {r['status']}, that one completed"
        elif k["_started"] > r["_started"]:
            why = "that one has a start time, this one none" if r["_started"] == -math.inf else "that one started later"
        else:
            why = "both started at the same time, the first by path is kept"
        of[i] = k["run_dir"]
        reason[i] = (f"repeats variant and seed {seed_text(r['seed'])} of {k['run_dir']}, "
                     f"{'counted instead' if k['_ok'] else 'kept instead (neither completed)'}: {why}")
    return pd.Series(dup, index=runs.index), of, reason


def collect(paths) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, steps): one row per run, and a long frame of every metrics.jsonl record."""
    roots = [Path(p).resolve() for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    rows, steps = [], []
    for d in find_run_dirs(paths):
        records = read_jsonl(d / METRICS)
        row = collect_run(d, records)
        sweep = _sweep_of(d, roots)
        row["sweep"] = str(sweep)
        row["sweep_name"] = _sweep_name(row, sweep)
        rows.append(row)
        meta = {k: row[k] for k in ("run_dir", "sweep", "variant", "seed", "router", "status")}
        for rec in records:
            kind = "eval" if "eval_loss" in rec else ("train" if "loss" in rec else "other")
            steps.append({**meta, "kind": kind, **rec})
    found = {Path(r["run_dir"]) for r in rows}
    found_overrides = {_override_set({k[3:]: v for k, v in r.items() if k.startswith("ov:")}) for r in rows}
    sweeps = {Path(r["sweep"]) for r in rows} | {p.parent.resolve() for root in roots for p in root.rglob(PLAN)}
    for sweep in sorted(sweeps):
        for row in not_started_runs(sweep, found, found_overrides):
            row["sweep"] = str(sweep)
            row["sweep_name"] = _sweep_name(row, sweep)
            rows.append(row)
    runs = pd.DataFrame(rows)
    if not runs.empty:
        runs["duplicate"], runs["duplicate_of"], runs["duplicate_reason"] = _mark_duplicates(runs)
        runs["counted"] = (runs["status"] == "completed") & ~runs["duplicate"]
    return runs, pd.DataFrame(steps)


def _text(v) -> str:
    """A cell as text: '' for None / NaN (pandas turns a None next to strings into NaN)."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def problems(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that are not counted, each with its problem (failed / incomplete / duplicate), its
    error ('' when none) and the reason it is not counted: the error of a failed or incomplete
    run, and for a duplicate which run it repeats and why that one is counted instead."""
    cols = ["run_dir", "variant", "seed", "problem", "error", "reason"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    bad = runs[~runs["counted"]].copy()
    bad["problem"] = [
        "duplicate" if dup and st == "completed" else (f"{st}, duplicate" if dup else st)
        for st, dup in zip(bad["status"], bad["duplicate"])
    ]
    bad["error"] = [_text(e) for e in bad["error"]]
    why = bad["duplicate_reason"] if "duplicate_reason" in bad else pd.Series("", index=bad.index)
    bad["reason"] = ["; ".join(x for x in (e, _text(w) if dup else "") if x)
                     for e, w, dup in zip(bad["error"], why, bad["duplicate"])]
    return bad[cols].reset_index(drop=True)
