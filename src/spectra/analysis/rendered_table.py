"""A rendered table: formatted cells, the numbers behind them, the best cells, and notes.

    t.markdown()   GitHub markdown, best cells in **bold**, notes as a list below
    t.latex()      booktabs (\\toprule/\\midrule/\\bottomrule), best cells in \\textbf{}
    t.write(dir)   <name>.md, <name>.tex, <name>.csv (the CSV holds the raw numbers: means,
                   stds, counts, p-values at full precision, not the formatted strings)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

MISSING = "–"


def fmt_value(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return MISSING
    if digits == 0 or abs(x) >= 1000:
        return f"{x:,.0f}" if abs(x) >= 10000 else f"{x:.0f}"
    return f"{x:.{digits}f}"


STD_NOTE = ("cells: mean ± sample standard deviation (ddof = 1) over the counted runs (one per seed); "
            "a single run shows its value alone; (n=k): only k runs have a value for this metric, fewer than "
            "the row's completed runs (the others did not log it)")


def fmt_mean_std(mean: float, std: float, n: int, digits: int = 3, expected: int | None = None) -> str:
    """'m ± s' over n > 1 values (s: sample std, ddof = 1), 'm' for one value, '–' for none.

    `expected`: the number of runs the cell should hold (the row's completed runs); a cell over
    fewer or more values says so, "m ± s (n=3)", so a metric some runs did not log cannot pass
    for a mean over all of them."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)) or n == 0 or mean is None or not math.isfinite(mean):
        return MISSING
    if n > 1 and std is not None and math.isfinite(std):
        text = f"{fmt_value(mean, digits)} ± {fmt_value(std, digits)}"
    else:
        text = fmt_value(mean, digits)
    if expected is not None and int(n) != int(expected):
        text += f" (n={int(n)})"
    return text


@dataclass
class Table:
    name: str  # file stem, e.g. "table07_ablations"
    title: str
    display: pd.DataFrame  # formatted strings; the index holds the row labels
    data: pd.DataFrame  # the numbers behind the cells (written as CSV)
    best: pd.DataFrame | None = None  # bool, same shape as display: cells to emphasise
    notes: list[str] = field(default_factory=list)

    def _is_best(self, i: int, j: int) -> bool:
        return self.best is not None and bool(self.best.iat[i, j])

    def markdown(self, title: bool = True) -> str:
        headers = [str(self.display.index.name or "")] + [str(c) for c in self.display.columns]
        lines = [f"**{self.title}**", ""] if title else []
        lines += ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        for i, (idx, row) in enumerate(self.display.iterrows()):
            cells = [f"**{v}**" if self._is_best(i, j) and v != MISSING else str(v) for j, v in enumerate(row.tolist())]
            lines.append("| " + " | ".join([str(idx), *cells]) + " |")
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines)

    def latex(self) -> str:
        cols = "l" + "r" * len(self.display.columns)
        header = " & ".join([latex_escape(self.display.index.name or "")] + [latex_escape(c) for c in self.display.columns])
        body = []
        for i, (idx, row) in enumerate(self.display.iterrows()):
            cells = [latex_escape(v) for v in row.tolist()]
            cells = [f"\\textbf{{{c}}}" if self._is_best(i, j) and row.iloc[j] != MISSING else c for j, c in enumerate(cells)]
            body.append(" & ".join([latex_escape(idx), *cells]) + r" \\")
        lines = [
            r"\begin{table}[t]", r"\centering", f"\\caption{{{latex_escape(self.title)}}}",
            f"\\label{{tab:{self.name}}}", f"\\begin{{tabular}}{{{cols}}}", r"\toprule", header + r" \\", r"\midrule",
            *body, r"\bottomrule", r"\end{tabular}",
        ]
        if self.notes:
            lines.append(r"\par\smallskip{\footnotesize " + "; ".join(latex_escape(n) for n in self.notes) + "}")
        lines.append(r"\end{table}")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {ext: out_dir / f"{self.name}.{ext}" for ext in ("md", "tex", "csv")}
        paths["md"].write_text(self.markdown() + "\n")
        paths["tex"].write_text(self.latex())
        self.data.to_csv(paths["csv"])
        return paths


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "±": r"$\pm$", "–": "--", "×": r"$\times$", "⁻²": r"$^{-2}$", "τ": r"$\tau$", "Δ": r"$\Delta$",
    "σ": r"$\sigma$", "≥": r"$\geq$", "≤": r"$\leq$", "<": r"$<$", ">": r"$>$", "·": r"$\cdot$", "−": "-", "★": r"$\star$",
}


def latex_escape(s) -> str:
    s = str(s)
    out, i = [], 0
    while i < len(s):
        if s[i : i + 2] in _LATEX_SPECIAL:
            out.append(_LATEX_SPECIAL[s[i : i + 2]])
            i += 2
            continue
        out.append(_LATEX_SPECIAL.get(s[i], s[i]))
        i += 1
    return "".join(out)
