"""End-to-end: a real tiny multirun (2 routers x 2 seeds) plus a deliberately failed run and a
duplicate, through `python -m spectra.analysis report` and the notebook, checked against numbers
read straight from the summary.json files with pandas and scipy."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from conftest import ROOT, TINY_TRAIN, assert_ok, run_cli

pytestmark = pytest.mark.slow

ROUTERS = ("topk", "switch_top2")
SEEDS = (0, 1)  # n = 2 per router: sample std (ddof=1) and Welch's t are defined
# 2 steps a run: eval at step 2 (+ the final evaluate); routing snapshots at steps 1 and 2 (>= 2 for
# usage over training and the stability table)
TINY = ["experiment=demo", *TINY_TRAIN, "trainer.max_steps=2"]


_ok = assert_ok


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """4 real runs, one real failed run, and an older copy of topk_s0 (a duplicate)."""
    root = tmp_path_factory.mktemp("analysis") / "sweep"
    # the failed run (it stops in preflight, after the imports) starts beside the multirun; one
    # thread each: two processes on a few cores only contend with more
    env = {"OMP_NUM_THREADS": "1"}
    with ThreadPoolExecutor(max_workers=1) as pool:
        failing = pool.submit(run_cli, ["train.py", *TINY, "router=topk", "data.max_seq_length=2048",
                                        f"hydra.run.dir={root / 'broken'}"], env=env)
        _ok(run_cli(["train.py", "-m", *TINY, f"router={','.join(ROUTERS)}", f"seed={','.join(map(str, SEEDS))}",
                     f"hydra.sweep.dir={root}", "hydra.sweep.subdir=${router.name}_s${seed}"], env=env))
        broken = failing.result()
    assert broken.returncode != 0
    dup = root / "rerun" / "topk_s0"
    shutil.copytree(root / "topk_s0", dup, ignore=shutil.ignore_patterns("checkpoints", "model"))
    s = json.loads((dup / "summary.json").read_text())
    s["started"] -= 3600  # an hour older than the run it repeats
    s["final"]["eval_loss"] = 1e6  # counted twice, it would show in every mean
    (dup / "summary.json").write_text(json.dumps(s))
    return root


def _direct(root) -> pd.DataFrame:
    """The four runs' numbers, read from summary.json without spectra.analysis."""
    rows = []
    for router in ROUTERS:
        for seed in SEEDS:
            s = json.loads((root / f"{router}_s{seed}" / "summary.json").read_text())
            assert s["status"] == "completed"
            rows.append({"router": router, "seed": seed, "eval_loss": s["final"]["eval_loss"], "cv": s["final"]["eval/cv_mean"]})
    return pd.DataFrame(rows)


def _check_figure(path):
    assert path.stat().st_size > 0, path
    if path.suffix == ".png":
        assert mpimg.imread(path).ndim == 3
    else:
        assert path.read_bytes()[:4] == b"%PDF"


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    proc = run_cli(["-m", "spectra.analysis", "report", str(sweep), "--out", str(out)])
    _ok(proc)
    return out, proc


def test_report_statistics_equal_pandas_and_scipy(sweep, report):
    out, _ = report
    direct = _direct(sweep)
    comp = pd.read_csv(out / "tables" / "comparison.csv", index_col=0)
    for router in ROUTERS:
        row = comp[comp.index.str.contains(f"router={router}") & ~comp.index.str.contains("2048")].iloc[0]
        d = direct[direct["router"] == router]
        assert row["eval_loss_n"] == len(SEEDS) and row["completed"] == len(SEEDS)  # the duplicate is not counted
        assert row["eval_loss_mean"] == pytest.approx(d["eval_loss"].mean(), rel=1e-12)
        assert row["eval_loss_std"] == pytest.approx(d["eval_loss"].std(), rel=1e-12)  # pandas' ddof=1
        assert row["cv_mean"] == pytest.approx(d["cv"].mean(), rel=1e-12)
        assert row["cv_std"] == pytest.approx(d["cv"].std(), rel=1e-12)
    sig = pd.read_csv(out / "tables" / "table13_significance.csv")
    for metric in ("eval_loss", "cv"):
        row = sig[(sig["metric"] == metric) & sig["variant"].str.contains("router=topk") & ~sig["variant"].str.contains("2048")]
        assert len(row) == 1 and "router=switch_top2" in row["baseline"].iloc[0]  # default baseline: the first variant
        ref = stats.ttest_ind(direct.loc[direct["router"] == "topk", metric], direct.loc[direct["router"] == "switch_top2", metric],
                              equal_var=False)
        assert row["p"].iloc[0] == pytest.approx(ref.pvalue, rel=1e-9)
        assert row["t"].iloc[0] == pytest.approx(ref.statistic, rel=1e-9)


def test_report_shows_the_broken_run_and_the_duplicate(report):
    out, proc = report
    index = (out / "index.md").read_text()
    assert "**failed**" in index and "broken" in index and "max_seq_length" in index
    assert "**duplicate**" in index and "rerun" in index
    # the duplicate says which run is counted instead and why; never "nan"
    dup_line = next(line for line in index.splitlines() if "**duplicate**" in line)
    assert "topk_s0, counted instead: that one started later" in dup_line and "nan" not in dup_line
    assert "(nan)" not in proc.stdout
    assert "failed: " in proc.stdout
    comp = pd.read_csv(out / "tables" / "comparison.csv", index_col=0)
    broken = comp[comp.index.str.contains("data.max_seq_length=2048")]
    assert len(broken) == 1 and broken["failed"].iloc[0] == 1 and broken["completed"].iloc[0] == 0
    assert "| 0 | 1 |" in (out / "tables" / "table07_ablations.md").read_text()  # completed 0, failed 1


def test_report_writes_every_table_and_figure(report):
    out, _ = report
    for name in ("comparison", "table07_ablations", "table09_overhead", "table10_model_sizes", "table11_num_experts",
                 "table12_stability", "table13_significance", "sweep_00_sweep"):
        for ext in ("md", "tex", "csv"):
            assert (out / "tables" / f"{name}.{ext}").stat().st_size > 0
        assert r"\toprule" in (out / "tables" / f"{name}.tex").read_text()
        if name not in ("table09_overhead", "table13_significance"):  # tables of mean ± std cells name their std
            assert "sample standard deviation (ddof = 1)" in (out / "tables" / f"{name}.md").read_text(), name
    figures = sorted((out / "figures").iterdir())
    stems = {f.stem for f in figures}
    assert {"loss_curves_sweep", "routing_curves_sweep", "pareto_sweep"} <= stems
    for f in figures:
        _check_figure(f)
    assert {f.suffix for f in figures} == {".png", ".pdf"} and len(figures) % 2 == 0
    index = (out / "index.md").read_text()
    for stem in stems:
        assert f"figures/{stem}.png" in index


def test_snapshot_figures_when_runs_have_routing_snapshots(sweep, report):
    out, _ = report
    if not any(sweep.glob("*/routing/step*.pt")):
        assert "no routing snapshots" in (out / "index.md").read_text()
        pytest.skip("these runs wrote no routing snapshots (monitor disabled)")
    stems = {f.stem for f in (out / "figures").glob("*.png")}
    for kind in ("usage_hist", "usage_over_training", "selection_heatmap", "domain_heatmap"):  # one per variant
        per_variant = {s for s in stems if s.startswith(kind + "_") and s != "usage_hist_variants"}
        assert len(per_variant) == len(ROUTERS), (kind, stems)
        assert any("switch_top2" in s for s in per_variant) and any("topk" in s for s in per_variant)
    assert "usage_hist_variants" in stems and "expert_tsne" in stems  # router gate rows from <run_dir>/model
    # TF-IDF keywords per expert, from the slice tokens decoded with each run's saved tokenizer
    index = (out / "index.md").read_text()
    tables = sorted((out / "tables").glob("keywords_*.csv"))
    assert len(tables) == len(ROUTERS) and "tokens decoded with the run's tokenizer" in index
    for t in tables:
        assert f"tables/{t.stem}.md" in index
        kw = pd.read_csv(t, index_col=0)
        assert len(kw) == 2 * 4  # TINY: 2 MoE layers x 4 experts
        busy = kw[kw["load"] >= 10]  # an expert serving a handful of special tokens may have none
        assert len(busy) and all(json.loads(x) for x in busy["keywords"])


def test_notebook_executes_against_the_sweep(sweep, tmp_path, monkeypatch):
    import nbclient
    import nbformat

    monkeypatch.setenv("SPECTRA_SWEEPS", str(sweep))
    monkeypatch.setenv("SPECTRA_REPORT_DIR", str(tmp_path / "nb-report"))
    nb = nbformat.read(ROOT / "analysis" / "sweeps.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "analysis")}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    index = (tmp_path / "nb-report" / "index.md").read_text()
    assert "**failed**" in index
    pngs = list((tmp_path / "nb-report" / "figures").glob("*.png"))
    assert pngs and all(np.asarray(mpimg.imread(p)).size for p in pngs)
