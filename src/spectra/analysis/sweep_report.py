"""The end-of-multirun report: the sweep's progress counts, then its comparison table.

Configured in conf/config.yaml (`hydra.callbacks.sweep_report`). The counting is the sweep's
(spectra.sweep.cells); the table is analysis's, so the callback that prints both lives here,
above both, and no arrow runs from sweep up to analysis.
"""

from __future__ import annotations

from pathlib import Path

from spectra.analysis.collect import collect
from spectra.analysis.tables import comparison_frame, to_markdown
from spectra.sweep.cells import SweepProgressCallback


class SweepReportCallback(SweepProgressCallback):
    """Progress counts after each cell; at the end of a multirun, the counts and the table."""

    def on_multirun_end(self, config, **kwargs) -> None:
        super().on_multirun_end(config, **kwargs)
        try:
            runs, _ = collect([Path(config.hydra.sweep.dir)])
            if not runs.empty:
                print(to_markdown(comparison_frame(runs)))
        except Exception as e:  # a report must never turn a finished sweep into a failure
            print(f"[spectra] could not build the summary table: {e}")
