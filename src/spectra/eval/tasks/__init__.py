"""lm-eval task configs shipped with spectra (TASKS_DIR): the bundled corpus's held-out split."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
