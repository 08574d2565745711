"""The benchmark runner's quick mode finishes and writes every section (timings are never asserted)."""

from __future__ import annotations

import pytest

from conftest import ROOT, assert_ok, run_cli

TITLES = [  # benchmarks/run_all.py's sections, in order
    "1. Table 9: SPECTRA layer time by stage",
    "2. SPECTRA layer vs Switch top-k layer",
    "3. Expert execution vs the dense equivalent",
    "4. Sinkhorn + quota selection vs N and E",
    "5. Router GRU vs sequence length",
    "6. Sweep overhead per trial",
    "7. Our MoE block vs Hugging Face's Qwen3-MoE block",
]


@pytest.mark.slow  # ~35 s on 2 CPU cores: six sections plus a 2-trial multirun
def test_quick_benchmarks_write_every_section(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = run_cli(["-m", "benchmarks.run_all", "--quick", "--out", str(out)], cwd=ROOT, env={"OMP_NUM_THREADS": "1"},
                   timeout=600)
    assert_ok(proc)
    text = out.read_text()
    assert text.startswith("# Benchmarks") and "torch" in text and "--quick" in text  # header: command, versions
    for title in TITLES:
        assert f"## {title}" in text
    assert "failed" not in text
    for figure in ("whole layer", "SPECTRA / Switch", "× dense", "log-log slope", "saved for backward", "Overhead per trial"):
        assert figure in text
