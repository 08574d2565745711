"""Multi-node trials without a cluster: `hydra/launcher=slurm` with nodes=2, tasks_per_node=1.

The driver (`python train.py -m hydra/launcher=slurm …`) goes through hydra-submitit-launcher
and submitit exactly as on a cluster; only `sbatch`/`sacct` are stand-ins (tests/slurm_stub.py)
that start the allocation's two tasks on localhost with the environment SLURM gives a
2-node x 1-task allocation (SLURM_NODEID 0 and 1, SLURM_PROCID, SLURM_NTASKS=2, …). Each task
runs submitit's `_submit` entry point, which runs the Hydra job; run() takes its rank from
submitit's TorchDistributedEnvironment and the Trainer joins one gloo group across both.

Reference: the same training in one process with the same global batch (2 ranks x 2 rows =
1 process x 4 rows). router=topk has no auxiliary loss, so the two runs differ only in float
reduction order: the training loss curves agree to 1e-4 relative (observed: ~1e-7) and the final
weights to 1e-9 (observed: ~1e-13).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

import slurm_stub
from conftest import TINY_TRAIN, assert_ok, run_cli
from spectra.contracts.rundir import read_jsonl

ARGS = [*TINY_TRAIN, "router=topk", "monitor.enabled=false", "trainer.max_steps=4", "trainer.logging_steps=1",
        "trainer.eval_steps=4", "trainer.save_steps=4", "data.max_eval_samples=8", "seed=5",
        # Learning rates that move the weights within 4 steps (the trainer's defaults, 1e-5 with
        # warm-up from 0, change the loss by ~1e-5: below the curves' 1e-4 tolerance, proving nothing).
        "trainer.base_lr=1e-3", "trainer.expert_lr=1e-3", "trainer.router_lr=1e-3", "trainer.warmup_ratio=0"]
ENV = {"OMP_NUM_THREADS": "1"}


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_two_node_slurm_trial_matches_the_single_process_run(tmp_path):
    ref = tmp_path / "ref"
    state = tmp_path / "slurm"
    env = {**ENV, **slurm_stub.install(tmp_path / "bin", state)}
    sweep = tmp_path / "sweep"
    # the single-process reference trains beside the 2-node job (independent processes, 1 thread each)
    with ThreadPoolExecutor(max_workers=1) as pool:
        reference = pool.submit(run_cli, ["train.py", *ARGS, "trainer.per_device_train_batch_size=4", f"hydra.run.dir={ref}"],
                                env=ENV)
        try:
            proc = run_cli(["train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1",
                            "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
                            *ARGS, "trainer.per_device_train_batch_size=2", f"hydra.sweep.dir={sweep}"], env=env, timeout=300)
        finally:
            slurm_stub.kill_all(state)
        assert_ok(reference.result())
    # the preview prints exactly the script submitit handed to sbatch (one cell: no array)
    from spectra.sweep.slurm import launcher_params, sbatch_preview

    (submitted,) = state.glob("*.sbatch")
    overrides = [o for o in proc.args[3:] if o.startswith(("hydra.launcher", "hydra/launcher", "hydra.sweep.dir"))]
    assert sbatch_preview(launcher_params(overrides)) == submitted.read_text()
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(sweep.glob(".submitit/*/*_log.err")))
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\nTASK LOGS:\n{logs}"
    (cell,) = [p.parent for p in sweep.glob("*/summary.json")]
    # rank 0 recorded the cell under the driver's worker id (the environment reaches the tasks)
    (record,) = read_jsonl(sweep / "sweep_progress.jsonl")
    assert record["status"] == "completed" and record.get("worker")
    assert "1 cells — 0 skipped (already complete), 1 ran, 0 failed" in proc.stdout
    s = json.loads((cell / "summary.json").read_text())
    r = json.loads((ref / "summary.json").read_text())
    assert s["status"] == "completed" and s["world_size"] == 2 and s["steps"] == r["steps"] == 4
    assert len(list(sweep.glob(".submitit/*/*_0_log.out"))) == 1 and len(list(sweep.glob(".submitit/*/*_1_log.out"))) == 1
    a, b = s["param_checksum_per_rank"]
    assert a == pytest.approx(b, rel=1e-12)  # both nodes hold the same weights: one data-parallel job
    la, lb = _losses(ref), _losses(cell)
    assert [x for x, _ in la] == [x for x, _ in lb] == [1, 2, 3, 4]
    for (step, x), (_, y) in zip(la, lb):
        assert y == pytest.approx(x, rel=1e-4), f"step {step}: 2-node loss {y} vs single-process {x}"
    assert s["param_checksum_per_rank"][0] == pytest.approx(r["param_checksum_per_rank"][0], rel=1e-9)  # same weights
    # The evaluation of identical weights differs by ~2e-4 relative between 1 and 2 ranks (observed on
    # CPU): the distributed evaluation splits the 8 eval rows (of unequal token counts) across ranks
    # and averages per-rank losses; hence a looser tolerance here than for training.
    assert s["final"]["eval_loss"] == pytest.approx(r["final"]["eval_loss"], rel=1e-3)
