"""spectra.analysis on hand-written run directories: collection (failed / incomplete / duplicate
runs), means and stds against numpy, Welch tests against scipy, table rendering, figures."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy import stats

from spectra.analysis import collect, comparison_frame, problems, significance_table, to_markdown
from spectra.analysis.__main__ import main as cli
from spectra.analysis.figures import (
    pareto_front,
    plot_domain_heatmap,
    plot_expert_tsne,
    plot_metric_curves,
    plot_pareto,
    plot_selection_heatmap,
    plot_usage_histograms,
    plot_usage_over_training,
    selection_frequency,
)
from spectra.analysis.snapshots import expert_representations, load_routing_snapshots, stability_from_snapshots
from spectra.analysis.stats import bootstrap_ci, bootstrap_diff_ci, stars, welch_ttest
from spectra.analysis.tables import (
    ablation_table,
    metric_table,
    overhead_table,
    resolve_baseline,
    scaling_table,
    stability_table,
    sweep_tables,
    variant_labels,
)

LOSS = {"spectra": [2.10, 2.05, 2.12], "switch_top2": [2.31, 2.36, 2.29]}
CV = {"spectra": [0.08, 0.11, 0.09], "switch_top2": [0.35, 0.41, 0.30]}


def make_run(path, router="spectra", seed=0, status="completed", loss=2.0, cv=0.1, extra_final=None,
             extra_summary=None, overrides=None, started=1000.0, records=None, config=None):
    """A run directory as train.py leaves it (summary None = no summary.json at all)."""
    (path / ".hydra").mkdir(parents=True, exist_ok=True)
    ovr = overrides if overrides is not None else [f"router={router}", f"seed={seed}"]
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(ovr))
    cfg = {"seed": seed, "router": {"name": router, "top_k": 2}, "moe": {"num_experts": 8}, "model": {"name": "tiny"}}
    cfg.update(config or {})
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    recs = records if records is not None else [
        {"step": s, "loss": 3.0 - 0.1 * s, "train/cv_mean": cv + 0.01 * s} for s in (1, 2, 3)
    ] + [{"step": 3, "eval_loss": loss, "eval/cv_mean": cv}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if status is None:
        return path
    summary = {"status": status, "started": started, "router": router, "seed": seed}
    if status == "completed":
        summary.update(final={"eval_loss": loss, "eval/cv_mean": cv, "eval/maxvio_mean": 2 * cv, **(extra_final or {})},
                       best={"eval_loss": loss}, objective={"eval_loss": loss}, steps=3, tokens_per_s=1000.0 + seed)
    else:
        summary["error"] = "RuntimeError: boom"
    summary.update(extra_summary or {})
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def sweep(tmp_path):
    """2 routers x 3 seeds, plus a failed run, a run without summary, and a duplicate."""
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "multirun.yaml").write_text("{}")
    for router in LOSS:
        for seed in range(3):
            make_run(root / f"{router}_s{seed}", router, seed, loss=LOSS[router][seed], cv=CV[router][seed])
    make_run(root / "spectra_s3", "spectra", 3, status="failed")
    make_run(root / "switch_top2_s4", "switch_top2", 4, status=None)  # killed: no summary.json
    # an older copy of spectra seed 0 with a different loss: must not be counted
    make_run(root / "old" / "spectra_s0", "spectra", 0, loss=9.9, cv=9.9, started=1.0)
    return root


def test_collect_flags_failed_incomplete_and_duplicate_runs(sweep):
    runs, steps = collect([sweep])
    assert len(runs) == 9
    by_dir = runs.set_index(runs["run_dir"].map(lambda p: p.split("sweep/")[-1]))
    assert by_dir.loc["spectra_s3", "status"] == "failed" and "boom" in by_dir.loc["spectra_s3", "error"]
    assert by_dir.loc["switch_top2_s4", "status"] == "incomplete"
    assert bool(by_dir.loc["old/spectra_s0", "duplicate"]) and not by_dir.loc["old/spectra_s0", "counted"]
    assert bool(by_dir.loc["spectra_s0", "counted"])  # the later-started completed run wins
    assert runs["counted"].sum() == 6
    assert by_dir.loc["spectra_s1", "cfg:moe.num_experts"] == 8 and by_dir.loc["spectra_s1", "ov:router"] == "spectra"
    assert by_dir.loc["spectra_s1", "last:train/cv_mean"] == pytest.approx(CV["spectra"][1] + 0.03)
    bad = problems(runs)
    assert sorted(bad["problem"]) == ["duplicate", "failed", "incomplete"]
    # the long frame: every record of every run, tagged
    assert len(steps) == 9 * 4 and {"step", "loss", "kind", "variant", "seed"} <= set(steps.columns)


def test_means_and_stds_equal_numpy_and_duplicates_not_counted(sweep):
    runs, _ = collect([sweep])
    t = metric_table(runs, ["eval_loss", "cv"], name="t", title="t")
    for router, losses in LOSS.items():
        row = t.data[t.data.index.str.contains(f"router={router}")].iloc[0]
        assert row["eval_loss_mean"] == pytest.approx(np.mean(losses))
        assert row["eval_loss_std"] == pytest.approx(np.std(losses, ddof=1))
        assert row["cv_mean"] == pytest.approx(np.mean(CV[router])) and row["eval_loss_n"] == 3
    spectra_row = t.data[t.data.index.str.contains("router=spectra")].iloc[0]
    assert spectra_row["failed"] == 1 and spectra_row["duplicate"] == 1 and spectra_row["completed"] == 3
    switch_row = t.data[t.data.index.str.contains("router=switch_top2")].iloc[0]
    assert switch_row["incomplete"] == 1
    # the display: formatted mean ± std, best loss in bold, short labels
    md = t.markdown()
    assert f"**{np.mean(LOSS['spectra']):.4f} ± {np.std(LOSS['spectra'], ddof=1):.4f}**" in md
    assert "| SPECTRA |" in md and "| Switch Top-2 |" in md


def test_significance_table_equals_scipy_welch(sweep):
    runs, _ = collect([sweep])
    t = significance_table(runs, ["eval_loss", "cv"])  # baseline: router=spectra
    d = t.data.set_index("metric")
    for metric, values in (("eval_loss", LOSS), ("cv", CV)):
        ref = stats.ttest_ind(values["switch_top2"], values["spectra"], equal_var=False)
        assert d.loc[metric, "p"] == pytest.approx(ref.pvalue, rel=1e-12)
        assert d.loc[metric, "t"] == pytest.approx(ref.statistic, rel=1e-12)
        assert d.loc[metric, "diff"] == pytest.approx(np.mean(values["switch_top2"]) - np.mean(values["spectra"]))
        assert d.loc[metric, "stars"] == stars(ref.pvalue)
        assert d.loc[metric, "diff_ci_low"] <= d.loc[metric, "diff"] <= d.loc[metric, "diff_ci_high"]
    assert "baseline: SPECTRA" in t.markdown()
    # an explicit baseline flips the sign of t, not p
    t2 = significance_table(runs, ["eval_loss"], baseline="switch_top2")
    assert t2.data["p"].iloc[0] == pytest.approx(d.loc["eval_loss", "p"]) and t2.data["t"].iloc[0] == pytest.approx(-d.loc["eval_loss", "t"])


def test_stars_welch_edge_cases_and_bootstrap():
    assert [stars(p) for p in (0.0009, 0.001, 0.009, 0.01, 0.049, 0.05, math.nan)] == ["***", "**", "**", "*", "*", "", ""]
    assert all(math.isnan(v) for v in welch_ttest([1.0], [1.0, 2.0]))  # < 2 values: nan, no exception
    assert math.isnan(welch_ttest([1.0, 1.0], [1.0, 1.0]).p)  # no variance: nan
    x = np.array([1.0, 2.0, 4.0, 3.0])
    lo, hi = bootstrap_ci(x, seed=3)
    ref = stats.bootstrap((x,), np.mean, n_resamples=9999, method="percentile", rng=np.random.default_rng(3))
    assert (lo, hi) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    assert bootstrap_ci(x, seed=3) == (lo, hi)  # seeded: reproducible
    assert all(math.isnan(v) for v in bootstrap_diff_ci([1.0], x))
    dlo, dhi = bootstrap_diff_ci(x + 10, x, seed=0)
    assert dlo <= 10 <= dhi


def test_monitor_keys_and_stability_block_fill_tables_7_9_12(tmp_path):
    mon = {"monitor/usage_entropy_mean": 0.9, "monitor/expert_overlap_mean": 0.2, "monitor/gram_orthogonality_mean": 0.75,
           "monitor/collapse_rate_mean": 0.125, "monitor/router_ms_mean": 1.0, "monitor/experts_ms_mean": 3.0,
           "monitor/layer0/router_ms": 99.0, "monitor/forward_ms": 10.0}
    stab = {"stability": {"mean": {"consistency_consecutive_mean": 0.8, "usage_variance": 0.01, "kendall_tau_mean": 0.5},
                          "layers": {"0": {"consistency_consecutive": [0.8]}}, "steps": [1, 2]}}
    for seed in range(2):
        make_run(tmp_path / f"r{seed}", seed=seed, extra_final=mon, extra_summary=stab)
    runs, _ = collect([tmp_path])
    t7 = ablation_table(runs)
    row = t7.display.iloc[0]
    assert row["expert entropy"] == "0.900 ± 0.000" and row["expert overlap (%)"] == "20.0 ± 0.0"
    assert row["Gram ortho (×10⁻²)"] == "75.0 ± 0.0" and row["collapse rate (%)"] == "12.5 ± 0.0"
    assert not any("not logged" in n for n in t7.notes)
    t12 = stability_table(runs).display.iloc[0]
    assert t12["routing consistency (%)"] == "80.0 ± 0.0" and t12["Kendall τ"] == "0.500 ± 0.000"
    t9 = overhead_table(runs)
    col_ms, col_pct = [c for c in t9.display.columns if c.endswith(" ms")][0], [c for c in t9.display.columns if c.endswith(" %")][0]
    assert list(t9.display[col_ms]) == ["1.000", "3.000", "4.000", "10.00"]  # router, experts, MoE total, forward
    assert list(t9.display[col_pct])[:3] == ["25.0", "75.0", "100"]


def test_missing_metrics_are_dashes_with_notes_and_failed_only_variants_kept(tmp_path):
    make_run(tmp_path / "a", "topk", 0)
    make_run(tmp_path / "b", "hash", 0, status="failed")
    runs, _ = collect([tmp_path])
    t = ablation_table(runs)
    assert (t.display["Gram ortho (×10⁻²)"] == "–").all()
    assert any(n.startswith("Gram ortho") and "not logged" in n for n in t.notes)
    assert t.display.loc["Hash", "eval loss"] == "–" and t.display.loc["Hash", "failed"] == "1"
    for tab in (overhead_table(runs), stability_table(runs), significance_table(runs),
                scaling_table(runs, "cfg:moe.num_experts", name="t11", title="t11"),
                scaling_table(runs, "cfg:nope", name="t10", title="t10")):
        assert tab.markdown() and tab.latex().count(r"\toprule") == 1  # renders, never raises


def test_latex_booktabs_and_legacy_comparison_table(sweep):
    runs, _ = collect([sweep])
    t = metric_table(runs, ["eval_loss", "dropped_token_rate"], name="t", title="Loss_and 50% drops")
    tex = t.latex()
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")
    assert r"\textbf{" in tex and r"$\pm$" in tex and r"Loss\_and 50\% drops" in tex
    assert tex.count(r" \\") == 1 + 2  # header + one line per variant
    legacy = comparison_frame(runs, columns=[("final:eval_loss", "eval loss", True)])
    assert isinstance(legacy, pd.DataFrame) and list(legacy.columns)[:1] == ["eval loss"]
    assert "| variant | eval loss |" in to_markdown(legacy)
    paths = t.write(sweep.parent / "tables")
    assert pd.read_csv(paths["csv"], index_col=0)["eval_loss_n"].tolist() == [3, 3]


def test_labels_baseline_and_sweep_tables(tmp_path):
    groups = ["ablation=no_gru,router=spectra", "ablation=full,router=spectra", "ablation=no_all,router=spectra"]
    assert variant_labels(groups)["ablation=full,router=spectra"] == "SPECTRA-Full"
    assert resolve_baseline(groups, None) == "ablation=full,router=spectra"
    assert resolve_baseline(groups, "-GRU") == "ablation=no_gru,router=spectra"
    with pytest.raises(ValueError, match="matches 3 variants"):
        resolve_baseline(groups, "spectra")
    for i, g in enumerate(groups):
        make_run(tmp_path / "abl" / f"r{i}", seed=0, overrides=g.split(",") + ["seed=0"])
    runs, _ = collect([tmp_path / "abl"])
    assert list(ablation_table(runs).display.index) == ["SPECTRA-Full", "-GRU", "-All"]  # the paper's order
    for i, (name, w) in enumerate([("C", 0.1), ("C", 0.5), ("D", 0.1)]):
        make_run(tmp_path / name / f"c{i}", seed=0, overrides=["+sweep=" + name, f"osr.repulsion_weight={w}", "seed=0"],
                 config={"sweep_name": name}, loss=2 + w)
        (tmp_path / name / "multirun.yaml").write_text("{}")
    runs, _ = collect([tmp_path / "C", tmp_path / "D"])
    tabs = sweep_tables(runs)
    assert [t.name for t in tabs] == ["sweep_00_C", "sweep_01_D"]
    assert list(tabs[0].display.index) == ["osr.repulsion_weight=0.1", "osr.repulsion_weight=0.5"]
    assert tabs[0].best["eval loss"].tolist() == [True, False]


def test_variant_leaves_out_seed_and_the_contracts_volatile_overrides(tmp_path):
    """The variant label is the overrides minus seed and every key the cell fingerprint ignores
    (contracts.rundir.VOLATILE_KEYS, trainer.resume) and Hydra's own settings."""
    ovr = ["router=topk", "seed=1", "+tags=[a]", "trainer.resume=never", "hydra.run.dir=x", "output_dir=y",
           "skip_complete=false", "seeds=[0,1]", "sweep_name=s", "osr.epsilon=0.05"]
    runs, _ = collect([make_run(tmp_path / "r", overrides=ovr)])
    assert runs.loc[0, "variant"] == "osr.epsilon=0.05,router=topk"
    assert runs.loc[0, "seed"] == 0 and runs.loc[0, "ov:tags"] == "[a]"  # the config's seed; overrides kept as columns


def _drop_final(run, key):
    """Delete one final metric from a run's summary.json (a run that did not log it)."""
    s = json.loads((run / "summary.json").read_text())
    del s["final"][key]
    (run / "summary.json").write_text(json.dumps(s))


def test_a_cell_over_fewer_runs_shows_its_n_and_every_table_names_the_sample_std(tmp_path):
    """4 SPECTRA runs, one without `eval/cv_mean`; 3 Switch runs, one without a final eval loss."""
    cv = {"spectra": [0.10, 0.12, 0.20, 0.5], "switch_top2": [0.30, 0.40, 0.35]}
    loss = {"spectra": [2.1, 2.0, 2.2, 2.3], "switch_top2": [2.4, 2.5, 2.45]}
    for router, values in cv.items():
        for seed, c in enumerate(values):
            make_run(tmp_path / f"{router}_s{seed}", router, seed, cv=c, loss=loss[router][seed])
    _drop_final(tmp_path / "spectra_s3", "eval/cv_mean")
    _drop_final(tmp_path / "switch_top2_s2", "eval_loss")
    runs, _ = collect([tmp_path])
    t = metric_table(runs, ["eval_loss", "cv"], name="t", title="t")
    # by hand / pandas, from the values the runs do have
    sp_cv = pd.Series(cv["spectra"][:3])
    sw_loss = pd.Series(loss["switch_top2"][:2])
    sp_cell = f"{sp_cv.mean():.3f} ± {sp_cv.std(ddof=1):.3f} (n=3)"
    sw_cell = f"{sw_loss.mean():.4f} ± {sw_loss.std(ddof=1):.4f} (n=2)"
    assert t.display.loc["SPECTRA", "load CV"] == sp_cell and t.display.loc["SPECTRA", "completed"] == "4"
    assert t.display.loc["Switch Top-2", "eval loss"] == sw_cell and t.display.loc["Switch Top-2", "completed"] == "3"
    full = pd.Series(loss["spectra"])  # all four runs: no n shown
    assert t.display.loc["SPECTRA", "eval loss"] == f"{full.mean():.4f} ± {full.std(ddof=1):.4f}"
    assert "(n=" not in t.display.loc["Switch Top-2", "load CV"]
    md, tex = t.markdown(), t.latex()
    assert sp_cell in md and sw_cell in md
    assert sp_cell.replace("±", r"$\pm$") in tex and "(n=2)" in tex
    paths = t.write(tmp_path / "out")
    csv = pd.read_csv(paths["csv"], index_col=0).set_index("label")
    assert csv.loc["SPECTRA", "cv_n"] == 3 and csv.loc["SPECTRA", "completed"] == 4
    assert csv.loc["Switch Top-2", "eval_loss_n"] == 2 and csv.loc["Switch Top-2", "cv_n"] == 3
    assert csv.loc["SPECTRA", "cv_std"] == pytest.approx(sp_cv.std(ddof=1))
    # Tables 10/11: the per-router loss cell of a (router, size) over fewer runs says so too
    t11 = scaling_table(runs, "cfg:moe.num_experts", name="t11", title="t11")
    assert t11.display.iloc[0]["Switch Top-2 eval loss"] == sw_cell
    assert "(n=" not in t11.display.iloc[0]["SPECTRA eval loss"]
    # every table of mean ± std cells names its std in the notes under it (markdown and LaTeX)
    for tab in (t, t11, ablation_table(runs), stability_table(runs), *sweep_tables(runs)):
        assert "sample standard deviation (ddof = 1)" in tab.markdown(), tab.name
        assert "sample standard deviation (ddof = 1)" in tab.latex(), tab.name


def test_overhead_cells_over_fewer_runs_show_their_n(tmp_path):
    """Two runs time the router, one also the experts: the experts' mean is over one run."""
    make_run(tmp_path / "r0", seed=0, extra_final={"monitor/router_ms_mean": 1.0, "monitor/experts_ms_mean": 3.0})
    make_run(tmp_path / "r1", seed=1, extra_final={"monitor/router_ms_mean": 2.0})
    runs, _ = collect([tmp_path])
    t9 = overhead_table(runs)
    (col_ms,) = [c for c in t9.display.columns if c.endswith(" ms")]
    assert t9.display[col_ms].tolist()[:3] == ["1.500", "3.000 (n=1)", "4.500"]  # router, experts, MoE total
    d = t9.data.reset_index().set_index("component")
    assert d.loc["router", "n"] == 2 and d.loc["experts", "n"] == 1 and d.loc["experts", "completed"] == 2

def test_ties_are_all_bold_at_the_shown_precision(tmp_path):
    # eval loss means: A (2.0 + 2.2) / 2, B 2.1, C 2.10001 -> all three shown as "2.1000", D 2.5;
    # CV means: A 0.3, B (0.1 + 0.3) / 2, C 0.2, D 0.2 -> three tied at "0.200"
    spec = {"A": ([2.0, 2.2], [0.3, 0.3]), "B": ([2.1, 2.1], [0.1, 0.3]), "C": ([2.10001], [0.2]), "D": ([2.5], [0.2])}
    for name, (losses, cvs) in spec.items():
        for seed, (l_, c) in enumerate(zip(losses, cvs)):
            make_run(tmp_path / f"{name}{seed}", seed=seed, loss=l_, cv=c, overrides=[f"+cell={name}", f"seed={seed}"])
    runs, _ = collect([tmp_path])
    t = metric_table(runs, ["eval_loss", "cv", "maxvio"], name="t", title="t")
    assert t.display.index.tolist() == ["cell=A", "cell=B", "cell=C", "cell=D"]
    assert t.best["eval loss"].tolist() == [True, True, True, False]
    assert t.best["load CV"].tolist() == [False, True, True, True]
    md = t.markdown()
    assert md.count("**2.1000") == 3 and md.count("**0.200") == 3 and "**0.300" not in md
    assert t.latex().count(r"\textbf{2.1000") == 3
    # a column where every row ties has no best
    same = metric_table(runs[runs["variant"].isin(["cell=C", "cell=D"])], ["cv"], name="s", title="s")
    assert same.display["load CV"].tolist() == ["0.200", "0.200"]
    assert not same.best["load CV"].any()


def test_duplicates_show_why_they_are_not_counted(sweep, tmp_path, capsys):
    # a failed re-run of switch_top2 seed 1, after the completed one; a run dir with only a log (no seed)
    make_run(sweep / "retry" / "switch_top2_s1", "switch_top2", 1, status="failed", started=5000.0)
    (sweep / "stray").mkdir()
    (sweep / "stray" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    runs, _ = collect([sweep])
    bad = problems(runs).set_index("problem")
    counted_s0 = str((sweep / "spectra_s0").resolve())
    dup = bad.loc["duplicate"]
    assert dup["run_dir"].endswith("old/spectra_s0") and dup["error"] == ""
    assert dup["reason"] == (f"repeats variant and seed 0 of {counted_s0}, counted instead: that one started later")
    fdup = bad.loc["failed, duplicate"]
    assert fdup["reason"].startswith("RuntimeError: boom; repeats variant and seed 1 of ")
    assert fdup["reason"].endswith("counted instead: this run is failed, that one completed")
    assert str((sweep / "switch_top2_s1").resolve()) in fdup["reason"]
    assert bad.loc["failed", "reason"] == "RuntimeError: boom"
    assert [("no summary.json" in x) for x in bad.loc[["incomplete"], "reason"]] == [True, True]  # killed run, stray
    assert runs.set_index("run_dir").loc[dup["run_dir"], "duplicate_of"] == counted_s0
    assert cli(["table", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "(nan)" not in out and f"old/spectra_s0 (repeats variant and seed 0 of {counted_s0}" in out
    assert cli(["report", str(sweep), "--out", str(tmp_path / "rep"), "--no-figures"]) == 0
    index = (tmp_path / "rep" / "index.md").read_text()
    assert "| nan |" not in index and "counted instead: that one started later |" in index
    assert "stray` | (defaults) | – |" in index and "| 3 | RuntimeError: boom |" in index  # seeds: no nan, no 3.0


def _captured_figures(monkeypatch):
    """Every figure a plot_* function saves, kept for reading back its artists."""
    from spectra.analysis import figures

    figs, real = [], figures.save_figure
    monkeypatch.setattr(figures, "save_figure", lambda fig, stem: figs.append(fig) or real(fig, stem))
    return figs


def _rgba(c):
    from matplotlib.colors import to_rgba

    return tuple(np.round(to_rgba(c), 6))


def test_curves_keep_one_colour_per_variant_in_every_panel_and_one_full_legend(tmp_path, monkeypatch):
    figs = _captured_figures(monkeypatch)
    rows = []
    for v in ("a", "b", "c"):
        for seed in (0, 1):
            for step in (1, 2, 3):
                rows.append({"step": step, "variant": v, "seed": seed,
                             "loss": None if v == "c" else 3.0 - step + seed,  # c: not in the first panel
                             "cv": None if v == "a" else 0.1 * step + seed})  # a: not in the second
    steps = pd.DataFrame(rows).astype({"loss": float, "cv": float})
    labels = {"a": "A", "b": "B", "c": "C"}
    plot_metric_curves(steps, [("loss", "loss"), ("cv", "CV")], tmp_path / "curves", labels=labels)
    fig = figs[-1]
    panels = [ax for ax in fig.axes if ax.get_visible()]
    seen: dict[str, set] = {}
    for ax in panels:
        for line in ax.get_lines():
            seen.setdefault(line.get_label(), set()).add(_rgba(line.get_color()))
    assert sorted(seen) == ["A", "B", "C"] and all(len(c) == 1 for c in seen.values()), seen  # one colour each
    assert len({next(iter(c)) for c in seen.values()}) == 3  # three different colours
    # the bands: drawn in their line's colour, min..max over seeds (seed 1 is seed 0 + 1)
    for ax, col in zip(panels, ("loss", "cv")):
        line_colours = {_rgba(line.get_color())[:3] for line in ax.get_lines()}
        band_colours = {tuple(np.round(p.get_facecolor()[0][:3], 6)) for p in ax.collections}
        assert band_colours == line_colours
        b = ax.collections[0].get_paths()[0].vertices[:, 1]
        sub = steps[steps["variant"] == ("a" if col == "loss" else "b")]
        assert set(np.round(b, 9)) >= set(np.round(sub[col].to_numpy(), 9))
    (legend,) = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["A", "B", "C", "shaded: min–max over seeds (line: mean over seeds)"]
    legend_colour = {t: _rgba(h.get_color()) for t, h in zip(texts, legend.legend_handles) if t in seen}
    assert legend_colour == {k: next(iter(v)) for k, v in seen.items()}



def _legend_colours(fig) -> dict[str, tuple]:
    """{legend text: rgba} of a figure's one figure-level legend (lines and patches)."""
    (legend,) = fig.legends
    get = lambda h: h.get_color() if hasattr(h, "get_color") else h.get_facecolor()  # noqa: E731
    return {t.get_text(): _rgba(get(h)) for t, h in zip(legend.get_texts(), legend.legend_handles)}


def _drawn_colours(fig) -> list[tuple[str, tuple]]:
    """(label, rgba) of every labelled line and bar drawn in any panel."""
    out = []
    for ax in fig.axes:
        out += [(ln.get_label(), _rgba(ln.get_color())) for ln in ax.get_lines() if not ln.get_label().startswith("_")]
        out += [(c.get_label(), _rgba(p.get_facecolor())) for c in ax.containers for p in c.patches]
    return out


def test_report_gives_each_variant_one_colour_in_every_panel_of_every_figure(tmp_path, monkeypatch):
    """Two sweeps (SPECTRA and Top-k in both, Hash in one, without Gram orthogonality or
    snapshots): SPECTRA has one colour in every panel of the curves of both sweeps and of the
    by-variant usage histogram, and every panel draws each variant in its legend colour."""
    from spectra.analysis import figures
    from spectra.analysis.report import build_report

    figs = []

    def keep(fig, stem):  # not written: the colours are read back from the artists (saves ~5 s of PNG/PDF)
        figs.append(fig)
        plt.close(fig)
        return [Path(f"{stem}.png"), Path(f"{stem}.pdf")]

    monkeypatch.setattr(figures, "save_figure", keep)
    roots = []
    # other seeds in sweep b: a (variant, seed) run twice in one report is counted once
    for name, routers, seeds in (("sweep_a", ("hash", "spectra", "topk"), (0, 1)), ("sweep_b", ("spectra", "topk"), (2, 3))):
        root = tmp_path / name
        roots.append(root)
        for router in routers:
            for seed in seeds:
                gram = {} if router == "hash" else {"train/gram_orthogonality_mean": 0.5 + 0.1 * seed}
                recs = [{"step": s, "loss": 3.0 - 0.1 * s, "train/cv_mean": 0.1 * s + seed, **gram} for s in (1, 2, 3)]
                run = make_run(root / f"{router}_s{seed}", router, seed, records=recs + [{"step": 3, "eval_loss": 2.0}])
                if router != "hash" and name == "sweep_a":
                    (run / "routing").mkdir()
                    torch.save(_keyword_snapshot(), run / "routing" / "step000004.pt")
        (root / "multirun.yaml").write_text("{}")
    rep = build_report(roots, tmp_path / "rep")
    assert {"routing_curves_sweep_a", "routing_curves_sweep_b", "usage_hist_variants"} <= set(rep.figures)
    variant_colour: dict[str, set] = {}
    for fig in figs:
        if not fig.legends:
            continue
        legend = _legend_colours(fig)
        for label, colour in _drawn_colours(fig):
            assert colour == legend[label], (fig.texts and fig.texts[0].get_text(), label)
            if label in ("Hash", "SPECTRA", "Top-k"):
                variant_colour.setdefault(label, set()).add(colour)
        for label in ("Hash", "SPECTRA", "Top-k"):
            if label in legend:
                variant_colour.setdefault(label, set()).add(legend[label])
    assert sorted(variant_colour) == ["Hash", "SPECTRA", "Top-k"]
    assert all(len(c) == 1 for c in variant_colour.values()), variant_colour  # one colour per variant, report-wide
    assert len({next(iter(c)) for c in variant_colour.values()}) == 3


def test_complete_colors_never_reuses_a_given_colour():
    from spectra.analysis.figures import complete_colors, series_colors

    given = series_colors(["a", "b", "c"])
    got = complete_colors(["a", "x", "c", "y"], {k: given[k] for k in ("a", "c")})
    assert got["a"] == given["a"] and got["c"] == given["c"]
    assert len({_rgba(c) for c in got.values()}) == 4  # x and y: colours neither a nor c has

def test_bar_tsne_and_pareto_colours_and_labels(tmp_path, monkeypatch):
    figs = _captured_figures(monkeypatch)
    # "after" is missing from layer 0: "served" must not take its colour there
    plot_usage_histograms({"before": {0: [5, 1, 1, 1], 1: [2, 2, 2, 2]}, "after": {1: [3, 1, 2, 2]},
                           "served": {0: [2, 2, 2, 2], 1: [1, 1, 1, 5]}}, tmp_path / "hist")
    fig = figs[-1]
    colour: dict[str, set] = {}
    for ax in fig.axes:
        for bars in ax.containers:
            colour.setdefault(bars.get_label(), set()).update(_rgba(p.get_facecolor()) for p in bars.patches)
    assert sorted(colour) == ["after", "before", "served"] and all(len(c) == 1 for c in colour.values())
    assert [t.get_text() for t in fig.legends[0].get_texts()][:3] == ["before", "after", "served"]
    # t-SNE: expert e has one colour in a panel of 8 experts and in a panel of 3
    rng = np.random.default_rng(0)
    plot_expert_tsne({"a": rng.normal(size=(8, 5)), "b": rng.normal(size=(3, 5))}, tmp_path / "tsne")
    a, b = [ax.collections[0].get_facecolors() for ax in figs[-1].axes if ax.get_visible()]
    np.testing.assert_allclose(a[:3], b)
    assert len({tuple(c) for c in a}) == 8
    # Pareto: the error bars say what they are
    cells = pd.DataFrame({"cv": [0.1, 0.2], "cv_std": [0.01, 0.02], "eval_loss": [3.0, 2.0], "eval_loss_std": [0.1, 0.2],
                          "label": ["a", "b"]})
    plot_pareto(cells, tmp_path / "pareto")
    texts = [t.get_text() for t in figs[-1].axes[0].get_legend().get_texts()]
    assert "cells: mean over seeds; bars: ± sample std over seeds (ddof = 1)" in texts


def _check_image_files(paths):
    png, pdf = paths
    assert png.stat().st_size > 0 and mpimg.imread(png).ndim == 3
    assert pdf.read_bytes()[:4] == b"%PDF"


def test_figures_from_synthetic_arrays(tmp_path):
    rng = np.random.default_rng(0)
    _check_image_files(plot_usage_histograms({"before": {0: [5, 1, 1, 1], 1: [2, 2, 2, 2]}, "after": {0: [2, 2, 2, 2], 1: [3, 1, 2, 2]}},
                                             tmp_path / "hist"))
    _check_image_files(plot_usage_over_training([1, 2, 4], rng.random((3, 4)), tmp_path / "over"))
    steps = pd.DataFrame({"step": [1, 2, 1, 2, 1, 2], "variant": ["a", "a", "a", "a", "b", "b"], "seed": [0, 0, 1, 1, 0, 0],
                          "train/cv_mean": rng.random(6)})
    _check_image_files(plot_metric_curves(steps, [("train/cv_mean", "CV"), ("missing", "not there")], tmp_path / "curves"))
    _check_image_files(plot_selection_heatmap({0: rng.integers(0, 4, (40, 2))}, np.tile(np.arange(10), 4), 4, tmp_path / "sel"))
    _check_image_files(plot_expert_tsne({"a": rng.normal(size=(8, 5)), "b": rng.normal(size=(3, 5))}, tmp_path / "tsne"))
    aff = rng.random((3, 4))
    _check_image_files(plot_domain_heatmap(aff / aff.sum(1, keepdims=True), rng.random(4), ["code", "math", "prose"],
                                           tmp_path / "dom", keywords={0: ["def", "return"], 2: ["x"]}))
    cells = pd.DataFrame({"cv": [0.1, 0.2, 0.3], "eval_loss": [3.0, 2.0, 2.5], "label": ["a", "b", "c"]})
    _check_image_files(plot_pareto(cells, tmp_path / "pareto"))


def test_pareto_front_and_selection_frequency_against_brute_force():
    rng = np.random.default_rng(1)
    x, y = rng.random(30), rng.random(30)
    x[3] = np.nan
    brute = [bool(np.isfinite(x[i]) and not any(x[j] <= x[i] and y[j] <= y[i] and (x[j] < x[i] or y[j] < y[i])
                                                for j in range(30) if np.isfinite(x[j]))) for i in range(30)]
    assert pareto_front(x, y).tolist() == brute
    idx = np.array([[0, 1], [1, 2], [0, 2], [0, 1]])
    f, edges = selection_frequency(idx, np.array([0, 1, 0, 1]), 3)
    assert edges.tolist() == [0, 1]
    # position 0: rows [0,1], [0,2]; position 1: rows [1,2], [0,1]
    np.testing.assert_allclose(f, [[1.0, 0.5], [0.5, 1.0], [0.5, 0.5]])  # P(e selected | position)


def _snapshot(step, index, load, n_valid):
    return {"format": 1, "step": step, "shape": [2, 3], "valid": torch.arange(6) < n_valid,
            "domain_ids": torch.tensor([0, 1, 0, 1, 0, -1]),
            "layers": {0: {"expert_index": torch.tensor(index, dtype=torch.int32), "served": torch.ones(6, 2, dtype=torch.bool),
                           "load": torch.tensor(load, dtype=torch.float64)}}}


def test_snapshots_loader_and_stability_by_hand(tmp_path):
    a = [[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]]
    b = [[0, 1], [2, 3], [2, 1], [3, 0], [1, 3], [0, 1]]  # kept: 2/2, 1/2, 1/2, 2/2, 0/2 (row 5 padding)
    (tmp_path / "routing").mkdir()
    torch.save(_snapshot(10, a, [3.0, 3.0, 3.0, 3.0], 5), tmp_path / "routing" / "step000010.pt")
    torch.save(_snapshot(20, b, [4.0, 3.0, 2.0, 3.0], 5), tmp_path / "routing" / "step000020.pt")
    (tmp_path / "routing" / "step000030.pt").write_bytes(b"torn")
    with pytest.warns(UserWarning, match="unreadable"):
        snaps = load_routing_snapshots(tmp_path)
    assert [s.step for s in snaps] == [10, 20]
    assert snaps[0].positions().tolist() == [0, 1, 2, 0, 1, 2]
    assert snaps[1].load_after(0).tolist() == [4.0, 3.0, 2.0, 3.0]
    st = stability_from_snapshots(snaps)
    assert st["consistency"] == pytest.approx((2 + 1 + 1 + 2 + 0) / 2 / 5)
    shares = np.array([[3, 3, 3, 3], [4, 3, 2, 3]]) / 12
    assert st["usage_variance"] == pytest.approx(shares.var(0).mean())
    assert math.isnan(st["kendall_tau"])  # a flat load has no ranking


def test_stability_from_snapshots_averages_like_the_monitor(tmp_path):
    """Per layer over pairs, then over layers (summary.json's definition), by hand. Layer 0's third
    snapshot has no real token (a per-layer valid mask) and an all-zero load: its pair has no
    comparable tokens, no τ, no usage variance, and is left out of layer 0's mean rather than of a
    pooled mean over all (layer, pair) values (which would give 7/12 and 1/3)."""
    idx0 = [[[0, 1], [2, 3]], [[0, 2], [2, 3]], [[0, 1], [2, 3]]]
    idx1 = [[[0, 1], [2, 3]], [[1, 0], [3, 2]], [[2, 3], [0, 1]]]
    load0 = [[1.0, 2, 3, 4], [1.0, 2, 3, 4], [0.0, 0, 0, 0]]
    load1 = [[1.0, 2, 3, 4], [1.0, 2, 3, 4], [4.0, 3, 2, 1]]
    (tmp_path / "routing").mkdir()
    for j, step in enumerate((10, 20, 30)):
        valid0 = torch.tensor([j < 2, j < 2])
        layer = {0: {"expert_index": torch.tensor(idx0[j]), "valid": valid0, "load": torch.tensor(load0[j])},
                 1: {"expert_index": torch.tensor(idx1[j]), "load": torch.tensor(load1[j])}}
        torch.save({"format": 1, "step": step, "valid": torch.ones(2, dtype=torch.bool), "layers": layer},
                   tmp_path / "routing" / f"step{step:06d}.pt")
    st = stability_from_snapshots(load_routing_snapshots(tmp_path))
    # layer 0: pair 1 keeps {0} of {0, 1} and {2, 3}: (1/2 + 1) / 2; pair 2 nan. Layer 1: 1, then 0.
    assert st["consistency"] == pytest.approx((0.75 + 0.5) / 2)
    # τ: layer 0 [1, nan] -> 1; layer 1 [1, -1] -> 0
    assert st["kendall_tau"] == pytest.approx(0.5)
    # usage variance: layer 0 nan (a zero load has no shares); layer 1 per-expert variances of
    # shares (.1, .1, .4), (.2, .2, .3), (.3, .3, .2), (.4, .4, .1): .02, 1/450, 1/450, .02
    assert st["usage_variance"] == pytest.approx(1 / 90)


# Hand-built slice for the TF-IDF keywords (k = 1, E = 2, N = 10 = 2 rows x 5):
#   expert 0 serves  a a b z   (domain 0)      expert 1 serves  c c d z   (domain 1)
#   row 8: token a routed to expert 1 but dropped; row 9: token d routed to expert 0, padding.
# Neither may reach a document. By hand (smooth idf = ln((1 + 2) / (1 + df)) + 1): a, b, c, d
# are in one document (idf ln 1.5 + 1 ≈ 1.405), z is in both (idf 1), so with tf a=2, b=1, z=1
# expert 0 ranks a > b > z and expert 1 ranks c > d > z: z, as common as b, ranks below it.
KW_VOCAB = ["[UNK]", "a", "b", "c", "d", "z"]
KW_TOKENS = ["a", "a", "b", "z", "c", "c", "d", "z", "a", "d"]
KW_EXPERT = [0, 0, 0, 0, 1, 1, 1, 1, 1, 0]
KW_EXPECTED = {0: ["a", "b", "z"], 1: ["c", "d", "z"]}


def _keyword_snapshot(step=4, quota=False):
    served = torch.ones(10, 1, dtype=torch.bool)
    served[8] = False
    layer = {"expert_index": torch.tensor(KW_EXPERT, dtype=torch.int32)[:, None], "served": served,
             "load": torch.tensor([4.0, 4.0], dtype=torch.float64)}
    if quota:
        layer.update(load_before_quota=torch.tensor([7.0, 3.0], dtype=torch.float64),
                     load_after_quota=torch.tensor([5.0, 5.0], dtype=torch.float64))
    return {"format": 1, "step": step, "shape": [2, 5], "valid": torch.arange(10) < 9,
            "domain_ids": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, -1]), "domain_names": ["prose", "code"],
            "input_ids": torch.tensor([KW_VOCAB.index(t) for t in KW_TOKENS], dtype=torch.int32), "layers": {0: layer}}


def _word_tokenizer(model_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(KW_VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(model_dir / "tokenizer.json"))


def test_expert_keywords_from_a_hand_built_snapshot(tmp_path):
    from spectra.analysis.report import expert_keywords, token_texts
    from spectra.analysis.snapshots import parse_snapshot

    snap = parse_snapshot(_keyword_snapshot(), tmp_path / "step000004.pt")
    texts, source = token_texts(tmp_path, snap)  # no tokenizer anywhere: the ids themselves
    assert texts == [str(KW_VOCAB.index(t)) for t in KW_TOKENS] and source.startswith("token ids")
    assert expert_keywords(snap, 0, texts, 2) == {e: [str(KW_VOCAB.index(t)) for t in w] for e, w in KW_EXPECTED.items()}
    _word_tokenizer(tmp_path / "model")
    texts, source = token_texts(tmp_path, snap)
    assert texts == KW_TOKENS and source == "the run's tokenizer"
    assert expert_keywords(snap, 0, texts, 2) == KW_EXPECTED
    assert expert_keywords(snap, 0, texts, 3)[2] == []  # an expert that served nothing
    assert expert_keywords(snap, 0, texts, 2, top_n=1) == {0: ["a"], 1: ["c"]}


def test_report_draws_quota_histograms_and_keyword_annotated_heatmaps(tmp_path, monkeypatch):
    from spectra.analysis import figures
    from spectra.analysis.report import build_report

    root = tmp_path / "sweep"
    for router, quota in (("spectra", True), ("topk", False)):
        run = make_run(root / f"{router}_s0", router, 0)
        (run / "routing").mkdir()
        torch.save(_keyword_snapshot(quota=quota), run / "routing" / "step000004.pt")
    _word_tokenizer(root / "spectra_s0" / "model")  # topk: no tokenizer -> keywords are token ids
    hist, heat = {}, {}
    real_hist, real_heat = figures.plot_usage_histograms, figures.plot_domain_heatmap
    monkeypatch.setattr(figures, "plot_usage_histograms",
                        lambda loads, stem, **kw: hist.setdefault(stem.name, loads) and real_hist(loads, stem, **kw))
    monkeypatch.setattr(figures, "plot_domain_heatmap",
                        lambda *a, keywords=None, **kw: heat.setdefault(a[3].name, keywords) and real_heat(*a, keywords=keywords, **kw))
    rep = build_report([root], tmp_path / "rep")
    (spectra_tag,) = [k[len("usage_hist_"):] for k in hist if "spectra" in k.lower()]
    (topk_tag,) = [k[len("usage_hist_"):] for k in hist if "top_k" in k.lower()]
    # SPECTRA: the monitor's pre/post-quota loads, next to the eval routing's served load
    got = {label: v[0].tolist() for label, v in hist[f"usage_hist_{spectra_tag}"].items()}
    assert got == {"before quota (top-k of the plan)": [7.0, 3.0], "after quota": [5.0, 5.0],
                   "served at eval (no quota)": [4.0, 4.0]}
    # top-k (no quota stored): falls back to every selected slot of the real tokens vs the served ones
    got = {label: v[0].tolist() for label, v in hist[f"usage_hist_{topk_tag}"].items()}
    assert got == {"selected (before drops)": [4.0, 5.0], "served (after quota / drops)": [4.0, 4.0]}
    assert heat[f"domain_heatmap_{spectra_tag}"] == KW_EXPECTED
    assert heat[f"domain_heatmap_{topk_tag}"] == {0: ["1", "2", "5"], 1: ["3", "4", "5"]}
    index = rep.index.read_text()
    for tag in (spectra_tag, topk_tag):
        for name in (f"usage_hist_{tag}", f"domain_heatmap_{tag}"):
            _check_image_files(rep.figures[name])
            assert f"figures/{name}.png" in index
        assert f"tables/keywords_{tag}.md" in index
    kw = pd.read_csv(tmp_path / "rep" / "tables" / f"keywords_{spectra_tag}.csv", index_col=0)
    assert [json.loads(x) for x in kw["keywords"]] == [KW_EXPECTED[0], KW_EXPECTED[1]]
    assert kw["load"].tolist() == [4.0, 4.0] and kw["purity"].tolist() == [1.0, 1.0]
    assert kw["top_domain"].tolist() == ["prose", "code"]
    assert "a · b · z" in (tmp_path / "rep" / "tables" / f"keywords_{spectra_tag}.md").read_text()
    assert "TF-IDF keywords are token ids" in index


def test_expert_representations_from_model_safetensors(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "model").mkdir()
    save_file({"model.layers.0.mlp.router.gate.weight": torch.ones(4, 6),
               "model.layers.1.mlp.router.expert_repr_ema": torch.full((4, 3), 2.0),
               "model.layers.1.mlp.router.expert_repr_ema_ready": torch.tensor(True),
               "model.layers.1.mlp.router.projector.weight": torch.zeros(12, 6)}, str(tmp_path / "model" / "model.safetensors"))
    reps = expert_representations(tmp_path)
    assert sorted(reps) == [0, 1] and reps[0].shape == (4, 6) and (reps[1] == 2.0).all()
    assert expert_representations(tmp_path / "nothing") == {}


def test_cli_table_report_and_latest(sweep, tmp_path, capsys):
    assert cli(["table", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "| SPECTRA |" in out and "failed: " in out and "incomplete: " in out and "duplicate: " in out
    out_dir = tmp_path / "report"
    assert cli(["report", str(sweep), "--out", str(out_dir), "--no-figures"]) == 0
    index = (out_dir / "index.md").read_text()
    assert "**failed**" in index and "spectra_s3" in index and "**incomplete**" in index and "**duplicate**" in index
    for name in ("table07_ablations", "table09_overhead", "table10_model_sizes", "table11_num_experts",
                 "table12_stability", "table13_significance", "sweep_00_sweep", "comparison"):
        for ext in ("md", "tex", "csv"):
            assert (out_dir / "tables" / f"{name}.{ext}").stat().st_size > 0, name
        assert f"tables/{name}.md" in index
    assert cli(["report", str(tmp_path / "missing"), "--out", str(out_dir)]) == 2
    capsys.readouterr()
    assert cli(["latest", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().endswith("sweep")


def test_comparison_shows_the_experts_per_token_each_router_spent(tmp_path):
    """experts/token comes from the last training log's `train/expert_slots_per_token_mean`
    (compute spent in training), mean over seeds; a router that never logged it shows –."""
    from spectra.analysis.tables import comparison_table

    slots = {"expert_choice": [2.0, 2.5], "switch_top2": [1.5, 1.75]}
    for router, values in slots.items():
        for seed, v in enumerate(values):
            recs = [{"step": 1, "loss": 3.0, "train/expert_slots_per_token_mean": 9.0},  # not the last log
                    {"step": 2, "loss": 2.9, "train/expert_slots_per_token_mean": v},
                    {"step": 2, "eval_loss": 2.0, "eval/cv_mean": 0.1}]
            make_run(tmp_path / f"{router}_s{seed}", router=router, seed=seed, records=recs)
    make_run(tmp_path / "dense_s0", router="dense", seed=0)
    table = comparison_table(collect([tmp_path])[0])
    md = table.markdown(title=False)
    header = next(line for line in md.splitlines() if line.startswith("|"))
    col = [c.strip() for c in header.strip("|").split("|")].index("experts/token")
    rows = {cells[0]: cells[col] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()[2:] if line.startswith("|"))}
    ec = [k for k in rows if "Expert Choice" in k or "expert_choice" in k][0]
    sw = [k for k in rows if "Switch" in k or "switch_top2" in k][0]
    dense = [k for k in rows if "Dense" in k or "dense" in k][0]
    assert rows[ec].startswith(f"{2.25:.2f} ± {statistics.stdev([2.0, 2.5]):.2f}")
    assert rows[sw].startswith(f"{1.625:.2f} ± {statistics.stdev([1.5, 1.75]):.2f}")
    assert rows[dense] == "–"


def test_scaling_tables_show_the_downstream_avg_score_of_eval_harness_json(tmp_path):
    """Runs with an eval_harness.json (python -m spectra.eval) fill the Avg Score column of Tables
    10/11, mean ± sample std over seeds in %; without one, eval loss stands in and a note says so."""
    scores = {"spectra": [0.40, 0.50], "switch_top2": [0.30, 0.35]}
    for router, values in scores.items():
        for seed, v in enumerate(values):
            run = make_run(tmp_path / f"{router}_s{seed}", router, seed)
            (run / "eval_harness.json").write_text(json.dumps(
                {"avg_score": v, "limit": 3, "scores": {"spectra_bundled_mc": v},
                 "metrics": {"spectra_bundled_ppl_code": {"word_perplexity": 12.5}}}))
    runs, _ = collect([tmp_path])
    assert runs.loc[runs["router"] == "spectra", "harness:spectra_bundled_ppl_code/word_perplexity"].tolist() == [12.5, 12.5]
    t = scaling_table(runs, "cfg:moe.num_experts", name="t11", title="t11")
    sp = pd.Series(scores["spectra"]) * 100  # 45.0 ± 7.1 by hand
    assert t.display.iloc[0]["SPECTRA Avg Score (%)"] == f"{sp.mean():.1f} ± {sp.std(ddof=1):.1f}" == "45.0 ± 7.1"
    assert t.display.iloc[0]["Switch Top-2 Avg Score (%)"] == "32.5 ± 3.5"
    md = t.markdown()
    assert "stands in" not in md and "--limit" in md  # a limited evaluation is flagged
    (tmp_path / "spectra_s0" / "eval_harness.json").unlink()  # one run lacks it: the cell says n=1
    runs, _ = collect([tmp_path])
    assert scaling_table(runs, "cfg:moe.num_experts", name="t", title="t").display.iloc[0]["SPECTRA Avg Score (%)"] == "50.0 (n=1)"
    for f in tmp_path.rglob("eval_harness.json"):
        f.unlink()
    runs, _ = collect([tmp_path])
    t = scaling_table(runs, "cfg:moe.num_experts", name="t", title="t")
    assert not any("Avg Score" in c for c in t.display.columns) and "stands in" in t.markdown()


def test_comparison_sets_training_and_inference_balance_side_by_side(tmp_path):
    """The comparison's load CV / MaxVio come from the inference routing (eval/…), the training
    columns from the last training log's train/… (after selection): one run's hand-set values
    land in their own columns, never swapped."""
    from spectra.analysis.tables import comparison_table

    recs = [{"step": 2, "loss": 2.9, "train/cv_mean": 0.30, "train/maxvio_mean": 0.25},
            {"step": 2, "eval_loss": 2.0, "eval/cv_mean": 0.88, "eval/maxvio_mean": 1.5}]
    make_run(tmp_path / "s0", router="spectra", seed=0, records=recs, cv=0.88,
             extra_final={"eval/maxvio_mean": 1.5})
    d = comparison_table(collect([tmp_path])[0]).display.iloc[0]
    assert (d["load CV"], d["load CV (training, after quota)"]) == ("0.880", "0.300")
    assert (d["MaxVio"], d["MaxVio (training, after quota)"]) == ("1.500", "0.250")


def test_table10_lists_model_sizes_smallest_first_not_alphabetically(tmp_path):
    # parameter counts by hand: tiny 100 < medium 200 < small 300; "big" has no count: last
    for name, params in (("small", 300), ("tiny", 100), ("medium", 200), ("big", None)):
        for router in ("spectra", "switch_top2"):
            extra = {} if params is None else {"parameters": {"total": params + (5 if router == "spectra" else 0)}}
            make_run(tmp_path / f"{name}_{router}", router, 0, config={"model": {"name": name}}, extra_summary=extra)
    runs, _ = collect([tmp_path])
    t10 = scaling_table(runs, "cfg:model.name", name="t10", title="t10")
    assert list(t10.display.index) == ["tiny", "medium", "small", "big"]
    # any other axis keeps its own order (numbers ascending)
    assert list(scaling_table(runs, "cfg:moe.num_experts", name="t11", title="t11").display.index) == [8]


def test_sweep_variants_follow_their_values_not_their_spelling():
    from spectra.analysis.tables import _order

    sweep_e = ["ablation=no_gru,data.max_seq_length=64", "ablation=full,data.max_seq_length=1024",
               "ablation=full,data.max_seq_length=16", "ablation=full,data.max_seq_length=256",
               "ablation=no_gru,data.max_seq_length=16"]
    assert _order(sweep_e, "variant") == ["ablation=full,data.max_seq_length=16", "ablation=full,data.max_seq_length=256",
                                          "ablation=full,data.max_seq_length=1024", "ablation=no_gru,data.max_seq_length=16",
                                          "ablation=no_gru,data.max_seq_length=64"]
    sweep_d = ["router.entropy_coef=0.1", "router.entropy_coef=1.0e-4", "router.entropy_coef=0", "router.entropy_coef=0.001"]
    assert _order(sweep_d, "variant") == ["router.entropy_coef=0", "router.entropy_coef=1.0e-4", "router.entropy_coef=0.001",
                                          "router.entropy_coef=0.1"]
    # keys sort by name (capacity_factor before enabled), the values of one key by number
    sweep_a = ["quota.enabled=false", "quota.capacity_factor=2.0", "quota.capacity_factor=1.25"]
    assert _order(sweep_a, "variant") == ["quota.capacity_factor=1.25", "quota.capacity_factor=2.0", "quota.enabled=false"]


def test_a_figure_saved_twice_is_the_same_bytes(tmp_path):
    import matplotlib.pyplot as plt

    from spectra.analysis.figures import save_figure

    def draw(stem):
        fig, ax = plt.subplots()
        ax.plot([0, 1, 2], [3, 1, 2])
        return save_figure(fig, stem)

    first = [p.read_bytes() for p in draw(tmp_path / "a")]
    import time

    time.sleep(1.1)  # a PDF creation date has one-second resolution
    second = [p.read_bytes() for p in draw(tmp_path / "b")]
    assert first == second and first[1].startswith(b"%PDF")
