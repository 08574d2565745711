"""Contracts at the bottom: what the layers share, importable by every layer.

- rundir.py     the run directory (config, metrics.jsonl, summary.json, cell identity, sweep
                progress file); standard library only
- snapshots.py  the routing-snapshot format `<run_dir>/routing/step*.pt` and its one reader

Nothing here imports another spectra package.
"""
