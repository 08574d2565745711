"""The paper's tables from the results pool (results/runs/<family>/<cell>).

The pool is one set of cells; each table selects its rows by configuration, so the SPECTRA cell
at E=8 on the tiny base is Table 7's "SPECTRA-Full", the baselines' SPECTRA row, Table 10's tiny
row and Table 11's E=8 row at once. The metric definitions and the mean ± std / Welch /
bootstrap machinery are spectra.analysis's; what is here is only which runs make which row.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from spectra.analysis.collect import collect
from spectra.analysis.columns import Metric
from spectra.analysis.rendered_table import Table
from spectra.analysis.tables import (
    ABLATION_NAMES,
    COMPARISON_METRICS,
    STABILITY_METRICS,
    TABLE7_METRICS,
    metric_table,
    overhead_table,
    scaling_table,
    significance_table,
    stability_table,
)
from spectra.routers_catalog import DISPLAY_NAMES

DOMAIN_KEY = re.compile(r"^final:eval_loss_(?P<domain>[a-z0-9_]+)$")
PAPER = "SPECTRA (paper)"  # the balance table's name for SPECTRA-Full
BALANCE_NAMES = {"balance_distill": "+distill plan", "balance_distill_selected": "+distill selected",
                 "balance_bias": "+expert bias", "balance_both": "+distill +bias"}
# The paper's open problem (section 7): thresholds a SPECTRA configuration must meet at once.
OPEN_PROBLEM = {"cv": 0.1, "dropped_token_rate": 0.0, "gram_orthogonality": 0.9}


def load_pool(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """collect() over results/runs/<family>; adds `family`, `ablation` and `E`, `model` columns."""
    runs_root = Path(root) / "runs"
    families = sorted(d for d in runs_root.iterdir() if d.is_dir()) if runs_root.is_dir() else []
    if not families:
        raise FileNotFoundError(f"{runs_root}: no results yet (make results trains them)")
    runs, steps = collect(families)
    runs["family"] = [Path(s).name for s in runs["sweep"]]
    runs["ablation"] = runs["ov:ablation"] if "ov:ablation" in runs.columns else None
    runs["ablation"] = runs["ablation"].fillna("full")
    if not steps.empty:
        steps["family"] = [Path(s).name for s in steps["sweep"]]
    return runs, steps


def _e(runs: pd.DataFrame) -> pd.Series:
    return pd.to_numeric(runs.get("cfg:moe.num_experts"), errors="coerce")


def tiny_e8(runs: pd.DataFrame) -> pd.Series:
    """The default setting: tiny base, E=8 (and the plan's defaults otherwise)."""
    return (runs["cfg:model.name"] == "tiny") & ((_e(runs) == 8) | (runs["router"] == "dense"))


def domains(runs: pd.DataFrame) -> list[str]:
    """Data domains with a per-domain eval loss in these runs (final:eval_loss_<domain>)."""
    return [m.group("domain") for c in runs.columns if (m := DOMAIN_KEY.match(c))]


def domain_metrics(runs: pd.DataFrame) -> list[Metric]:
    """One eval-loss metric per domain (lower is better)."""
    return [Metric(f"eval_loss_{d}", f"eval loss {d}", True, digits=4, candidates=(f"final:eval_loss_{d}",))
            for d in domains(runs)]


def _with_row(runs: pd.DataFrame, names: dict, column: str) -> pd.DataFrame:
    out = runs.copy()
    out["row"] = [names.get(v, str(v)) for v in out[column]]
    return out


def _table(runs: pd.DataFrame, metrics, name: str, title: str, order: list[str]) -> Table:
    order = [o for o in order if o in set(runs["row"])] + sorted(set(runs["row"]) - set(order))
    return metric_table(runs, metrics, "row", name=name, title=title, labels={o: o for o in order}, order=order)


EC_CAUSAL = DISPLAY_NAMES["expert_choice"] + " (causal eval)"
EC_BATCH_NOTE = (f"{DISPLAY_NAMES['expert_choice']}: evaluated as it trains (router.ec_inference=batch): each expert "
                 "picks its top tokens among the whole eval batch, so a token's route depends on later tokens and on "
                 "other sequences; its eval loss is not a causal LM's and its load CV is 0 by construction. "
                 f"{EC_CAUSAL} is the same training evaluated with the token-choice fallback "
                 "(router.ec_inference=causal), the row comparable with the causal routers.")


def _ec_causal(runs: pd.DataFrame) -> pd.Series:
    col = runs["cfg:router.ec_inference"] if "cfg:router.ec_inference" in runs.columns else pd.Series("batch", runs.index)
    return (runs["router"] == "expert_choice") & (col.astype(str) == "causal")


def baselines_pool(runs: pd.DataFrame) -> pd.DataFrame:
    """Every router at the default setting (the baselines family), rows named by router; Expert
    Choice evaluated causally (router.ec_inference=causal) is a row of its own."""
    sub = runs[(runs["family"] == "baselines") & tiny_e8(runs)]
    out = _with_row(sub, DISPLAY_NAMES, "router")
    out.loc[_ec_causal(out), "row"] = EC_CAUSAL
    return out


def router_order(pool: pd.DataFrame) -> list[str]:
    """SPECTRA first, then the catalogue's order."""
    names = [DISPLAY_NAMES["spectra"]] + [n for r, n in DISPLAY_NAMES.items() if r != "spectra"]
    names.insert(names.index(DISPLAY_NAMES["expert_choice"]) + 1, EC_CAUSAL)
    return [n for n in names if n in set(pool["row"])]


def ablation_pool(runs: pd.DataFrame) -> pd.DataFrame:
    """SPECTRA-Full (the baselines' SPECTRA cells) and each ablation, rows named as in Table 7."""
    full = runs[(runs["family"] == "baselines") & (runs["router"] == "spectra") & tiny_e8(runs)]
    abl = runs[runs["family"] == "ablations"]
    return _with_row(pd.concat([full, abl]), ABLATION_NAMES, "ablation")


def balance_pool(runs: pd.DataFrame) -> pd.DataFrame:
    """SPECTRA (paper) and the balance-learning variants, plus Switch Top-2 and Aux-Loss-Free."""
    paper = runs[(runs["family"] == "baselines") & runs["router"].isin(["spectra", "switch_top2", "aux_free"]) & tiny_e8(runs)]
    bal = runs[runs["family"] == "balance"]
    names = {**BALANCE_NAMES, "full": PAPER}
    out = pd.concat([paper, bal])
    out["row"] = [names.get(a, a) if r == "spectra" else DISPLAY_NAMES.get(r, r) for r, a in zip(out["router"], out["ablation"])]
    return out


def significance(runs: pd.DataFrame, seed: int = 0) -> Table:
    """Table 13: each baseline vs SPECTRA and each ablation vs SPECTRA-Full (Welch t + bootstrap)."""
    metrics = ["eval_loss", "cv", "expert_overlap", "gram_orthogonality"]
    parts = [significance_table(pool, metrics, baseline=base, by="row", seed=seed)
             for pool, base in ((baselines_pool(runs), "SPECTRA"), (ablation_pool(runs), "SPECTRA-Full"))
             if base in set(pool["row"]) and pool["row"].nunique() > 1]
    if not parts:
        return significance_table(runs.iloc[:0].assign(row=[]), metrics, by="row")
    display = pd.concat([p.display for p in parts])
    data = pd.concat([p.data for p in parts])
    notes = list(dict.fromkeys(n for p in parts for n in p.notes))
    return Table("table13_significance", "Table 13: Welch t-tests across seeds with bootstrap 95 % CIs "
                 "(baselines vs SPECTRA; ablations vs SPECTRA-Full)", display, data, None, notes)


def domain_table(runs: pd.DataFrame) -> Table:
    """Per-domain eval loss per router (H7), and SPECTRA's gain over Switch Top-2 per domain."""
    pool = baselines_pool(runs)
    t = _table(pool, ["eval_loss", *domain_metrics(pool)], "domains", "Per-domain eval loss (mean ± std over seeds)",
               router_order(pool))
    gains = domain_gains(pool)
    if gains:
        t.notes.append("SPECTRA vs Switch Top-2, relative gain (loss[Switch] − loss[SPECTRA]) / loss[Switch]: "
                       + ", ".join(f"{d} {100 * g:+.2f} %" for d, g in gains.items()))
    return t


def domain_gains(pool: pd.DataFrame, primary: str = "SPECTRA", reference: str = "Switch Top-2") -> dict[str, float]:
    """Relative eval-loss gain of `primary` over `reference` per domain (positive: primary better)."""
    ok = pool[pool["counted"]]
    out = {}
    for d in domains(pool):
        col = f"final:eval_loss_{d}"
        a = pd.to_numeric(ok.loc[ok["row"] == primary, col], errors="coerce").mean()
        b = pd.to_numeric(ok.loc[ok["row"] == reference, col], errors="coerce").mean()
        if math.isfinite(a) and math.isfinite(b) and b:
            out[d] = (b - a) / b
    return out


def same_eval_tokens(runs: pd.DataFrame) -> pd.Series:
    """Runs evaluated on the baselines' tokens: the validation split is cut into rows of
    data.max_seq_length, with long conversations truncated or split (data.split_long_documents),
    so a Sweep E length sees other tokens and contexts and its eval loss is another quantity
    (compared within Sweep E only). Same length and same truncation as the baselines' (mode)."""
    same = pd.Series(True, index=runs.index)
    for col, default in (("cfg:data.max_seq_length", None), ("cfg:data.split_long_documents", False)):
        if col not in runs.columns:
            continue  # runs recorded before the key existed: its default
        values = runs[col] if default is None else runs[col].where(runs[col].notna(), default)
        ref = values[runs["family"] == "baselines"].mode()
        if len(ref):
            same &= values == ref.iloc[0]
    return same


def spectra_configs(runs: pd.DataFrame) -> pd.DataFrame:
    """Every SPECTRA configuration of the pool at E=8 on the tiny base, evaluated on the baselines'
    tokens (same sequence length), one row per (family, variant)."""
    sub = runs[(runs["router"] == "spectra") & tiny_e8(runs) & same_eval_tokens(runs)].copy()
    sub["row"] = [f"{f}: {_short(v)}" for f, v in zip(sub["family"], sub["variant"])]
    return sub


def _short(variant: str) -> str:
    """A variant without the overrides every SPECTRA cell of the pool shares."""
    kept = [o for o in str(variant).split(",") if o not in ("experiment=results", "router=spectra")]
    return ",".join(kept) or "defaults"


def open_problem_table(runs: pd.DataFrame) -> Table:
    """The paper's open problem: which SPECTRA configuration has inference load CV < 0.1, zero
    dropped tokens, Gram orthogonality >= 0.9 and eval loss <= Switch Top-2's (means over seeds)."""
    pool = spectra_configs(runs)
    t = _table(pool, ["eval_loss", "cv", "dropped_token_rate", "gram_orthogonality", "maxvio"], "open_problem",
               "Open problem: inference-time balance of every SPECTRA configuration (E=8, tiny base)", [])
    switch = baselines_pool(runs)
    ref = pd.to_numeric(switch.loc[switch["counted"] & (switch["router"] == "switch_top2"), "final:eval_loss"], errors="coerce").mean()
    meets = open_problem_hits(t.data, ref)
    t.display["meets all"] = ["yes" if meets.get(r, False) else "no" for r in t.data.index]
    t.best["meets all"] = False
    t.data["meets_all"] = [meets.get(r, False) for r in t.data.index]
    t.notes.append(f"meets all: mean inference load CV < {OPEN_PROBLEM['cv']}, dropped tokens = 0, Gram orthogonality "
                   f">= {OPEN_PROBLEM['gram_orthogonality']} and eval loss <= Switch Top-2's mean "
                   f"({ref:.4f})" if math.isfinite(ref) else "Switch Top-2 has no completed run: eval-loss criterion unknown")
    return t


def open_problem_hits(data: pd.DataFrame, switch_loss: float) -> dict[str, bool]:
    """Row -> meets every criterion (means over seeds; a missing metric fails it)."""
    def val(r, key):
        v = data.at[r, f"{key}_mean"] if f"{key}_mean" in data.columns else math.nan
        return float(v) if pd.notna(v) else math.nan

    out = {}
    for r in data.index:
        cv, drop, gram, loss = (val(r, k) for k in ("cv", "dropped_token_rate", "gram_orthogonality", "eval_loss"))
        out[r] = (cv < OPEN_PROBLEM["cv"] and drop <= OPEN_PROBLEM["dropped_token_rate"]
                  and gram >= OPEN_PROBLEM["gram_orthogonality"] and math.isfinite(switch_loss) and loss <= switch_loss)
    return out


def family_table(runs: pd.DataFrame, family: str, title: str) -> Table:
    """A sweep family's cells (variant = overrides minus seed), best per column marked."""
    sub = runs[runs["family"] == family]
    metrics = ["eval_loss", "cv", "maxvio", "train_cv", "dropped_token_rate", "usage_entropy", "expert_overlap",
               "gram_orthogonality", "consistency", "sequential_overlap", "tokens_per_s"]
    return metric_table(sub, metrics, "variant", name=f"sweep_{family.removeprefix('sweep_')}", title=title)


def paper_tables(runs: pd.DataFrame, seed: int = 0) -> list[Table]:
    """Every table of results/README.md, in its order."""
    base = baselines_pool(runs)
    abl = ablation_pool(runs)
    baselines = _table(base, COMPARISON_METRICS + ["dropped_token_rate", "consistency"], "baselines",
                       "Baselines: every router at E=8, k=2 on the tiny base (mean ± std over seeds)", router_order(base))
    if DISPLAY_NAMES["expert_choice"] in set(base["row"]):
        baselines.notes.append(EC_BATCH_NOTE)
    tables = [
        baselines,
        _table(abl, TABLE7_METRICS + ["consistency", "dropped_token_rate"], "table07_ablations",
               "Table 7: Ablations — expert specialization (mean ± std over seeds)", list(ABLATION_NAMES.values())),
        overhead_table(base, by="row"),
        scaling_table(pd.concat([runs[(runs["family"] == "baselines") & runs["router"].isin(["spectra", "switch_top2", "dense"])
                                      & tiny_e8(runs)], runs[runs["family"] == "size"]]),
                      "cfg:model.name", name="table10_model_sizes", title="Table 10: two model sizes (tiny H=128, small H=256)"),
        scaling_table(pd.concat([runs[(runs["family"] == "baselines") & runs["router"].isin(["spectra", "switch_top2"])
                                      & tiny_e8(runs)], runs[runs["family"] == "experts"]]),
                      "cfg:moe.num_experts", name="table11_num_experts", title="Table 11: number of experts (tiny base, k=2)"),
        stability_table(base, by="row"),
        significance(runs, seed),
        domain_table(runs),
        _table(balance_pool(runs), ["eval_loss", "cv", "maxvio", "train_cv", "dropped_token_rate", "gram_orthogonality"],
               "balance", "Balance learning: SPECTRA's inference-time balance with the plan learned into its scores",
               [PAPER, *BALANCE_NAMES.values(), "Switch Top-2", "Aux-Loss-Free"]),
        open_problem_table(runs),
    ]
    for family, title in (("sweep_A", "Sweep A: quota off / capacity factor"), ("sweep_B", "Sweep B: Sinkhorn ε × iterations"),
                          ("sweep_C", "Sweep C: repulsion weight"), ("sweep_D", "Sweep D: routing entropy coefficient"),
                          ("sweep_E", "Sweep E: sequence length × {full, −GRU} (tokens per step fixed)")):
        if (runs["family"] == family).any():
            tables.append(family_table(runs, family, title))
    return tables


__all__ = ["load_pool", "paper_tables", "baselines_pool", "ablation_pool", "balance_pool", "spectra_configs",
           "domain_gains", "open_problem_hits", "STABILITY_METRICS"]
