"""The layers of DESIGN.md import one way: an import that runs back up fails this test.

The contract is `[tool.importlinter]` in pyproject.toml (config / data / routing -> moe ->
metrics -> train -> sweep -> analysis, with spectra.contracts at the bottom); import-linter
(grimp) reads every import statement, those inside functions included.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_no_import_runs_back_up_the_layers():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_the_contract_catches_an_upward_import(tmp_path):
    """The checker itself can fail: a metrics module importing the trainer is reported."""
    pkg = tmp_path / "src" / "spectra"
    for layer in ("analysis", "sweep", "train", "metrics", "moe", "config", "data", "routing", "contracts"):
        (pkg / layer).mkdir(parents=True)
        (pkg / layer / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "metrics" / "bad.py").write_text("from spectra.train import something  # runs back up\n")
    (pkg / "train" / "ok.py").write_text("from spectra.metrics import bad  # runs down\n")
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--config", str(tmp_path / "pyproject.toml"), "--no-cache"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(tmp_path / "src"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "spectra.metrics.bad -> spectra.train" in proc.stdout
