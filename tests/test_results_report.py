"""`python -m spectra.results report`: the paper's tables and the H1-H7 verdicts from a results
pool, checked on fabricated cells whose outcome is known by construction (p-values from scipy)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from scipy import stats

from spectra.results.plan import Cell, Plan
from spectra.results.report import VERDICTS_BEGIN, VERDICTS_END, write_results
from spectra.results.tables import load_pool, paper_tables
from spectra.results.verdicts import (
    CONFIRMED,
    NOT_CONFIRMED,
    NOT_TESTABLE,
    PENDING,
    h1,
    h2,
    h3,
    h5,
    h6,
    h7,
    open_problem,
    verdicts_markdown,
)
from test_analysis import make_run
from test_report_html import check_served_index

DOMAINS = ("code", "docs", "math", "quotes", "dictionary")
LOSS = {"topk": [2.15, 2.16, 2.17], "spectra": [2.00, 2.01, 2.02], "switch_top2": [2.10, 2.11, 2.13], "switch_top1": [2.20, 2.22, 2.21],
        "expert_choice": [2.05, 2.06, 2.04], "dense": [2.3, 2.31, 2.29]}
EC_CAUSAL_LOSS = [2.25, 2.26, 2.27]  # Expert Choice evaluated causally: worse than with batch routing
ABLATION_LOSS = {"no_gru": [2.10, 2.12, 2.11], "no_quota": [1.99, 2.03, 2.00]}  # -Quota: no worse than Full


def _cell(root, family, router, seed, loss, *, ablation=None, model="tiny", experts=8, cv=0.3, gram=0.5, dom=None,
          ec_inference="batch", seq=128, split=False):
    ovs = (["experiment=results", f"router={router}"] + ([f"ablation={ablation}"] if ablation else [])
           + ([f"model={model}"] if model != "tiny" else []) + ([f"data.max_seq_length={seq}"] if seq != 128 else [])
           + ([f"router.ec_inference={ec_inference}"] if ec_inference != "batch" else [])
           + (["data.split_long_documents=true"] if split else []) + [f"seed={seed}"])
    name = ",".join(o for o in ovs[1:])
    dom = dom or {d: loss for d in DOMAINS}
    final = {"eval/cv_mean": cv, "eval/dropped_token_rate_mean": 0.0, "monitor/gram_orthogonality_mean": gram,
             "monitor/expert_overlap_mean": 0.2, **{f"eval_loss_{d}": v for d, v in dom.items()}}
    make_run(root / "runs" / family / name, router, seed, loss=loss, cv=cv, overrides=ovs, extra_final=final,
             config={"model": {"name": model}, "moe": {"num_experts": experts}, "router": {"name": router, "top_k": 2, "ec_inference": ec_inference},
                     "data": {"max_seq_length": seq, **({"split_long_documents": True} if split else {})}})


@pytest.fixture
def pool(tmp_path):
    root = tmp_path / "results"
    for router, losses in LOSS.items():
        for s, loss in enumerate(losses):
            # SPECTRA gains 10x more on code and math than elsewhere
            dom = {d: loss - (0.05 if router == "spectra" and d in ("code", "math") else 0.0) for d in DOMAINS}
            _cell(root, "baselines", router, s, loss, dom=dom)
    for s, loss in enumerate(EC_CAUSAL_LOSS):
        _cell(root, "baselines", "expert_choice", s, loss, ec_inference="causal", cv=0.4)
    for abl, losses in ABLATION_LOSS.items():
        for s, loss in enumerate(losses):
            _cell(root, "ablations", "spectra", s, loss, ablation=abl)
    for s in range(3):  # the balance variant that solves the open problem
        _cell(root, "balance", "spectra", s, 2.05 + s / 100, ablation="balance_bias", cv=0.05, gram=0.95)
    _cell(root, "size", "spectra", 0, 1.8, model="small")  # one seed: H6 not testable
    _cell(root, "size", "switch_top2", 0, 1.9, model="small")
    return root


def test_h1_and_h5_follow_welch_tests(pool):
    runs, _ = load_pool(pool)
    verdict, lines = h1(runs)
    p2 = stats.ttest_ind(LOSS["spectra"], LOSS["switch_top2"], equal_var=False).pvalue
    assert verdict == CONFIRMED and p2 < 0.05
    assert "Switch Top-2" in lines[0] and f"{sum(LOSS['spectra']) / 3:.4f}" in lines[0]
    verdict, lines = h5(runs)
    assert verdict == PENDING  # 4 of Table 7's 6 ablations have no cell yet
    assert sum("-All" in x and x.endswith("— not trained yet") for x in lines) == 1
    for abl in ("no_expression", "no_repulsion", "no_ortho", "no_all"):
        for s, loss in enumerate([2.3, 2.31, 2.32]):
            _cell(pool, "ablations", "spectra", s, loss, ablation=abl)
    verdict, lines = h5(load_pool(pool)[0])
    assert verdict == NOT_CONFIRMED  # -Quota is not worse than Full
    assert any("-GRU" in x and "— contributes" in x for x in lines)
    assert any("-Quota" in x and "no significant contribution" in x for x in lines)
    assert not any("not trained yet" in x for x in lines)


def test_h6_needs_two_seeds_and_h7_reads_per_domain_losses(pool):
    runs, _ = load_pool(pool)
    assert h6(runs)[0] == NOT_TESTABLE
    verdict, lines = h7(runs)
    gain_code = 0.05 / (sum(LOSS["switch_top2"]) / 3) + (sum(LOSS["switch_top2"]) - sum(LOSS["spectra"])) / sum(LOSS["switch_top2"])
    assert verdict == CONFIRMED
    assert any(x.startswith("eval_loss_code") and f"{100 * gain_code:+.2f} %" in x for x in lines)


def test_missing_cells_are_pending_and_one_seed_is_not_testable(pool):
    runs, _ = load_pool(pool)
    assert h6(runs)[0] == NOT_TESTABLE  # the small size has one seed per router
    no_switch = runs[runs["router"] != "switch_top2"]
    assert h1(no_switch)[0] == PENDING


def test_h2_compares_gram_orthogonality_only_where_the_baseline_has_it(pool):
    runs, _ = load_pool(pool)
    assert any(x.startswith("gram_orthogonality: SPECTRA 0.5000 vs Switch Top-2 0.5000") for x in h2(runs)[1])
    col = "final:monitor/gram_orthogonality_mean"
    runs.loc[runs["router"] == "switch_top2", col] = float("nan")  # a linear router logs no Gram
    verdict, lines = h2(runs)
    assert any("not defined for Switch Top-2" in x for x in lines) and verdict != PENDING


def test_open_problem_names_the_configuration_that_meets_every_threshold(pool):
    # a Sweep E length is evaluated on other tokens (rows of 1024): never a candidate, whatever its numbers
    _cell(pool, "sweep_E", "spectra", 0, 1.5, cv=0.01, gram=0.99, seq=1024)
    # nor is one at the baselines' length whose long conversations were split, not truncated (the
    # baselines' configs predate the key: they count as its default, truncation)
    _cell(pool, "sweep_E", "spectra", 0, 1.5, cv=0.01, gram=0.99, seq=128, split=True)
    runs, _ = load_pool(pool)
    assert runs["cfg:data.split_long_documents"].isna().sum() > 0
    verdict, lines = open_problem(runs)
    assert verdict == "solved by balance: ablation=balance_bias"
    assert "ablation=no_gru" not in verdict and "sweep_E" not in " ".join(lines)


def test_partial_results_say_so_before_the_verdicts(pool):
    runs, _ = load_pool(pool)
    text = verdicts_markdown(runs, unfinished=40, planned=127)
    assert "**PARTIAL: 87 of 127 planned cells finished.**" in text
    assert text.index("PARTIAL") < text.index("**H1")
    assert "PARTIAL" not in verdicts_markdown(runs, unfinished=0, planned=127)


def test_tables_select_rows_by_configuration(pool):
    runs, _ = load_pool(pool)
    tables = {t.name: t for t in paper_tables(runs)}
    base = tables["baselines"].display
    assert list(base.index[:3]) == ["SPECTRA", "Top-k", "Switch Top-1"]  # SPECTRA first, then the catalogue
    t7 = tables["table07_ablations"].display
    assert list(t7.index) == ["SPECTRA-Full", "-GRU", "-Quota"]
    assert t7.loc["SPECTRA-Full", "eval loss"].startswith(f"{sum(LOSS['spectra']) / 3:.4f}")
    sig = tables["table13_significance"].data
    assert "Switch Top-2 vs SPECTRA" in set(sig.index) and "-GRU vs SPECTRA-Full" in set(sig.index)
    row = sig[(sig.index == "Switch Top-2 vs SPECTRA") & (sig["metric"] == "eval_loss")].iloc[0]
    assert row["p"] == pytest.approx(stats.ttest_ind(LOSS["switch_top2"], LOSS["spectra"], equal_var=False).pvalue)
    assert "yes" in list(tables["open_problem"].display["meets all"])


def test_expert_choice_evaluated_causally_is_a_row_of_its_own(pool):
    runs, _ = load_pool(pool)
    base = {t.name: t for t in paper_tables(runs)}["baselines"]
    rows = list(base.display.index)
    assert rows.index("Expert Choice (causal eval)") == rows.index("Expert Choice") + 1
    assert base.display.loc["Expert Choice (causal eval)", "eval loss"].startswith(f"{sum(EC_CAUSAL_LOSS) / 3:.4f}")
    assert base.display.loc["Expert Choice", "eval loss"].startswith(f"{sum(LOSS['expert_choice']) / 3:.4f}")
    assert any("ec_inference=batch" in n and "not a causal LM" in n for n in base.notes)
    # H3 compares SPECTRA with the causally evaluated Expert Choice, not the batch-routed one
    lines = h3(runs)[1]
    assert any("Expert Choice (causal eval)" in x for x in lines)
    assert not any("Expert Choice " in x.replace("Expert Choice (causal eval)", "") for x in lines)


def test_report_writes_tables_figures_html_and_readme_verdicts(pool):
    readme = pool / "README.md"
    readme.write_text(f"# Results\n\nhand-written setting\n\n{VERDICTS_BEGIN}\nSTALE-VERDICT\n{VERDICTS_END}\n\ntail\n")
    make_run(pool / "runs" / "baselines" / "router=hash,seed=9", "hash", 9, status=None)  # still running: no summary
    # a sweep's default point repeats the baselines' SPECTRA cell (same config fingerprint, same numbers)
    spectra0 = pool / "runs" / "baselines" / "router=spectra,seed=0"
    repeat = pool / "runs" / "sweep_A" / "quota.capacity_factor=1.25,seed=0"
    shutil.copytree(spectra0, repeat)
    overrides = repeat / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text() + "- quota.capacity_factor=1.25\n")
    for d in (spectra0, repeat):
        s = json.loads((d / "summary.json").read_text())
        (d / "summary.json").write_text(json.dumps({**s, "config_fingerprint": "f1"}))
    # and a true duplicate (a second copy of one cell): not counted, its reason names the other run
    shutil.copytree(pool / "runs" / "baselines" / "router=topk,seed=0", pool / "runs" / "baselines" / "zz_copy")
    plan = Plan(pool / "plan.yaml", {}, [Cell("baselines", "router=spectra,seed=0", ("router=spectra",), None, False)])
    html = write_results(pool, plan, pool, details=False)
    text = readme.read_text()
    assert "**Reproducibility.** 1 committed cell(s) repeat" in text and "; 1 of them are bit-identical" in text
    assert "- sweep_A/quota.capacity_factor=1.25,seed=0 = baselines/router=spectra,seed=0: bit-identical" in text
    assert "hand-written setting" in text and text.rstrip().endswith("tail") and "STALE-VERDICT" not in text
    assert "**H1 — confirmed.**" in text and "**H6 — not testable at this scale.**" in text
    assert (pool / "tables" / "table07_ablations.csv").is_file()
    # a run not counted is named relative to the results page, never by this machine's path
    index = (pool / "index.md").read_text()
    assert "`runs/baselines/router=hash,seed=9`" in index and str(pool) not in index
    assert "`runs/baselines/zz_copy`" in index and "runs/baselines/router=topk,seed=0, counted instead" in index
    page = html.read_text()
    assert "runs/baselines/router=hash,seed=9" in page and "zz_copy" in page and str(pool) not in page
    served = check_served_index(html.parent, against_markdown=False)
    assert "pareto" in served["figures"] and "table13_significance" in served["tables"]


RESULTS = Path(__file__).resolve().parents[1] / "results"


@pytest.mark.skipif(not (RESULTS / "index.html").is_file(), reason="no committed results/index.html yet (make results writes it)")
def test_committed_results_page_loads_with_every_image_and_table_row():
    """The committed results/index.html, served over HTTP: every image resolves, every table has
    rows, every linked file is there, nothing is fetched from outside."""
    served = check_served_index(RESULTS, against_markdown=False)
    assert {"baselines", "table07_ablations", "table13_significance", "open_problem"} <= set(served["tables"])
    assert served["figures"], "the results page shows no figure"
