"""DeepSpeed ZeRO-2 and ZeRO-3 with MoE blocks, on CPU: 2 gloo ranks under torchrun.

ZeRO-3 hangs on MoE without marking the MoE block as a leaf module (DeepSpeed #4808: experts
that got no tokens skip their all-gathers); train/deepspeed.py marks them. Here a tiny MoE
(router=topk: no auxiliary loss, so nothing depends on how tokens split across ranks) trains
with deepspeed=zero2 and zero3 and follows the plain 2-rank run's loss curve. fp32 on CPU:
ZeRO only changes where parameters, gradients and optimizer states live, so the curves agree to
1e-4 relative (the partitioned reductions sum in another order).

Resume across a changed world size (same global batch: 2 ranks x 2 rows -> 1 rank x 4 rows):
deepspeed.stage=0 checkpoints (full model and optimizer) resume on 1 rank and follow the 2-rank
curve. A ZeRO checkpoint holds one optimizer partition per rank
(`global_stepN/zero_pp_rank_<r>_mp_rank_00_optim_states.pt`) and DeepSpeed 0.19 refuses to
re-partition it ("Automatic adjustment of ZeRO's optimizer state partitioning with a new world
size is not currently supported"); run() refuses it up front with one line naming both counts.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import TINY_TRAIN, assert_ok
from spectra.contracts.rundir import read_jsonl
from test_distributed import _torchrun, needs_torchrun

ARGS = [*TINY_TRAIN, "router=topk", "monitor.enabled=false", "trainer.max_steps=4", "trainer.logging_steps=1",
        "trainer.eval_steps=4", "trainer.save_steps=2", "trainer.resume=auto", "seed=7",
        # Learning rates that move the weights within 4 steps (the trainer's defaults, 1e-5 with
        # warm-up from 0, change the loss by ~1e-5: below the curves' 1e-4 tolerance, proving nothing).
        "trainer.base_lr=1e-3", "trainer.expert_lr=1e-3", "trainer.router_lr=1e-3", "trainer.warmup_ratio=0"]


def _curve(run_dir):
    return [(r["step"], r["loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def _resume_on_one_rank(run_dir, stage: str):
    """The 2-rank run, as if killed after checkpoint-2, restarted on 1 rank with the same global batch."""
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-4")
    (run_dir / "summary.json").unlink()
    return _torchrun(1, [*ARGS, f"deepspeed={stage}", "trainer.per_device_train_batch_size=4"], run_dir)


@pytest.mark.slow
@needs_torchrun
def test_zero2_and_zero3_train_a_moe_like_the_plain_run(tmp_path):
    runs = {stage: tmp_path / stage for stage in ("none", "zero2", "zero3")}
    plain_copy, zero2_copy = tmp_path / "none_1rank", tmp_path / "zero2_1rank"
    # Each 1-rank restart (checked below) starts on a copy of its 2-rank run as soon as that run is
    # done, beside the next 2-rank run: one single process at a time next to the two ranks.
    with ThreadPoolExecutor(max_workers=1) as side:
        assert_ok(_torchrun(2, [*ARGS, "deepspeed=none"], runs["none"]))
        shutil.copytree(runs["none"], plain_copy)
        plain_restart = side.submit(_resume_on_one_rank, plain_copy, "none")
        assert_ok(_torchrun(2, [*ARGS, "deepspeed=zero2"], runs["zero2"]))
        shutil.copytree(runs["zero2"], zero2_copy)
        zero2_restart = side.submit(_resume_on_one_rank, zero2_copy, "zero2")
        assert_ok(_torchrun(2, [*ARGS, "deepspeed=zero3"], runs["zero3"]))
        plain_proc, proc = plain_restart.result(), zero2_restart.result()
    plain = _curve(runs["none"])
    assert [s for s, _ in plain] == [1, 2, 3, 4]
    for stage in ("zero2", "zero3"):
        curve = _curve(runs[stage])
        assert [s for s, _ in curve] == [1, 2, 3, 4], stage
        for (step, x), (_, y) in zip(plain, curve):
            assert y == pytest.approx(x, rel=1e-4), f"{stage} step {step}: {y} vs plain {x}"
        s = _summary(runs[stage])
        assert s["status"] == "completed" and s["world_size"] == 2
        assert s["final"]["eval_loss"] == pytest.approx(_summary(runs["none"])["final"]["eval_loss"], rel=1e-4), stage
        assert s["buffer_checksum_per_rank"][0] == s["buffer_checksum_per_rank"][1]
    # ZeRO-3 saves the gathered 16-bit weights: the saved model is whole, not a partition
    assert (runs["zero3"] / "model").is_dir()

    # resume on 1 rank: plain (stage 0) follows the 2-rank curve; ZeRO-2's partitions are refused
    assert_ok(plain_proc)
    resumed = _summary(plain_copy)
    assert resumed["world_size"] == 1 and resumed["resumed_from"].endswith("checkpoint-2")
    for (step, x), (_, y) in zip(plain, _curve(plain_copy)):
        assert y == pytest.approx(x, rel=1e-4), f"resumed on 1 rank, step {step}: {y} vs 2 ranks {x}"
    assert proc.returncode != 0
    assert "split over 2 ranks, this run has 1; DeepSpeed cannot re-partition it" in proc.stdout + proc.stderr
