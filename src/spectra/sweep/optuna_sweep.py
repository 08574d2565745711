"""The sweep loop behind `hydra/sweeper=spectra_optuna`: Optuna studies that resume and share.

The Hydra plugin (src/hydra_plugins/spectra_sweeper) is a thin shell over `SpectraOptunaSweep`.
We reuse the upstream plugin for everything it does right — samplers, search-space syntax
(`choice`, `interval`, `range`, `tag(log, …)`), overrides per trial, the results file — and
replace its `sweep()` loop, whose behaviour loses or duplicates work (SWEEPS.md, Optuna sweeper):

- upstream runs `n_trials` *more* trials each start; here `n_trials` is the study's target and a
  re-run (or a second worker) runs only what is missing;
- upstream leaves a killed driver's trials RUNNING; here stale trials are failed and re-queued
  (spectra.sweep.study_hygiene), and the retry lands in the same cell directory and resumes its checkpoint;
- upstream's default storage is in-memory and its default study name random; here the study is an
  SQLite file in the sweep directory named after the sweep, so it resumes with `load_if_exists`;
- a seeded sampler is re-seeded per trial number, so restarts and workers never replay suggestions;
- a failed trial (crash, NaN) is recorded as FAIL with its error and the sweep goes on; a study
  with no complete trial ends with a readable error instead of "Record does not exist".
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import optuna

# Private upstream module: hydra-optuna-sweeper exposes only its Hydra `Sweeper` class; the search
# space syntax (choice / interval / range / tag(log, ...)) and per-trial overrides live in `_impl`,
# and re-implementing them would drift from the syntax users know. We subclass its implementation
# and call five of its underscore methods (_process_searchspace_config,
# _parse_sweeper_params_config, _get_directions, _configure_trials, _to_grid_sampler_choices).
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import OmegaConf
from optuna.trial import TrialState

from spectra.sweep import study_hygiene as hygiene

log = logging.getLogger(__name__)


class _SearchSpace(NamedTuple):
    """The parsed search space: what upstream's `create_params_from_overrides` returns, plus the
    override strings it came from (they name the study)."""

    params_conf: list[str]
    distributions: dict
    fixed_params: dict[str, Any]
    fixed_overrides: list[str]


class SweepFailed(RuntimeError):
    """The Optuna sweep cannot go on (too many failures, or not one trial completed)."""


class SpectraOptunaSweep(OptunaSweeperImpl):
    """Upstream implementation with spectra's sweep loop (see the module docstring)."""

    def __init__(self, *args, sampler_seed: int | None, heartbeat_interval: float, grace_period: float, **kw):
        super().__init__(*args, **kw)
        self.sampler_seed = sampler_seed
        self.heartbeat_interval = float(heartbeat_interval)
        self.grace_period = float(grace_period)

    # ----------------------------------------------------------------------------- helpers
    def _study_name(self, params_conf: list[str]) -> str:
        """`study_name`, else `<sweep_name>-<hash of the search space and fixed overrides>`: the
        same command finds its study again, a different search never joins it by accident."""
        if self.study_name:
            return str(self.study_name)
        digest = hashlib.sha256("\n".join(sorted(params_conf)).encode()).hexdigest()[:8]
        return f"{self.config.get('sweep_name') or 'adhoc'}-{digest}"

    def _check_directions(self, directions: list[str]) -> None:
        objectives = list(self.config.get("objectives") or [])
        if objectives and len(objectives) != len(directions):
            raise ValueError(
                f"hydra.sweeper.direction has {len(directions)} entr{'y' if len(directions) == 1 else 'ies'} "
                f"({directions}) but objectives has {len(objectives)} ({objectives}): give one direction per objective"
            )

    def _grid(self, distributions: dict) -> None:
        """GridSampler needs the whole grid up front; the target is capped at the grid's size."""
        if isinstance(self.sampler, functools.partial) and self.sampler.func == optuna.samplers.GridSampler:
            grid = {k: self._to_grid_sampler_choices(d) for k, d in distributions.items()}
            self.sampler = self.sampler(grid)
            size = 1
            for v in grid.values():
                size *= len(v)
            self.n_trials = min(self.n_trials, size)

    def _tell(self, study: optuna.Study, trial: optuna.Trial, ret, n_obj: int) -> Exception | None:
        """Record one finished job; returns its exception when it failed."""
        try:
            value = ret.return_value  # re-raises the job's exception
            values = [float(value)] if n_obj == 1 else [float(v) for v in value]
            if len(values) != n_obj:
                raise ValueError(f"the run returned {len(values)} objective values for {n_obj} directions")
            if study.tell(trial, values=values).state == TrialState.FAIL:  # NaN value
                raise ValueError(f"objective is not finite: {values}")
            return None
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            try:
                trial.set_user_attr(hygiene.ERROR, msg)
                study.tell(trial, state=TrialState.FAIL)
            except (RuntimeError, ValueError):  # already FAIL (non-finite value)
                pass
            log.warning(f"trial {trial.number} failed ({msg}); the sweep goes on")
            return e

    # ------------------------------------------------------------------------------- sweep
    def sweep(self, arguments: list[str]) -> None:
        """Run the study up to its `n_trials` target (see the module docstring), then write the results."""
        assert self.config is not None and self.launcher is not None
        space = self._search_space(arguments)
        directions = self._get_directions()
        self._check_directions(directions)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        self._mark_sweep_dir(sweep_dir)
        target = int(self.n_trials)
        study = self._open_study(space.params_conf, directions, sweep_dir, target)
        ran = self._run_trials(study, space, target, len(directions))
        self._write_results(study, directions, sweep_dir, ran)

    def _search_space(self, arguments: list[str]) -> _SearchSpace:
        """The sweeper's params plus the command line's overrides, parsed by upstream; a grid
        sampler gets its grid (and caps `n_trials`); fixed values leave the distributions."""
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config() + list(arguments)
        distributions, fixed_params, fixed_overrides = create_params_from_overrides(params_conf)
        self._grid(distributions)
        for name in fixed_params:
            distributions.pop(name, None)
        return _SearchSpace(params_conf, distributions, fixed_params, fixed_overrides)

    def _mark_sweep_dir(self, sweep_dir: Path) -> None:
        """As Hydra's BasicSweeper does: multirun.yaml marks the directory as a sweep for
        spectra.analysis. Atomic, since several workers may share the directory."""
        sweep_dir.mkdir(parents=True, exist_ok=True)
        tmp = sweep_dir / f".multirun.yaml.{os.getpid()}"
        OmegaConf.save(self.config, tmp)
        tmp.replace(sweep_dir / "multirun.yaml")

    def _open_study(self, params_conf: list[str], directions: list[str], sweep_dir: Path, target: int) -> optuna.Study:
        """The sweep's study, created or loaded (`load_if_exists`), with a line on where it stands."""
        storage = hygiene.open_storage(self.storage, sweep_dir)
        study = optuna.create_study(
            study_name=self._study_name(params_conf),
            storage=storage,
            sampler=self.sampler,
            directions=cast(list[Literal["minimize", "maximize"]], directions),
            load_if_exists=True,
        )
        start = hygiene.progress(study)
        log.info(
            f"Optuna study '{study.study_name}' in {hygiene.describe_storage(self.storage, sweep_dir)}: "
            f"{start['counted']}/{target} trials finished, {start['running']} running elsewhere; "
            f"directions {directions}, sampler {type(self.sampler).__name__}"
        )
        return study

    def _run_trials(self, study: optuna.Study, space: _SearchSpace, target: int, n_obj: int) -> int:
        """Ask, launch and tell batches of up to `n_jobs` trials until the study holds `target`
        finished ones and none runs elsewhere; returns how many this worker ran."""
        ran, failures = 0, []
        with hygiene.Heartbeat(study, self.heartbeat_interval) as heart:
            while True:
                recovered = hygiene.recover_stale_trials(study, self.grace_period)
                if recovered:
                    log.warning(f"trials {recovered} had no live owner: marked FAIL and re-queued")
                n = min(self.n_jobs, hygiene.remaining(study, target))
                if n == 0:
                    if hygiene.progress(study)["running"] == 0:
                        break
                    # Others' trials still run: wait, so their trials are retried here if they die.
                    time.sleep(min(self.heartbeat_interval, 5.0))
                    continue
                batch = self._ask(study, heart, n, target)
                if not batch:
                    continue
                failures += self._launch(study, batch, space, n_obj)
                heart.release(batch)
                ran += len(batch)
                p = hygiene.progress(study)
                log.info(f"[spectra] optuna: {p['counted']}/{target} trials finished "
                         f"({p['complete']} complete, {p['failed']} failed), {p['running']} running")
                if self.max_failure_rate < 1.0 and len(failures) / ran > self.max_failure_rate:
                    raise SweepFailed(
                        f"{len(failures)} of this worker's {ran} trials failed, above "
                        f"hydra.sweeper.max_failure_rate={self.max_failure_rate}; first error: {failures[0]}"
                    )
        return ran

    def _ask(self, study: optuna.Study, heart: hygiene.Heartbeat, n: int, target: int) -> list[optuna.Trial]:
        """`n` new trials claimed by this worker, less those past the target (another worker got
        there first: dropped and released)."""
        trials = [study.ask() for _ in range(n)]
        heart.claim(trials)
        batch = []
        for t in trials:
            if hygiene.is_surplus(study, t.number, target):
                hygiene.drop_surplus(study, t)  # another worker reached the target first
                heart.release([t])
            else:
                batch.append(t)
        return batch

    def _launch(self, study: optuna.Study, batch: list[optuna.Trial], space: _SearchSpace, n_obj: int) -> list[Exception]:
        """Launch one job per trial (a seeded sampler re-seeded per trial number) and record each
        result; returns the failed jobs' exceptions."""
        overrides = []
        for t in batch:
            if self.sampler_seed is not None:
                hygiene.reseed_sampler(study.sampler, int(self.sampler_seed) + t.number)
            overrides += self._configure_trials([t], space.distributions, space.fixed_params, space.fixed_overrides)
        returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
        self.job_idx += len(returns)
        errors = [self._tell(study, t, ret, n_obj) for t, ret in zip(batch, returns)]
        return [e for e in errors if e is not None]

    def _write_results(self, study: optuna.Study, directions: list[str], sweep_dir: Path, ran: int) -> None:
        """optimization_results.yaml (best trial or Pareto front) and optuna_trials.csv."""
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            errors = [t.user_attrs.get(hygiene.ERROR) for t in study.get_trials(deepcopy=False)]
            errors = [e for e in errors if e]
            raise SweepFailed(
                f"Optuna study '{study.study_name}': no trial completed ({len(study.trials)} trials, "
                f"{ran} run by this worker); first error: {errors[0] if errors else 'none recorded'}. "
                f"Run directories are under {sweep_dir}"
            )
        results: dict[str, Any] = {"name": "optuna", "study_name": study.study_name, "n_complete": len(complete)}
        if len(directions) == 1:
            best = study.best_trial
            results.update(best_params=best.params, best_value=best.value, best_trial=best.number)
            log.info(f"Best parameters: {best.params}  value: {best.value} (trial {best.number})")
        else:
            front = study.best_trials
            results["solutions"] = [{"trial": t.number, "params": t.params, "values": t.values} for t in front]
            log.info(f"Pareto front: {len(front)} trials")
            for t in front:
                log.info(f"    values {t.values}  params {t.params}")
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        df = study.trials_dataframe(attrs=("number", "state", "values", "params", "user_attrs", "duration"))
        tmp = sweep_dir / "optuna_trials.csv.tmp"
        df.to_csv(tmp, index=False)
        tmp.replace(sweep_dir / "optuna_trials.csv")
