"""`hydra/sweeper=spectra_optuna`: the Hydra glue around spectra.sweep.optuna_sweep.

Hydra finds sweepers only in the `hydra_plugins` namespace package; everything but reading the
config keys and turning a failed sweep into one readable line lives in `spectra.sweep`.
The config (conf/hydra/sweeper/spectra_optuna.yaml) has its own name, so upstream's
`hydra/sweeper=optuna` stays available unchanged.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig

from spectra.sweep.optuna_sweep import SpectraOptunaSweep, SweepFailed

log = logging.getLogger(__name__)


class SpectraOptunaSweeper(Sweeper):
    """Hydra's Optuna sweeper with spectra's trial hygiene; same config keys plus
    `heartbeat_interval` and `grace_period` (conf/hydra/sweeper/spectra_optuna.yaml)."""

    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        custom_search_space: str | None,
        params: DictConfig | None,
        heartbeat_interval: float = 30.0,
        grace_period: float = 300.0,
    ) -> None:
        seed = sampler.get("seed") if isinstance(sampler, (dict, DictConfig)) else None
        sampler = instantiate(
            sampler, _execution_whitelist_=("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")
        )
        if storage is not None and not isinstance(storage, str):
            raise ValueError("hydra.sweeper.storage must be a URL string (sqlite:///…, journal:///…, postgresql://…)")
        if n_trials < 1:
            raise ValueError(f"hydra.sweeper.n_trials must be >= 1, got {n_trials}")
        self.sweeper = SpectraOptunaSweep(
            sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate, custom_search_space,
            params, sampler_seed=seed, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
        )

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        try:
            return self.sweeper.sweep(arguments)
        except SweepFailed as e:  # one readable line and exit 1, not Hydra's traceback
            log.error(str(e))
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
