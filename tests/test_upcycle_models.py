"""Upcycling trains on every supported dense architecture (Llama, Qwen2, Mistral, GPT-2), and a
tokenizer larger than the model's vocabulary grows the embedding (issue 6)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_causal_lm
from spectra.config import ModelConfig, load_config, validate
from spectra.moe import load_base_model, moe_blocks, upcycle


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


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gpt2"])
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
