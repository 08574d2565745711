"""Sweep and run directories -> pandas DataFrames -> tables (and, later, figures).

    runs, steps = spectra.analysis.collect(["outputs/demo"])
    print(spectra.analysis.comparison_table(runs))
CLI: `python -m spectra.analysis table DIR...`.
"""

from spectra.analysis.collect import collect, find_run_dirs
from spectra.analysis.tables import aggregate, comparison_table, to_markdown

__all__ = ["aggregate", "collect", "comparison_table", "find_run_dirs", "to_markdown"]
