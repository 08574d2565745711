"""The run directory: the only thing training shares with analysis and the sweepers.

    <run_dir>/.hydra/config.yaml   resolved config (written by Hydra)
    <run_dir>/metrics.jsonl        one JSON object per log/eval step; lines are appended whole
    <run_dir>/summary.json         final/best metrics, status and objective; written last, atomically
    <run_dir>/checkpoints/         Trainer checkpoints
    <run_dir>/model/               the final upcycled model (save_pretrained)
    <run_dir>/routing/             routing snapshots (format: spectra.contracts.snapshots)
    <sweep_dir>/sweep_progress.jsonl   one line per finished/skipped/failed cell of a multirun

A torn last line in metrics.jsonl (a kill mid-write) is skipped with a warning by `read_jsonl`;
`summary.json` appears only complete (temp file + rename), so its presence with
`status == "completed"` is what marks a run as done; with the same `config_fingerprint` it
marks a sweep cell as done (`cached_objective`), which is how a re-run sweep resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
PROGRESS = "sweep_progress.jsonl"  # in the sweep directory
EVAL_HARNESS = "eval_harness.json"  # downstream evaluation (spectra.eval), written atomically
# Keys that do not change what a run computes (where it writes, how it resumes, its labels).
VOLATILE_KEYS = ("output_dir", "skip_complete", "tags", "sweep_name", "scale_name", "seeds", "sweep_values")
VOLATILE_TRAINER_KEYS = ("resume",)
# Keys added to the config after runs were recorded, with the default that reproduces what those
# runs computed: at that default a key is left out of the fingerprint, so a recorded run keeps
# its fingerprint (and its cached objective) when the schema grows.
ADDED_KEYS_AT_DEFAULT = (("data", "split_long_documents", False),)
# Hydra's own settings (`hydra.run.dir`, `hydra.launcher.*`): never part of the run config, so the
# fingerprint never sees them; as command-line overrides they are volatile too.
VOLATILE_OVERRIDE_PREFIXES = ("hydra.",)


def is_volatile_override(key: str) -> bool:
    """Whether a command-line override key (`trainer.resume`, `+tags`, `hydra.run.dir`) sets a
    volatile key: one of VOLATILE_KEYS, `trainer.<VOLATILE_TRAINER_KEYS>`, something below one of
    them, or a Hydra setting. Such an override changes nothing a run computes."""
    key = key.lstrip("+~")
    names = VOLATILE_KEYS + tuple(f"trainer.{k}" for k in VOLATILE_TRAINER_KEYS)
    return key.startswith(VOLATILE_OVERRIDE_PREFIXES) or any(key == n or key.startswith(n + ".") for n in names)


def _jsonable(x: Any) -> Any:
    """Floats that JSON can't hold (NaN, inf) become None; tensors become Python numbers."""
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_atomic(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False) -> None:
    """Write a file whole or not at all: `write(f)` into a temp file in the same directory,
    fsync, then rename over `path` (readers never see a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """JSON (NaN/inf as null) written atomically (see `write_atomic`)."""
    write_atomic(path, lambda f: json.dump(_jsonable(obj), f, indent=2, sort_keys=True))


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record as a single write of one line (no interleaving of partial lines)."""
    line = json.dumps(_jsonable(record), sort_keys=True) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All complete records; a torn or corrupt line is skipped with a warning naming it."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{i}: skipping a torn or corrupt line", stacklevel=2)
    return records


def read_summary(run_dir: str | os.PathLike) -> dict | None:
    """The run's summary, or None when it is missing or unreadable (never a partial one)."""
    p = Path(run_dir) / SUMMARY
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_eval_harness(run_dir: str | os.PathLike) -> dict | None:
    """The run's EVAL_HARNESS record (`python -m spectra.eval`), or None when absent or unreadable."""
    try:
        record = json.loads((Path(run_dir) / EVAL_HARNESS).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_complete(run_dir: str | os.PathLike) -> bool:
    """True when the run finished and wrote its summary."""
    s = read_summary(run_dir)
    return bool(s) and s.get("status") == "completed"


# ------------------------------------------------------------------ cell identity and resume


def config_fingerprint(cfg) -> str:
    """sha256 of the resolved config (a dataclass) without volatile keys: equal fingerprints train
    the same. Recorded in summary.json; a complete cell with the same fingerprint is not re-run."""
    d = dataclasses.asdict(cfg)
    for k in VOLATILE_KEYS:
        d.pop(k, None)
    for k in VOLATILE_TRAINER_KEYS:
        d["trainer"].pop(k, None)
    for group, key, default in ADDED_KEYS_AT_DEFAULT:
        if group in d and key in d[group] and d[group][key] == default:
            del d[group][key]
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_objective(run_dir: str | os.PathLike, fingerprint: str):
    """The recorded objective of a complete cell with this fingerprint, else None."""
    s = read_summary(run_dir)
    if not s or s.get("status") != "completed" or s.get("config_fingerprint") != fingerprint:
        return None
    values = tuple((s.get("objective") or {}).values())
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def reset_run_dir(run_dir: str | os.PathLike) -> None:
    """Start a run from scratch (trainer.resume=never): drop a previous attempt's outputs."""
    run_dir = Path(run_dir)
    for name in (METRICS, SUMMARY):
        (run_dir / name).unlink(missing_ok=True)
    for name in ("checkpoints", "routing", "model"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def append_progress(sweep_dir: str | os.PathLike, run_dir: str | os.PathLike, status: str, **extra) -> None:
    """Append `{cell, status, time}` to `<sweep_dir>/sweep_progress.jsonl`."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    append_jsonl(sweep_dir / PROGRESS, {"cell": str(run_dir), "status": status, "time": time.time(), **extra})
