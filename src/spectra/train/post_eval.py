"""Downstream evaluation after training (`trainer.eval_harness`): `python -m spectra.eval` on the
run's saved model, in a subprocess.

A subprocess because lm-evaluation-harness is an optional extra and `spectra.eval` sits above
`train` in the package layers (README, Architecture): training imports neither. A failed
evaluation is logged with its exit status and the tail of its output, and leaves the run
`completed`: the model and summary.json are already written, and the evaluation can be re-run by
hand with the command the log prints.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def eval_harness_command(model_dir: str | os.PathLike, tasks: list[str], limit: int | None) -> list[str]:
    """The `python -m spectra.eval` command line for `model_dir` (results beside it, in the run directory)."""
    cmd = [sys.executable, "-m", "spectra.eval", str(model_dir), "--tasks", ",".join(tasks)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    return cmd


def run_eval_harness(model_dir: str | os.PathLike, tasks: list[str], limit: int | None) -> bool:
    """Run the evaluation; True when it succeeded. Never raises for a failed evaluation."""
    cmd = eval_harness_command(model_dir, tasks, limit)
    log.info("downstream evaluation: " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path.cwd())
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        log.warning(f"downstream evaluation failed (exit {proc.returncode}); the run stays completed. "
                    f"Re-run: {' '.join(cmd)}\n{tail}")
        return False
    return True
