"""Padding is not a token (METHOD.md §2b): the pad block of packed rows changes nothing for the
real tokens -- routes, weights, Sinkhorn plan, quota capacity, Gram, aux and LM losses, and every
recorder / monitor metric -- through the real packing, collator and model forward.

Reference: the same documents packed into rows with no padding at all. The padded batch is the
same rows with a pad block appended, as `iter_packed` makes it (routing_mask 0, position_ids
0.., labels IGNORE_INDEX). Real tokens sit at the same places in both, and the per-document
attention mask (from position_ids) keeps them from seeing the pad block, so every number that
describes real tokens must agree.
"""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import pytest
import torch

from conftest import tiny_causal_lm
from spectra.config import MonitorConfig, load_config, validate
from spectra.data.collate import PackedCollator
from spectra.data.sft import IGNORE_INDEX, ROUTING_MASK, iter_packed
from spectra.metrics.monitor import RoutingMonitor, load_snapshot, snapshot_path
from spectra.metrics.recorder import RoutingRecorder
from spectra.moe import upcycle
from spectra.moe.context import ROUTING_MASK as CONTEXT_ROUTING_MASK
from spectra.train.callbacks import RoutingMonitorCallback

ROW_DOCS = [[5, 7], [3, 4, 5]]  # document lengths of each row: 12 real tokens per row
S = 12
PAD = 5  # the appended pad block
E = 4
ROUTERS = {
    # quota.capacity_factor=1: cap = ceil(N·k/E) binds; counting the pad block would raise it
    "spectra": ["router=spectra", "quota.capacity_factor=1.0", "router.entropy_coef=0.01", "router.srip_enabled=false"],
    "topk": ["router=topk", "router.entropy_coef=0.01"],
    "switch_top2": ["router=switch_top2", "router.capacity_factor=1.0", "router.z_loss_coef=0.001"],
    "expert_choice": ["router=expert_choice"],
    "hash": ["router=hash"],
}
ATOL = 1e-5


def _documents() -> list[list[dict]]:
    """Per row, its documents: random ids, labels = ids (IGNORE_INDEX on the first), domain = doc index % 3."""
    g = torch.Generator().manual_seed(0)
    rows, d = [], 0
    for lengths in ROW_DOCS:
        docs = []
        for n in lengths:
            ids = torch.randint(1, 97, (n,), generator=g).tolist()
            docs.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:], "domain_id": d % 3})
            d += 1
        rows.append(docs)
    return rows


def _rows(pad: int) -> list[dict]:
    """One packed row per document group, `pad` positions longer than its documents."""
    rows = []
    for docs in _documents():
        (row,) = iter_packed(docs, S + pad, pad_token_id=0)
        assert row[ROUTING_MASK] == [1] * S + [0] * pad
        rows.append(row)
    return rows


def _model(router: str):
    cfg = validate(load_config([f"moe.num_experts={E}", *ROUTERS[router]]))
    model = tiny_causal_lm("llama", seed=0)
    upcycle(model, cfg, seed=0)
    model.config.use_cache = False
    return model, cfg


def _forward(router: str, pad: int, training: bool):
    """A fresh model's forward on the collated rows: (LM loss, {layer: RoutingOutput}, batch)."""
    model, _ = _model(router)
    batch = PackedCollator()(_rows(pad))
    ctx = model.spectra_context
    model.train(training)
    ctx.recording = True
    torch.manual_seed(0)
    with torch.no_grad():
        loss = model(**batch).loss
    ctx.recording = False
    return loss, dict(ctx.outputs), batch


def _assert_close_dicts(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for k in want:
        g, w = torch.as_tensor(got[k]).double(), torch.as_tensor(want[k]).double()
        torch.testing.assert_close(g, w, atol=ATOL, rtol=1e-5, msg=lambda m, k=k: f"{what}[{k}]: {m}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("router", list(ROUTERS))
def test_pad_block_changes_nothing_for_real_tokens(router, training):
    loss_ref, ref, batch_ref = _forward(router, 0, training)
    loss_pad, out, batch_pad = _forward(router, PAD, training)
    assert ROUTING_MASK in batch_pad
    real = batch_pad[ROUTING_MASK].reshape(-1).bool()  # [N_pad]
    assert int(real.sum()) == batch_ref["input_ids"].numel() == len(ROW_DOCS) * S
    torch.testing.assert_close(loss_pad, loss_ref, atol=ATOL, rtol=1e-5)  # LM loss
    assert set(out) == set(ref) == {0, 1}
    for layer in ref:
        a, b = ref[layer], out[layer]
        assert torch.equal(b.expert_index[real], a.expert_index), "routes"
        assert torch.equal(b.dropped[real], a.dropped) and not b.dropped[~real].any()
        torch.testing.assert_close(b.expert_weight[real], a.expert_weight, atol=ATOL, rtol=1e-5)
        assert not b.expert_weight[~real].any(), "the pad block gets no routed output"
        torch.testing.assert_close(b.probs[real], a.probs, atol=ATOL, rtol=1e-5)  # Sinkhorn plan / softmax
        assert torch.equal(b.dispatch_counts, a.dispatch_counts), "dispatched load"
        for name in ("scores", "logits", "gram", "expert_repr", "load_before_quota"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), name
            if x is not None:
                y = y[real] if name in ("scores", "logits") else y
                torch.testing.assert_close(y, x, atol=ATOL, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        _assert_close_dicts(b.aux_losses, a.aux_losses, f"layer{layer} aux losses")
        _assert_close_dicts(b.diagnostics, a.diagnostics, f"layer{layer} diagnostics")
        assert torch.equal(b.valid, real), "the router must see the pad block as padding"
    if router == "spectra" and training:
        # quota capacity by hand over the 24 real tokens: ceil(1.0 · 24 · 2 / 4) = 12, not ceil(34·2/4) = 17
        assert float(out[0].diagnostics["quota_capacity"]) == 12.0
        assert float(out[0].dispatch_counts.max()) <= 12.0
    # the recorder: every key equal, computed from real tokens only
    rec_ref, rec_pad = RoutingRecorder(), RoutingRecorder()
    rec_ref.add(ref)
    rec_pad.add(out)
    _assert_close_dicts(rec_pad.report("train/"), rec_ref.report("train/"), "recorder")


def test_hook_strips_routing_mask_from_the_model_kwargs():
    model, _ = _model("spectra")
    seen = {}
    # registered after the routing hook, so it sees the kwargs the model's forward will get
    model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw) and None, with_kwargs=True)
    batch = PackedCollator()(_rows(PAD))
    with torch.no_grad():
        model(**batch)
    assert ROUTING_MASK not in seen and "input_ids" in seen
    assert ROUTING_MASK in batch  # the caller's batch is left as it was
    bad = {**batch, ROUTING_MASK: batch[ROUTING_MASK][:, :-1]}
    with pytest.raises(ValueError, match="routing_mask"):
        with torch.no_grad():
            model(**bad)
    assert ROUTING_MASK == CONTEXT_ROUTING_MASK  # the data's column is the key the hook pops


def test_collator_sends_routing_mask_only_when_asked():
    rows = _rows(PAD)
    batch = PackedCollator()(rows)
    assert batch[ROUTING_MASK].tolist() == [[1] * S + [0] * PAD] * 2
    assert ROUTING_MASK not in PackedCollator(include_routing_mask=False)(rows)  # a dense model's batches


# ---------------------------------------------------------------------------------- monitor


def _monitor_run(router: str, pad: int, tmp_path):
    model, _ = _model(router)
    rows = _rows(pad)
    mon = RoutingMonitor(model, rows, tmp_path, MonitorConfig(timing=False), PackedCollator(include_domain_ids=True),
                         num_domains=3, domain_names=("a", "b", "c"))
    state = SimpleNamespace(global_step=1, max_steps=1, is_world_process_zero=True)
    args = SimpleNamespace(bf16=False)
    RoutingMonitorCallback(mon).on_train_begin(args, state, None)
    logs = mon.evaluation_metrics(model, args, state)
    RoutingMonitorCallback(mon).on_step_end(args, state, None, model=model)  # step 1 of 1: a snapshot step
    return logs, load_snapshot(snapshot_path(tmp_path, 1))


@pytest.mark.parametrize("router", ["spectra", "switch_top2"])
def test_monitor_metrics_and_snapshot_ignore_the_pad_block(router, tmp_path):
    logs_ref, snap_ref = _monitor_run(router, 0, tmp_path / "ref")
    logs_pad, snap_pad = _monitor_run(router, PAD, tmp_path / "pad")
    assert logs_pad["monitor/num_tokens"] == len(ROW_DOCS) * S
    _assert_close_dicts(logs_pad, logs_ref, "monitor")
    real = snap_pad["valid"]
    assert int(real.sum()) == snap_ref["valid"].numel() == len(ROW_DOCS) * S
    for layer, want in snap_ref["layers"].items():
        got = snap_pad["layers"][layer]
        assert torch.equal(got["expert_index"][real], want["expert_index"])
        assert torch.equal(got["served"][real], want["served"]) and not got["served"][~real].any()
        for key in ("load", "load_before_quota", "load_after_quota"):
            assert (key in got) == (key in want) == (key != "load" and router == "spectra" or key == "load"), key
            if key in want:
                assert torch.equal(got[key], want[key]), key
    if router == "spectra":  # the quota pass over the 24 real tokens: cap = ceil(24·2/4) = 12 per expert
        for layer in snap_pad["layers"].values():
            assert layer["load_after_quota"].sum() == 48 and layer["load_after_quota"].max() <= 12


# ---------------------------------------------------------------------------------- the Trainer


def _trainer_run(pad: int, tmp_path):
    """One optimizer step and one evaluation of a SPECTRA (quota) model through MoETrainer."""
    from transformers import TrainingArguments

    from spectra.train.trainer import MoETrainer

    model, cfg = _model("spectra")
    data = datasets.Dataset.from_list(_rows(pad))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        logging_steps=1, report_to="none", use_cpu=True, remove_unused_columns=False, save_strategy="no",
        eval_strategy="no", seed=0, data_seed=0, disable_tqdm=True, lr_scheduler_type="constant",
    )
    trainer = MoETrainer(model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=PackedCollator(),
                         spectra_cfg=cfg, routing_context=model.spectra_context)
    trainer.train()
    train_log = next(r for r in trainer.state.log_history if "loss" in r)
    return train_log, trainer.evaluate()


def test_trainer_train_and_eval_records_ignore_the_pad_block(tmp_path):
    train_ref, eval_ref = _trainer_run(0, tmp_path / "ref")
    train_pad, eval_pad = _trainer_run(PAD, tmp_path / "pad")
    assert train_pad["train/layer0/quota_capacity"] == 12.0  # ceil(24 · 2 / 4): real tokens only
    routing = [k for k in train_ref if k.startswith("train/")]
    assert {"train/layer0/cv", "train/layer0/cv_before_quota", "train/layer0/dropped_token_rate"} <= set(routing)
    for k in ["loss", *routing]:
        assert train_pad[k] == pytest.approx(train_ref[k], rel=1e-5, abs=ATOL), k
    evals = [k for k in eval_ref if k.startswith("eval/") or k == "eval_loss"]
    assert "eval/layer0/cv" in evals and "eval_loss" in evals
    for k in evals:
        assert eval_pad[k] == pytest.approx(eval_ref[k], rel=1e-5, abs=ATOL), k
