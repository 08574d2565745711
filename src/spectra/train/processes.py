"""Several processes for one run: torch's elastic launch, and SLURM tasks as ranks.

- `launch_processes(fn, nproc, *args)`: run `fn(*args)` in `nproc` local processes with torch's
  elastic launch API (what `torchrun` uses), from inside a Hydra job. Hydra and torchrun don't
  fight over argv (hydra #2038), every rank gets the job's already-resolved run directory (no
  per-rank `${now:}` directories, hydra #2070), and a free port per run lets trials run side by
  side. c10d rendezvous, no restarts: a failing rank fails the run promptly.
- `export_submitit_distributed_env()`: on SLURM with `tasks_per_node > 1`, submitit starts the
  Hydra job once per task; this sets RANK / WORLD_SIZE / MASTER_ADDR / LOCAL_RANK from it.

These belong to a run (`trainer.nproc_per_node`), sweep or not; what a SLURM launch submits is
the sweep's business (spectra.sweep.slurm).
"""

from __future__ import annotations

import os
import socket
import uuid

from torch.distributed.launcher.api import LaunchConfig, elastic_launch


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_processes(fn, nproc: int, *args):
    """Run fn(*args) on `nproc` local ranks; returns rank 0's return value."""
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"spectra-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    outputs = elastic_launch(config, fn)(*args)  # {rank: return value}
    return outputs[0]


def export_submitit_distributed_env() -> bool:
    """Inside a multi-task submitit job, export the torch.distributed variables; True if done."""
    if "SUBMITIT_FOLDER" not in os.environ and "SUBMITIT_EXECUTOR" not in os.environ:
        return False
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "WORLD_SIZE" in os.environ:
        return False
    import submitit  # optional dependency (hydra-submitit-launcher brings it); only SLURM jobs get here

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True
