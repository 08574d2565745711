"""`build_report(paths, out)`: every table and figure for a set of sweeps, plus `index.md`.

    out/index.md                  run status (failed / incomplete / duplicate runs listed), every
                                  table inline, links to .md/.tex/.csv and to each figure
    out/index.html                the same sections as one self-contained page (HTML tables,
                                  <img> figures; see html_index.py)
    out/tables/<name>.{md,tex,csv}
    out/figures/<name>.{png,pdf}

Figures that need per-token data (usage histograms, selection heatmaps, t-SNE, domain heatmaps,
usage over training) are drawn from the routing snapshots `<run_dir>/routing/step*.pt` when a
run has them (one representative run per variant: the lowest counted seed); otherwise they are
skipped and the index says why. From the last snapshot: usage histograms before vs after the
quota (quota routers; others: selected vs served slots), and per layer and expert the TF-IDF
keywords of the slice tokens it served (`tables/keywords_<variant>.{md,tex,csv}`; layer 0's
annotate the domain heatmap), decoded with the run's tokenizer (see `token_texts`).

Colours: one {variant: colour} map for the whole report (`Report.colors`, `series_colors` over
every variant, sorted), passed to every per-variant figure, so a variant has the same colour in
every panel of every figure.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from tokenizers import Tokenizer

from spectra.analysis import figures as F
from spectra.analysis.collect import collect, problems, seed_text
from spectra.analysis.columns import resolve
from spectra.analysis.html_index import shown_path, shown_text, write_index_html
from spectra.analysis.rendered_table import MISSING, Table
from spectra.analysis.snapshots import (
    BEFORE_QUOTA_KEYS,
    RoutingSnapshot,
    expert_representations,
    load_routing_snapshots,
    stability_from_snapshots,
)
from spectra.analysis.tables import (
    STABILITY_METRICS,
    TABLE7_METRICS,
    ablation_table,
    cell_stats,
    comparison_table,
    overhead_table,
    scaling_table,
    significance_table,
    stability_table,
    sweep_tables,
    variant_labels,
)
from spectra.contracts.rundir import read_summary
from spectra.data import load_tokenizer
from spectra.metrics import domain_affinity, domain_expert_counts, expert_purity, expert_top_keywords

CURVE_METRICS = [("cv", "load CV"), ("maxvio", "MaxVio"), ("routing_entropy", "routing entropy"),
                 ("usage_entropy", "expert entropy"), ("gram_orthogonality", "Gram orthogonality")]
MAX_TSNE_PANELS = 12


@dataclass
class Report:
    out: Path
    index: Path
    runs: pd.DataFrame
    steps: pd.DataFrame
    tables: list[Table] = field(default_factory=list)
    figures: dict[str, list[Path]] = field(default_factory=dict)  # name -> [png, pdf]
    notes: list[str] = field(default_factory=list)
    problems: pd.DataFrame | None = None
    sources: list[str] = field(default_factory=list)  # the paths the report was built from
    captions: dict[str, str] = field(default_factory=dict)  # figure name -> its title
    colors: dict[str, tuple] = field(default_factory=dict)  # variant -> colour, in every figure
    html: Path | None = None  # out/index.html

    def status_line(self) -> str:
        """'Runs: N found — k counted (...), f failed, i incomplete, d duplicate.' (index.md / .html)"""
        runs, n = self.runs, self.runs["status"].value_counts()
        return (f"Runs: {len(runs)} found — {int(runs['counted'].sum())} counted (completed, not duplicate), "
                f"{int(n.get('failed', 0))} failed, {int(n.get('incomplete', 0))} incomplete, "
                f"{int((runs['duplicate'] & (runs['status'] == 'completed')).sum())} duplicate.")


def _add_figure(rep: Report, name: str, caption: str, paths: list[Path]) -> None:
    """Record a drawn figure and its caption (its title), which index.md / index.html show."""
    rep.figures[name] = paths
    rep.captions[name] = caption


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", str(s)).strip("_")[:60] or "x"


def _step_column(steps: pd.DataFrame, name: str) -> str | None:
    for col in (f"monitor/{name}_mean", f"train/monitor/{name}_mean", f"train/{name}_mean", f"eval/{name}_mean"):
        if col in steps.columns and steps[col].notna().any():
            return col
    return None


def _representatives(runs: pd.DataFrame, has: dict[str, bool]) -> dict[str, str]:
    """variant -> run_dir of its lowest counted seed for which `has[run_dir]`."""
    out = {}
    ok = runs[runs["counted"]].sort_values(["variant", "seed", "run_dir"], na_position="last")
    for _, r in ok.iterrows():
        if r["variant"] not in out and has.get(r["run_dir"]):
            out[r["variant"]] = r["run_dir"]
    return out


def token_texts(run_dir: str | Path, snap: RoutingSnapshot) -> tuple[list[str] | None, str]:
    """The slice's tokens as strings [N], aligned with the snapshot's routing rows, and their source.

    In order: the snapshot's `token_texts`; its `input_ids` / `token_ids` decoded one token at a
    time with the run's saved tokenizer (`<run_dir>/model/tokenizer.json`), else with the run's
    `data.tokenizer` from `.hydra/config.yaml` when that loads without the network (`bundled` or a
    local directory); else the ids themselves as strings. Special tokens decode to "" (dropped
    by the TF-IDF). Returns (None, "none") when the snapshot has no tokens at all.
    """
    texts = snap.shared.get("token_texts")
    if texts is not None:
        return [str(t) for t in texts], "token_texts"
    ids = next((snap.shared[k] for k in ("input_ids", "token_ids") if snap.shared.get(k) is not None), None)
    if ids is None:
        return None, "none"
    ids = [int(i) for i in np.asarray(ids).ravel()]  # [N]
    run_dir = Path(run_dir)
    if (run_dir / "model" / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(run_dir / "model" / "tokenizer.json"))
        return [tok.decode([i]) for i in ids], "the run's tokenizer"
    name = _config_tokenizer(run_dir)
    if name is not None:
        try:
            tok = load_tokenizer(name)
            return [tok.decode([i]) for i in ids], f"tokenizer {name!r} of the run's config"
        except (OSError, ValueError):
            pass
    return [str(i) for i in ids], "token ids (no tokenizer found)"


def _config_tokenizer(run_dir: Path) -> str | None:
    """The run's `data.tokenizer` when it can be loaded offline ('bundled' or a local dir), else None."""
    try:
        cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    name = (cfg.get("data") or {}).get("tokenizer") if isinstance(cfg, dict) else None
    if name == "bundled" or (isinstance(name, str) and Path(name).is_dir()):
        return name
    return None


def expert_keywords(snap: RoutingSnapshot, layer: int, texts: list[str], num_experts: int,
                    top_n: int = 4) -> dict[int, list[str]] | None:
    """TF-IDF keywords per expert of one layer: each expert's document is the text of every slice
    token served to it (a token routed to k experts goes into k documents), scored by
    `spectra.metrics.expert_top_keywords`. texts: [N] aligned with the layer's rows.
    Returns {expert: [term, ...]} (best first; [] for an expert that served nothing), or None
    when the layer has no `expert_index`."""
    d = snap.layers.get(layer, {})
    if "expert_index" not in d:
        return None
    idx = np.asarray(d["expert_index"])  # [N, k]
    served = np.asarray(d.get("served", np.ones_like(idx, dtype=bool)), dtype=bool) & snap.valid(layer)[:, None]
    per_expert: dict[int, list[str]] = {e: [] for e in range(num_experts)}
    for t, j in zip(*np.nonzero(served)):
        if t < len(texts):
            per_expert[int(idx[t, j])].append(str(texts[t]))
    return expert_top_keywords(per_expert, top_n=top_n)


def _md_cell(s: str) -> str:
    """A keyword as one markdown/LaTeX table cell: no pipes or line breaks."""
    return s.replace("|", "\\|").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def keyword_table(name: str, title: str, rows: list[dict]) -> Table:
    """rows: {layer, expert, load, purity, top_domain, keywords: [str]} -> a Table (the CSV holds
    the keywords as a JSON list, markdown/LaTeX separate them by " · ")."""
    data = pd.DataFrame(rows)
    data["keywords"] = [json.dumps(list(k), ensure_ascii=False) for k in data["keywords"]]
    data.index = [f"layer {r['layer']} · E{r['expert']}" for r in rows]
    data.index.name = "expert"
    display = pd.DataFrame({
        "load": [f"{r['load']:.0f}" for r in rows],
        "purity": [MISSING if not np.isfinite(r["purity"]) else f"{r['purity']:.2f}" for r in rows],
        "top domain": [r["top_domain"] for r in rows],
        "TF-IDF keywords": [" · ".join(_md_cell(k) for k in r["keywords"]) or MISSING for r in rows],
    }, index=data.index)
    return Table(name=name, title=title, display=display, data=data)


def _domain_names(run_dir: str, snap: RoutingSnapshot, n: int) -> list[str]:
    names = snap.shared.get("domain_names")
    if not names:
        names = ((read_summary(run_dir) or {}).get("monitor") or {}).get("domain_names")
    names = list(names or [])
    return names if len(names) >= n else names + [f"domain {j}" for j in range(len(names), n)]


def _snapshot_figures(rep: Report, runs: pd.DataFrame, snaps: dict[str, list[RoutingSnapshot]], fig_dir: Path) -> None:
    """Per variant (its lowest counted seed): usage histograms, usage over training, selection
    heatmap, domain heatmap and keyword table; across variants: served usage per layer and t-SNE
    of expert vectors."""
    labels = variant_labels(sorted(runs["variant"].unique()))
    reps = _representatives(runs, {r: bool(s) for r, s in snaps.items()})
    if not reps:
        rep.notes.append("no routing snapshots (`<run_dir>/routing/step*.pt`, written by the routing monitor): usage "
                         "histograms, usage over training, selection and domain heatmaps skipped")
    across: dict[str, dict[int, np.ndarray]] = {}  # variant label -> {layer: [E] served load}
    keywords_missing = False
    for variant, run_dir in sorted(reps.items()):
        s_all = snaps[run_dir]
        tag, lab = _slug(labels[variant]), labels[variant]
        after = _usage_figures(rep, s_all, tag, lab, fig_dir)
        if after:
            across[lab] = after
        _selection_figure(rep, s_all[-1], tag, lab, fig_dir)
        keywords_missing |= not _domain_figures(rep, run_dir, s_all[-1], tag, lab, fig_dir)
    if len(across) >= 2:
        title = "Served expert usage per layer, by variant (last snapshot)"
        # the series are variants here: their report-wide colours, as in the curves
        colors = {labels[v]: rep.colors[v] for v in reps if labels[v] in across and v in rep.colors}
        _add_figure(rep, "usage_hist_variants", title, F.plot_usage_histograms(
            across, fig_dir / "usage_hist_variants", title=title, colors=colors))
    if reps and not any(k.startswith("selection_heatmap") for k in rep.figures):
        rep.notes.append("snapshots carry no `shape` / `positions`: selection heatmaps skipped")
    if reps and not any(k.startswith("domain_heatmap") for k in rep.figures):
        rep.notes.append("snapshots carry no `domain_ids`: domain heatmaps skipped")
    if keywords_missing:
        rep.notes.append("snapshots carry no `input_ids` / `token_texts`: domain heatmaps drawn without TF-IDF keywords")
    _tsne_figure(rep, runs, snaps, labels, fig_dir)


def _usage_series(last: RoutingSnapshot) -> tuple[dict[str, dict[int, np.ndarray]], dict[int, np.ndarray]]:
    """The last snapshot's usage histograms: ({series name: {layer: [E] load}}, {layer: [E] served
    load at eval}). With the monitor's quota pass, before / after the quota next to eval routing;
    otherwise what was selected before drops and what was served."""
    layers = sorted(last.layers)
    series: dict[str, dict[int, np.ndarray]] = {}
    explicit = any(k in last.layers[i] for i in layers for k in BEFORE_QUOTA_KEYS)
    before = {i: v for i in layers if (v := last.load_before(i)) is not None}
    after = {i: v for i in layers if (v := last.load_after(i)) is not None}
    quota_after = {i: v for i in layers if (v := last.load_after_quota(i)) is not None}
    if explicit and quota_after:
        # the monitor's quota pass (training-style routing of the slice) next to eval routing
        series["before quota (top-k of the plan)"] = before
        series["after quota"] = quota_after
        if after:
            series["served at eval (no quota)"] = after
    elif before:
        series["before quota" if explicit else "selected (before drops)"] = before
    if after and not (explicit and quota_after):
        series["served (after quota / drops)"] = after
    return series, after


def _usage_figures(rep: Report, s_all: list[RoutingSnapshot], tag: str, lab: str, fig_dir: Path) -> dict[int, np.ndarray]:
    """One variant's usage histograms (last snapshot) and usage over training (first MoE layer);
    returns the last snapshot's served load per layer."""
    last = s_all[-1]
    layers = sorted(last.layers)
    series, after = _usage_series(last)
    if series:
        title = f"Expert usage per layer — {lab} (step {last.step})"
        _add_figure(rep, f"usage_hist_{tag}", title, F.plot_usage_histograms(series, fig_dir / f"usage_hist_{tag}", title=title))
    if len(s_all) >= 2 and layers:
        loads = [s.load_after(layers[0]) for s in s_all]
        if all(x is not None for x in loads) and len({x.shape for x in loads}) == 1:
            title = f"Expert usage over training — {lab}, layer {layers[0]}"
            _add_figure(rep, f"usage_over_training_{tag}", title, F.plot_usage_over_training(
                [s.step for s in s_all], np.stack(loads), fig_dir / f"usage_over_training_{tag}", title=title))
    return after


def _selection_figure(rep: Report, last: RoutingSnapshot, tag: str, lab: str, fig_dir: Path) -> None:
    """One variant's expert selection over positions (needs the snapshot's shape / positions)."""
    layers = sorted(last.layers)
    pos = last.positions()
    e = next((last.num_experts(i) for i in layers if last.num_experts(i)), None)
    sel = {i: np.asarray(last.layers[i]["expert_index"])[last.valid(i)] for i in layers if "expert_index" in last.layers[i]}
    if pos is not None and sel and e:
        valid = last.valid(layers[0])
        title = f"Expert selection over positions — {lab}"
        _add_figure(rep, f"selection_heatmap_{tag}", title, F.plot_selection_heatmap(
            sel, pos[valid], e, fig_dir / f"selection_heatmap_{tag}", title=title))


def _domain_figures(rep: Report, run_dir: str, last: RoutingSnapshot, tag: str, lab: str, fig_dir: Path) -> bool:
    """One variant's domain heatmap (first MoE layer) and TF-IDF keyword table (every layer);
    returns whether the snapshot's tokens could be decoded for keywords."""
    layers = sorted(last.layers)
    e = next((last.num_experts(i) for i in layers if last.num_experts(i)), None)
    dom = last.shared.get("domain_ids")
    texts, source = token_texts(run_dir, last)
    if texts is not None and source.startswith("token ids"):
        rep.notes.append(f"{lab}: no tokenizer for the run, TF-IDF keywords are token ids")
    kw_rows: list[dict] = []  # one per (layer, expert): the keyword table
    dom = None if dom is None else np.asarray(dom).ravel()  # [N]
    for i in layers if dom is not None and e else []:
        d = last.layers[i]
        if "expert_index" not in d:
            continue
        ok = (dom >= 0) & last.valid(i)  # [N] real tokens with a domain
        names = _domain_names(run_dir, last, int(dom.max()) + 1 if dom.size else 0)
        idx = np.asarray(d["expert_index"])[ok]
        served = np.asarray(d.get("served", np.ones_like(d["expert_index"], dtype=bool)))[ok]
        aff = domain_affinity(idx, served, dom[ok], e, len(names)).numpy()  # [D, E]
        pur = expert_purity(idx, served, dom[ok], e, len(names)).per_expert.numpy()  # [E]
        kw = expert_keywords(last, i, texts, e) if texts is not None else None
        if kw is not None:
            counts = domain_expert_counts(idx, served, dom[ok], e, len(names)).numpy()  # [D, E]
            top, load = counts.argmax(0), counts.sum(0)  # [E] each: the expert's top domain, its load
            kw_rows += [{"layer": i, "expert": x, "load": float(load[x]), "purity": float(pur[x]),
                         "top_domain": names[top[x]] if load[x] else MISSING, "keywords": kw.get(x, [])}
                        for x in range(e)]
        if i == layers[0]:
            title = f"Domain affinity and purity — {lab}, layer {i}"
            _add_figure(rep, f"domain_heatmap_{tag}", title, F.plot_domain_heatmap(
                aff, pur, names, fig_dir / f"domain_heatmap_{tag}", keywords=kw, title=title))
    if kw_rows:
        t = keyword_table(f"keywords_{tag}", f"TF-IDF keywords per expert — {lab} (step {last.step}, "
                          f"tokens decoded with {source})", kw_rows)
        t.write(fig_dir.parent / "tables")
        rep.tables.append(t)
    return texts is not None


def _tsne_figure(rep: Report, runs: pd.DataFrame, snaps: dict[str, list[RoutingSnapshot]], labels: dict[str, str],
                 fig_dir: Path) -> None:
    """t-SNE of expert vectors: the last snapshot's `expert_repr` if any, else the final model's
    router vectors; one panel per (variant, layer), at most MAX_TSNE_PANELS."""
    tsne: dict[str, np.ndarray] = {}
    vecs = {}
    for r in runs.loc[runs["counted"], "run_dir"]:
        last = snaps.get(r)[-1] if snaps.get(r) else None
        from_snap = {i: np.asarray(d["expert_repr"]) for i, d in (last.layers.items() if last else []) if "expert_repr" in d}
        vecs[r] = from_snap or expert_representations(r)
    for variant, run_dir in sorted(_representatives(runs, {r: bool(v) for r, v in vecs.items()}).items()):
        for layer, x in vecs[run_dir].items():
            if len(tsne) < MAX_TSNE_PANELS:
                tsne[f"{labels[variant]} · layer {layer}"] = x
    if tsne:
        title = "t-SNE of expert representations (one panel per variant and layer; colour: expert id)"
        _add_figure(rep, "expert_tsne", title, F.plot_expert_tsne(tsne, fig_dir / "expert_tsne", title=title))
    else:
        rep.notes.append("no expert vectors (routing snapshots' `expert_repr` or router weights in `<run_dir>/model`): t-SNE skipped")


def _sweep_figures(rep: Report, runs: pd.DataFrame, steps: pd.DataFrame, fig_dir: Path) -> None:
    for sweep, sub in sorted(runs.groupby("sweep"), key=lambda kv: kv[0]):
        tag = _slug(sub["sweep_name"].iloc[0])
        groups = sorted(sub["variant"].unique())
        labels = variant_labels(groups)
        colors = rep.colors  # report-wide: a variant keeps its colour across sweeps and figures
        st = steps[(steps["sweep"] == sweep) & steps["run_dir"].isin(sub.loc[sub["counted"], "run_dir"])] if not steps.empty else steps
        if not st.empty:
            loss = [(c, lab) for c, lab in (("loss", "train loss"), ("eval_loss", "eval loss")) if c in st and st[c].notna().any()]
            if loss:
                title = f"Training dynamics — sweep {tag}"
                _add_figure(rep, f"loss_curves_{tag}", title, F.plot_metric_curves(
                    st, loss, fig_dir / f"loss_curves_{tag}", title=title, labels=labels, colors=colors))
            curves = [(col, lab) for name, lab in CURVE_METRICS if (col := _step_column(st, name))]
            missing = [lab for name, lab in CURVE_METRICS if not _step_column(st, name)]
            if curves:
                title = f"Routing metrics vs steps — sweep {tag}"
                _add_figure(rep, f"routing_curves_{tag}", title, F.plot_metric_curves(
                    st, curves, fig_dir / f"routing_curves_{tag}", title=title, labels=labels, colors=colors))
            if missing:
                rep.notes.append(f"sweep {tag}: not logged per step, no curve: {', '.join(missing)}")
        cv, loss_col = resolve(sub, "cv"), resolve(sub, "eval_loss")
        if cv and loss_col:
            a, b = cell_stats(sub, cv, "variant"), cell_stats(sub, loss_col, "variant")
            cells = pd.DataFrame({"cv": a["mean"], "cv_std": a["std"], "eval_loss": b["mean"], "eval_loss_std": b["std"]}).dropna(subset=["cv", "eval_loss"])
            if not cells.empty:
                cells["label"] = [labels.get(v, v) for v in cells.index]
                title = f"Eval loss vs load CV — sweep {tag}"
                _add_figure(rep, f"pareto_{tag}", title, F.plot_pareto(cells, fig_dir / f"pareto_{tag}", title=title))


def build_report(paths, out: str | Path, baseline: str | None = None, figures: bool = True, seed: int = 0) -> Report:
    """Collect the runs under `paths` and write every table, figure, `index.md` and `index.html` under `out`."""
    out = Path(out)
    runs, steps = collect(paths)
    if runs.empty:
        raise ValueError(f"no run directories under {' '.join(map(str, paths))}")
    out.mkdir(parents=True, exist_ok=True)
    table_dir, fig_dir = out / "tables", out / "figures"
    rep = Report(out=out, index=out / "index.md", runs=runs, steps=steps, problems=problems(runs),
                 sources=[str(p) for p in paths],
                 # fixed once from every variant: figures drawn later cannot shift one another's colours
                 colors=F.series_colors(sorted(runs["variant"].dropna().unique(), key=str)))

    snaps = {r: load_routing_snapshots(r) for r in runs.loc[runs["counted"], "run_dir"]}
    if not any(resolve(runs, m) for m in STABILITY_METRICS):
        for r, s in snaps.items():
            if len(s) >= 2:
                for k, v in stability_from_snapshots(s).items():
                    runs.loc[runs["run_dir"] == r, f"stability:{k}"] = v

    sig_metrics = ["eval_loss"] + [m for m in ["cv", *TABLE7_METRICS[:4]] if resolve(runs, m)]
    rep.tables = [
        comparison_table(runs),
        ablation_table(runs),
        overhead_table(runs),
        scaling_table(runs, "cfg:model.name", name="table10_model_sizes", title="Table 10: Performance across model sizes"),
        scaling_table(runs, "cfg:moe.num_experts", name="table11_num_experts", title="Table 11: Performance vs number of experts"),
        stability_table(runs),
        significance_table(runs, sig_metrics, baseline=baseline, seed=seed),
        *sweep_tables(runs),
    ]
    for t in rep.tables:
        t.write(table_dir)
    if figures:
        _sweep_figures(rep, runs, steps, fig_dir)
        _snapshot_figures(rep, runs, snaps, fig_dir)
    rep.index.write_text(index_markdown(rep, paths))
    rep.html = write_index_html(rep)
    return rep


def index_markdown(rep: Report, paths, title: str = "spectra report") -> str:
    """index.md of a report: status, runs not counted (with why), tables (with md/tex/csv links),
    figures (PNG inline, PDF linked) and notes; paths are the sources it was built from."""
    rel = lambda p: os.path.relpath(p, rep.out)  # noqa: E731
    lines = [f"# {title}", "", "Sources: " + ", ".join(f"`{p}`" for p in paths), "", rep.status_line(), ""]
    if rep.problems is not None and not rep.problems.empty:
        lines += ["## Runs not counted", "", "| problem | run | variant | seed | reason |", "|---|---|---|---|---|"]
        for r in rep.problems.itertuples():
            err = shown_text(str(r.reason), rep.out).replace("|", "\\|").replace("\n", " ")[:400]
            lines.append(f"| **{r.problem}** | `{shown_path(r.run_dir, rep.out)}` | {r.variant} | {seed_text(r.seed)} | {err} |")
        lines.append("")
    lines += ["## Tables", ""]
    for t in rep.tables:
        links = " · ".join(f"[{ext}](tables/{t.name}.{ext})" for ext in ("md", "tex", "csv"))
        lines += [f"### {t.title}", "", links, "", t.markdown(title=False), ""]
    lines += ["## Figures", ""]
    for name, (png, pdf) in rep.figures.items():
        caption = [f"*{rep.captions[name]}*", ""] if rep.captions.get(name) else []
        lines += [f"### {name}", "", *caption, f"![{name}]({rel(png)})", "", f"[PDF]({rel(pdf)})", ""]
    if not rep.figures:
        lines += ["(none)", ""]
    if rep.notes:
        lines += ["## Notes", ""] + [f"- {x}" for x in rep.notes] + [""]
    return "\n".join(lines)
