"""Bad input fails before any model or data is loaded, with a message naming the key, and never
with a traceback from inside torch/transformers.

Three layers, each tested here: Hydra composition (unknown keys, wrong types), `validate`
(ranges, cross-field rules), `preflight` (files, the model's config, hardware); and `train.py`
turns the latter two into one line `error: ...` with exit code 2.
"""

from __future__ import annotations

import json
import traceback

import pytest
from hydra.errors import ConfigCompositionException

from conftest import ROOT, run_cli
from spectra.config import ConfigError, load_config, validate

# Refused by Hydra's composition against the schemas (overrides, the key the message must name)
COMPOSITION = [
    # wrong type
    (["router.top_k=abc"], "router.top_k"),
    (["trainer.eval_steps=often"], "trainer.eval_steps"),
    (["trainer.bf16=maybe"], "trainer.bf16"),
    (["osr.epsilon=[1,2]"], "osr.epsilon"),
    # unknown key
    (["router.unknown_knob=1"], "router.unknown_knob"),
]

# Refused by `validate` with a ConfigError whose message starts with the key
INVALID = [
    # unknown key added with +
    (["+moe.experts=4"], "moe.experts"),
    (["+trainer.learning_rate=1e-3"], "trainer.learning_rate"),
    # out of range
    (["moe.num_experts=0"], "moe.num_experts"),
    (["moe.num_shared_experts=2"], "moe.num_shared_experts"),
    (["moe.shared_expert_weight=1.0"], "moe.shared_expert_weight"),
    (["moe.upcycle_noise=-1"], "moe.upcycle_noise"),
    (["router.name=nonsense"], "router.name"),
    (["router.gram_ema_decay=1.0"], "router.gram_ema_decay"),
    (["router.capacity_factor=0"], "router.capacity_factor"),
    (["osr.epsilon=0"], "osr.epsilon"),
    (["osr.epsilon=-0.1"], "osr.epsilon"),
    (["osr.iterations=0"], "osr.iterations"),
    (["osr.hinge_threshold=1.5"], "osr.hinge_threshold"),
    (["quota.capacity_factor=0.8"], "quota.capacity_factor"),  # quota capacity < 1 token per slot
    (["data.max_seq_length=4"], "data.max_seq_length"),
    (["data.max_train_samples=0"], "data.max_train_samples"),
    (["data.num_proc=0"], "data.num_proc"),
    (["data.name=wikipedia"], "data.name"),
    (["model.attn_implementation=fast"], "model.attn_implementation"),
    (["model.dtype=int8"], "model.dtype"),
    (["trainer.max_steps=0"], "trainer.max_steps"),
    (["trainer.per_device_train_batch_size=0"], "trainer.per_device_train_batch_size"),
    (["trainer.base_lr=-0.001"], "trainer.base_lr"),
    (["trainer.warmup_ratio=1.5"], "trainer.warmup_ratio"),
    (["trainer.max_grad_norm=0"], "trainer.max_grad_norm"),
    (["trainer.save_total_limit=0"], "trainer.save_total_limit"),
    (["trainer.weight_decay=-0.1"], "trainer.weight_decay"),
    (["trainer.lr_scheduler=nonsense"], "trainer.lr_scheduler"),
    (["trainer.max_bad_steps=-1"], "trainer.max_bad_steps"),
    (["trainer.dataloader_num_workers=-1"], "trainer.dataloader_num_workers"),
    (["deepspeed.stage=4"], "deepspeed.stage"),
    (["seed=-1"], "seed"),
    (["objectives=[loss]"], "objectives"),
    # conflicting pair
    (["router.top_k=9"], "router.top_k"),  # k > E (E = 8)
    (["moe.num_experts=4", "router.top_k=5"], "router.top_k"),
    (["moe.num_experts=1"], "moe.num_experts"),  # an MoE router needs >= 2 experts
    (["router=switch_top1", "router.top_k=2"], "router.top_k"),
    (["router=switch_top2", "router.top_k=1"], "router.top_k"),
    (["deepspeed.offload_param=true"], "deepspeed.offload_param"),  # needs stage 3
    (["deepspeed=zero2", "trainer.max_bad_steps=2"], "trainer.max_bad_steps"),  # DeepSpeed steps inside backward
    (["model.source=pretrained"], "model.pretrained"),  # ... without a path
    # not an import path
    (["trainer.callbacks=[not_a_path]"], "trainer.callbacks[0]"),
    (["trainer.callbacks=[{patience:3}]"], "trainer.callbacks[0]"),  # no _target_
]

_FOREIGN = ("/torch/", "/transformers/", "/deepspeed/", "/datasets/")


def _assert_clean(err: BaseException, key: str, overrides):
    text = f"{err} {err.__cause__ or ''}"
    assert key in text, f"{overrides}: message does not name {key!r}: {text}"
    shown = [err, err.__cause__, None if err.__suppress_context__ else err.__context__]  # what a traceback prints
    frames = [f.filename for e in shown if e is not None for f in traceback.extract_tb(e.__traceback__)]
    assert not [f for f in frames if any(s in f for s in _FOREIGN)], f"{overrides}: raised inside a library: {frames}"


CASES = [(o, k, ConfigCompositionException) for o, k in COMPOSITION] + [(o, k, ConfigError) for o, k in INVALID]


@pytest.mark.parametrize("overrides, key, kind", CASES, ids=[" ".join(o) for o, _, _ in CASES])
def test_invalid_override_fails_before_model_construction(overrides, key, kind, monkeypatch):
    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was constructed for an invalid config")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", forbidden)
    with pytest.raises(kind) as info:  # this type, not any Exception: an unrelated crash naming the key fails
        validate(load_config(overrides))
    _assert_clean(info.value, key, overrides)
    if kind is ConfigError:
        assert str(info.value).startswith(f"{key}: "), info.value


# Checks that need files, the model's config.json or the hardware (guards.preflight).
PREFLIGHT = [
    (["data.path=/nonexistent/corpus.jsonl.gz"], "data.path", FileNotFoundError),
    (["data.tokenizer=/nonexistent/tokenizer"], "data.tokenizer", FileNotFoundError),
    (["model.source=pretrained", "model.pretrained=/nonexistent/model"], "model.pretrained", FileNotFoundError),
    (["model.arch.model_type=nonsense"], "model.arch.model_type", ConfigError),
    (["model.arch.hidden_size=-3"], "model.arch", ConfigError),
    (["data.max_seq_length=2048"], "data.max_seq_length", ConfigError),  # > max_position_embeddings (1024)
    (["trainer.resume=/nonexistent/checkpoint-4"], "trainer.resume", FileNotFoundError),
    (["trainer.callbacks=[nonexistent_pkg.Callback]"], "trainer.callbacks[0]", ConfigError),
    (["trainer.callbacks=[transformers.PreTrainedModel]"], "trainer.callbacks[0]", ConfigError),  # no TrainerCallback
    (["trainer.callbacks=[transformers.PrinterCallback,{_target_:transformers.EarlyStoppingCallback,patience:3}]"],
     "trainer.callbacks[1]", ConfigError),  # no such argument (it is early_stopping_patience)
]


@pytest.mark.parametrize("overrides, key, kind", PREFLIGHT, ids=[" ".join(o) for o, _, _ in PREFLIGHT])
def test_preflight_names_the_key(overrides, key, kind):
    from spectra.train.guards import preflight

    cfg = validate(load_config(overrides))  # valid as a config ...
    with pytest.raises(kind) as info:  # ... but not on this machine / with these files
        preflight(cfg)
    assert type(info.value) is kind, info.value  # a FileNotFoundError is no ConfigError, nor the reverse
    _assert_clean(info.value, key, overrides)


def test_preflight_refuses_deepspeed_bf16_without_cuda():
    import torch

    from spectra.train.guards import preflight

    if torch.cuda.is_available():
        pytest.skip("the rule applies to CPU-only machines")
    with pytest.raises(ConfigError, match=r"^trainer\.bf16: "):
        preflight(validate(load_config(["deepspeed=zero2", "trainer.bf16=true"])))


def test_preflight_refuses_an_incomplete_resume_checkpoint(tmp_path):
    from spectra.train.guards import preflight

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "COMPLETE").write_text("{}")
    with pytest.raises(ConfigError, match=r"^trainer\.resume: .* is not a complete checkpoint"):
        preflight(validate(load_config([f"trainer.resume={ckpt}"])))


SHIPPED = [[]] + [[f"{group}={p.stem}"] for group in ("router", "model", "experiment", "ablation")
                  for p in sorted((ROOT / "conf" / group).glob("*.yaml"))]


@pytest.mark.parametrize("overrides", SHIPPED, ids=[" ".join(o) or "defaults" for o in SHIPPED])
def test_preflight_passes_every_shipped_config_and_refuses_it_one_key_off(overrides):
    """preflight returns normally for each shipped config that runs offline, and the same call
    refuses that config with one key changed: a sequence one token longer than the model's
    positions (as its config group states them)."""
    from spectra.train.guards import preflight

    cfg = validate(load_config(overrides))
    if cfg.model.source == "pretrained" or cfg.data.name != "bundled":
        pytest.skip("needs the hub (model or data by hub id)")
    assert preflight(cfg) is None
    limit = cfg.model.arch["max_position_embeddings"]
    too_long = validate(load_config([*overrides, f"data.max_seq_length={limit + 1}"]))
    with pytest.raises(ConfigError, match=rf"^data\.max_seq_length: {limit + 1} exceeds the model's max_position_embeddings={limit}$"):
        preflight(too_long)
    fits = validate(load_config([*overrides, f"data.max_seq_length={limit}"]))
    assert preflight(fits) is None  # the boundary itself is allowed


def test_trainer_callbacks_are_built_from_import_paths_and_arguments():
    """`trainer.callbacks` (checked by preflight, built by MoETrainer): a bare path is constructed
    without arguments, a `_target_` mapping with its other keys as keyword arguments."""
    from transformers import EarlyStoppingCallback, PrinterCallback

    from spectra.train.guards import preflight
    from spectra.train.trainer import user_callbacks

    cfg = validate(load_config(["trainer.callbacks=[transformers.PrinterCallback,"
                                "{_target_:transformers.EarlyStoppingCallback,early_stopping_patience:3}]"]))
    assert preflight(cfg) is None
    printer, stopper = user_callbacks(cfg.trainer.callbacks)
    assert type(printer) is PrinterCallback and type(stopper) is EarlyStoppingCallback
    assert stopper.early_stopping_patience == 3 and stopper.early_stopping_threshold == 0.0  # the class default
    assert user_callbacks(validate(load_config([])).trainer.callbacks) == []


# ----------------------------------------------------------------------------- train.py (slow)

CLI = [
    (["data.path=/nonexistent.jsonl.gz"], "data.path"),
    (["data.tokenizer=/nonexistent"], "data.tokenizer"),
    (["data.tokenizer={empty_dir}"], "tokenizer"),  # exists but is no tokenizer: unreadable
    (["model.source=pretrained", "model.pretrained=/nonexistent"], "model.pretrained"),
    (["model.arch.model_type=nonsense"], "model.arch.model_type"),
    (["moe.num_experts=4", "router.top_k=5"], "router.top_k"),
    (["trainer.callbacks=[nonexistent_pkg.Callback]"], "trainer.callbacks[0]"),
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides, key", CLI, ids=[" ".join(o) for o, _ in CLI])
def test_train_py_prints_one_clear_line(tmp_path, overrides, key):
    (tmp_path / "empty").mkdir()
    overrides = [o.format(empty_dir=tmp_path / "empty") for o in overrides]
    run_dir = tmp_path / "run"
    proc = run_cli(["train.py", *overrides, f"hydra.run.dir={run_dir}"], timeout=300)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and key in errors[0], proc.stderr[-3000:]
    assert not (run_dir / "checkpoints").exists()  # nothing was trained
    if (run_dir / "summary.json").exists():  # preflight/data errors: the failure is recorded
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "failed" and key in summary["error"]


@pytest.mark.slow
def test_train_py_unknown_key_is_rejected_by_composition_without_traceback(tmp_path):
    proc = run_cli(["train.py", "router.unknown_knob=1", f"hydra.run.dir={tmp_path / 'run'}"], timeout=300)
    assert proc.returncode != 0 and "router.unknown_knob" in proc.stderr and "Traceback" not in proc.stderr
