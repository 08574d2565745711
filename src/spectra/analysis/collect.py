"""Run directories -> pandas. Analysis reads only run directories (see train/rundir.py).

A run directory is any directory holding `.hydra/config.yaml`, `summary.json` or
`metrics.jsonl`. `collect(paths)` returns one row per run with:
    run_dir, status (completed | failed | incomplete), variant (the overrides minus seed),
    seed, router, every override as a column (`ov:<key>`), final metrics (`final:<key>`),
    best metrics (`best:<key>`), objective values (`objective:<name>`), tokens_per_s,
    duplicate (True for every run beyond the first of the same variant and seed).
Failed, incomplete and duplicate runs are kept and flagged, never dropped silently.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from spectra.train.rundir import METRICS, SUMMARY, read_jsonl, read_summary

VOLATILE_OVERRIDE_KEYS = ("seed", "output_dir", "hydra.", "trainer.resume")


def find_run_dirs(paths) -> list[Path]:
    """Every run directory under the given paths (a path may itself be a run directory)."""
    found: set[Path] = set()
    for p in [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]:
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such sweep or run directory")
        candidates = [p] + [d for d in p.rglob("*") if d.is_dir()]
        for d in candidates:
            if "checkpoints" in d.parts or d.name in (".hydra", "model"):
                continue
            if (d / ".hydra" / "config.yaml").exists() or (d / SUMMARY).exists() or (d / METRICS).exists():
                found.add(d.resolve())
    return sorted(found)


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
    return yaml.safe_load(f.read_text()) if f.exists() else {}


def _flatten(prefix: str, d: dict | None) -> dict:
    return {f"{prefix}{k}": v for k, v in (d or {}).items() if not isinstance(v, (dict, list))}


def collect_run(run_dir: Path) -> dict:
    """One row describing one run directory."""
    summary = read_summary(run_dir)
    cfg = _config(run_dir)
    ovr = _overrides(run_dir)
    status = summary.get("status", "incomplete") if summary else "incomplete"
    if status not in ("completed", "failed"):
        status = "incomplete"
    variant = ",".join(f"{k}={v}" for k, v in sorted(ovr.items()) if not k.startswith(VOLATILE_OVERRIDE_KEYS))
    row = {
        "run_dir": str(run_dir),
        "status": status,
        "variant": variant or "(defaults)",
        "seed": cfg.get("seed", (summary or {}).get("seed")),
        "router": (cfg.get("router") or {}).get("name", (summary or {}).get("router")),
        "error": (summary or {}).get("error"),
        "steps": (summary or {}).get("steps"),
        "tokens_per_s": (summary or {}).get("tokens_per_s"),
    }
    row.update({f"ov:{k}": v for k, v in ovr.items()})
    if summary:
        row.update(_flatten("final:", summary.get("final")))
        row.update(_flatten("best:", summary.get("best")))
        row.update(_flatten("objective:", summary.get("objective")))
    return row


def collect(paths) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, steps): one row per run, and a long frame of every metrics.jsonl record."""
    rows, steps = [], []
    for d in find_run_dirs(paths):
        row = collect_run(d)
        rows.append(row)
        for rec in read_jsonl(d / METRICS):
            steps.append({"run_dir": row["run_dir"], "variant": row["variant"], "seed": row["seed"], **rec})
    runs = pd.DataFrame(rows)
    if not runs.empty:
        runs["duplicate"] = runs.duplicated(subset=["variant", "seed"], keep="first")
    return runs, pd.DataFrame(steps)
