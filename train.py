"""Train one upcycled MoE model: `python train.py router=spectra osr.repulsion_weight=0.3`.

A thin Hydra entry point. Everything happens in `spectra.train.run(cfg)`, which returns the
objective (`objectives` in the config) so Hydra's Optuna sweeper can optimise it.
Multirun: `python train.py -m router=topk,spectra` (see README).

Exit codes (single run): 0 done; 2 bad input (a config value, a missing data file / tokenizer /
model), printed as one line `error: <message naming the key>`; 1 training stopped by the
numerics guard (one line naming the step and term) or any other failure (with its traceback).
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from spectra.config import ConfigError, register_configs

register_configs()


def _single_run() -> bool:
    """True for `python train.py ...` (not -m): a sweeper records a multirun job's exception itself."""
    try:
        return HydraConfig.get().mode == RunMode.RUN
    except ValueError:  # called outside a Hydra app
        return False


# Trusted `_target_`s: our callbacks (conf/config.yaml hydra.callbacks) — Hydra 1.5 will require it.
@hydra.main(config_path="conf", config_name="config", execution_whitelist=["spectra.*"])
def main(cfg: DictConfig):
    # Lazy on purpose: the training stack (torch, transformers, datasets) takes seconds to import,
    # so `--help`, `--cfg job` and config errors answer before it loads.
    from spectra.train.guards import NonFiniteError
    from spectra.train.run import run

    try:
        return run(cfg)
    except (ConfigError, OSError, NonFiniteError) as e:
        # A user error (bad value, missing file / tokenizer / model) or a run stopped by the
        # numerics guard: one line, no traceback (run() has written summary.json already).
        if not _single_run():
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1 if isinstance(e, NonFiniteError) else 2)


if __name__ == "__main__":
    main()
