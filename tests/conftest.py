"""Shared test setup: offline, quiet, a session-wide model cache, tiny models from configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub names in tests are only composed, never fetched
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session", autouse=True)
def _spectra_cache(tmp_path_factory):
    """Models built from configs are cached per test session, not in the user's home."""
    path = tmp_path_factory.mktemp("spectra-cache")
    os.environ["SPECTRA_CACHE"] = str(path)
    yield path


def tiny_causal_lm(model_type: str = "llama", seed: int = 0, **overrides):
    """A small randomly initialised causal LM built from a transformers config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
    if model_type == "gpt2":
        arch = dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    arch.update(overrides)
    config = AutoConfig.for_model(model_type, **arch)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def run_cli(args: list[str], cwd: Path = ROOT, timeout: int = 900, env: dict | None = None):
    """Run a command (e.g. train.py) in a subprocess with the test environment; returns CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args] if args[0].endswith(".py") or args[0] == "-m" else args,
                          cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


# Any training config shrunk to seconds per run (a 2-layer model, 4 steps, 64-token rows).
TINY_TRAIN = [
    "trainer.max_steps=4",
    "trainer.eval_steps=2",
    "trainer.logging_steps=1",
    "trainer.save_steps=4",
    "trainer.per_device_train_batch_size=2",
    "trainer.per_device_eval_batch_size=4",
    "data.max_seq_length=64",
    "data.max_train_samples=64",
    "data.max_eval_samples=8",
    "moe.num_experts=4",
    "model.arch.num_hidden_layers=2",
]


def assert_ok(proc) -> None:
    """A subprocess exited 0; otherwise fail with the ends of its output."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
