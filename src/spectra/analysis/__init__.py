"""Sweep and run directories -> pandas DataFrames -> tables, statistics and figures.

    runs, steps = spectra.analysis.collect(["outputs/demo"])       # one row per run / per log step
    print(spectra.analysis.to_markdown(spectra.analysis.comparison_table(runs)))
    spectra.analysis.build_report(["outputs/demo"], "outputs/report")   # everything + index.md

    collect.py         run directories -> runs / steps frames; failed, incomplete, duplicate flagged
    columns.py         which runs-frame column holds a metric (recorder, monitor, stability keys)
    stats.py           Welch t-test, stars, bootstrap CIs (scipy)
    rendered_table.py  Table: a rendered table (markdown / LaTeX booktabs / CSV)
    tables.py          the paper's tables (7, 9, 10, 11, 12, 13) and one table per sweep
    snapshots.py       routing snapshots `<run_dir>/routing/step*.pt` -> arrays, stability
    figures.py         pure plotting functions (PNG + PDF)
    report.py          build_report: all of the above into one directory with index.md
CLI: `python -m spectra.analysis table DIR...`, `... report DIR... --out OUT`, `... latest`.
"""

from spectra.analysis.collect import collect, find_run_dirs, find_sweep_dirs, problems
from spectra.analysis.rendered_table import Table
from spectra.analysis.stats import bootstrap_ci, bootstrap_diff_ci, stars, welch_ttest
from spectra.analysis.tables import (
    ablation_table,
    aggregate,
    comparison_frame,
    comparison_table,
    metric_table,
    overhead_table,
    scaling_table,
    significance_table,
    stability_table,
    sweep_tables,
    to_markdown,
)


def build_report(*args, **kwargs):
    """See `spectra.analysis.report.build_report` (imported lazily: it pulls in matplotlib)."""
    from spectra.analysis.report import build_report as _build  # deliberately lazy: it pulls in matplotlib

    return _build(*args, **kwargs)


__all__ = [
    "Table", "ablation_table", "aggregate", "bootstrap_ci", "bootstrap_diff_ci", "build_report", "collect",
    "comparison_frame", "comparison_table", "find_run_dirs", "find_sweep_dirs", "metric_table", "overhead_table",
    "problems", "scaling_table", "significance_table", "stability_table", "stars", "sweep_tables",
    "to_markdown", "welch_ttest",
]
