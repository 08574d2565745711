"""Per-domain eval loss (`eval_loss_<domain>`): MoETrainer's numbers against a plain per-row
reference loop, their token-weighted mean against eval_loss, dense and MoE models, eval data
without domain ids, and the model's forward never receiving `domain_ids`."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainingArguments

from conftest import tiny_causal_lm
from spectra.config import DataConfig, load_config, validate
from spectra.data import IGNORE_INDEX, PackedCollator, build_datasets, get_domain_names, load_tokenizer
from spectra.moe import upcycle
from spectra.train.trainer import MoETrainer

MOE_OVERRIDES = ["router=topk", "moe.num_experts=4", "router.top_k=2"]


@pytest.fixture(scope="module")
def data():
    """Tokenizer and 12 packed eval rows of 64 tokens holding all five bundled domains."""
    tok = load_tokenizer("bundled")
    _, evals = build_datasets(DataConfig(max_seq_length=64, max_train_samples=8, max_eval_samples=12), tok, seed=0)
    assert set(get_domain_names(evals)) == {"code", "docs", "math", "quotes", "dictionary"}
    return tok, evals


def _refuse_domain_ids(model):
    """A forward pre-hook that fails the test if the model is ever called with `domain_ids`."""
    def hook(module, args, kwargs):
        if "domain_ids" in kwargs:
            raise TypeError("forward() got an unexpected keyword argument 'domain_ids'")

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return model


def _model(kind: str, vocab: int):
    """A tiny Llama, dense or upcycled to a 4-expert top-2 MoE, that refuses `domain_ids`."""
    model = tiny_causal_lm("llama", seed=0, vocab_size=vocab, max_position_embeddings=64)
    cfg = None
    if kind == "moe":
        cfg = validate(load_config(MOE_OVERRIDES))
        upcycle(model, cfg, seed=0)
    model.config.use_cache = False  # packed rows: per-document masks come from position_ids only without a cache
    return _refuse_domain_ids(model.eval()), cfg


def _trainer(model, cfg, evals, tmp_path, batch: int, domains=True, **args):
    moe = getattr(model, "spectra_context", None) is not None
    return MoETrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=False,
                               per_device_eval_batch_size=batch, per_device_train_batch_size=batch, **args),
        train_dataset=evals,
        eval_dataset=evals,
        data_collator=PackedCollator(include_domain_ids=domains, include_routing_mask=moe),
        spectra_cfg=cfg,
        routing_context=getattr(model, "spectra_context", None),
        domain_names=get_domain_names(evals),
    )


@torch.no_grad()
def _reference(model, evals) -> tuple[dict[str, float], dict[str, int]]:
    """Per-domain mean CE by hand: one row at a time, logits[t] scored against labels[t + 1],
    the loss going to domain_ids[t + 1]."""
    names = get_domain_names(evals)
    sums, counts = [0.0] * len(names), [0] * len(names)
    moe = getattr(model, "spectra_context", None) is not None
    for row in evals:
        extra = {"routing_mask": torch.tensor([row["routing_mask"]])} if moe else {}
        logits = model(input_ids=torch.tensor([row["input_ids"]]), position_ids=torch.tensor([row["position_ids"]]),
                       **extra).logits[0].double()  # [S, V]
        logp = torch.log_softmax(logits, dim=-1)
        for t in range(len(row["input_ids"]) - 1):
            label, dom = row["labels"][t + 1], row["domain_ids"][t + 1]
            if label != IGNORE_INDEX and dom >= 0:
                sums[dom] -= logp[t, label].item()
                counts[dom] += 1
    return {n: s / c for n, s, c in zip(names, sums, counts) if c}, dict(zip(names, counts))


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_per_domain_eval_loss_matches_reference(data, tmp_path, kind):
    """Several eval batches (token sums across the loop, not batch means) against the reference;
    one batch: the token-weighted mean of the per-domain losses is eval_loss."""
    tok, evals = data
    model, cfg = _model(kind, len(tok))
    want, counts = _reference(model, evals)
    assert len(want) == 5

    metrics = _trainer(model, cfg, evals, tmp_path, batch=5).evaluate()  # batches of 5, 5, 2 rows
    got = {k.removeprefix("eval_loss_"): v for k, v in metrics.items() if k.startswith("eval_loss_")}
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-5), name

    one = _trainer(model, cfg, evals, tmp_path, batch=len(evals)).evaluate()  # the whole set in one batch
    weighted = sum(one[f"eval_loss_{n}"] * c for n, c in counts.items()) / sum(counts.values())
    assert weighted == pytest.approx(one["eval_loss"], abs=1e-5)
    assert all(math.isfinite(v) for v in got.values())


def test_eval_data_without_domain_ids_logs_no_domain_keys(data, tmp_path):
    """No per-domain keys, neither when the collator drops domain_ids nor when the rows lack them."""
    tok, evals = data
    model, cfg = _model("moe", len(tok))
    dropped = _trainer(model, cfg, evals, tmp_path, batch=6, domains=False).evaluate()
    no_column = evals.remove_columns("domain_ids")
    bare = MoETrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                                          remove_unused_columns=False, per_device_eval_batch_size=6),
                      eval_dataset=no_column, data_collator=PackedCollator(), spectra_cfg=cfg,
                      routing_context=model.spectra_context).evaluate()
    for metrics in (dropped, bare):
        assert "eval_loss" in metrics
        assert not [k for k in metrics if k.startswith("eval_loss_")]


def test_training_batches_with_domain_ids_never_reach_the_forward(data, tmp_path):
    """Training (one collator for train and eval) pops domain_ids too: the refusing model trains."""
    tok, evals = data
    model, cfg = _model("moe", len(tok))
    trainer = _trainer(model, cfg, evals, tmp_path, batch=4, max_steps=2, eval_strategy="steps", eval_steps=2,
                       save_strategy="no", logging_steps=1)
    trainer.train()
    evals_logged = [r for r in trainer.state.log_history if "eval_loss" in r]
    assert evals_logged and {f"eval_loss_{n}" for n in get_domain_names(evals)} <= evals_logged[-1].keys()


def test_domain_loss_sums_attribute_to_the_target_token():
    """Synthetic batch where domains change mid-document: each token's CE goes to the domain of
    the label it predicts (position t + 1), ignored labels and domain -1 excluded."""
    from spectra.train.trainer import domain_loss_sums

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=gen, dtype=torch.bfloat16)  # [B, S, V]; upcast inside
    labels = torch.randint(0, 11, (2, 7), generator=gen)  # [B, S]
    labels[0, 3] = IGNORE_INDEX
    domains = torch.tensor([[0, 1, 2, 0, 1, 2, -1], [2, 2, 1, 1, 0, -1, -1]])  # [B, S]
    sums, counts = domain_loss_sums(logits, labels, domains, num_domains=3)
    want_s, want_c = [0.0] * 3, [0] * 3
    for b in range(2):
        for t in range(6):
            label, dom = labels[b, t + 1].item(), domains[b, t + 1].item()
            if label != IGNORE_INDEX and dom >= 0:
                want_s[dom] -= torch.log_softmax(logits[b, t].double(), -1)[label].item()
                want_c[dom] += 1
    assert counts.tolist() == want_c
    assert sums.tolist() == pytest.approx(want_s, abs=1e-5)
