"""Several processes for one run: torch's elastic launch, and SLURM tasks as ranks.

- `launch_processes(fn, nproc, *args)`: run `fn(*args)` in `nproc` local processes with torch's
  elastic launch API (what `torchrun` uses), from inside a Hydra job. Hydra and torchrun don't
  fight over argv (hydra #2038), every rank gets the job's already-resolved run directory (no
  per-rank `${now:}` directories, hydra #2070), and a free port per run lets trials run side by
  side. c10d rendezvous, no restarts: a failing rank fails the run promptly.
- `export_submitit_distributed_env()`: on SLURM with `nodes x tasks_per_node > 1`, submitit starts
  the Hydra job once per task, on every node; this sets RANK / WORLD_SIZE / MASTER_ADDR /
  MASTER_PORT / LOCAL_RANK from the allocation (submitit's TorchDistributedEnvironment), so one
  torch.distributed / DeepSpeed job spans all nodes (tests/test_multinode.py simulates 2 nodes).

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
    """Inside a submitit job with several tasks, export the torch.distributed variables from it;
    True if done.

    On SLURM, `hydra.launcher.nodes=N, tasks_per_node=G` starts the Hydra job once per task
    (N x G tasks); submitit's `TorchDistributedEnvironment` turns the allocation's variables into
    env:// rendezvous: RANK=SLURM_PROCID, WORLD_SIZE=SLURM_NTASKS, LOCAL_RANK=SLURM_LOCALID,
    MASTER_ADDR = the first host of SLURM_JOB_NODELIST, MASTER_PORT derived from the job id (or
    $MASTER_PORT). The Trainer then joins one process group across all nodes (NCCL on GPUs,
    gloo on CPU). The local executor (`hydra/launcher=local`, tasks_per_node > 1) works the same
    way on one machine. Nothing is exported when torch's launcher already set WORLD_SIZE."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "WORLD_SIZE" in os.environ:
        return False
    import submitit  # optional dependency (hydra-submitit-launcher brings it); only submitit jobs get here

    if submitit.JobEnvironment().num_tasks <= 1:
        return False
    # set_cuda_visible_devices=False: every task sees its node's GPUs and the Trainer picks
    # cuda:LOCAL_RANK (guards.check_process_count has checked there are enough)
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True
