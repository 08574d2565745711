"""The paper's tables from `collect`'s runs frame: mean ± std over seeds per cell.

    comparison_table(runs)      the Table-7-style comparison `python -m spectra.analysis table` prints
    comparison_frame(runs)      its cells as a plain DataFrame (the sweep's progress line prints it)
    ablation_table(runs)        Table 7: expert entropy, overlap, Gram ortho, collapse rate, CV, loss
    overhead_table(runs)        Table 9: router / expert time per component (monitor's *_ms keys)
    scaling_table(runs, by)     Tables 10 (by model) and 11 (by number of experts)
    stability_table(runs)       Table 12: checkpoint consistency, usage variance, Kendall τ
    significance_table(runs)    Table 13: Welch t-tests vs a baseline, stars, bootstrap CIs
    sweep_tables(runs)          one table per sweep directory (A–E), best cell per column marked
Only counted runs (completed, not duplicates) enter means and tests; every table also counts
failed/incomplete runs per row, so they are never invisible.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from spectra.analysis.columns import Metric, metric, missing_note, resolve
from spectra.analysis.rendered_table import MISSING, STD_NOTE, Table, fmt_mean_std, fmt_value
from spectra.analysis.stats import bootstrap_ci, bootstrap_diff_ci, format_p, stars, welch_ttest
from spectra.routers_catalog import DISPLAY_NAMES as ROUTER_NAMES  # router.name -> printed name

ABLATION_NAMES = {"full": "SPECTRA-Full", "no_expression": "-Expression", "no_gru": "-GRU",
                  "no_repulsion": "-Repulsion", "no_quota": "-Quota", "no_ortho": "-OrthoConstraint", "no_all": "-All"}
TABLE7_METRICS = ["usage_entropy", "expert_overlap", "gram_orthogonality", "collapse_rate", "cv", "eval_loss"]
# Balance under inference routing (cv, maxvio: eval mode, what a deployed model does) beside the
# training routing's (after selection: SPECTRA's quota, Switch's capacity), so the gap is a column.
COMPARISON_METRICS = ["eval_loss", "cv", "train_cv", "maxvio", "train_maxvio", "usage_entropy", "expert_overlap", "gram_orthogonality",
                      "collapse_rate", "expert_slots_per_token", "tokens_per_s"]
STABILITY_METRICS = ["consistency", "usage_variance", "kendall_tau"]
SWEEP_EXTRA_METRICS = ["usage_entropy", "expert_overlap", "gram_orthogonality", "collapse_rate", "consistency",
                       "sequential_overlap", "tokens_per_s"]
# legacy (column, header, lower is better) triples still accepted by comparison_frame
COMPARISON_COLUMNS = [(m, metric(m).header, metric(m).lower_is_better) for m in COMPARISON_METRICS]


# ---------------------------------------------------------------- grouping and labels
def strip_common_overrides(labels: list[str]) -> dict[str, str]:
    """Shorten variant labels by dropping the `key=value` parts every label shares."""
    parts = [set(label.split(",")) for label in labels]
    common = set.intersection(*parts) if parts and len(parts) > 1 else set()
    return {label: ",".join(p for p in label.split(",") if p not in common) or label for label in labels}


def variant_labels(groups: list[str]) -> dict[str, str]:
    """Short, paper-style row labels: common overrides dropped, `router=`/`ablation=` named."""
    short = strip_common_overrides(list(groups))
    out = {}
    for g, s in short.items():
        key, _, value = s.partition("=")
        if "," not in s and key == "ablation" and value in ABLATION_NAMES:
            s = ABLATION_NAMES[value]
        elif "," not in s and key == "router" and value in ROUTER_NAMES:
            s = ROUTER_NAMES[value]
        out[g] = s
    if len(set(out.values())) < len(out):  # pretty names collided: fall back to overrides
        out = short
    return out


def _overrides_key(group) -> tuple:
    """Sort key of a variant label "k1=v1,k2=v2": key by key, numbers as numbers (16 < 64 < 1024,
    1e-4 < 0.001), so a sweep's rows follow its values rather than their spelling."""
    out = []
    for part in str(group).split(","):
        k, _, v = part.partition("=")
        try:
            out.append((k, 0, float(v), ""))
        except ValueError:
            out.append((k, 1, 0.0, v))
    return tuple(out)


def _order(groups, by: str) -> list:
    groups = list(pd.unique(pd.Series(list(groups))))
    if by == "variant":
        rank = {f"ablation={k}": i for i, k in enumerate(ABLATION_NAMES)}

        def key(g):
            hit = [rank[p] for p in str(g).split(",") if p in rank]
            return (min(hit) if hit else len(rank), _overrides_key(g))

        return sorted(groups, key=key)
    try:
        return sorted(groups, key=float)
    except (TypeError, ValueError):
        return sorted(groups, key=str)


def cell_stats(runs: pd.DataFrame, col: str, by: str | list[str]) -> pd.DataFrame:
    """mean, std (ddof=1, as pandas), n of column `col` over counted runs per group."""
    ok = runs[runs["counted"]]
    if col not in ok.columns or ok.empty:
        return pd.DataFrame(columns=["mean", "std", "n"])
    vals = pd.to_numeric(ok[col], errors="coerce")
    g = vals.groupby([ok[b] for b in ([by] if isinstance(by, str) else by)])
    return pd.DataFrame({"mean": g.mean(), "std": g.std(), "n": g.count()})


def status_counts(runs: pd.DataFrame, by: str) -> pd.DataFrame:
    """Per group: completed (counted), failed, incomplete, not started (planned in sweep_plan.json,
    no run directory), duplicate (completed repeats)."""
    return pd.DataFrame({
        "completed": runs[runs["counted"]].groupby(by).size(),
        "failed": runs[runs["status"] == "failed"].groupby(by).size(),
        "incomplete": runs[runs["status"] == "incomplete"].groupby(by).size(),
        "not started": runs[runs["status"] == "not started"].groupby(by).size(),
        "duplicate": runs[runs["duplicate"] & (runs["status"] == "completed")].groupby(by).size(),
    }).reindex(_order(runs[by].unique(), by)).fillna(0).astype(int)


def _counted_per(runs: pd.DataFrame, by: str, values) -> list[int]:
    """The number of counted runs per value of `by`, in the order of `values`."""
    ok = runs[runs["counted"]] if "counted" in runs.columns else runs
    return ok.groupby(by).size().reindex(values).fillna(0).astype(int).tolist()


def aggregate(runs: pd.DataFrame, columns: list[str], by: str = "variant") -> pd.DataFrame:
    """Mean, std (ddof=1, as pandas) and count of counted runs per group, for raw columns."""
    ok = runs[runs["counted"]] if "counted" in runs.columns else runs[runs["status"] == "completed"]
    cols = [c for c in columns if c in ok.columns]
    if ok.empty or not cols:
        return pd.DataFrame()
    g = ok.groupby(by)[cols]
    return pd.concat({"mean": g.mean(), "std": g.std(), "n": g.count()}, axis=1)


def _best_mask(stats: pd.DataFrame, lower: bool | None, index, scale: float = 1.0, digits: int | None = None) -> pd.Series:
    """The best cells of a column: every row whose mean, as shown (× scale, rounded to `digits`),
    equals the best shown mean, so tied rows are all marked. None when every row ties (no best)."""
    mask = pd.Series(False, index=index)
    if lower is None or stats.empty:
        return mask
    m = stats["mean"].reindex(index).astype(float)
    m = m[np.isfinite(m)] * scale
    if digits is not None:
        m = m.round(digits)
    if len(m) >= 2 and m.nunique() > 1:
        target = m.min() if lower else m.max()
        mask[m.index[m == target]] = True
    return mask


# ---------------------------------------------------------------- the generic per-cell table
def metric_table(runs: pd.DataFrame, metrics: list, by: str = "variant", *, name: str, title: str,
                 counts: bool = True, drop_missing: bool = False, labels: dict | None = None,
                 order: list | None = None) -> Table:
    """Rows = groups of `by`; one column per metric (mean ± std, best cell marked); run counts."""
    groups = order or _order(runs[by].unique(), by)
    labels = labels or (variant_labels(groups) if by == "variant" else {g: str(g) for g in groups})
    display = pd.DataFrame(index=groups)
    data = pd.DataFrame(index=groups)
    best = pd.DataFrame(index=groups)
    notes = [STD_NOTE]
    sc = status_counts(runs, by).reindex(groups).fillna(0).astype(int)
    for spec in metrics:
        m = metric(spec)
        col = resolve(runs, m)
        if col is None:
            if drop_missing:
                continue
            display[m.header], best[m.header] = MISSING, False
            notes.append(missing_note(m))
            continue
        st = cell_stats(runs, col, by).reindex(groups)
        st["n"] = st["n"].fillna(0).astype(int)
        display[m.header] = [fmt_mean_std(r["mean"] * m.scale, r["std"] * m.scale, r["n"], m.digits, expected=done)
                             for (_, r), done in zip(st.iterrows(), sc["completed"])]
        best[m.header] = _best_mask(st, m.lower_is_better, groups, m.scale, m.digits)
        for stat in ("mean", "std", "n"):
            data[f"{m.key}_{stat}"] = st[stat]
        data[f"{m.key}_source"] = col
    if counts:
        shown = (["completed", "failed", "incomplete"] + (["not started"] if sc["not started"].any() else [])
                 + (["duplicate"] if sc["duplicate"].any() else []))
        for c in shown:
            display[c], best[c] = sc[c].astype(str), False
        data = data.join(sc)
    data.insert(0, "label", [labels[g] for g in groups])
    data.index.name = by
    display.index = [labels[g] for g in groups]
    display.index.name = "variant" if by == "variant" else by.removeprefix("cfg:").removeprefix("ov:")
    best.index = display.index
    return Table(name, title, display, data, best, notes)


def comparison_frame(runs: pd.DataFrame, by: str = "variant", columns=None) -> pd.DataFrame:
    """The comparison's cells as a DataFrame: one row per variant, formatted mean ± std per metric
    plus run counts (no notes, no best-cell marks; `comparison_table` renders it as a Table).

    `columns`: metric names, or legacy (runs column, header, lower is better) triples.
    """
    metrics = []
    for c in columns or COMPARISON_METRICS:
        if isinstance(c, tuple):
            col, header, lower = c
            m = metric(col)
            metrics.append(Metric(m.key, header, lower, m.scale, m.digits, (col, *m.columns())))
        else:
            metrics.append(c)
    return metric_table(runs, metrics, by, name="comparison", title="Comparison").display


def comparison_table(runs: pd.DataFrame, by: str = "variant") -> Table:
    """The comparison as a rendered Table (best cells marked, notes for metrics these runs did not
    log); `comparison_frame` gives its cells as a plain DataFrame."""
    return metric_table(runs, COMPARISON_METRICS, by, name="comparison", title="Comparison: mean ± sample std over seeds")


def to_markdown(table) -> str:
    """A GitHub-flavoured markdown table (a Table keeps its bold best cells and notes)."""
    if isinstance(table, Table):
        return table.markdown(title=False)
    headers = [table.index.name or ""] + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for idx, row in table.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [str(v) for v in row.tolist()]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- paper tables
def ablation_table(runs: pd.DataFrame, by: str = "variant") -> Table:
    t = metric_table(runs, TABLE7_METRICS, by, name="table07_ablations",
                     title="Table 7: Ablations — expert specialization (mean ± sample std over seeds)")
    t.notes.append("collapse rate: share of experts below 10 % of the uniform load (METHOD.md §5)")
    return t


def stability_table(runs: pd.DataFrame, by: str = "variant") -> Table:
    t = metric_table(runs, STABILITY_METRICS, by, name="table12_stability",
                     title="Table 12: Routing consistency across checkpoints (ideal: 100 %, 0, 1)")
    t.notes.append("consistency: fraction of top-k sets kept between consecutive checkpoints on the same held-out "
                   "tokens; usage variance: variance across checkpoints of each expert's load share (mean over experts); "
                   "Kendall τ-b of expert loads between consecutive checkpoints")
    return t


_MS_KEY = re.compile(r"^(final|monitor|last):(?:eval/|train/|metrics/)?(?:monitor/)?(?P<comp>[a-z][a-z0-9_]*?)_ms_mean$")
_ROUTER_PARTS = ("gru", "projection", "expression", "gram", "cosine", "sinkhorn", "selection", "topk", "quota")
_FORWARD_MS = ("final:monitor/forward_ms", "monitor:metrics/forward_ms", "last:monitor/forward_ms")


def overhead_table(runs: pd.DataFrame, by: str = "variant") -> Table:
    """Table 9: mean time per MoE-layer stage and its share of the layer, one column pair per variant.

    Stages are the monitor's per-layer `<stage>_ms` keys averaged over layers (`monitor/router_ms_mean`,
    `experts_ms_mean`, `shared_ms_mean`; finer router parts such as `gru_ms` when logged, shown
    indented as parts of the router time). total = the sum of the top-level stages: the MoE layer.
    `model forward` is the whole timed forward (all layers, attention included), for scale.
    """
    source: dict[str, str] = {}
    for prefix in ("final", "monitor", "last"):
        for c in runs.columns:
            m = _MS_KEY.match(c)
            if m and m.group(1) == prefix and m.group("comp") not in source:
                if pd.to_numeric(runs.loc[runs["counted"], c], errors="coerce").notna().any():
                    source[m.group("comp")] = c
    name, title = "table09_overhead", "Table 9: Routing overhead breakdown (ms per MoE layer, measured)"
    if not source:
        display = pd.DataFrame({"time (ms)": [MISSING], "% of total": [MISSING]}, index=pd.Index(["total"], name="component"))
        return Table(name, title, display, pd.DataFrame(), None,
                     ["no `*_ms` timings in these runs (the monitoring callback logs `monitor/router_ms_mean`, "
                      "`monitor/experts_ms_mean`); FLOPs are not reported (measured times only, paper 6.4)"])
    order = {"router": 0, "experts": 2, "shared": 3}
    comps = sorted(source, key=lambda c: (order.get(c, 1 if c in _ROUTER_PARTS else 4), c))
    top = [c for c in comps if c not in _ROUTER_PARTS or "router" not in source]
    fwd = next((c for c in _FORWARD_MS if c in runs.columns), None)
    groups = _order(runs[by].unique(), by)
    labels = variant_labels(groups) if by == "variant" else {g: str(g) for g in groups}
    display = pd.DataFrame(index=[*comps, "total", "model forward"])
    rows = []
    done = dict(zip(groups, _counted_per(runs, by, groups)))

    def ms(value, n, g, digits):  # "(n=k)": a mean over fewer runs than the variant's completed ones
        text = fmt_value(value, digits)
        return text + (f" (n={n})" if text != MISSING and n != done[g] else "")

    for g in groups:
        st = {c: cell_stats(runs, source[c], by) for c in comps}
        means = {c: st[c]["mean"].get(g, math.nan) for c in comps}
        ns = {c: int(st[c]["n"].get(g, 0)) for c in comps}
        vals = [means[c] for c in top]
        total = float(np.nansum(vals)) if any(math.isfinite(v) for v in vals) else math.nan
        fst = cell_stats(runs, fwd, by) if fwd else None
        forward = fst["mean"].get(g, math.nan) if fwd else math.nan
        pct = {c: 100 * means[c] / total if math.isfinite(total) and total > 0 else math.nan for c in comps}
        display[f"{labels[g]} ms"] = [ms(means[c], ns[c], g, 3) for c in comps] + [
            fmt_value(total, 3), ms(forward, int(fst["n"].get(g, 0)) if fwd else 0, g, 2)]
        display[f"{labels[g]} %"] = [fmt_value(pct[c], 1) for c in comps] + ["100" if math.isfinite(total) else MISSING, MISSING]
        rows += [{"variant": g, "label": labels[g], "component": c, "ms": means[c], "pct_of_total": pct[c],
                  "n": ns[c], "completed": done[g], "source": source[c]} for c in comps]
        rows += [{"variant": g, "label": labels[g], "component": "total", "ms": total, "pct_of_total": 100.0,
                  "completed": done[g]},
                 {"variant": g, "label": labels[g], "component": "model_forward", "ms": forward,
                  "n": int(fst["n"].get(g, 0)) if fwd else 0, "completed": done[g], "source": fwd}]
    display.index = [f"  {c}" if c not in top else c for c in comps] + ["total (MoE layer)", "model forward (all layers)"]
    display.index.name = "component"
    notes = ["mean wall-clock ms per MoE layer on the monitor's held-out slice, final evaluation, over the variant's "
             "completed runs ((n=k): only k of them logged it); FLOPs are not reported (measured times only, paper 6.4)"]
    if len(top) < len(comps):
        notes.append("indented rows are parts of the router time")
    return Table(name, title, display, pd.DataFrame(rows).set_index(["variant", "component"]), None, notes)


def scaling_table(runs: pd.DataFrame, by: str, *, name: str, title: str, primary: str = "spectra",
                  reference: str = "switch_top2") -> Table:
    """Tables 10/11: eval loss per router for each value of `by` and, where the runs have a
    downstream evaluation (eval_harness.json), the Avg Score per router; plus the primary router's
    expert entropy and Gram orthogonality."""
    avg = resolve(runs, "avg_score")
    notes = [STD_NOTE]
    if avg is None:
        notes.append("eval loss stands in for the paper's downstream Avg Score (no run has an eval_harness.json: "
                     "python -m spectra.eval <run>/model)")
    elif "harness:limit" in runs.columns and pd.to_numeric(runs["harness:limit"], errors="coerce").notna().any():
        notes.append("Avg Score: some runs were evaluated on a limited number of documents per task (--limit); "
                     "their scores are not comparable with a full evaluation")
    if by not in runs.columns:
        display = pd.DataFrame({"eval loss": [MISSING]}, index=pd.Index([MISSING], name=by))
        return Table(name, title, display, pd.DataFrame(), None, [f"no `{by}` in these runs", *notes])
    values = _order(runs[by].dropna().unique(), by)
    if by == "cfg:model.name" and "parameters:total" in runs.columns:
        # Model sizes read smallest first (by the median parameter count of their runs), not
        # alphabetically ("small" before "tiny"); names without a count go last.
        size = pd.to_numeric(runs["parameters:total"], errors="coerce").groupby(runs[by]).median()
        values = sorted(values, key=lambda v: (math.isnan(size.get(v, math.nan)), size.get(v, 0.0)))
    routers = sorted(runs["router"].dropna().unique(), key=lambda r: (r != reference, r != primary, r))
    loss = resolve(runs, "eval_loss")
    display, data, best = pd.DataFrame(index=values), pd.DataFrame(index=values), pd.DataFrame(index=values)
    for r in routers:
        st = cell_stats(runs[runs["router"] == r], loss, by).reindex(values) if loss else pd.DataFrame(index=values, columns=["mean", "std", "n"])
        header = f"{ROUTER_NAMES.get(r, r)} eval loss"
        done = _counted_per(runs[runs["router"] == r], by, values)
        display[header] = [fmt_mean_std(x["mean"], x["std"], x["n"], 4, expected=d) for (_, x), d in zip(st.iterrows(), done)]
        best[header] = False
        for s in ("mean", "std", "n"):
            data[f"{r}_eval_loss_{s}"] = st[s]
        if avg is not None:
            m = metric("avg_score")
            st = cell_stats(runs[runs["router"] == r], avg, by).reindex(values)
            header = f"{ROUTER_NAMES.get(r, r)} {m.header}"
            display[header] = [fmt_mean_std(x["mean"] * m.scale, x["std"] * m.scale, x["n"], m.digits, expected=d)
                               for (_, x), d in zip(st.iterrows(), done)]
            best[header] = False
            for s in ("mean", "std", "n"):
                data[f"{r}_avg_score_{s}"] = st[s]
    if primary in routers and reference in routers:
        imp = 100 * (data[f"{reference}_eval_loss_mean"] - data[f"{primary}_eval_loss_mean"]) / data[f"{reference}_eval_loss_mean"]
        display["improvement (%)"] = [f"{v:+.1f}" if math.isfinite(v) else MISSING for v in imp.astype(float)]
        best["improvement (%)"] = False
        data["improvement_pct"] = imp
        notes.append(f"improvement = (loss[{reference}] − loss[{primary}]) / loss[{reference}]")
    main = primary if primary in routers else (routers[0] if routers else None)
    sub = runs[runs["router"] == main] if main else runs.iloc[:0]
    for key in ("usage_entropy", "gram_orthogonality"):
        m = metric(key)
        col = resolve(sub, m) if not sub.empty else None
        header = f"{m.header} [{ROUTER_NAMES.get(main, main)}]"
        if col is None:
            display[header] = MISSING
            notes.append(missing_note(m))
        else:
            st = cell_stats(sub, col, by).reindex(values)
            done = _counted_per(sub, by, values)
            display[header] = [fmt_mean_std(x["mean"] * m.scale, x["std"] * m.scale, x["n"], m.digits, expected=d)
                               for (_, x), d in zip(st.iterrows(), done)]
            for s_ in ("mean", "std", "n"):
                data[f"{main}_{key}_{s_}"] = st[s_]
        best[header] = False
    if len(values) < 2:
        notes.append(f"only one value of `{by}` in these runs: no trend")
    display.index.name = data.index.name = by.removeprefix("cfg:")
    return Table(name, title, display, data, best, notes)


# ---------------------------------------------------------------- Table 13
def default_baseline(groups: list[str]) -> str:
    """The `ablation=full` variant, else the `router=spectra` one, else the first."""
    for token in ("ablation=full", "router=spectra"):
        hits = [g for g in groups if token in str(g).split(",")]
        if hits:
            return hits[0]
    return groups[0]


def resolve_baseline(groups: list[str], requested: str | None, labels: dict | None = None) -> str:
    """A group named exactly (full variant or its short label), or by a unique substring."""
    if requested is None:
        return default_baseline(groups)
    labels = labels or variant_labels(groups)
    for g in groups:
        if requested in (g, labels.get(g)):
            return g
    hits = [g for g in groups if requested in g or requested in labels.get(g, "")]
    if len(hits) == 1:
        return hits[0]
    raise ValueError(f"--baseline {requested!r} matches {len(hits)} variants; choose one of: "
                     + "; ".join(f"{labels.get(g, g)} ({g})" for g in groups))


def significance_table(runs: pd.DataFrame, metrics=("eval_loss", "cv"), baseline: str | None = None,
                       by: str = "variant", seed: int = 0) -> Table:
    """Table 13: each variant vs the baseline, per metric: Welch t-test (scipy), stars, and
    percentile-bootstrap 95 % CIs of each mean and of the difference (variant − baseline)."""
    counted = runs[runs["counted"]]
    groups = _order(counted[by].unique(), by) if not counted.empty else []
    name, title = "table13_significance", "Table 13: Welch t-tests across seeds (vs baseline) with bootstrap 95 % CIs"
    legend = "*** p<0.001, ** p<0.01, * p<0.05 (two-sided Welch t-test, scipy.stats.ttest_ind(equal_var=False))"
    if len(groups) < 2:
        display = pd.DataFrame({"p": [MISSING]}, index=pd.Index([MISSING], name="comparison"))
        return Table(name, title, display, pd.DataFrame(), None, ["fewer than two variants with completed runs", legend])
    labels = variant_labels(groups) if by == "variant" else {g: str(g) for g in groups}
    base = resolve_baseline(groups, baseline, labels)
    rows, notes = [], [legend]
    for spec in metrics:
        m = metric(spec)
        col = resolve(runs, m)
        if col is None:
            notes.append(missing_note(m))
            continue
        vals = {g: pd.to_numeric(counted.loc[counted[by] == g, col], errors="coerce").dropna().to_numpy() for g in groups}
        a = vals[base]
        for g in groups:
            if g == base:
                continue
            b = vals[g]
            w = welch_ttest(b, a)
            lo, hi = bootstrap_diff_ci(b, a, seed=seed)
            ca, cb = bootstrap_ci(a, seed=seed), bootstrap_ci(b, seed=seed)
            rows.append({
                "comparison": f"{labels[g]} vs {labels[base]}", "variant": g, "baseline": base, "metric": m.key,
                "source": col, "n_variant": len(b), "n_baseline": len(a),
                "mean_variant": b.mean() if len(b) else math.nan, "mean_baseline": a.mean() if len(a) else math.nan,
                "ci_variant_low": cb[0], "ci_variant_high": cb[1], "ci_baseline_low": ca[0], "ci_baseline_high": ca[1],
                "diff": (b.mean() - a.mean()) if len(a) and len(b) else math.nan, "diff_ci_low": lo, "diff_ci_high": hi,
                "t": w.t, "df": w.df, "p": w.p, "stars": stars(w.p), "x_scale": m.scale, "x_digits": m.digits, "x_header": m.header,
            })
    if not rows:
        display = pd.DataFrame({"p": [MISSING]}, index=pd.Index([MISSING], name="comparison"))
        return Table(name, title, display, pd.DataFrame(), None, notes)
    df = pd.DataFrame(rows)

    def ci(mean, lo, hi, s, d):
        if not math.isfinite(mean):
            return MISSING
        core = fmt_value(mean * s, d)
        return f"{core} [{fmt_value(lo * s, d)}, {fmt_value(hi * s, d)}]" if math.isfinite(lo) else core

    display = pd.DataFrame({
        "metric": df["x_header"],
        "baseline [95% CI]": [ci(r.mean_baseline, r.ci_baseline_low, r.ci_baseline_high, r.x_scale, r.x_digits) for r in df.itertuples()],
        "variant [95% CI]": [ci(r.mean_variant, r.ci_variant_low, r.ci_variant_high, r.x_scale, r.x_digits) for r in df.itertuples()],
        "Δ [95% CI]": [ci(r.diff, r.diff_ci_low, r.diff_ci_high, r.x_scale, r.x_digits) for r in df.itertuples()],
        "n": [f"{r.n_variant} vs {r.n_baseline}" for r in df.itertuples()],
        "t": [fmt_value(t, 2) for t in df["t"]],
        "p": [format_p(p) for p in df["p"]],
        "significant?": [f"yes ({s})" if s else ("no" if math.isfinite(p) else MISSING) for s, p in zip(df["stars"], df["p"])],
    })
    display.index = pd.Index(df["comparison"], name="comparison")
    notes.append(f"baseline: {labels[base]}; Δ = variant − baseline; CIs: percentile bootstrap, "
                 f"9999 resamples, seed {seed}; < 2 seeds on a side gives –")
    data = df.drop(columns=["x_scale", "x_digits", "x_header"]).set_index("comparison")
    return Table(name, title, display, data, None, notes)


# ---------------------------------------------------------------- per-sweep tables
def sweep_tables(runs: pd.DataFrame) -> list[Table]:
    """One table per sweep directory: its cells (the overrides that vary), best cell marked."""
    tables = []
    for i, (sweep, sub) in enumerate(sorted(runs.groupby("sweep"), key=lambda kv: kv[0])):
        sname = str(sub["sweep_name"].iloc[0])
        metrics = ["eval_loss", "cv", "maxvio"] + [m for m in SWEEP_EXTRA_METRICS if resolve(sub, m)]
        slug = re.sub(r"[^A-Za-z0-9]+", "_", sname).strip("_") or f"{i}"
        t = metric_table(sub, metrics, "variant", name=f"sweep_{i:02d}_{slug}",
                         title=f"Sweep {sname}: mean ± sample std over seeds per cell (best per column in bold, ties all bold)")
        t.notes.append(f"directory: {sweep}")
        tables.append(t)
    return tables
