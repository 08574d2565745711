"""spectra: a research framework for Mixture-of-Experts routing (SPECTRA and baselines).

Layout: one job per sub-package; each imports only from those below it (README, Architecture;
checked by import-linter, `[tool.importlinter]` in pyproject.toml):

    analysis/         run directories -> pandas -> tables and figures; the end-of-sweep report
    sweep/            cells and sweep progress, Optuna study hygiene and sweep loop, sbatch preview
                      (the Hydra plugin hydra_plugins/spectra_sweeper is a thin shell over it)
    train/            run(cfg), MoETrainer, callbacks (incl. the routing monitor's), checkpoints,
                      guards, DeepSpeed config, several processes per run
    metrics/          pure metric functions on dispatched assignments, the per-layer recorder,
                      the routing monitor's computations, stability across routing snapshots
    moe/              MoE block, experts, upcycling, router replacement, stage timing, save/load
    config.py         typed schemas + validation (the user's API)
    data/             bundled corpus, tokenizer, chat formatting, packing
    routing/          one file per router, each returning a `RoutingOutput` (base.py); sinkhorn,
                      selection (the one capacity formula), losses
    contracts/        what the layers share, at the bottom: rundir.py (run directory, cell
                      identity, volatile keys, sweep progress file; standard library only),
                      snapshots.py (routing-snapshot format and its one reader)
    routers_catalog.py  the router names (`router.name`) and their printed names, stated once
"""

__version__ = "0.1.0"
