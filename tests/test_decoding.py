"""Decoding is the full forward, whatever calls it (METHOD.md §2b "Decoding").

Every test here routes an upcycled model whose experts and routers were pushed far apart (noise
as large as the weights themselves), so a wrong route changes the argmax; a sensitivity test
proves that for the GRU state. The references are independent of the cache: the logits of one
full forward over the final sequence, and `generate(use_cache=False)`, which recomputes the
whole sequence at every step.

The KV cache reaches the model as `cache=` (transformers >= 5.24, what `generate` passes there)
or `past_key_values=` (<= 5.23, still accepted by 5.24 with a deprecation warning): the manual
loops below use both keywords, so the suite checks both on whichever release is installed.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_causal_lm
from spectra.config import load_config, validate
from spectra.moe import load_moe_model, save_moe_model, upcycle

RECURRENCES = ["token_and_depth", "depth", "none"]
VOCAB = 97


def _distinct_moe(*overrides, seed: int = 0):
    """An upcycled tiny Llama (4 experts, k=2) whose experts and routers differ clearly.

    Upcycled experts are near-copies of one MLP (1 % noise), so any route gives almost the same
    logits and a decoding bug could hide. Adding noise of the parameters' own std makes every
    expert a different function. One training forward first gives SPECTRA's running Gram (used
    at inference) a value.
    """
    cfg = validate(load_config(["moe.num_experts=4", "router.top_k=2", *overrides]))
    moe = upcycle(tiny_causal_lm("llama", seed=seed), cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if ".experts." in name or ".router." in name:
                p.add_(torch.randn(p.shape, generator=gen) * p.std())
    moe.train()
    moe(torch.randint(0, VOCAB, (2, 16), generator=gen))
    return moe.eval()


def _full_forward_step_logits(model, sequences: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits that chose each generated token, from ONE forward over the final sequences.

    sequences [B, P + T] -> [T, B, V]: position P-1+t predicts generated token t.
    """
    with torch.no_grad():
        logits = model(sequences, use_cache=False).logits  # [B, P + T, V]
    return logits[:, prompt_len - 1 : -1].transpose(0, 1)


def _greedy(model, prompt, **kw):
    return model.generate(prompt, max_new_tokens=10, do_sample=False, return_dict_in_generate=True,
                          output_logits=True, pad_token_id=0, **kw)


@pytest.mark.parametrize("recurrence", RECURRENCES)
def test_cached_greedy_generate_is_the_full_forward(recurrence):
    moe = _distinct_moe("router=spectra", f"router.recurrence={recurrence}")
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    cached = _greedy(moe, prompt, use_cache=True)
    recomputed = _greedy(moe, prompt, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    full = _full_forward_step_logits(moe, cached.sequences, prompt.shape[1])  # [T, B, V]
    step = torch.stack(cached.logits)  # [T, B, V] logits the cached decode chose from
    torch.testing.assert_close(step, full, rtol=0, atol=1e-5)


def test_the_gru_state_decides_the_tokens():
    """Sensitivity: decoding that restarts the GRU routing state at every step (the transformers
    5.24 `cache=` bug) gives other tokens here, so the equality tests above can fail."""
    moe = _distinct_moe("router=spectra", "router.recurrence=token_and_depth")
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    right = _greedy(moe, prompt, use_cache=True)
    ctx = moe.spectra_context
    begin = ctx.begin_forward

    def forgetful_begin(input_ids, attention_mask, position_ids, past_length):
        begin(input_ids, attention_mask, position_ids, past_length)
        ctx.cached_states = {}  # every decoding step starts the recurrence from zeros

    ctx.begin_forward = forgetful_begin
    wrong = _greedy(moe, prompt, use_cache=True)
    ctx.begin_forward = begin
    assert not torch.equal(right.sequences, wrong.sequences)
    full = _full_forward_step_logits(moe, right.sequences, prompt.shape[1])
    gap = (torch.stack(wrong.logits)[0] - full[0]).abs().max()
    assert gap < 1e-5  # the first token comes from the prompt's full forward, before any cache use
    assert (torch.stack(wrong.logits) - full).abs().max() > 1e-3


def _cache_keywords() -> list[str]:
    """The KV-cache keywords the installed transformers' forward takes (5.24: both; 5.23: one)."""
    from transformers import LlamaForCausalLM

    params = inspect.signature(LlamaForCausalLM.forward).parameters
    return ["cache", "past_key_values"] if "cache" in params else ["past_key_values"]


@pytest.mark.parametrize("cache_kwarg", _cache_keywords())
@pytest.mark.parametrize("recurrence", RECURRENCES)
def test_manual_cached_loop_is_the_full_forward(recurrence, cache_kwarg):
    """A hand-written decode loop: prompt in one call, then one token per call with the cache."""
    moe = _distinct_moe("router=spectra", f"router.recurrence={recurrence}")
    seq = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(5))  # [B, S]
    with torch.no_grad():
        full = moe(seq, use_cache=False).logits  # [B, S, V]
        cache = DynamicCache(config=moe.config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # 5.24 deprecates past_key_values=
            step_logits = [moe(seq[:, :5], use_cache=True, **{cache_kwarg: cache}).logits]
            for t in range(5, seq.shape[1]):
                step_logits.append(moe(seq[:, t : t + 1], use_cache=True, **{cache_kwarg: cache}).logits)
    assert cache.get_seq_length() == seq.shape[1]
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("recurrence", RECURRENCES)
def test_cached_beam_search_is_recomputed_beam_search(recurrence):
    """Beam search reorders the KV cache between steps; the cached GRU states must follow."""
    moe = _distinct_moe("router=spectra", f"router.recurrence={recurrence}")
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=8, do_sample=False, num_beams=3, num_return_sequences=3, early_stopping=False,
              return_dict_in_generate=True, output_scores=True, pad_token_id=0)
    cached = moe.generate(prompt, use_cache=True, **kw)
    recomputed = moe.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores, rtol=0, atol=1e-5)
    # and each returned beam scores as its sequence's full forward does (length penalty 1)
    full = _full_forward_step_logits(moe, cached.sequences, prompt.shape[1]).log_softmax(-1)  # [T, B·3, V]
    tokens = cached.sequences[:, prompt.shape[1]:].T  # [T, B·3]
    logp = full.gather(2, tokens.unsqueeze(-1)).squeeze(-1).sum(0)  # [B·3]
    torch.testing.assert_close(cached.sequences_scores, logp / tokens.shape[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("recurrence", ["token_and_depth", "none"])
def test_left_padded_batch_decodes_each_prompt_as_alone(recurrence):
    """Padding routes nowhere while decoding: a left-padded batch = each prompt decoded alone."""
    moe = _distinct_moe("router=spectra", f"router.recurrence={recurrence}")
    g = torch.Generator().manual_seed(11)
    long, short = torch.randint(1, VOCAB, (1, 7), generator=g), torch.randint(1, VOCAB, (1, 4), generator=g)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)])  # [2, 7]
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    both = _greedy(moe, batch, attention_mask=mask, use_cache=True)
    alone = [_greedy(moe, p, use_cache=True) for p in (long, short)]
    assert torch.equal(both.sequences[0, 7:], alone[0].sequences[0, 7:])
    assert torch.equal(both.sequences[1, 7:], alone[1].sequences[0, 4:])
    for row, single in enumerate(alone):
        torch.testing.assert_close(torch.stack(both.logits)[:, row], torch.stack(single.logits)[:, 0],
                                   rtol=0, atol=1e-4)


@pytest.mark.parametrize("router", ["topk", "spectra", "switch_top1", "switch_top2", "expert_choice", "hash"])
def test_save_load_roundtrip_identical_logits_and_greedy_generation(tmp_path, router):
    """For every router: reload gives bit-identical logits, and greedy decoding with the cache
    (KV and GRU state) equals recomputing the whole sequence, on the reloaded model too."""
    k = 1 if router in ("switch_top1", "hash") else 2
    moe = _distinct_moe(f"router={router}", f"router.top_k={k}")
    save_moe_model(moe, tmp_path / "m")
    again = load_moe_model(tmp_path / "m")
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, moe(x).logits, rtol=0, atol=0)
    prompt = x[:1, :4]
    cached = _greedy(moe, prompt, use_cache=True)
    recomputed = _greedy(moe, prompt, use_cache=False)
    loaded = _greedy(again, prompt, use_cache=True)
    assert cached.sequences.shape[1] == 14
    assert torch.equal(cached.sequences, recomputed.sequences) and torch.equal(cached.sequences, loaded.sequences)
    full = _full_forward_step_logits(moe, cached.sequences, prompt.shape[1])
    torch.testing.assert_close(torch.stack(cached.logits), full, rtol=0, atol=1e-5)
    spec = again.config.spectra_moe
    assert spec["moe"]["num_experts"] == 4 and spec["router"]["name"] == router


def test_sinkhorn_inference_refuses_cached_decoding_and_recomputes_without_cache():
    moe = _distinct_moe("router=spectra", "osr.sinkhorn_inference=true")
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(17))
    with pytest.raises(ValueError, match=r"osr\.sinkhorn_inference=true .*use_cache=False"):
        _greedy(moe, prompt, use_cache=True)
    # Without a cache every step recomputes the prefix, so step t is the last position of a
    # forward over the prefix (a plan over the prefix's tokens: batch- and length-dependent).
    out = _greedy(moe, prompt, use_cache=False)
    P = prompt.shape[1]
    with torch.no_grad():
        want = [moe(out.sequences[:, : P + t], use_cache=False).logits[:, -1] for t in range(len(out.logits))]
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(want), rtol=0, atol=1e-5)


def test_a_new_prompt_forgets_the_previous_sequence():
    """The cached GRU state is reset for a new prompt: generating B after A equals B alone."""
    moe = _distinct_moe("router=spectra")
    g = torch.Generator().manual_seed(19)
    a, b = torch.randint(0, VOCAB, (1, 6), generator=g), torch.randint(0, VOCAB, (1, 6), generator=g)
    fresh = _distinct_moe("router=spectra")
    _greedy(moe, a, use_cache=True)
    after_a = _greedy(moe, b, use_cache=True)
    alone = _greedy(fresh, b, use_cache=True)
    assert torch.equal(after_a.sequences, alone.sequences)
    torch.testing.assert_close(torch.stack(after_a.logits), torch.stack(alone.logits), rtol=0, atol=0)


def test_deepcopy_keeps_decoding_right():
    """A deep copy gets its own routing context (the pre-hook and the blocks share it)."""
    moe = _distinct_moe("router=spectra")
    twin = copy.deepcopy(moe)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(23))
    a, b = _greedy(moe, prompt, use_cache=True), _greedy(twin, prompt, use_cache=True)
    assert torch.equal(a.sequences, b.sequences)
