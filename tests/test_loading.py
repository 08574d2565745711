"""Saving and loading upcycled models, and the model weights of a resume (issue #16): the keys go
through transformers' loader (GPT-NeoX saves its `lm_head` as `embed_out`), and a missing or
unexpected key fails, naming it, instead of leaving an untrained weight in place."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_causal_lm
from spectra.config import load_config, validate
from spectra.moe import load_moe_model, save_moe_model, upcycle
from spectra.moe.loading import WeightsMismatchError
from test_upcycle_models import one_thread  # noqa: F401 (fixture)

# model type, config overrides, the LM head's key in the saved file (None: tied, not saved)
FAMILIES = {
    # save_moe_model keeps the module's name: transformers would rename it `embed_out` (as a Trainer
    # checkpoint has it) and back on load, but not for the saved modeling code (tests/test_hf_native.py)
    "gpt_neox": ("gpt_neox", {}, "lm_head.weight"),
    "llama": ("llama", {}, "lm_head.weight"),
    "qwen2": ("qwen2", {}, "lm_head.weight"),
    "gpt2": ("gpt2", {}, None),  # GPT-2 ties its head to wte by default
    "llama_tied": ("llama", {"tie_word_embeddings": True}, None),
}


def _cfg(*overrides):
    return validate(load_config(list(overrides)))


def upcycled(family: str, seed: int = 0):
    """A tiny upcycled model (E=4, k=2, one frozen shared expert) whose every weight is then
    perturbed, so experts, routers, embedding and LM head all differ from any fresh build: a
    weight that is not loaded shows in the logits."""
    model_type, overrides, _ = FAMILIES[family]
    model = tiny_causal_lm(model_type, seed=seed, **overrides)
    upcycle(model, _cfg("router=topk", "router.top_k=2", "moe.num_experts=4", "moe.num_shared_experts=1"), seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * (p.std() if p.numel() > 1 else 1.0) * torch.randn(p.shape, generator=gen))
    return model.eval()


def _logits(model, seed: int = 1) -> torch.Tensor:
    x = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_load_gives_bit_equal_logits_and_weights(tmp_path, family):
    model = upcycled(family)
    save_moe_model(model, tmp_path / "m")
    saved = set(load_file(str(tmp_path / "m" / "model.safetensors")))
    head_key = FAMILIES[family][2]
    assert (head_key in saved) if head_key else not any(k.endswith("lm_head.weight") for k in saved)

    again = load_moe_model(tmp_path / "m")
    assert torch.equal(_logits(again), _logits(model))
    want = model.state_dict()
    got = again.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # Tied stays tied (one tensor), untied stays two tensors; frozen stays frozen.
    tied = again.get_output_embeddings().weight is again.get_input_embeddings().weight
    assert tied == (head_key is None)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and frozen == {n for n, p in again.named_parameters() if not p.requires_grad}


def _rewrite(path, drop: str | None = None, add: dict | None = None) -> None:
    """Rewrite a saved model's safetensors without `drop` and/or with extra tensors."""
    f = str(path / "model.safetensors")
    state = load_file(f)
    if drop is not None:
        del state[drop]
    state.update(add or {})
    save_file(state, f, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "family, key",
    [
        ("gpt_neox", "lm_head.weight"),  # the untied head
        ("llama", "lm_head.weight"),  # an untied head is not "tied, so allowed to be missing"
        ("llama", "model.layers.1.mlp.experts.down_proj"),
        ("qwen2", "model.layers.0.mlp.router.gate.weight"),
    ],
)
def test_load_with_a_missing_weight_fails_naming_it(tmp_path, family, key):
    model = upcycled(family)
    save_moe_model(model, tmp_path / "m")
    _rewrite(tmp_path / "m", drop=key)
    model_key = "lm_head.weight" if key == "embed_out.weight" else key  # the model's name for it
    with pytest.raises(WeightsMismatchError, match=rf"missing \[.*'{model_key}'"):
        load_moe_model(tmp_path / "m")


def test_load_with_an_unexpected_weight_fails_naming_it(tmp_path):
    model = upcycled("llama")
    save_moe_model(model, tmp_path / "m")
    _rewrite(tmp_path / "m", add={"model.layers.0.mlp.extra.weight": torch.zeros(3)})
    with pytest.raises(WeightsMismatchError, match=r"unexpected \[.*'model\.layers\.0\.mlp\.extra\.weight'"):
        load_moe_model(tmp_path / "m")


def test_a_tied_head_saved_with_its_own_values_fails(tmp_path):
    """A tied model's file holding the LM head as a second, different tensor cannot be loaded
    into one shared tensor: refused, naming both."""
    model = upcycled("llama_tied")
    save_moe_model(model, tmp_path / "m")
    embed = load_file(str(tmp_path / "m" / "model.safetensors"))["model.embed_tokens.weight"]
    _rewrite(tmp_path / "m", add={"lm_head.weight": embed + 1.0})
    with pytest.raises(WeightsMismatchError, match=r"tied \S*embed_tokens\.weight and lm_head\.weight differ"):
        load_moe_model(tmp_path / "m")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "olmoe", "mixtral", "qwen2_moe"])
def test_router_replaced_models_save_load_bit_equal(tmp_path, model_type):
    """Models whose gates were replaced keep transformers' experts; their keys must come back
    through transformers' conversion mapping (which has legacy per-expert layouts for these
    families) unchanged, the Qwen2-MoE shared expert and its gate included."""
    from test_router_replacement import tiny_moe

    model = tiny_moe(model_type)
    upcycle(model, _cfg("router=topk", "router.top_k=2"), seed=2)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=gen))
    model.eval()
    save_moe_model(model, tmp_path / "m")
    again = load_moe_model(tmp_path / "m")
    assert torch.equal(_logits(again), _logits(model))
    want, got = model.state_dict(), again.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _trainer(model, out):
    from transformers import TrainingArguments

    from spectra.train.trainer import MoETrainer

    args = TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True)
    return MoETrainer(model=model, args=args, spectra_cfg=None, routing_context=model.spectra_context)


@pytest.mark.parametrize("family", ["gpt_neox", "llama_tied"])
def test_resume_loads_every_trained_weight_the_lm_head_included(tmp_path, family):
    """The Trainer's checkpoint (its own save) loaded back into a freshly built model of another
    seed, as a resume does: the logits are the trained model's, so the LM head came back too."""
    trained = upcycled(family, seed=0)
    _trainer(trained, tmp_path / "a")._save(str(tmp_path / "ckpt"))
    fresh = upcycled(family, seed=1)
    assert not torch.equal(_logits(fresh), _logits(trained))
    head = fresh.get_output_embeddings().weight
    _trainer(fresh, tmp_path / "b")._load_from_checkpoint(str(tmp_path / "ckpt"))
    assert torch.equal(_logits(fresh), _logits(trained))
    assert fresh.get_output_embeddings().weight is head  # loaded in place: optimizer-safe, still tied or not


def test_resume_with_a_missing_weight_fails_naming_it(tmp_path):
    trained = upcycled("gpt_neox")
    _trainer(trained, tmp_path / "a")._save(str(tmp_path / "ckpt"))
    _rewrite(tmp_path / "ckpt", drop="embed_out.weight")
    with pytest.raises(WeightsMismatchError, match=r"missing \['lm_head\.weight'\]"):
        _trainer(upcycled("gpt_neox", seed=1), tmp_path / "b")._load_from_checkpoint(str(tmp_path / "ckpt"))
