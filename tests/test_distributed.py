"""Several processes, one model: ZeRO-3 leaf marking, SPECTRA's running Gram synced across ranks,
and routing snapshots on a multi-rank resume.

Multi-rank pieces run on CPU with gloo: unit tests spawn 2 processes (torch.multiprocessing), the
end-to-end tests launch train.py under torchrun with 2 ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from conftest import ROOT, TINY_TRAIN, assert_ok, run_cli

TESTS = Path(__file__).resolve().parent
TORCHRUN = ROOT / ".venv/bin/torchrun"
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, args: list[str], run_dir: Path, timeout: int = 600):
    """train.py under torchrun (gloo on CPU); tests/ on PYTHONPATH so callbacks below import."""
    exe = str(TORCHRUN) if TORCHRUN.exists() else "torchrun"
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)}
    return run_cli([exe, f"--nproc_per_node={nproc}", f"--master_port={_free_port()}", "train.py", *args,
                    f"hydra.run.dir={run_dir}"], env=env, timeout=timeout)


class RecordRouterGram(TrainerCallback):
    """Test instrument (a `trainer.callbacks` entry): per rank, each SPECTRA router's collected
    M sum and count at every optimizer step (the Trainer's on_optimizer_step event comes before
    on_step_end, where RouterStepCallback folds them in), and the `expert_repr_ema` buffers at
    the end of training; saved to `<out>/rank<r>.pt`."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.steps: list[dict] = []

    @staticmethod
    def _routers(model):
        from spectra.moe.upcycle import routers

        return [r for r in routers(model) if hasattr(r, "expert_repr_ema")]

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        rs = self._routers(model)
        self.steps.append({"sum": [r._ema_sum.clone() for r in rs], "count": [float(r._ema_count) for r in rs]})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rs = self._routers(model)
        self.out.mkdir(parents=True, exist_ok=True)
        rank = int(os.environ.get("RANK", "0"))
        torch.save({"steps": self.steps, "ema": [r.expert_repr_ema.clone() for r in rs],
                    "decay": [r.gram_ema_decay for r in rs]}, self.out / f"rank{rank}.pt")


# ------------------------------------------------------------------------ ZeRO-3 leaf modules


def test_zero3_leaf_marking_flags_every_moe_block_and_nothing_in_a_dense_model():
    from deepspeed.utils import get_z3_leaf_modules

    from conftest import tiny_causal_lm
    from spectra.config import load_config, validate
    from spectra.moe.block import MoEBlock
    from spectra.moe.upcycle import upcycle
    from spectra.train.deepspeed import mark_moe_blocks_as_zero3_leaves

    dense = tiny_causal_lm("llama")  # router=dense: no MoE block (DeepSpeed raised "No modules of type")
    assert mark_moe_blocks_as_zero3_leaves(dense) is False
    assert get_z3_leaf_modules(dense) == []
    moe = upcycle(tiny_causal_lm("llama"), validate(load_config(["router=topk", "moe.num_experts=4"])), seed=0)
    assert mark_moe_blocks_as_zero3_leaves(moe) is True
    blocks = [m for m in moe.modules() if isinstance(m, MoEBlock)]
    assert len(blocks) == 2 and get_z3_leaf_modules(moe) == blocks  # the blocks, nothing else


# ------------------------------------------------------------------ helpers: 2 gloo processes


def _spawn(fn, tmp_path: Path, world: int = 2, timeout: float = 120.0, *args) -> None:
    """Run fn(rank, world, init_file, out_dir, *args) in `world` spawned processes joined in one
    gloo group; fail (not hang) if they do not all finish within `timeout` seconds."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=(world, str(tmp_path / "init"), str(tmp_path), *args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} processes did not finish within {timeout} s (a collective hung?)")


def _init_group(rank: int, world: int, init_file: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


# ------------------------------------------------------- SPECTRA's running Gram across ranks


def _gram_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """Each rank routes its own batches through the same router, as data-parallel training does."""
    import torch.distributed as dist

    from test_spectra_router import H, inputs, make

    _init_group(rank, world, init_file)
    router = make(router={"gram_ema_decay": 0.5}).train()  # same seed: identical weights on every rank
    torch.manual_seed(100 + rank)  # different tokens per rank
    ms = []
    with torch.no_grad():
        router.on_optimizer_step(0)  # RouterStepCallback.on_train_begin: nothing collected yet
        for _ in range(2):  # step 1: two micro-batches (gradient accumulation)
            ms.append(router(inputs(torch.randn(2, 6, H))).expert_repr)
        router.on_optimizer_step(1)
        ms.append(router(inputs(torch.randn(2, 6, H))).expert_repr)  # step 2, one micro-batch
        if rank == 0:
            # Only rank 0 switches to eval (e.g. rank-0-only generation) with M pending: it must
            # neither fold alone nor enter a collective the other rank never joins.
            router.eval()
            router(inputs(torch.randn(1, 4, H)))
            router.train()
        router.on_optimizer_step(2)
    torch.save({"m": ms, "ema": router.expert_repr_ema.clone(), "ready": bool(router.expert_repr_ema_ready)},
               Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_running_gram_is_the_mean_over_ranks_and_identical_on_every_rank(tmp_path):
    _spawn(_gram_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["ready"] and r1["ready"]
    assert torch.equal(r0["ema"], r1["ema"])  # bitwise: both ranks folded the same all-reduced mean
    # Hand computation, decay 0.5: step 1 copies the mean of all four micro-batch M's (2 per
    # rank); step 2 blends in the mean of the two ranks' M's.
    step1 = (r0["m"][0] + r0["m"][1] + r1["m"][0] + r1["m"][1]) / 4
    expected = 0.5 * step1 + 0.5 * (r0["m"][2] + r1["m"][2]) / 2
    torch.testing.assert_close(r0["ema"], expected, atol=1e-6, rtol=0)
    # ... which is not what either rank alone would hold (its own tokens only)
    for r in (r0, r1):
        alone = 0.5 * (r["m"][0] + r["m"][1]) / 2 + 0.5 * r["m"][2]
        assert (alone - expected).abs().max() > 1e-3


def _running_gram(steps: list[tuple[torch.Tensor, float]], decay: float) -> torch.Tensor:
    """Reference EMA over (M sum, count) per optimizer step: the first step copies its mean."""
    ema = None
    for total, count in steps:
        mean = total / count
        ema = mean if ema is None else decay * ema + (1 - decay) * mean
    return ema


# One 2-rank ZeRO-2 router=spectra run serves both end-to-end tests below (a torchrun launch
# imports the training stack on every rank): 4 steps, eval + monitor every 2 (snapshots at steps
# 1-4), checkpoints at 2 and 4, the Gram recorder on. The resume test works on a copy of it.
SPECTRA_ZERO2 = [*TINY_TRAIN, "router=spectra", "deepspeed=zero2", "trainer.save_steps=2", "trainer.eval_steps=2",
                 "trainer.resume=auto", "monitor.num_sequences=4"]


def _recorder(out: Path) -> str:
    return f"trainer.callbacks=[{{_target_:test_distributed.RecordRouterGram,out:{out}}}]"


@pytest.fixture(scope="module")
def spectra_zero2_run(tmp_path_factory):
    """(run_dir, rec): the shared 2-rank run and its RecordRouterGram output directory."""
    base = tmp_path_factory.mktemp("spectra_zero2")
    rec, run_dir = base / "rec", base / "run"
    assert_ok(_torchrun(2, [*SPECTRA_ZERO2, _recorder(rec)], run_dir))
    return run_dir, rec


@pytest.mark.slow
@needs_torchrun
def test_two_rank_zero2_spectra_run_ends_with_identical_running_gram(spectra_zero2_run):
    """router=spectra under ZeRO-2 with 2 gloo ranks (4 steps, eval + monitor every 2): every
    rank's `expert_repr_ema` is the same, and it is the EMA of the mean over both ranks' M's."""
    run_dir, rec = spectra_zero2_run
    r0, r1 = (torch.load(rec / f"rank{r}.pt") for r in (0, 1))
    assert len(r0["steps"]) == len(r1["steps"]) == 4 and len(r0["ema"]) == 2  # 4 steps, 2 MoE layers
    for layer, decay in enumerate(r0["decay"]):
        assert torch.equal(r0["ema"][layer], r1["ema"][layer]), f"layer {layer}: ranks disagree"
        both = [(a["sum"][layer] + b["sum"][layer], a["count"][layer] + b["count"][layer])
                for a, b in zip(r0["steps"], r1["steps"])]
        torch.testing.assert_close(r0["ema"][layer], _running_gram(both, decay), atol=1e-6, rtol=0)
        for r in (r0, r1):  # what a rank folding only its own tokens would hold: clearly different
            alone = _running_gram([(s["sum"][layer], s["count"][layer]) for s in r["steps"]], decay)
            assert (alone - r0["ema"][layer]).abs().max() > 1e-3
    s = json.loads((run_dir / "summary.json").read_text())
    a, b = s["buffer_checksum_per_rank"]
    assert a == b  # the per-rank consistency check covers buffers


# ------------------------------------------------------------- routing snapshots on a resume


def _snapshots_on_disk(run_dir: Path, steps) -> None:
    from spectra.metrics.monitor import save_snapshot, snapshot_path

    for step in steps:
        save_snapshot(snapshot_path(run_dir, step), {"step": step, "fingerprint": "f"})


def test_resume_loads_only_snapshots_named_up_to_the_resume_step(tmp_path):
    """Rank 0 deletes snapshots past the resume step while other ranks load: a file past it must
    never be opened. Here step 4's file is unreadable (as one half-deleted, or from an earlier
    attempt on another schedule): loading up to step 3 does not touch it."""
    import spectra.metrics.monitor as mon
    from spectra.metrics.monitor import SNAPSHOT_DIR, load_snapshots

    _snapshots_on_disk(tmp_path, [1, 3, 6])
    (tmp_path / SNAPSHOT_DIR / "step000004.pt").write_bytes(b"not a torch file")
    (tmp_path / SNAPSHOT_DIR / "step000003.pt.abc123.tmp").write_bytes(b"")  # an atomic write's temp file
    assert [s["step"] for s in load_snapshots(tmp_path, max_step=3)] == [1, 3]
    assert [step for step, _ in mon.snapshot_files(tmp_path)] == [1, 3, 4, 6]  # the listing, by name


def test_a_snapshot_vanishing_between_listing_and_loading_is_skipped(tmp_path, monkeypatch):
    import spectra.contracts.snapshots as contract
    import spectra.metrics.monitor as mon

    _snapshots_on_disk(tmp_path, [1, 2, 3])
    real = contract.load_snapshot

    def racing_load(path):  # another process deletes step 2 after this one listed the directory
        if Path(path).name == "step000002.pt":
            Path(path).unlink()
        return real(path)

    monkeypatch.setattr(contract, "load_snapshot", racing_load)  # the one snapshot reader's loader
    with pytest.warns(UserWarning, match="step000002.pt vanished"):
        assert [s["step"] for s in mon.load_snapshots(tmp_path, max_step=3)] == [1, 3]


@pytest.mark.slow
@needs_torchrun
def test_two_rank_resume_with_the_monitor_reloads_snapshots_up_to_the_resume_step(spectra_zero2_run, tmp_path):
    """2 ranks, ZeRO-2, monitor on (snapshots at steps 1-4), checkpoints at 2 and 4. With
    checkpoint-4 gone (as if killed before committing it) the rerun resumes from step 2: rank 0
    deletes the snapshots of steps 3 and 4 (step 4's made unreadable here) while rank 1 loads
    those of steps 1 and 2; both ranks finish and stability spans steps 1-4 as before."""
    from spectra.metrics.monitor import SNAPSHOT_DIR

    run_dir = tmp_path / "run"
    shutil.copytree(spectra_zero2_run[0], run_dir)  # the shared first run stays as it ended
    first = json.loads((run_dir / "summary.json").read_text())
    on_disk = sorted(p.name for p in (run_dir / SNAPSHOT_DIR).glob("step*.pt"))
    assert on_disk == [f"step00000{s}.pt" for s in first["stability"]["steps"]] and first["stability"]["steps"] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-4")
    (run_dir / "summary.json").unlink()  # as if killed: a completed summary would skip the rerun
    (run_dir / SNAPSHOT_DIR / "step000004.pt").write_bytes(b"stale, unreadable")
    proc = _torchrun(2, [*SPECTRA_ZERO2, _recorder(tmp_path / "rec")], run_dir)  # the same command (own recorder dir)
    assert_ok(proc)
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["resumed_from"].endswith("checkpoint-2") and s["steps"] == 4
    assert s["stability"]["steps"] == [1, 2, 3, 4]  # steps 1-2 reloaded, 3-4 taken again
    assert s["stability"]["mean"] == pytest.approx(first["stability"]["mean"], rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------- process-count preflight


def _cfg(*overrides):
    from spectra.config import load_config, validate

    return validate(load_config(["router=topk", *overrides]))


def test_process_counts_that_cannot_work_are_refused_naming_the_keys(monkeypatch):
    from spectra.config import ConfigError
    from spectra.train.guards import check_process_count

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    slurm = {"nodes": 1, "tasks_per_node": 2, "gpus_per_node": 2}
    # tasks_per_node > 1 makes the tasks the ranks: nproc_per_node would be silently ignored
    with pytest.raises(ConfigError, match=r"trainer\.nproc_per_node=2 with hydra\.launcher\.tasks_per_node=2"):
        check_process_count(_cfg("trainer.nproc_per_node=2"), slurm, visible_gpus=2)
    # 4 ranks on 1 GPU: by nproc_per_node, by tasks_per_node vs gpus_per_node, by visible devices
    with pytest.raises(ConfigError, match=r"trainer\.nproc_per_node=4 ranks per node but this node shows 1 CUDA device"):
        check_process_count(_cfg("trainer.nproc_per_node=4"), None, visible_gpus=1)
    with pytest.raises(ConfigError, match=r"hydra\.launcher\.tasks_per_node=4 ranks per node but hydra\.launcher\.gpus_per_node=1"):
        check_process_count(_cfg(), {"nodes": 2, "tasks_per_node": 4, "gpus_per_node": 1}, visible_gpus=1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(ConfigError, match=r"tasks_per_node=4 ranks per node but this node shows 2 CUDA devices \(CUDA_VISIBLE_DEVICES=0\)"):
        check_process_count(_cfg(), {"nodes": 1, "tasks_per_node": 4, "gpus_per_node": None}, visible_gpus=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node=4
    with pytest.raises(ConfigError, match=r"torchrun --nproc_per_node \(LOCAL_WORLD_SIZE\)=4 ranks per node"):
        check_process_count(_cfg(), None, visible_gpus=1)


def test_process_counts_that_work_pass(monkeypatch):
    from spectra.train.guards import check_process_count

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    check_process_count(_cfg("trainer.nproc_per_node=4"), None, visible_gpus=0)  # CPU: 4 gloo ranks are fine
    check_process_count(_cfg(), {"nodes": 2, "tasks_per_node": 2, "gpus_per_node": 0}, visible_gpus=0)
    check_process_count(_cfg("trainer.nproc_per_node=4"), None, visible_gpus=4)
    check_process_count(_cfg(), {"nodes": 2, "tasks_per_node": 4, "gpus_per_node": 4}, visible_gpus=4)


def test_run_refuses_nproc_per_node_with_launcher_tasks_before_training(monkeypatch, tmp_path):
    """run() checks against the job's hydra.launcher node before it starts any process."""
    import importlib

    from spectra.config import ConfigError

    run_mod = importlib.import_module("spectra.train.run")
    monkeypatch.setattr(run_mod, "_launcher_config", lambda: {"nodes": 2, "tasks_per_node": 1, "gpus_per_node": 1})
    monkeypatch.setattr(run_mod, "launch_processes", lambda *a: pytest.fail("processes were started"))
    with pytest.raises(ConfigError, match=r"hydra\.launcher\.nodes=2"):
        run_mod.run(_cfg("trainer.nproc_per_node=2", f"output_dir={tmp_path / 'run'}"))
