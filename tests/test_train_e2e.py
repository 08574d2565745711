"""End-to-end: train.py as a user runs it (subprocesses), the run directory it leaves, multirun,
and 2-process DeepSpeed ZeRO-2 on CPU."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import ROOT, run_cli
from spectra.contracts.rundir import read_jsonl

pytestmark = pytest.mark.slow

# The demo experiment, shrunk to seconds.
SMALL = [
    "experiment=demo",
    "trainer.max_steps=8",
    "trainer.eval_steps=4",
    "trainer.logging_steps=2",
    "trainer.save_steps=4",
    "trainer.per_device_train_batch_size=4",
    "trainer.per_device_eval_batch_size=8",
    "data.max_seq_length=64",
    "data.max_train_samples=300",
    "data.max_eval_samples=16",
]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "r"
    proc = run_cli(["train.py", *SMALL, "trainer.max_steps=12", "logger.tensorboard=true", f"hydra.run.dir={run_dir}"])
    _ok(proc)
    return run_dir, proc


def test_run_directory_layout_and_summary(single_run):
    run_dir, _ = single_run
    assert (run_dir / ".hydra" / "config.yaml").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 12
    # the objective is the final eval loss, and it is what train.py returned to Hydra
    assert summary["objective"]["eval_loss"] == pytest.approx(summary["final"]["eval_loss"])
    assert any((run_dir / "checkpoints").glob("checkpoint-*"))
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents.*"))  # logger.tensorboard=true
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert len(train) >= 5 and len(evals) >= 3  # logging every 2 steps; eval at 4, 8, 12 (+ final)
    for r in train[1:]:
        assert {"learning_rate", "tokens_per_s", "train/layer0/cv", "train/cv_mean", "train/layer3/dropped_token_rate"} <= r.keys()
    for r in evals:
        assert {"eval/layer0/cv", "eval/cv_mean", "eval/dropped_token_rate_mean"} <= r.keys()
        assert 0 <= r["eval/cv_mean"] < 10
    assert train[-1]["loss"] < train[0]["loss"]  # it learns


def test_run_model_reloads_and_generates(single_run):
    from spectra.data import load_tokenizer
    from spectra.moe import load_moe_model

    run_dir, _ = single_run
    model = load_moe_model(run_dir / "model")
    tok = load_tokenizer(str(run_dir / "model"))
    ids = tok("def add(a, b):", return_tensors="pt").input_ids
    a = model.generate(ids, max_new_tokens=8, do_sample=False)
    b = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert a.shape[1] == ids.shape[1] + 8 and torch.equal(a, b)


def test_multirun_over_routers_and_comparison_table(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["train.py", "-m", *SMALL, "trainer.max_steps=4", "router=topk", "router.top_k=1,2", f"hydra.sweep.dir={sweep}",
                    "hydra.sweep.subdir=k${router.top_k}"])
    _ok(proc)
    for k in (1, 2):
        s = json.loads((sweep / f"k{k}" / "summary.json").read_text())
        assert s["status"] == "completed"
    table = run_cli(["-m", "spectra.analysis", "table", str(sweep)])
    _ok(table)
    assert "router.top_k=1" in table.stdout and "router.top_k=2" in table.stdout
    assert "eval loss" in table.stdout and "load CV" in table.stdout


def test_failed_run_writes_failed_summary_and_exits_nonzero(tmp_path):
    run_dir = tmp_path / "bad"
    proc = run_cli(["train.py", *SMALL, "data.max_seq_length=2048", f"hydra.run.dir={run_dir}"])
    assert proc.returncode != 0
    assert "max_position_embeddings" in proc.stderr
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "failed" and "max_seq_length" in s["error"]


@pytest.mark.skipif(shutil.which("torchrun") is None and not (ROOT / ".venv/bin/torchrun").exists(), reason="torchrun")
def test_deepspeed_zero2_two_cpu_processes_agree(tmp_path):
    run_dir = tmp_path / "ds"
    torchrun = str(ROOT / ".venv/bin/torchrun") if (ROOT / ".venv/bin/torchrun").exists() else "torchrun"
    proc = run_cli([torchrun, "--nproc_per_node=2", f"--master_port={_free_port()}", "train.py", *SMALL, "trainer.max_steps=4",
                    "deepspeed=zero2", f"hydra.run.dir={run_dir}"], env={"OMP_NUM_THREADS": "1"}, timeout=600)
    _ok(proc)
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["world_size"] == 2
    a, b = s["param_checksum_per_rank"]
    assert a == pytest.approx(b, rel=1e-9)  # replicas identical after 4 ZeRO-2 steps
    a, b = s["buffer_checksum_per_rank"]
    assert a == b  # buffers too (nothing but our own code syncs them)
    train = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert all(r["loss"] == r["loss"] for r in train)  # finite (not NaN)
