"""The routing-snapshot format and its one reader: `<run_dir>/routing/step{step:06d}.pt`.

Written by the routing monitor (spectra.metrics.monitor) at chosen optimizer steps; read by the
monitor again after a resume (stability across the whole run) and by spectra.analysis (figures,
Table 12). Format 1, on a fixed held-out slice of N = B·S positions:

    {"format": 1, "step": int, "max_steps", "fingerprint", "num_experts", "top_k",
     "shape": [B, S], "valid": [N] bool, "domain_ids": [N] long (−1 = padding) or None,
     "input_ids": [N] int32, "domain_names": [str],
     "layers": {i: {"expert_index": [N, k] int32, "served": [N, k] bool, "load": [E] float64,
                    "chosen": [N, k] bool (routers that mark their choices, e.g. Expert Choice),
                    "load_before_quota": [E], "load_after_quota": [E]   (quota routers only)}}}

A file is whole or absent (temp file + rename). Files are picked by the step in their name before
any is opened: on a multi-rank resume rank 0 deletes snapshots past the resume step while other
ranks list the directory, so a file past `max_step` is never read.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from spectra.contracts.rundir import write_atomic

SNAPSHOT_DIR = "routing"


def snapshot_path(run_dir, step: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"step{step:06d}.pt"


def save_snapshot(path, record: dict) -> None:
    """torch.save to a temp file in the same directory, then rename: the file is whole or absent."""
    write_atomic(path, lambda f: torch.save(record, f), binary=True)


def load_snapshot(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def snapshot_files(run_dir, max_step: int | None = None) -> list[tuple[int, Path]]:
    """(step, path) of a run's snapshot files in step order, read from the names (stepNNNNNN.pt)
    without opening them; only steps <= max_step when given. Other names are ignored."""
    out = []
    for p in (Path(run_dir) / SNAPSHOT_DIR).glob("step*.pt"):
        digits = p.stem[len("step"):]
        if digits.isdigit() and (max_step is None or int(digits) <= max_step):
            out.append((int(digits), p))
    return sorted(out)


def read_snapshots(run_dir, max_step: int | None = None, skip_unreadable: bool = False) -> list[tuple[Path, dict]]:
    """(path, record) of a run's snapshots in step order (steps <= max_step when given).

    A listed file that is gone when opened is skipped with a warning (a concurrent resume deleted
    it). skip_unreadable: also skip, with a warning, a file that cannot be loaded (torn, foreign) —
    what a report wants; training wants such a file to fail loudly.
    """
    out = []
    for _, path in snapshot_files(run_dir, max_step):
        try:
            record = load_snapshot(path)
        except FileNotFoundError:
            warnings.warn(f"routing snapshot {path} vanished while loading; skipped", stacklevel=2)
            continue
        except Exception as e:  # noqa: BLE001 - a torn or foreign file must not stop a report
            if not skip_unreadable:
                raise
            warnings.warn(f"{path}: unreadable routing snapshot skipped ({type(e).__name__}: {e})", stacklevel=2)
            continue
        if max_step is None or not isinstance(record, dict) or record.get("step", 0) <= max_step:
            out.append((path, record))
    return out


def load_snapshots(run_dir, max_step: int | None = None) -> list[dict]:
    """A run's snapshot records in step order (those at steps <= max_step when given)."""
    return [record for _, record in read_snapshots(run_dir, max_step)]
