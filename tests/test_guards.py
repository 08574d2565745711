"""Numerics guard: a non-finite loss term or gradient stops training with a message naming the
step and the term (router terms separately), leaves the last good checkpoint intact and records
the failure in summary.json; `trainer.max_bad_steps` skips a bounded number of such steps."""

from __future__ import annotations

import json
import math

import pytest
import torch

import faults
from conftest import run_cli
from spectra.contracts.rundir import read_jsonl
from spectra.train.guards import NonFiniteError, NumericsGuard

# ----------------------------------------------------------------------------- unit (fast)


def test_guard_passes_finite_steps_and_names_bad_terms():
    g = NumericsGuard()
    w = torch.zeros(3)
    g.term("ce", torch.tensor(2.0))
    g.term("layer0/ortho", torch.tensor(0.1))
    assert g.check(5, [("w", w)], "cpu") is None
    g.term("ce", torch.tensor(2.0))
    g.term("layer2/ortho", torch.tensor(float("inf")))
    msg = g.check(5, [("w", w)], "cpu")
    assert "step 5" in msg and "router loss terms layer2/ortho=inf" in msg and "CE loss" not in msg
    g.term("ce", torch.tensor(float("nan")))
    msg = g.check(7, [], "cpu")
    assert "step 7" in msg and "CE loss=nan" in msg and "router" not in msg


def test_guard_names_parameters_with_non_finite_gradients():
    g = NumericsGuard()
    g.term("ce", torch.tensor(1.0))
    grads = [("layers.0.mlp.w", torch.ones(4)), ("layers.1.router.gru.weight", torch.tensor([1.0, float("nan")]))]
    msg = g.check(3, grads, "cpu")
    assert "step 3" in msg and "layers.1.router.gru.weight" in msg and "layers.0.mlp.w" not in msg


@pytest.mark.parametrize("term", ["ce", "layer1/ortho"])
def test_poison_fault_hits_one_term_of_training_forwards_of_one_step(term):
    """The test fault (tests/faults) the slow tests below rely on: only `term`, only while
    training, only in optimizer step 4 (global_step 3 during its forwards), every micro-batch."""
    from types import SimpleNamespace

    from transformers import TrainerState

    class Model(torch.nn.Module):  # the two places the guard reads: the model's loss, the recorded aux losses
        def __init__(self):
            super().__init__()
            self.spectra_context = SimpleNamespace(outputs={})

        def forward(self, x):
            self.spectra_context.outputs = {i: SimpleNamespace(aux_losses={"ortho": x * i, "aux": x}) for i in (0, 1)}
            return {"loss": x}

    def terms(model):
        out = model(torch.tensor(2.0))
        named = {"ce": out["loss"]} | {f"layer{i}/{n}": v for i, o in model.spectra_context.outputs.items() for n, v in o.aux_losses.items()}
        return sorted(n for n, v in named.items() if math.isnan(float(v)))

    model, state = Model(), TrainerState()
    cb = faults.PoisonLoss(step=4, term=term)
    cb.on_train_begin(None, state, None, model=model)
    assert terms(model) == []  # step 1
    state.global_step = 3
    assert terms(model) == [term] and terms(model) == [term]  # step 4, two micro-batches
    model.eval()
    assert terms(model) == []  # evaluation forwards are left alone
    model.train()
    state.global_step = 4
    assert terms(model) == []  # step 5
    state.global_step = 3
    cb.on_train_end(None, state, None)
    assert terms(model) == []  # the hook is gone with the run


# ----------------------------------------------------------------------------- training (slow)

TINY = [
    "router=spectra",
    "moe.num_experts=4",
    "data.max_seq_length=64",
    "data.max_train_samples=40",
    "data.max_eval_samples=8",
    "trainer.per_device_train_batch_size=4",
    "trainer.per_device_eval_batch_size=8",
    "trainer.base_lr=1e-3",
    "trainer.expert_lr=1e-3",
    "trainer.router_lr=3e-3",
    "trainer.logging_steps=1",
    "trainer.eval_steps=100",
    "trainer.resume=auto",
    "monitor.enabled=false",
]


def _run_in_process(run_dir, overrides):
    from spectra.config import load_config
    from spectra.train.run import run

    return run(load_config([*TINY, *overrides, f"output_dir={run_dir}"]))


@pytest.mark.slow
def test_injected_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    from spectra.moe import load_moe_model
    from spectra.train.checkpoint import find_resumable_checkpoint

    run_dir = tmp_path / "nan"
    proc = run_cli(["train.py", *TINY, "trainer.max_steps=8", "trainer.save_steps=4", faults.poison(5),
                    f"hydra.run.dir={run_dir}"], env={**faults.ENV, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: non-finite values at step 5: CE loss=nan"), errors[0]
    assert "Traceback" not in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "step 5" in summary["error"] and "NonFiniteError" in summary["error"]
    # nothing after the bad step was saved or logged; checkpoint-4 is complete and loads
    assert find_resumable_checkpoint(run_dir / "checkpoints") == str(run_dir / "checkpoints" / "checkpoint-4")
    assert [p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")] == ["checkpoint-4"]
    assert max(r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")) == 4
    model = load_moe_model(run_dir / "checkpoints" / "checkpoint-4")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert torch.isfinite(logits).all()
    assert int(model.model.layers[0].mlp.router.srip_step) == 4  # SRIP step saved with the weights


@pytest.mark.slow
def test_non_finite_router_term_is_named_separately(tmp_path):
    with pytest.raises(NonFiniteError) as info:
        _run_in_process(tmp_path / "r", ["trainer.max_steps=4", "trainer.save_steps=100", faults.poison(3, "layer1/ortho")])
    msg = str(info.value)
    assert "step 3" in msg and "router loss terms layer1/ortho=nan" in msg and "CE loss" not in msg
    assert "no checkpoint was saved" in msg
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_max_bad_steps_skips_the_step_without_touching_weights(tmp_path):
    from safetensors.torch import load_file

    run_dir = tmp_path / "skip"
    _run_in_process(run_dir, ["trainer.max_steps=4", "trainer.save_steps=1", "trainer.save_total_limit=10",
                              "trainer.max_bad_steps=1", faults.poison(3)])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4
    train = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}
    assert "skipped_steps" not in train[2] and train[3]["skipped_steps"] == 1 and train[4]["skipped_steps"] == 1
    assert math.isfinite(train[4]["loss"]) and train[3]["grad_norm"] is None  # NaN -> null in JSON
    ck = {s: load_file(str(run_dir / "checkpoints" / f"checkpoint-{s}" / "model.safetensors")) for s in (2, 3, 4)}
    assert all(torch.equal(ck[2][k], ck[3][k]) for k in ck[2] if "srip_step" not in k)  # step 3: no update
    assert any(not torch.equal(ck[3][k], ck[4][k]) for k in ck[3])  # step 4 trained normally
    opt = {s: torch.load(run_dir / "checkpoints" / f"checkpoint-{s}" / "optimizer.pt", weights_only=True) for s in (2, 3)}
    assert all(torch.equal(opt[2]["state"][i]["exp_avg"], opt[3]["state"][i]["exp_avg"]) for i in opt[2]["state"])
    state = json.loads((run_dir / "checkpoints" / "checkpoint-4" / "spectra_state.json").read_text())
    assert state["bad_steps"] == 1  # the budget survives a resume
