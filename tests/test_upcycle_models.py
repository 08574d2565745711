"""Upcycling trains on every supported dense architecture (Llama, Qwen2, Mistral, GPT-2, GPT-NeoX),
preserves the function of every supported family at noise 0, refuses an MLP with anything it does
not understand (BitNet's sub-norm), keeps the model's train/eval mode (issue #16), and a tokenizer
larger than the model's vocabulary grows the embedding (issue 6)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP

from conftest import tiny_causal_lm
from spectra.config import ModelConfig, load_config, validate
from spectra.moe import UnsupportedMLPError, load_base_model, moe_blocks, upcycle


@pytest.fixture(autouse=True)
def one_thread():
    """Toy models: a second intra-op thread only adds sync overhead, and on a busy 2-core host
    oversubscribed OpenMP threads made 10 ms steps take seconds. Restored afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def train_steps(model, steps: int = 15, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """AdamW on one fixed random batch (labels = inputs), aux losses included as the trainer
    adds them; returns the training loss (CE + aux) of every step."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (4, 16), generator=gen)  # [B, S]
    ctx = model.spectra_context
    ctx.recording = True
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        out = model(input_ids=x, labels=x)
        aux = ctx.aux_loss()
        loss = out.loss if aux is None else out.loss + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctx.step += 1
        losses.append(loss.item())
    model.eval()
    return losses


def assert_loss_decreases(losses: list[float], margin: float = 0.5) -> None:
    """The last loss is below the first by `margin` nats and every loss is finite."""
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - margin, f"loss did not decrease enough: {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gpt2", "gpt_neox"])
def test_upcycled_dense_models_train_with_decreasing_loss(model_type):
    model = tiny_causal_lm(model_type)
    cfg = validate(load_config(["moe.num_experts=4", "router.top_k=2", "moe.num_shared_experts=1"]))
    upcycle(model, cfg)
    blocks = moe_blocks(model)
    assert len(blocks) == 2 and model.config.spectra_moe["mode"] == "upcycle"
    router_before = [p.detach().clone() for b in blocks for p in b.router.parameters()]
    losses = train_steps(model)
    assert_loss_decreases(losses)
    # The routers are in the graph and learn (a router cut off from the loss would not move).
    router_after = [p.detach() for b in blocks for p in b.router.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(router_before, router_after))


def test_load_base_model_grows_embedding_for_a_larger_tokenizer(tmp_path):
    """A tokenizer with more tokens than the model's vocabulary (the paper's SmolVLM tokenizer on
    SmolLM2) must not index past the embedding: rows are added, the old ones are kept."""
    arch = dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    mc = ModelConfig(name="tiny_vocab", source="config", arch=arch, attn_implementation="sdpa")
    base = load_base_model(mc, vocab_size=97, cache_root=tmp_path)
    grown = load_base_model(mc, vocab_size=120, cache_root=tmp_path)
    assert base.get_input_embeddings().num_embeddings == 97
    assert grown.get_input_embeddings().num_embeddings == 120
    assert grown.get_output_embeddings().out_features == 120 and grown.config.vocab_size == 120
    torch.testing.assert_close(grown.get_input_embeddings().weight[:97], base.get_input_embeddings().weight[:97])
    with torch.no_grad():
        assert torch.isfinite(grown(torch.tensor([[3, 119, 100]])).logits).all()
    # A smaller tokenizer leaves the embedding alone.
    assert load_base_model(mc, vocab_size=50, cache_root=tmp_path).get_input_embeddings().num_embeddings == 97


# Dense families upcycling supports beyond the four above (config overrides for a tiny model).
MORE_FAMILIES = {
    "gpt_neox": {},
    "qwen3": {"head_dim": 8},
    "gemma": {"head_dim": 8},
    "phi": {},
    "olmo2": {},
    "stablelm": {},
    "falcon": {"new_decoder_architecture": True},
    "starcoder2": {},
}


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gpt2", *MORE_FAMILIES])
def test_every_supported_dense_family_is_function_preserving_at_noise_0(model_type):
    """Independent reference: the dense model itself. Identical experts whose weights sum to 1 and
    a shared expert mixed (1 - a) / a compute the dense MLP, so the logits must not move."""
    dense = tiny_causal_lm(model_type, **MORE_FAMILIES.get(model_type, {}))
    cfg = validate(load_config(["moe.upcycle_noise=0", "moe.num_experts=4", "router.top_k=2", "moe.num_shared_experts=1"]))
    moe = upcycle(copy.deepcopy(dense), cfg).eval()
    assert len(moe_blocks(moe)) == 2
    x = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=0, atol=1e-5)


def test_bitnet_mlp_with_its_sub_norm_is_refused_by_name():
    """BitNet's MLP normalises act(gate x) * up x with `ffn_sub_norm` before down_proj; experts
    built from gate/up/down alone would compute another function."""
    model = tiny_causal_lm("bitnet")
    before = [type(layer.mlp) for layer in model.model.layers]
    with pytest.raises(UnsupportedMLPError, match=r"model\.layers\.0\.mlp \(BitNetMLP\).*'ffn_sub_norm' \(BitNetRMSNorm\)"):
        upcycle(model, validate(load_config(["moe.num_experts=4"])))
    assert [type(layer.mlp) for layer in model.model.layers] == before  # nothing was changed


class _NormedMLP(LlamaMLP):
    """A Llama MLP with an extra weight-holding child between the activation and down_proj."""

    def __init__(self, config):
        super().__init__(config)
        self.inner_norm = torch.nn.LayerNorm(config.intermediate_size)

    def forward(self, x):
        return self.down_proj(self.inner_norm(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


class _GainMLP(LlamaMLP):
    """A Llama MLP holding a parameter of its own (an output gain)."""

    def __init__(self, config):
        super().__init__(config)
        self.gain = torch.nn.Parameter(torch.full((config.hidden_size,), 2.0))

    def forward(self, x):
        return super().forward(x) * self.gain


class _SwappedMLP(LlamaMLP):
    """The children of a Llama MLP, but the activation on up_proj instead of gate_proj."""

    def forward(self, x):
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))


class _ScaledLinear(torch.nn.Module):
    """A projection that is not an nn.Linear (a stand-in for a quantised layer)."""

    def __init__(self, linear):
        super().__init__()
        self.weight = linear.weight
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight) * self.scale


def _custom_projection(config):
    mlp = LlamaMLP(config)
    mlp.up_proj = _ScaledLinear(mlp.up_proj)
    return mlp


@pytest.mark.parametrize(
    "make, match",
    [
        (_NormedMLP, r"\(_NormedMLP\): unknown child 'inner_norm' \(LayerNorm\) holding \['weight', 'bias'\]"),
        (_GainMLP, r"\(_GainMLP\): the MLP itself holds \['gain'\]"),
        (_SwappedMLP, r"\(_SwappedMLP\): its forward does not compute the gated MLP"),
        (_custom_projection, r"\(LlamaMLP\): projection 'up_proj' is a _ScaledLinear holding \['scale'\]"),
    ],
)
def test_mlp_with_something_not_understood_is_refused_naming_it(make, match):
    model = tiny_causal_lm("llama")
    model.model.layers[1].mlp = make(model.config)
    kept = model.model.layers[0].mlp
    with pytest.raises(UnsupportedMLPError, match=r"model\.layers\.1\.mlp " + match):
        upcycle(model, validate(load_config(["moe.num_experts=4", "moe.first_k_dense_replace=0"])))
    assert model.model.layers[0].mlp is kept  # layer 0 was fine, yet nothing was replaced


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("training", [False, True])
def test_upcycle_keeps_the_model_mode_in_every_submodule(model_type, training):
    """New routers / blocks / experts start in training mode; a model in eval mode must stay
    fully in eval mode after upcycling (dropout, SPECTRA's training-only Sinkhorn and running
    statistics depend on it), and a training model fully in training mode."""
    model = tiny_causal_lm(model_type).train(training)
    upcycle(model, validate(load_config(["moe.num_experts=4", "router.top_k=2", "moe.num_shared_experts=1"])))
    assert moe_blocks(model)
    wrong = [name for name, m in model.named_modules() if m.training != training]
    assert not wrong, f"not in {'training' if training else 'eval'} mode: {wrong}"
