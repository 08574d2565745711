"""Comparison tables: mean ± std over seeds per variant, from `collect`'s runs frame."""

from __future__ import annotations

import math

import pandas as pd

# (column in the runs frame, header, lower is better)
COMPARISON_COLUMNS = [
    ("final:eval_loss", "eval loss", True),
    ("final:eval/cv_mean", "load CV", True),
    ("final:eval/maxvio_mean", "MaxVio", True),
    ("final:eval/dropped_rate_mean", "dropped", True),
    ("tokens_per_s", "tokens/s", False),
]


def aggregate(runs: pd.DataFrame, columns: list[str], by: str = "variant") -> pd.DataFrame:
    """Mean, std (ddof=1, as pandas) and count of completed, non-duplicate runs per group."""
    ok = runs[(runs["status"] == "completed") & (~runs.get("duplicate", False))]
    cols = [c for c in columns if c in ok.columns]
    if ok.empty or not cols:
        return pd.DataFrame()
    g = ok.groupby(by)[cols]
    out = pd.concat({"mean": g.mean(), "std": g.std(), "n": g.count()}, axis=1)
    return out


def _fmt(mean: float, std: float, n: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    digits = 0 if abs(mean) >= 100 else 4
    if n > 1 and std == std:  # not nan
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{mean:.{digits}f}"


def comparison_table(runs: pd.DataFrame, by: str = "variant", columns=COMPARISON_COLUMNS) -> pd.DataFrame:
    """One row per variant: formatted mean ± std for each comparison column, plus run counts.

    Failed/incomplete runs are counted in their own columns so they are never invisible.
    """
    agg = aggregate(runs, [c for c, _, _ in columns], by=by)
    table = pd.DataFrame(index=sorted(runs[by].unique()))
    for col, header, _ in columns:
        if not agg.empty and ("mean", col) in agg.columns:
            table[header] = [
                _fmt(agg.loc[v, ("mean", col)], agg.loc[v, ("std", col)], agg.loc[v, ("n", col)]) if v in agg.index else "–"
                for v in table.index
            ]
    counts = runs.groupby(by)["status"].value_counts().unstack(fill_value=0)
    for status in ("completed", "failed", "incomplete"):
        table[status] = counts[status] if status in counts.columns else 0
    if by == "variant":
        table.index = table.index.map(strip_common_overrides(list(table.index)))
    table.index.name = by
    return table


def strip_common_overrides(labels: list[str]) -> dict[str, str]:
    """Shorten variant labels by dropping the `key=value` parts every label shares."""
    parts = [set(label.split(",")) for label in labels]
    common = set.intersection(*parts) if parts and len(parts) > 1 else set()
    return {
        label: ",".join(p for p in label.split(",") if p not in common) or label for label in labels
    }


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no extra dependency)."""
    headers = [table.index.name or ""] + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for idx, row in table.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [str(v) for v in row.tolist()]) + " |")
    return "\n".join(lines)
