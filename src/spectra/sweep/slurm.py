"""What a SLURM launch will submit, without SLURM: `python -m spectra.sweep.slurm sbatch [overrides]`.

`hydra/launcher=slurm` (hydra-submitit-launcher) submits the sweep's cells as one submitit job
array: one sbatch script whose `srun` line runs `python -u -m submitit.core._submit <folder>`
in every task; each array task unpickles its cell's Hydra job (the overrides) and runs it.
`sbatch_preview` builds the executor exactly as the launcher does (`SlurmLauncher.launch`:
init keys, BaseQueueConf keys as they are, the rest with a `slurm_` prefix) and renders the
script with submitit's own code — with `--array=0-<n-1>%<array_parallelism>` when there are
several cells, as `map_array` submits them, and without it for one cell — then lists the
Hydra command each array task runs. tests/test_multinode.py checks it against the script
submitit really hands to `sbatch`.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import submitit
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf, open_dict

from spectra.config import config_dir, register_configs
from spectra.sweep.cells import grid_jobs

_INIT_KEYS = {"max_num_timeout", "python"}  # SlurmLauncher: executor constructor arguments


def _executor(params: dict, folder: str):
    """The submitit executor `SlurmLauncher.launch` builds from the launcher's parameters (its
    `_target_` is Hydra's, not a parameter)."""
    params = {k: v for k, v in params.items() if not k.startswith("_")}
    init = {f"slurm_{k}": v for k, v in params.items() if k in _INIT_KEYS}
    executor = submitit.AutoExecutor(cluster="slurm", folder=folder, **init)
    base = {f.name for f in fields(BaseQueueConf)}
    executor.update_parameters(**{(k if k in base else f"slurm_{k}"): v for k, v in params.items()
                                  if k not in _INIT_KEYS | {"submitit_folder"}})
    return executor


def sbatch_preview(params: dict, num_jobs: int = 1, folder: str | os.PathLike | None = None) -> str:
    """The sbatch script `hydra/launcher=slurm` submits for `num_jobs` cells, given the launcher's
    parameters (the composed `hydra.launcher` node, e.g. `launcher_params(...)`).

    submitit insists on finding `srun` when the executor is built; a stub on PATH satisfies it
    (it is never executed)."""
    params = {k: v for k, v in params.items() if not k.startswith("_")}
    folder = str(folder or params.get("submitit_folder") or Path(tempfile.mkdtemp()) / "%j")
    with tempfile.TemporaryDirectory() as stub_dir:
        stub = Path(stub_dir) / "srun"
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
        old_path = os.environ.get("PATH", "")
        os.environ["PATH"] = f"{stub_dir}{os.pathsep}{old_path}"
        try:
            slurm = _executor(params, folder)._executor
        finally:
            os.environ["PATH"] = old_path
    # Private: submitit has no public way to render a submission without submitting it (its
    # executors only `submit` / `map_array`, which call sbatch). These are the calls map_array
    # makes: for several jobs, a copy of the executor with `map_count` set (-> `--array`); for
    # one job, the plain submission (no array); the command is the executor's `_submit` line.
    if num_jobs > 1:
        slurm.parameters["map_count"] = int(num_jobs)
    return slurm._make_submission_file_text(slurm._submitit_command_str, "preview")


def _compose(overrides: list[str]):
    """The multirun's config as the driver sees it: composed without the command line's sweeps
    (`k=a,b` composes only in a multirun), which go back into `hydra.overrides.task`."""
    register_configs()
    if not any(o.startswith("hydra/launcher=") for o in overrides):
        overrides = ["hydra/launcher=slurm", *overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o for o, p in zip(overrides, parsed) if not p.is_sweep_override()]
    # job_name: train.py's task name (Hydra's default outside an app would be "app"), which the
    # launcher's `name: ${hydra.job.name}` becomes the sbatch --job-name
    with initialize_config_dir(config_dir=str(config_dir()), job_name="train"):
        cfg = compose(config_name="config", overrides=fixed, return_hydra_config=True)
    task = [o for o, p in zip(overrides, parsed) if not p.key_or_group.startswith("hydra")]
    with open_dict(cfg):
        cfg.hydra.overrides.task = task
    return cfg


def launcher_params(overrides: list[str], cfg=None) -> dict:
    """The composed `hydra.launcher` node for these overrides (default hydra/launcher=slurm)."""
    cfg = cfg if cfg is not None else _compose(overrides)
    hydra_config, previous = HydraConfig.instance(), HydraConfig.instance().cfg
    hydra_config.set_config(cfg)  # `${hydra:runtime.cwd}` resolves as in the driver
    try:
        node = cfg.hydra.launcher
        params = {}
        for key in node:
            try:
                value = node[key]
                params[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            except Exception:  # an interpolation that exists only inside a run
                params[key] = OmegaConf.to_container(node, resolve=False)[key]
        return params
    finally:
        hydra_config.cfg = previous


def cell_commands(cfg) -> list[str] | None:
    """The Hydra command each array task runs, in array order (None for sweepers that choose
    their trials as they go, such as Optuna)."""
    jobs = grid_jobs(cfg)
    if jobs is None:
        return None
    return ["python train.py " + " ".join(shlex.quote(o) for o in job) for job in jobs]


def preview(overrides: list[str]) -> str:
    """The whole preview: the sbatch script and what each array task runs."""
    cfg = _compose(list(overrides))
    commands = cell_commands(cfg)
    params = launcher_params(overrides, cfg)
    n = len(commands) if commands else 1
    out = [sbatch_preview(params, n).rstrip("\n"), ""]
    if commands is None:
        out.append("# array tasks: chosen by the sweeper as it goes (one per trial, hydra.sweeper.n_jobs per array)")
    else:
        out.append(f"# {n} array task{'s' if n != 1 else ''}; each runs its cell's Hydra job (pickled by submitit), i.e.:")
        out += [f"#   {i}: {c}" for i, c in enumerate(commands)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """`python -m spectra.sweep.slurm sbatch [the multirun's overrides]`: print what would be submitted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "sbatch":
        print("usage: python -m spectra.sweep.slurm sbatch [the multirun's overrides, e.g. +sweep=A "
              "hydra.launcher.partition=gpu]")
        return 2
    print(preview(argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
