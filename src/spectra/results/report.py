"""results/runs -> results/tables, results/figures, results/index.{md,html}, the verdicts in
results/README.md, and a detailed spectra.analysis report per family with routing snapshots.

    write_results(root, plan, out)  everything above; returns out/index.html
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from spectra.analysis import figures as F
from spectra.analysis.collect import problems
from spectra.analysis.html_index import write_index_html
from spectra.analysis.report import Report, build_report, index_markdown
from spectra.analysis.tables import cell_stats
from spectra.results.plan import Plan
from spectra.results.runner import status_rows
from spectra.results.tables import ablation_pool, baselines_pool, load_pool, paper_tables, spectra_configs
from spectra.results.verdicts import verdicts_markdown
from spectra.results.verify import repeats_markdown

VERDICTS_BEGIN, VERDICTS_END = "<!-- verdicts:begin (python -m spectra.results report) -->", "<!-- verdicts:end -->"
DETAIL_FAMILIES = ("baselines", "ablations")  # the families whose routing snapshots are committed
CURVES = [("loss", "train loss"), ("eval_loss", "eval loss"), ("eval/cv_mean", "inference load CV"),
          ("train/cv_mean", "training load CV (after quota)"), ("monitor/gram_orthogonality_mean", "Gram orthogonality"),
          ("monitor/usage_entropy_mean", "expert entropy")]


def _curves(rep: Report, steps: pd.DataFrame, pool: pd.DataFrame, name: str, title: str, colors: dict) -> None:
    """Per-row mean curves (shaded min-max over seeds) of the pool's counted runs."""
    if steps.empty:
        return
    rows = dict(zip(pool.loc[pool["counted"], "run_dir"], pool.loc[pool["counted"], "row"]))
    st = steps[steps["run_dir"].isin(rows)].copy()
    if st.empty:
        return
    st["row"] = st["run_dir"].map(rows)
    metrics = [(c, lab) for c, lab in CURVES if c in st.columns and st[c].notna().any()]
    paths = F.plot_metric_curves(st, metrics, rep.out / "figures" / name, title=title, by="row", colors=colors)
    rep.figures[name], rep.captions[name] = paths, title


def _pareto(rep: Report, runs: pd.DataFrame) -> None:
    """Eval loss vs inference load CV: every baseline router and every SPECTRA configuration."""
    pool = pd.concat([baselines_pool(runs)[lambda d: d["router"] != "spectra"], spectra_configs(runs)])
    pool = pool[pool["router"] != "dense"]  # no routing, no load CV
    a, b = cell_stats(pool, "final:eval/cv_mean", "row"), cell_stats(pool, "final:eval_loss", "row")
    cells = pd.DataFrame({"cv": a["mean"], "cv_std": a["std"], "eval_loss": b["mean"], "eval_loss_std": b["std"]}).dropna(
        subset=["cv", "eval_loss"])
    if cells.empty:
        return
    cells["label"] = [str(i) for i in cells.index]
    title = "Eval loss vs inference load CV: baselines and every SPECTRA configuration (E=8, tiny base)"
    rep.figures["pareto"] = F.plot_pareto(cells, rep.out / "figures" / "pareto", title=title)
    rep.captions["pareto"] = title


def _detail_reports(root: Path, out: Path, rep: Report) -> None:
    """A full spectra.analysis report (usage histograms, heatmaps, t-SNE, keywords) per family
    that commits its routing snapshots; linked from the notes."""
    for family in DETAIL_FAMILIES:
        src = root / "runs" / family
        if not src.is_dir():
            continue
        detail = build_report([src], out / "reports" / family)
        rel = os.path.relpath(detail.html or detail.index, out)
        rep.notes.append(f"{family}: the full routing report (usage histograms, selection and domain heatmaps, "
                         f"t-SNE, expert keywords) is {rel}")


def _status_note(plan: Plan, root: Path) -> str:
    rows = status_rows(plan, root)
    done = sum(r["completed"] for r in rows)
    total = sum(r["cells"] for r in rows)
    hours = sum(r["wall_time_min"] for r in rows) / 60
    per = "; ".join(f"{r['family']} {r['completed']}/{r['cells']}" for r in rows)
    return f"cells completed: {done}/{total} ({per}); summed cell wall time {hours:.1f} h"


def base_hash_note(root: Path) -> str | None:
    """Which base weights the completed cells upcycled (cell.json's sha256), flagged when a base
    was retrained into different weights between sessions."""
    seen: dict[str, set[str]] = {}
    for rec in sorted((root / "runs").glob("*/*/cell.json")):
        base = (json.loads(rec.read_text()).get("base") or {})
        if base.get("name"):
            seen.setdefault(base["name"], set()).add(str(base.get("model_sha256"))[:12])
    if not seen:
        return None
    parts = [f"{name}: {', '.join(sorted(h))}" for name, h in sorted(seen.items())]
    warn = any(len(h) > 1 for h in seen.values())
    return ("WARNING: cells upcycled different weights of the same base (retrained between sessions): " if warn
            else "base weights (sha256 prefix) the cells upcycled: ") + "; ".join(parts)


def update_readme(readme: Path, verdicts: str) -> None:
    """Replace the text between the verdict markers of results/README.md (added at the end when absent)."""
    text = readme.read_text() if readme.is_file() else "# Results\n"
    block = f"{VERDICTS_BEGIN}\n{verdicts.rstrip()}\n{VERDICTS_END}"
    if VERDICTS_BEGIN in text and VERDICTS_END in text:
        head, rest = text.split(VERDICTS_BEGIN, 1)
        text = head + block + rest.split(VERDICTS_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)


def write_results(root: Path, plan: Plan, out: Path, details: bool = True) -> Path:
    """Tables, figures, index.md/index.html and README verdicts from the cells done so far."""
    runs, steps = load_pool(root)
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(out=out, index=out / "index.md", runs=runs, steps=steps, problems=problems(runs),
                 sources=[str(root / "runs")])
    rep.tables = paper_tables(runs)
    for t in rep.tables:
        t.write(out / "tables")
    base, abl = baselines_pool(runs), ablation_pool(runs)
    colors = F.series_colors(sorted(set(base["row"]) | set(abl["row"])))
    _curves(rep, steps, base, "curves_baselines", "Training dynamics: every router (mean over seeds, min-max shaded)", colors)
    _curves(rep, steps, abl, "curves_ablations", "Training dynamics: SPECTRA ablations (mean over seeds, min-max shaded)", colors)
    _pareto(rep, runs)
    if details:
        _detail_reports(root, out, rep)
    rep.notes.insert(0, _status_note(plan, root))
    hashes = base_hash_note(root)
    if hashes:
        rep.notes.insert(1, hashes)
    rep.index.write_text(index_markdown(rep, [os.path.relpath(root / "runs", out)], title="spectra results"))
    html = write_index_html(rep, out)
    rows = status_rows(plan, root)
    planned = sum(r["cells"] for r in rows)
    verdicts = verdicts_markdown(runs, planned - sum(r["completed"] for r in rows), planned)
    repeats = repeats_markdown(root / "runs")
    update_readme(out / "README.md", verdicts if repeats is None else f"{verdicts.rstrip()}\n\n{repeats}")
    return html


__all__ = ["write_results", "update_readme", "VERDICTS_BEGIN", "VERDICTS_END"]
