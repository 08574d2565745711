"""Figures: pure functions from arrays / DataFrames to PNG + PDF files (matplotlib, Agg).

Each `plot_*` takes data, writes `<stem>.png` and `<stem>.pdf`, and returns the two paths; none
reads a run directory (report.py does that), so each is testable with synthetic data.

    plot_usage_histograms     expert load per layer, before vs after quota selection
    plot_usage_over_training  stacked expert shares across snapshots (paper Figure 4)
    plot_metric_curves        metrics vs steps per variant, mean over seeds with a min–max band
                              (one colour per variant in every panel, one legend of all)
    plot_selection_heatmap    P(expert | position) per layer
    plot_expert_tsne          t-SNE of expert representations, one panel per router/layer
    plot_domain_heatmap       P(expert | domain), per-expert purity, TF-IDF keywords
    plot_pareto               eval loss vs load CV per sweep cell, Pareto front marked

Colours: `series_colors(names)` fixes one colour per name for a whole figure (a report builds
one such map over all its variants and passes it to every figure); `complete_colors` extends a
given map to names it lacks without reusing its colours.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402


def save_figure(fig, stem: str | Path) -> list[Path]:
    """stem.png and stem.pdf; the PDF without its creation date, so the same figure is the same
    bytes (a regenerated results/ shows only the figures that changed)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None})
    plt.close(fig)
    return paths


def series_colors(names) -> dict:
    """One colour per name, fixed once for a whole figure (every panel) from the full list of
    names: a series missing from one panel does not shift the others' colours. tab10 for up to
    10 names, tab20 for up to 20, evenly spaced turbo colours beyond."""
    names = list(dict.fromkeys(names))
    n = len(names)
    if n <= 10:
        cols = [plt.get_cmap("tab10")(i) for i in range(n)]
    elif n <= 20:
        cols = [plt.get_cmap("tab20")(i) for i in range(n)]
    else:
        cols = [plt.get_cmap("turbo")(x) for x in np.linspace(0.05, 0.95, n)]
    return dict(zip(names, cols))


def complete_colors(names, given: dict | None = None) -> dict:
    """`given` (e.g. a report-wide {variant: colour}) extended to every one of `names`.

    Names already in `given` keep their colour; each missing name gets a palette colour no
    given name uses. Filling the gaps from `series_colors(names)` instead could hand a missing
    name the very colour `given` assigns to another, and then two series would share it."""
    names = list(dict.fromkeys(names))
    out = dict(given or {})
    missing = [n for n in names if n not in out]
    if not missing:
        return out
    taken = {to_rgba(c) for c in out.values()}
    palette = series_colors(range(len(out) + len(missing)))  # big enough: at most len(out) are taken
    free = [c for c in palette.values() if to_rgba(c) not in taken]
    out.update(zip(missing, free))
    return out


def _grid(n: int, ncols: int = 4, size=(3.6, 2.8)):
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def plot_usage_histograms(loads: dict[str, dict[int, np.ndarray]], stem, title: str = "Expert usage",
                          colors: dict | None = None) -> list[Path]:
    """loads: {series label ('before quota', 'after quota'): {layer: [E] counts}} -> one panel per
    layer, bars of each expert's share of assignments per series, uniform share dashed.

    A series keeps one colour and one bar slot in every panel, also where another series is
    missing: `colors` ({series label: colour}, e.g. a report's variant colours) when given, a
    free palette colour for a series it lacks (`complete_colors`), else `series_colors(loads)`.
    The legend, below the panels, is built from that same map and lists every series."""
    layers = sorted(set().union(*[d.keys() for d in loads.values()]))
    colors = complete_colors(loads, colors) if colors else series_colors(loads)
    fig, axes = _grid(len(layers))
    width = 0.8 / max(len(loads), 1)
    for ax, layer in zip(axes, layers):
        e = 0
        for j, (label, per_layer) in enumerate(loads.items()):
            if layer not in per_layer:
                continue
            x = np.asarray(per_layer[layer], dtype=float)
            e = len(x)
            share = x / x.sum() if x.sum() > 0 else x
            ax.bar(np.arange(e) + (j - (len(loads) - 1) / 2) * width, share, width=width, label=label, color=colors[label])
        if e:
            ax.axhline(1 / e, color="k", ls="--", lw=0.8)
            ax.set_xticks(range(e))
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("expert")
        ax.set_ylabel("share of assignments")
    handles = [Patch(facecolor=colors[label], label=label) for label in loads]
    handles.append(Line2D([], [], color="k", ls="--", lw=0.8, label="uniform share 1/E"))
    fig.suptitle(title)
    _figure_legend(fig, handles)
    return save_figure(fig, stem)


def _figure_legend(fig, handles) -> None:
    """One legend for the whole figure, below the panels, with every handle."""
    fig.tight_layout()
    if not handles:
        return
    ncol = min(4, len(handles))
    rows = math.ceil(len(handles) / ncol)
    height = fig.get_size_inches()[1]
    bottom = min(0.4, (0.3 * rows + 0.15) / height)  # inches of legend -> fraction of the figure
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, bbox_to_anchor=(0.5, 0.0), frameon=False)


def plot_usage_over_training(steps, shares: np.ndarray, stem, title: str = "Expert usage over training") -> list[Path]:
    """steps: [S]; shares: [S, E] loads (normalised per row here) -> stacked area chart."""
    x = np.asarray(steps, dtype=float)
    s = np.asarray(shares, dtype=float)
    s = s / np.clip(s.sum(1, keepdims=True), 1e-12, None)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.stackplot(x, s.T, labels=[f"E{e}" for e in range(s.shape[1])])
    ax.set_xlabel("step")
    ax.set_ylabel("share of assignments")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=max(1, s.shape[1] // 8), loc="upper left", bbox_to_anchor=(1.01, 1))
    return save_figure(fig, stem)


BAND_LABEL = "shaded: min–max over seeds (line: mean over seeds)"


def plot_metric_curves(steps: pd.DataFrame, metrics: list[tuple[str, str]], stem, title: str = "",
                       by: str = "variant", labels: dict | None = None, colors: dict | None = None) -> list[Path]:
    """steps: long frame with `step`, `by`, `seed` and the metric columns; metrics: [(column,
    label)]. One panel per metric; per group the mean over seeds, shaded between min and max
    (groups with one seed: the line alone).

    The colour map is fixed once for the whole figure, before any panel is drawn: `colors`
    ({group: colour}; a report passes one map for all its figures, so a variant has one colour
    in every figure), a free palette colour for a group it lacks (`complete_colors`), default
    `series_colors` of every group in `steps`, sorted. Every panel and the legend read that map,
    so a group keeps its colour in a panel where another group has no values (a panel's own
    groups never pick the colours). The legend below the panels lists every group (" (not
    logged)" for one with no values in any panel) and says what the shaded band is (`BAND_LABEL`)."""
    labels = labels or {}
    groups = sorted(steps[by].dropna().unique(), key=str) if by in steps.columns else []
    colors = complete_colors(groups, colors) if colors else series_colors(groups)
    fig, axes = _grid(len(metrics), ncols=min(3, len(metrics)), size=(4.2, 3.0))
    drawn, band = set(), False
    for ax, (col, label) in zip(axes, metrics):
        if col not in steps.columns:
            ax.text(0.5, 0.5, f"{col}\nnot logged", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(label)
            continue
        d = steps[["step", by, "seed", col]].dropna(subset=[col])
        for g, sub in d.groupby(by, sort=True):
            per_step = sub.groupby("step")[col].agg(["mean", "min", "max"])
            ax.plot(per_step.index, per_step["mean"], label=labels.get(g, g), lw=1.2, color=colors[g])
            drawn.add(g)
            if sub["seed"].nunique() > 1:
                ax.fill_between(per_step.index, per_step["min"], per_step["max"], alpha=0.2, color=colors[g], lw=0)
                band = True
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{label} (mean over seeds)", fontsize=8)
    handles = [Line2D([], [], color=colors[g], lw=1.2, label=str(labels.get(g, g)) + ("" if g in drawn else " (not logged)"))
               for g in groups]
    if band:
        handles.append(Patch(facecolor="0.5", alpha=0.3, label=BAND_LABEL))
    if title:
        fig.suptitle(title)
    _figure_legend(fig, handles)
    return save_figure(fig, stem)


def selection_frequency(expert_index, positions, num_experts: int, max_bins: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """F[e, b] = share of position-bin b's tokens that selected expert e (a token counts once per
    slot, so columns sum to k). Positions are grouped into at most `max_bins` equal bins.
    Returns (F [E, B], left edge of each bin [B])."""
    idx = np.asarray(expert_index)
    pos = np.asarray(positions).ravel()
    n_pos = int(pos.max()) + 1 if pos.size else 1
    width = max(1, math.ceil(n_pos / max_bins))
    b = pos // width
    nb = int(b.max()) + 1 if b.size else 1
    counts = np.zeros((num_experts, nb))
    np.add.at(counts, (idx, np.repeat(b[:, None], idx.shape[1], 1)), 1.0)
    tokens = np.bincount(b, minlength=nb).astype(float)
    return counts / np.clip(tokens, 1, None), np.arange(nb) * width


def plot_selection_heatmap(expert_index: dict[int, np.ndarray], positions, num_experts: int, stem,
                           title: str = "Expert selection over positions") -> list[Path]:
    """expert_index: {layer: [N, k]}; positions: [N] position of each token in its sequence."""
    layers = sorted(expert_index)
    fig, axes = _grid(len(layers), ncols=2, size=(5.0, 2.6))
    for ax, layer in zip(axes, layers):
        f, edges = selection_frequency(expert_index[layer], positions, num_experts)
        im = ax.imshow(f, aspect="auto", origin="lower", cmap="viridis", vmin=0,
                       extent=(edges[0], edges[-1] + (edges[1] - edges[0] if len(edges) > 1 else 1), -0.5, num_experts - 0.5))
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("position")
        ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax, label="P(selected)")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, stem)


def embed_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Rows L2-normalised (directions, as routers score by angle), then t-SNE to 2-D with the
    perplexity scaled down for a handful of experts; < 4 points: PCA."""
    x = np.asarray(x, dtype=float)
    x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    n = x.shape[0]
    if n < 4:
        x = x - x.mean(0)
        if n < 2 or x.shape[1] < 2:
            return np.c_[np.arange(n), np.zeros(n)]
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        out = u[:, :2] * s[:2]
        return np.c_[out, np.zeros((n, 2 - out.shape[1]))]
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
    # exact gradients: a few hundred experts at most, where Barnes-Hut is slower (and thread-bound)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, method="exact").fit_transform(x)


def plot_expert_tsne(reprs: dict[str, np.ndarray], stem, title: str = "t-SNE of expert representations",
                     seed: int = 0) -> list[Path]:
    """reprs: {panel label: [E, D] expert representations}. Each panel is embedded on its own
    (different routers/layers live in different spaces); points are annotated with expert ids."""
    fig, axes = _grid(len(reprs), ncols=3, size=(3.4, 3.2))
    for ax, (label, x) in zip(axes, reprs.items()):
        y = embed_2d(np.asarray(x), seed=seed)
        # expert e has one colour in every panel (tab20, cycling past 20 experts)
        ax.scatter(y[:, 0], y[:, 1], color=[plt.get_cmap("tab20")(e % 20) for e in range(len(y))], s=40)
        for e, (a, b) in enumerate(y):
            ax.annotate(str(e), (a, b), fontsize=7, xytext=(2, 2), textcoords="offset points")
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, stem)


def plot_domain_heatmap(affinity: np.ndarray, purity: np.ndarray, domain_names: list[str], stem,
                        keywords: dict[int, list[str]] | None = None,
                        title: str = "Domain affinity P(expert | domain) and expert purity") -> list[Path]:
    """affinity: [D, E] rows summing to 1; purity: [E]; keywords: TF-IDF terms per expert."""
    a = np.asarray(affinity, dtype=float)
    p = np.asarray(purity, dtype=float)
    d, e = a.shape
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(max(6, 0.6 * e + 2), 2.2 + 0.35 * d + 2.0),
                                 gridspec_kw={"height_ratios": [max(d, 2), 2]})
    im = ax.imshow(a, aspect="auto", cmap="magma", vmin=0)
    ax.set_yticks(range(d), [f"{n} (no tokens)" if np.isnan(row).all() else n for n, row in zip(domain_names, a)])
    ax.set_xticks(range(e))
    ax.set_xlabel("expert")
    fig.colorbar(im, ax=ax, label="P(expert | domain)")
    ax.set_title(title, fontsize=10)
    bx.bar(range(e), np.nan_to_num(p), color="tab:blue")
    bx.axhline(1 / max(d, 1), color="k", ls="--", lw=0.8)
    bx.set_xticks(range(e))
    bx.set_xlim(-0.5, e - 0.5)
    bx.set_ylim(0, 1.05)
    bx.set_ylabel("purity")
    if keywords:  # each expert's tick: its id, then its top TF-IDF keywords (best first)
        bx.set_xticks(range(e), [
            "\n".join([str(i), *(repr(w)[1:-1][:12] for w in (keywords.get(i) or [])[:4])]) for i in range(e)
        ], fontsize=7)
        bx.set_xlabel("expert / TF-IDF keywords")
    fig.tight_layout()
    return save_figure(fig, stem)


def pareto_front(x, y) -> np.ndarray:
    """Mask of the points not dominated when minimising both x and y (nan never on the front)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    front = np.zeros(len(x), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (x <= x[i]) & (y <= y[i]) & ((x < x[i]) | (y < y[i]))
        front[i] = not dominated.any()
    return front


def plot_pareto(cells: pd.DataFrame, stem, x: str = "cv", y: str = "eval_loss", label: str = "label",
                title: str = "Pareto front: eval loss vs load CV") -> list[Path]:
    """cells: one row per cell with columns x, y (means over seeds), label and optional
    `{x}_std`/`{y}_std` error bars (sample std over seeds, as the legend says); the
    non-dominated cells are joined and highlighted."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs, ys = cells[x].to_numpy(float), cells[y].to_numpy(float)
    xe = cells[f"{x}_std"].to_numpy(float) if f"{x}_std" in cells else None
    ye = cells[f"{y}_std"].to_numpy(float) if f"{y}_std" in cells else None
    front = pareto_front(xs, ys)
    has_bars = any(e is not None and np.isfinite(e).any() for e in (xe, ye))
    bars = "; bars: ± sample std over seeds (ddof = 1)" if has_bars else ""
    ax.errorbar(xs, ys, xerr=xe, yerr=ye, fmt="o", color="tab:gray", alpha=0.7, ms=5, capsize=2,
                label=f"cells: mean over seeds{bars}")
    order = np.argsort(xs[front])
    ax.plot(xs[front][order], ys[front][order], "-o", color="tab:red", ms=7, label="Pareto front")
    for xi, yi, t, f in zip(xs, ys, cells[label].astype(str), front):
        if np.isfinite(xi) and np.isfinite(yi):
            ax.annotate(t, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points", color="tab:red" if f else "k")
    ax.set_xlabel("load CV (lower is better)")
    ax.set_ylabel("eval loss (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return save_figure(fig, stem)
