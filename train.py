"""Train one upcycled MoE model: `python train.py router=spectra osr.repulsion_weight=0.3`.

A thin Hydra entry point. Everything happens in `spectra.train.run(cfg)`, which returns the
objective (`objectives` in the config) so Hydra's Optuna sweeper can optimise it.
Multirun: `python train.py -m router=topk,spectra` (see README).
"""

import hydra
from omegaconf import DictConfig

from spectra.config import register_configs

register_configs()


@hydra.main(config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from spectra.train.run import run  # imported here so `--help` and config errors stay fast

    return run(cfg)


if __name__ == "__main__":
    main()
