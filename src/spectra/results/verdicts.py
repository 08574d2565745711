"""H1-H7 (paper 5.8) and the open problem (paper 7), decided from the results pool by fixed rules.

Each hypothesis gets: confirmed / not confirmed / not testable at this scale (fewer than 2
completed seeds on a side, or a metric nobody logged), with the numbers and Welch p-values that
decide it. The rules are written here once, before reading any result, and the README quotes
them: "better" means the mean over seeds is better and the two-sided Welch t-test gives
p < ALPHA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from spectra.analysis.columns import resolve
from spectra.analysis.stats import format_p, welch_ttest
from spectra.results.tables import (
    BALANCE_NAMES,
    EC_CAUSAL,
    OPEN_PROBLEM,
    ablation_pool,
    baselines_pool,
    domains,
    open_problem_hits,
    spectra_configs,
)

ALPHA = 0.05
SPECIALIZED = ("code", "math")  # the paper's "code, math, science"; the corpus has no science domain
CONFIRMED, NOT_CONFIRMED, NOT_TESTABLE = "confirmed", "not confirmed", "not testable at this scale"
PENDING = "pending (its cells are not trained yet)"


@dataclass
class Comparison:
    """a vs b on one metric: means, relative difference, Welch p, and whether a is better."""

    metric: str
    a: str
    b: str
    mean_a: float
    mean_b: float
    n_a: int
    n_b: int
    p: float
    lower_is_better: bool

    @property
    def testable(self) -> bool:
        return self.n_a >= 2 and self.n_b >= 2 and math.isfinite(self.p)

    @property
    def better(self) -> bool:
        """a's mean is better than b's and the difference is significant."""
        d = self.mean_b - self.mean_a if self.lower_is_better else self.mean_a - self.mean_b
        return self.testable and d > 0 and self.p < ALPHA

    @property
    def rel(self) -> float:
        """(b − a) / |b| for lower-is-better, (a − b) / |b| otherwise: positive when a is better."""
        d = self.mean_b - self.mean_a if self.lower_is_better else self.mean_a - self.mean_b
        return d / abs(self.mean_b) if self.mean_b else math.nan

    def text(self, digits: int = 4) -> str:
        return (f"{self.metric}: {self.a} {self.mean_a:.{digits}f} vs {self.b} {self.mean_b:.{digits}f} "
                f"(n={self.n_a}/{self.n_b}, {100 * self.rel:+.2f} % in {self.a}'s favour, p={format_p(self.p)})")


def _values(pool: pd.DataFrame, row: str, col: str | None) -> np.ndarray:
    if col is None or col not in pool.columns:
        return np.array([])
    ok = pool[pool["counted"] & (pool["row"] == row)]
    return pd.to_numeric(ok[col], errors="coerce").dropna().to_numpy(float)


def compare(pool: pd.DataFrame, a: str, b: str, metric: str, lower_is_better: bool, column: str | None = None) -> Comparison:
    """Rows a and b of a pool (a `row` column) on a metric (a spectra.analysis metric name)."""
    col = column or resolve(pool, metric)
    va, vb = _values(pool, a, col), _values(pool, b, col)
    p = welch_ttest(va, vb).p if len(va) >= 2 and len(vb) >= 2 else math.nan
    mean = lambda v: float(v.mean()) if len(v) else math.nan  # noqa: E731
    return Comparison(metric, a, b, mean(va), mean(vb), len(va), len(vb), p, lower_is_better)


def _verdict(cs: list[Comparison], rule_holds: bool) -> str:
    if not cs or any(c.n_a == 0 or c.n_b == 0 for c in cs):
        return PENDING  # a side has no completed run yet: `make results` has not reached it
    if not all(c.testable for c in cs):
        return NOT_TESTABLE
    return CONFIRMED if rule_holds else NOT_CONFIRMED


def h1(runs) -> tuple[str, list[str]]:
    """SPECTRA's eval loss is better than Switch Top-1's and Top-2's."""
    pool = baselines_pool(runs)
    cs = [compare(pool, "SPECTRA", s, "eval_loss", True) for s in ("Switch Top-2", "Switch Top-1")]
    return _verdict(cs, all(c.better for c in cs)), [c.text() for c in cs]


def _completed(pool: pd.DataFrame, row: str) -> int:
    return int((pool["counted"] & (pool["row"] == row)).sum())


def h2(runs) -> tuple[str, list[str]]:
    """Lower expert overlap and higher Gram orthogonality than Switch Top-2. Gram orthogonality is
    a property of expert representations (SPECTRA's expression projector); a Switch router has
    none, so where Switch's completed runs do not log it, H2 rests on expert overlap alone."""
    pool = baselines_pool(runs)
    overlap = compare(pool, "SPECTRA", "Switch Top-2", "expert_overlap", True)
    gram = compare(pool, "SPECTRA", "Switch Top-2", "gram_orthogonality", False)
    cs, lines = [overlap], [overlap.text()]
    if gram.n_b == 0 and _completed(pool, "Switch Top-2") > 0:
        lines.append(f"gram_orthogonality: SPECTRA {gram.mean_a:.4f}; not defined for Switch Top-2 (a linear router "
                     "has no expert representations), so not compared")
    else:
        cs.append(gram)
        lines.append(gram.text())
    return _verdict(cs, all(c.better for c in cs)), lines


def h3(runs) -> tuple[str, list[str]]:
    """Higher routing consistency across checkpoints than Switch Top-2 (and Top-1, Expert Choice).
    Expert Choice is its causally evaluated row: with batch routing at eval a token's route
    depends on the rest of the eval batch, which is not the routing the others are measured on."""
    pool = baselines_pool(runs)
    cs = [compare(pool, "SPECTRA", b, "consistency", False) for b in ("Switch Top-2", "Switch Top-1", EC_CAUSAL)]
    return _verdict(cs, all(c.better for c in cs)), [c.text() for c in cs]


def h4(runs) -> tuple[str, list[str]]:
    """Similar cost: SPECTRA's training tokens/s at least 0.8x Switch Top-2's (the #23 target)."""
    pool = baselines_pool(runs)
    c = compare(pool, "SPECTRA", "Switch Top-2", "tokens_per_s", False)
    ratio = c.mean_a / c.mean_b if c.mean_b else math.nan
    lines = [f"training tokens/s: SPECTRA {c.mean_a:.0f} vs Switch Top-2 {c.mean_b:.0f} = {ratio:.2f}x "
             f"(n={c.n_a}/{c.n_b}; each cell's own throughput, taken while other cells shared the machine; "
             "benchmarks/RESULTS.md has the controlled in-process ratio); rule: >= 0.8x"]
    verdict = PENDING if not (c.n_a and c.n_b) else (CONFIRMED if ratio >= 0.8 else NOT_CONFIRMED)
    return verdict, lines


def h5(runs) -> tuple[str, list[str]]:
    """Every component contributes: SPECTRA-Full's eval loss better than each ablation's."""
    pool = ablation_pool(runs)
    # every ablation of Table 7, trained or not: one not trained yet keeps the verdict pending
    rows = ["-Expression", "-GRU", "-Repulsion", "-Quota", "-OrthoConstraint", "-All"]
    cs = [compare(pool, "SPECTRA-Full", r, "eval_loss", True) for r in rows]
    lines = [c.text() + (" — not trained yet" if c.n_b == 0 else " — contributes" if c.better
                         else " — no significant contribution") for c in cs]
    return _verdict(cs, bool(cs) and all(c.better for c in cs)), lines


def h6(runs) -> tuple[str, list[str]]:
    """The eval-loss gain of SPECTRA over Switch Top-2 grows from the tiny to the small model."""
    out, cs = [], []
    for size in ("tiny", "small"):
        sub = runs[(runs["cfg:model.name"] == size) & runs["router"].isin(["spectra", "switch_top2"])
                   & (pd.to_numeric(runs["cfg:moe.num_experts"], errors="coerce") == 8)
                   & runs["family"].isin(["baselines", "size"])].copy()
        sub["row"] = sub["router"].map({"spectra": "SPECTRA", "switch_top2": "Switch Top-2"})
        c = compare(sub, "SPECTRA", "Switch Top-2", "eval_loss", True)
        c.a, c.b = f"SPECTRA ({size})", f"Switch Top-2 ({size})"
        cs.append(c)
        out.append(c.text())
    tiny, small = cs
    grows = small.better and small.rel > tiny.rel
    out.append("two CPU sizes (H=128 and H=256, 4 layers); the paper's GPT-2-Medium / LLaMA-7B / Mixtral sizes are "
               "not testable here")
    return _verdict(cs, grows), out


def h7(runs) -> tuple[str, list[str]]:
    """The gain over Switch Top-2 is larger on code and math than on the other domains."""
    pool = baselines_pool(runs)
    ds = domains(pool)
    cs = {d: compare(pool, "SPECTRA", "Switch Top-2", f"eval_loss_{d}", True, column=f"final:eval_loss_{d}") for d in ds}
    spec = [d for d in ds if d in SPECIALIZED]
    other = [d for d in ds if d not in SPECIALIZED]
    if not spec or not other:
        return PENDING, ["no per-domain eval loss (eval_loss_<domain>) in these runs yet"]
    g_spec = float(np.mean([cs[d].rel for d in spec]))
    g_other = float(np.mean([cs[d].rel for d in other]))
    lines = [cs[d].text() for d in ds]
    lines.append(f"mean relative gain: {'/'.join(spec)} {100 * g_spec:+.2f} %, {'/'.join(other)} {100 * g_other:+.2f} % "
                 "(the corpus has no science domain)")
    holds = g_spec > g_other and g_spec > 0 and any(cs[d].better for d in spec)
    return _verdict(list(cs.values()), holds), lines


def open_problem(runs) -> tuple[str, list[str]]:
    """Which SPECTRA configuration meets every threshold at once (means over seeds)."""
    from spectra.analysis.tables import metric_table

    pool = spectra_configs(runs)
    if pool.empty:
        return PENDING, ["no SPECTRA run yet"]
    data = metric_table(pool, ["eval_loss", "cv", "dropped_token_rate", "gram_orthogonality"], "row",
                        name="x", title="x", labels={r: r for r in pool["row"].unique()}).data
    base = baselines_pool(runs)
    switch = float(pd.to_numeric(base.loc[base["counted"] & (base["row"] == "Switch Top-2"), "final:eval_loss"],
                                 errors="coerce").mean())
    hits = [r for r, ok in open_problem_hits(data, switch).items() if ok]
    get = lambda r, k: data.at[r, f"{k}_mean"] if f"{k}_mean" in data.columns else math.nan  # noqa: E731
    best_cv = data["cv_mean"].astype(float).idxmin() if "cv_mean" in data.columns and data["cv_mean"].notna().any() else None
    lines = [f"thresholds: inference load CV < {OPEN_PROBLEM['cv']}, dropped tokens = 0, Gram orthogonality >= "
             f"{OPEN_PROBLEM['gram_orthogonality']}, eval loss <= Switch Top-2's {switch:.4f}"]
    for r in hits or ([best_cv] if best_cv is not None else []):
        lines.append(f"{'meets all' if hits else 'closest (lowest inference CV)'}: {r} — CV {get(r, 'cv'):.3f}, dropped "
                     f"{100 * get(r, 'dropped_token_rate'):.2f} %, Gram ortho {get(r, 'gram_orthogonality'):.3f}, "
                     f"eval loss {get(r, 'eval_loss'):.4f}")
    return ("solved by " + ", ".join(hits)) if hits else "open: no configuration meets all four", lines


HYPOTHESES = [
    ("H1", "Task performance: SPECTRA's eval loss better than Switch Top-1 and Top-2", h1),
    ("H2", "Expert specialization: lower expert overlap and higher Gram orthogonality than Switch Top-2", h2),
    ("H3", "Routing stability: higher consistency across checkpoints than Switch Top-1/Top-2 and Expert Choice", h3),
    ("H4", "Computational efficiency: SPECTRA trains at >= 0.8x Switch Top-2's tokens/s", h4),
    ("H5", "Ablation importance: SPECTRA-Full's eval loss better than every ablation", h5),
    ("H6", "Model scaling: SPECTRA's gain over Switch Top-2 larger on the small model than on the tiny one "
           "(rule: significantly better on the small model, and a larger relative gain there; the difference of "
           "the two gains is not itself tested)", h6),
    ("H7", "Specialized domains: larger gain over Switch Top-2 on code/math than on docs/quotes/dictionary "
           "(rule: mean relative gain larger on code/math, positive, and significant on one of them; the "
           "difference of gains is not itself tested)", h7),
]


def verdicts_markdown(runs: pd.DataFrame, unfinished: int = 0, planned: int = 0) -> str:
    """The verdict section of results/README.md: one block per hypothesis, then the open problem.
    unfinished / planned: cells of the plan not finished yet / in all; while any is unfinished the
    section says so first, since a row with fewer seeds than planned can still change its verdict."""
    out = ["## Verdicts (computed by `python -m spectra.results report` from the tables; rules in "
           "src/spectra/results/verdicts.py: better = better mean and Welch p < 0.05)", ""]
    if unfinished:
        out += [f"**PARTIAL: {planned - unfinished} of {planned} planned cells finished.** A verdict whose rows have "
                "fewer seeds than planned (n below) may still change; `make results` resumes the rest.", ""]
    for key, claim, fn in HYPOTHESES:
        verdict, lines = fn(runs)
        out += [f"**{key} — {verdict}.** {claim}.", ""] + [f"- {x}" for x in lines] + [""]
    verdict, lines = open_problem(runs)
    out += [f"**Open problem (paper 7) — {verdict}.** Inference-time load CV < 0.1 with zero dropped tokens, "
            f"Gram orthogonality >= 0.9 and eval loss <= Switch Top-2 (balance-learning variants: "
            f"{', '.join(BALANCE_NAMES.values())}).", ""] + [f"- {x}" for x in lines] + [""]
    return "\n".join(out)
