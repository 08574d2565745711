"""Which column of the runs frame holds a metric, and how to show it.

Runs written at different times log a metric under different keys: the routing recorder writes
`eval/cv_mean` in the final evaluation, the monitoring callback writes `monitor/<metric>_mean`
(per layer `monitor/layer{i}/<metric>`) and a `stability` block in summary.json. A `Metric`
names the candidates in order of preference; `resolve` picks the first one that some run has.
A metric no run has resolves to None: tables show "–" and a note naming the keys looked for.

One metric, one routing. The candidates of a routing metric (`cv`, `dropped_token_rate`, ...) are
all *inference* routing (eval mode, no quota: the recorder's `eval/` keys, the monitor's
`monitor/` keys); a table never falls back to the training routing for them. The training
routing has its own metrics: `train_cv` (after selection, i.e. post-quota) and
`train_cv_before_quota` (the router's own top-k before the quota), from the last training log.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


def _candidates(name: str) -> tuple[str, ...]:
    """Where a per-layer-averaged metric `name` of the *inference* routing may live, most specific
    first (never the `train/` keys: those describe another routing, see the module docstring)."""
    return (
        f"final:eval/{name}_mean",
        f"final:monitor/{name}_mean",
        f"final:eval/monitor/{name}_mean",
        f"final:eval_monitor/{name}_mean",
        f"monitor:metrics/{name}_mean",
        f"monitor:{name}_mean",
        f"final:{name}_mean",
        f"last:monitor/{name}_mean",
        f"last:eval/monitor/{name}_mean",
        f"last:eval/{name}_mean",
    )


def _train(name: str) -> tuple[str, ...]:
    """A training-routing metric: the recorder's `train/<name>_mean` in the last training log."""
    return (f"last:train/{name}_mean",)


@dataclass(frozen=True)
class Metric:
    key: str  # short name, e.g. "gram_orthogonality"
    header: str  # column header in tables
    lower_is_better: bool | None  # None: no "best" direction
    scale: float = 1.0  # shown value = raw · scale (100 for % and ×10⁻²)
    digits: int = 3
    candidates: tuple[str, ...] = field(default=())

    def columns(self) -> tuple[str, ...]:
        return self.candidates or _candidates(self.key)


def _stab(*keys: str) -> tuple[str, ...]:
    """Stability: the summary's `stability.mean` block (over all snapshots), then the monitor's
    running values in the final eval record (latest snapshot pair)."""
    out = []
    for k in keys:
        out += [f"stability:mean/{k}", f"stability:{k}"]
    for k in keys:
        out += list(_candidates(k))
    return tuple(out)


METRICS: dict[str, Metric] = {
    m.key: m
    for m in [
        Metric("eval_loss", "eval loss", True, digits=4, candidates=("final:eval_loss", "objective:eval_loss", "best:eval_loss")),
        Metric("cv", "load CV", True),
        Metric("maxvio", "MaxVio", True),
        Metric("train_cv", "load CV (training, after quota)", True, candidates=_train("cv")),
        Metric("train_maxvio", "MaxVio (training, after quota)", True, candidates=_train("maxvio")),
        Metric("train_cv_before_quota", "load CV (training, before quota)", True, candidates=_train("cv_before_quota")),
        Metric("dropped_token_rate", "dropped tokens (%)", True, scale=100, digits=2),
        Metric("dropped_slot_rate", "dropped slots (%)", True, scale=100, digits=2),
        Metric("gini", "Gini", True),
        Metric("unused_rate", "unused (%)", True, scale=100, digits=1),
        Metric("usage_entropy", "expert entropy", False),
        Metric("collapse_rate", "collapse rate (%)", True, scale=100, digits=1),
        Metric("expert_overlap", "expert overlap (%)", True, scale=100, digits=1),
        Metric("gram_orthogonality", "Gram ortho (×10⁻²)", False, scale=100, digits=1),
        Metric("expert_similarity_mean", "expert similarity", True),
        Metric("routing_entropy", "routing entropy", None),
        Metric("confidence", "confidence", None),
        Metric("sequential_overlap", "sequential overlap (%)", None, scale=100, digits=1),
        Metric("domain_purity", "domain purity (%)", False, scale=100, digits=1),
        Metric("consistency", "routing consistency (%)", False, scale=100, digits=1,
               candidates=_stab("consistency_consecutive_mean", "consistency", "consistency_prev")),
        Metric("usage_variance", "usage variance", True, digits=5, candidates=_stab("usage_variance")),
        Metric("kendall_tau", "Kendall τ", False, candidates=_stab("kendall_tau_mean", "kendall_tau", "kendall_tau_prev")),
        Metric("consistency_last_vs_first", "consistency last vs first (%)", False, scale=100, digits=1,
               candidates=_stab("consistency_last_vs_first", "consistency_first")),
        Metric("tokens_per_s", "tokens/s", False, digits=0, candidates=("tokens_per_s",)),
        # Downstream evaluation (python -m spectra.eval -> eval_harness.json): the mean of the tasks'
        # accuracy-like scores, the paper's "Avg Score".
        Metric("avg_score", "Avg Score (%)", False, scale=100, digits=1, candidates=("harness:avg_score",)),
        # Compute spent: expert applications per real token in training (top-k: k; Switch: k less
        # drops; Expert Choice: ~cf), so routers are compared knowing their compute.
        Metric("expert_slots_per_token", "experts/token", None, digits=2, candidates=_train("expert_slots_per_token")),
    ]
}


def metric(key: str | Metric) -> Metric:
    """The registered metric, or an ad-hoc one for a raw runs-frame column / final key."""
    if isinstance(key, Metric):
        return key
    if key in METRICS:
        return METRICS[key]
    return Metric(key, key, None, candidates=(key, f"final:{key}", *_candidates(key)))


def resolve(runs: pd.DataFrame, m: str | Metric) -> str | None:
    """The first candidate column of `m` holding a number for at least one counted run."""
    m = metric(m)
    ok = runs[runs["counted"]] if "counted" in runs.columns else runs
    for col in m.columns():
        if col in ok.columns and pd.to_numeric(ok[col], errors="coerce").notna().any():
            return col
    return None


def missing_note(m: str | Metric) -> str:
    m = metric(m)
    cols = m.columns()
    looked = " and ".join(f"`{c}`" for c in cols[:2])
    if len(cols) > 2:
        looked = f"`{cols[0]}`, `{cols[1]}` and {len(cols) - 2} other keys"
    return f"{m.header}: – (not logged by these runs; looked for {looked})"
