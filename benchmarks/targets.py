"""The benchmarks' targets: one table, the one place each threshold is written.

Each `Target` names the section and the figure (a key of that section's `Section.figures`) it
judges, its threshold and direction. The sections take their thresholds from here (`threshold`),
and `benchmarks.run_all` ends its output and RESULTS.md with `targets_markdown`: one row per
target, with the figure measured, the threshold and met / NOT met (`met`).

In quick mode a target is judged on its section's quick-size figure (`quick_figure`) where one
exists: that checks the plumbing, not the target, since quick sizes measure per-op overhead.

Standard library only, so the verdict logic is testable without torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

MET, NOT_MET, NOT_MEASURED = "met", "NOT met", "not measured"


@dataclass(frozen=True)
class Target:
    """One target: `figure` of section `section` compared with `threshold`."""

    key: str
    name: str
    section: str  # key in run_all.SECTIONS
    figure: str  # key in that Section's figures (full mode)
    threshold: float
    higher_is_better: bool = False  # ≥ threshold (a throughput ratio) rather than ≤
    unit: str = "×"
    quick_figure: str | None = None  # the figure judged in quick mode (None: not measured there)
    issue: str = ""  # where the target comes from

    @property
    def sign(self) -> str:
        return "≥" if self.higher_is_better else "≤"

    def describe_threshold(self) -> str:
        return f"{self.sign} {self.threshold:g}{self.unit}"


# Issue #23 (speed), then the earlier routing-overhead targets.
TARGETS: tuple[Target, ...] = (
    Target("layer_demo", "SPECTRA layer / Switch top-k layer, demo layer (H=128, E=8, k=2), fwd+bwd",
           "layer", "demo_spectra_over_switch", 1.3, quick_figure="quick_spectra_over_switch", issue="#23 (a)"),
    Target("layer_paper", "SPECTRA layer / Switch top-k layer, paper layer (H=576, E=32, k=4), fwd+bwd",
           "layer", "paper_spectra_over_switch", 1.05, quick_figure="quick_spectra_over_switch", issue="#23 (a)"),
    Target("demo_train", "SPECTRA / top-k training tokens/s, demo model (`make demo`'s config)",
           "demo_train", "spectra_over_topk_tokens_per_s", 0.8, higher_is_better=True,
           quick_figure="spectra_over_topk_tokens_per_s", issue="#23 (b)"),
    Target("hf_block_paper", "our top-k MoE block / HF Qwen3-MoE block, paper layer, fwd+bwd",
           "hf_block", "paper_topk_over_hf", 1.0, quick_figure="quick_topk_over_hf", issue="#23 (c)"),
    Target("hf_block_demo", "our top-k MoE block / HF Qwen3-MoE block, demo layer, fwd+bwd",
           "hf_block", "demo_topk_over_hf", 1.0, quick_figure="quick_topk_over_hf", issue="#23 (c)"),
    Target("experts_block", "MoE block (top-k router + grouped_mm) / dense MLP of k× width, largest N "
           "(4096 on CPU, 8192 on GPU)", "experts", "largest_block_over_dense", 1.3,
           quick_figure="largest_block_over_dense"),
    Target("experts_grouped", "grouped_mm experts / dense MLP of k× width, largest N",
           "experts", "largest_grouped_over_dense", 1.3, quick_figure="largest_grouped_over_dense"),
    Target("routing_share", "Sinkhorn + quota selection, share of the SPECTRA layer at N=8192, E=32",
           "routing_scale", "share_pct_at_ref", 5.0, unit=" %", quick_figure="share_pct_at_ref"),
    Target("routing_slope", "Sinkhorn + quota selection, log-log slope in N",
           "routing_scale", "slope_in_n", 1.1, unit="", quick_figure="slope_in_n"),
    Target("gru_time_slope", "router GRU time, log-log slope in S", "gru", "slope_time", 1.1, unit="",
           quick_figure="slope_time"),
    Target("gru_memory_slope", "router GRU saved memory, log-log slope in S", "gru", "slope_memory", 1.1, unit="",
           quick_figure="slope_memory"),
)
BY_KEY: dict[str, Target] = {t.key: t for t in TARGETS}


def threshold(key: str) -> float:
    """The threshold of target `key` (what a section's own verdict line compares with)."""
    return BY_KEY[key].threshold


def met(value: float, limit: float, higher_is_better: bool = False) -> bool:
    """value ≤ limit (or ≥ when higher is better); a NaN is never met."""
    if math.isnan(value):
        return False
    return value >= limit if higher_is_better else value <= limit


@dataclass(frozen=True)
class Row:
    """One line of the Targets table."""

    target: Target
    value: float | None  # None: not measured (section not run, failed, or no quick figure)
    verdict: str  # MET, NOT_MET or NOT_MEASURED
    note: str = ""


def evaluate(figures: Mapping[str, Mapping[str, float]], quick: bool = False,
             notes: Mapping[str, str] | None = None) -> list[Row]:
    """One Row per target from {section key: that section's figures}."""
    rows = []
    for t in TARGETS:
        key = t.quick_figure if quick else t.figure
        value = figures.get(t.section, {}).get(key) if key else None
        if value is None:
            rows.append(Row(t, None, NOT_MEASURED, (notes or {}).get(t.key, "")))
            continue
        ok = met(float(value), t.threshold, t.higher_is_better)
        rows.append(Row(t, float(value), MET if ok else NOT_MET, (notes or {}).get(t.key, "")))
    return rows


def format_value(row: Row) -> str:
    return "—" if row.value is None else f"{row.value:.3f}{row.target.unit}"


def targets_markdown(rows: list[Row], quick: bool = False) -> str:
    """'## Targets': one table row per target (figure measured, threshold, verdict)."""
    n_met = sum(r.verdict == MET for r in rows)
    n_measured = sum(r.verdict != NOT_MEASURED for r in rows)
    lines = [
        "## Targets",
        "",
        f"{n_met} of {n_measured} measured targets met ({len(rows)} targets; thresholds: benchmarks/targets.py).",
    ]
    if quick:
        lines.append("Quick mode: the figures are of the quick sizes (per-op overhead), not the targets' sizes; "
                     "these verdicts check the plumbing, not the targets.")
    lines += ["", "| target | source | section | figure | threshold | verdict |", "|---|---|---|---|---|---|"]
    for r in rows:
        t = r.target
        verdict = f"**{r.verdict}**" if r.verdict != NOT_MEASURED else r.verdict
        figure = format_value(r) + (f" ({r.note})" if r.note else "")
        lines.append(f"| {t.name} | {t.issue or '–'} | {t.section} | {figure} | {t.describe_threshold()} | {verdict} |")
    return "\n".join(lines) + "\n"


def summary_line(rows: list[Row]) -> str:
    """'3 of 11 measured targets met, 8 NOT met, 0 not measured (...)' for the results file's header."""
    counts = {v: sum(r.verdict == v for r in rows) for v in (MET, NOT_MET, NOT_MEASURED)}
    return (f"{counts[MET]} of {counts[MET] + counts[NOT_MET]} measured targets met, {counts[NOT_MET]} NOT met, "
            f"{counts[NOT_MEASURED]} not measured: the Targets table at the end")
