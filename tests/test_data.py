"""Data layer: bundled corpus, tokenizer, SFT labels, packing, datasets, collation.

Expectations are computed independently of the code under test (hand-written ChatML strings,
math answers re-derived with the standard library, packing references built by plain list
concatenation), never copied from its output.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import math
import re
import statistics
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from spectra.config import DataConfig
from spectra.data import (
    BUNDLED_CORPUS,
    DOMAINS,
    IGNORE_INDEX,
    PackedCollator,
    build_datasets,
    get_domain_names,
    load_bundled_corpus,
    load_tokenizer,
    pack,
    tokenize_conversation,
)

MIN_PER_DOMAIN_TRAIN = 1000
MIN_PER_DOMAIN_VALIDATION = 30


@pytest.fixture(scope="module")
def corpus():
    return load_bundled_corpus()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("bundled")


def _norm(messages) -> str:
    return "\n".join(f"{m['role']}: {' '.join(m['content'].split())}" for m in messages)


# --------------------------------------------------------------------------- corpus


def test_corpus_file_is_small_gzip_jsonl():
    size = BUNDLED_CORPUS.stat().st_size
    assert 300_000 < size < 5_000_000, f"bundled corpus is {size} bytes"
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert set(first) >= {"messages", "domain", "source"}


def test_domains_and_counts(corpus):
    assert len(DOMAINS) >= 5 and len(set(DOMAINS)) == len(DOMAINS)
    assert set(corpus) == {"train", "validation"}
    for split, minimum in (("train", MIN_PER_DOMAIN_TRAIN), ("validation", MIN_PER_DOMAIN_VALIDATION)):
        counts = {d: 0 for d in DOMAINS}
        for d in corpus[split]["domain"]:
            assert d in counts, f"unknown domain {d!r}"
            counts[d] += 1
        for d, n in counts.items():
            assert n >= minimum, f"{split}/{d} has only {n} records"
    n_train, n_val = len(corpus["train"]), len(corpus["validation"])
    assert 0.03 < n_val / (n_train + n_val) < 0.08  # a ~5% validation split
    # Domains are interleaved in file order, so a capped eval set is a mix, not one domain.
    assert len(set(corpus["validation"]["domain"][:50])) == len(DOMAINS)


def test_every_record_is_a_user_assistant_chat(corpus):
    for split in ("train", "validation"):
        for rec in corpus[split]:
            roles = [m["role"] for m in rec["messages"]]
            assert roles[0] == "user" and roles[-1] == "assistant" and "assistant" in roles, roles
            assert all(m["content"].strip() for m in rec["messages"])
            assert rec["source"]


def test_splits_are_disjoint_and_deduplicated(corpus):
    train = [_norm(m) for m in corpus["train"]["messages"]]
    val = [_norm(m) for m in corpus["validation"]["messages"]]
    assert len(set(train)) == len(train) and len(set(val)) == len(val)
    assert not set(train) & set(val)
    answers = lambda split: {" ".join(m[-1]["content"].split()) for m in corpus[split]["messages"]}  # noqa: E731
    assert not answers("train") & answers("validation")


def test_split_is_deterministic(corpus):
    again = load_bundled_corpus(str(BUNDLED_CORPUS))
    for split in ("train", "validation"):
        assert again[split]["messages"] == corpus[split]["messages"]
        assert again[split]["domain"] == corpus[split]["domain"]


def test_split_does_not_depend_on_record_order(tmp_path, corpus):
    # A copy without the stored split column, in reversed order: the loader re-derives the
    # split from content, so every record must land where it did before.
    recs = [{"messages": r["messages"], "domain": r["domain"], "source": r["source"]}
            for s in ("train", "validation") for r in corpus[s].select(range(200))]
    path = tmp_path / "mini.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reversed(recs)))
    mini = load_bundled_corpus(str(path))
    assert {_norm(m) for m in mini["train"]["messages"]} == {_norm(m) for m in corpus["train"].select(range(200))["messages"]}
    assert {_norm(m) for m in mini["validation"]["messages"]} == {
        _norm(m) for m in corpus["validation"].select(range(200))["messages"]}


def test_missing_corpus_raises_file_not_found(tmp_path):
    missing = tmp_path / "nope" / "corpus.jsonl.gz"
    with pytest.raises(FileNotFoundError) as exc:
        load_bundled_corpus(str(missing))
    assert str(missing) in str(exc.value) and "\n" not in str(exc.value)


def test_unreadable_corpus_raises_file_not_found(tmp_path):
    bad = tmp_path / "corpus.jsonl.gz"
    bad.write_bytes(b"this is not gzip")
    with pytest.raises(FileNotFoundError) as exc:
        load_bundled_corpus(str(bad))
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value)


# --------------------------------------------------------------------------- math answers


def _num(text: str) -> Fraction:
    return Fraction(text.replace("$", "").replace(",", ""))


def _solve(kind: str, q: str) -> list[Fraction]:
    """Independent solution of a generated math question, as the list of numbers in its answer."""
    ints = [int(x) for x in re.findall(r"-?\d+", q)]
    if kind == "arithmetic_series":
        a, d, n = ints
        return [Fraction(sum(a + i * d for i in range(n)))]
    if kind == "linear_equation":
        m = re.fullmatch(r"Solve for x: (-?\d*)x ([+-]) (\d+) = (-?\d+)\.", q)
        a = int(m.group(1)) if m.group(1) not in ("", "-") else (-1 if m.group(1) == "-" else 1)
        b = int(m.group(3)) * (1 if m.group(2) == "+" else -1)
        return [Fraction(int(m.group(4)) - b, a)]
    if kind == "gcd_lcm":
        a, b = ints
        return [Fraction(math.gcd(a, b)), Fraction(math.lcm(a, b))]
    if kind == "combinations":
        k, n = ints
        return [Fraction(math.comb(n, k))]
    if kind == "pythagoras":
        if "hypotenuse of length" in q:
            c, a = ints
            return [Fraction(math.isqrt(c * c - a * a))]
        a, b = ints
        return [Fraction(math.isqrt(a * a + b * b))]
    if kind == "percent_of":
        r, n = ints
        return [Fraction(r * n, 100)]
    if kind == "percent_discount":
        price, r = ints
        return [Fraction(price) * (100 - r) / 100]
    if kind == "work_rate":
        a, b = ints
        return [1 / (Fraction(1, a) + Fraction(1, b))]
    if kind == "mean_median":
        nums = [Fraction(int(x)) for x in q.split(":")[1].strip(" .").split(", ")]  # Fractions: exact mean
        return [Fraction(statistics.mean(nums)), Fraction(statistics.median(nums))]
    if kind == "dice":
        m = re.match(r"(Two|Three) fair (\d+)-sided dice .* sum is (exactly|at least|at most) (\d+)\?", q)
        k, sides, t = {"Two": 2, "Three": 3}[m.group(1)], int(m.group(2)), int(m.group(4))
        ok = {"exactly": t.__eq__, "at least": t.__le__, "at most": t.__ge__}[m.group(3)]
        rolls = list(itertools.product(range(1, sides + 1), repeat=k))
        return [Fraction(sum(ok(sum(r)) for r in rolls), len(rolls))]
    if kind == "compound_interest":
        principal, r, n = ints
        v = Decimal(principal)
        for _ in range(n):
            v += v * Decimal(r) / 100
        return [Fraction(v.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))]
    if kind == "unit_conversion":
        x, factor = (Decimal(v) for v in re.findall(r"\d+(?:\.\d+)?", q)[:3:2])
        return [Fraction((x * factor).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))]
    if kind == "quadratic":
        m = re.fullmatch(r"Solve the quadratic equation (-?\d*)x\^2 ([+-]) (\d*)x(?: ([+-]) (\d+))? = 0\.", q)
        a = int(m.group(1) or 1)
        b = int(m.group(3) or 1) * (1 if m.group(2) == "+" else -1)
        c = int(m.group(5) or 0) * (1 if m.group(4) == "+" else -1)
        disc = b * b - 4 * a * c
        r = math.isqrt(disc)
        assert r * r == disc
        return sorted({Fraction(-b - r, 2 * a), Fraction(-b + r, 2 * a)})
    raise AssertionError(f"no independent solver for {kind}")


def test_math_answers_are_correct(corpus):
    checked = {}
    for split in ("train", "validation"):
        for rec in corpus[split]:
            if rec["domain"] != "math":
                continue
            kind = rec["source"].split("/")[-1]
            q, a = rec["messages"][0]["content"], rec["messages"][-1]["content"]
            stated = re.search(r"The answer is (.*)\.$", a).group(1)
            numbers = [_num(x) for x in re.findall(r"-?\$?\d+(?:\.\d+)?(?:/\d+)?", stated)]
            assert numbers == _solve(kind, q), f"{kind}: {q!r} -> {stated!r}"
            checked[kind] = checked.get(kind, 0) + 1
    assert len(checked) >= 10 and min(checked.values()) >= 50, checked


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_specials_and_vocab(tok):
    assert 4096 <= len(tok) <= 8192
    for s in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        ids = tok.encode(s, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == s
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"


def test_tokenizer_round_trips_every_domain(corpus, tok):
    per_domain = {d: 0 for d in DOMAINS}
    for rec in corpus["validation"]:
        if per_domain[rec["domain"]] >= 15:
            continue
        per_domain[rec["domain"]] += 1
        for m in rec["messages"]:
            ids = tok.encode(m["content"], add_special_tokens=False)
            assert tok.decode(ids) == m["content"]
    assert min(per_domain.values()) == 15
    odd = "  tabs\tand\r\nnewlines\n\n unicode: é ß 你好 🙂 ∑ \x00 end  "
    assert tok.decode(tok.encode(odd, add_special_tokens=False)) == odd


def test_tokenizer_compresses_text(corpus, tok):
    # A trained BPE must beat raw bytes by a wide margin on held-out text of its domains.
    text = "\n".join(m["content"] for msgs in corpus["validation"]["messages"][:200] for m in msgs)
    assert len(tok.encode(text, add_special_tokens=False)) < len(text.encode("utf-8")) / 2.5


def test_chat_template_is_chatml(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    expected = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    assert tok.apply_chat_template(msgs, tokenize=False) == expected
    assert tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_load_tokenizer_bad_path_names_it(tmp_path):
    bad = str(tmp_path / "no_tokenizer_here")
    with pytest.raises(OSError) as exc:
        load_tokenizer(bad)
    assert bad in str(exc.value) and "\n" not in str(exc.value)


# --------------------------------------------------------------------------- SFT labels


CONV = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "4 × 3 = 12."},
]


def _runs(labels):
    """Contiguous runs of labelled (non-ignored) values."""
    runs, cur = [], []
    for v in labels:
        if v == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(v)
    return runs + ([cur] if cur else [])


def test_assistant_only_labels_match_hand_built_example(tok):
    out = tokenize_conversation(tok, CONV)
    rendered = ("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n2 + 2 = 4.<|im_end|>\n"
                "<|im_start|>user\nAnd times 3?<|im_end|>\n<|im_start|>assistant\n4 × 3 = 12.<|im_end|>\n")
    assert out["input_ids"] == tok.encode(rendered, add_special_tokens=False)
    assert len(out["labels"]) == len(out["input_ids"])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    runs = _runs(out["labels"])
    assert runs == [tok.encode("2 + 2 = 4.", add_special_tokens=False) + [im_end],
                    tok.encode("4 × 3 = 12.", add_special_tokens=False) + [im_end]]
    assert [tok.decode(r) for r in runs] == ["2 + 2 = 4.<|im_end|>", "4 × 3 = 12.<|im_end|>"]
    # Labelled positions hold their own input token (the model shifts internally).
    assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(out["labels"], out["input_ids"]))


def test_all_token_labels(tok):
    out = tokenize_conversation(tok, CONV, assistant_only_loss=False)
    assert out["labels"][0] == IGNORE_INDEX  # a document's first token is never a target
    assert out["labels"][1:] == out["input_ids"][1:]


# --------------------------------------------------------------------------- packing


def _docs(tok, corpus, n):
    recs = corpus["validation"].select(range(n))
    docs = []
    for rec in recs:
        enc = tokenize_conversation(tok, rec["messages"])
        docs.append({**enc, "domain_id": DOMAINS.index(rec["domain"])})
    return docs


@pytest.mark.parametrize("max_len", [48, 97, 256])
def test_pack_against_concatenation(tok, corpus, max_len):
    docs = _docs(tok, corpus, 25)
    docs.append({"input_ids": list(range(10, 10 + 3 * max_len)), "labels": list(range(3 * max_len)), "domain_id": 2})
    rows = pack(docs, max_len, pad_token_id=0)
    columns = ("input_ids", "labels", "position_ids", "domain_ids", "routing_mask")
    assert rows and all(set(r) == set(columns) and len(r[k]) == max_len for r in rows for k in columns)

    # Reference built by hand: truncate each document, concatenate, pad once at the very end.
    trunc = [{k: d[k][:max_len] for k in ("input_ids", "labels")} | {"dom": d["domain_id"]} for d in docs]
    ids = [t for d in trunc for t in d["input_ids"]]
    labels = [t for d in trunc for t in d["labels"]]
    pos = [p for d in trunc for p in range(len(d["input_ids"]))]
    doms = [d["dom"] for d in trunc for _ in d["input_ids"]]
    starts = list(itertools.accumulate([0] + [len(d["input_ids"]) for d in trunc[:-1]]))
    n_pad = len(rows) * max_len - len(ids)
    assert 0 <= n_pad < max_len  # as few rows as possible; only the last one padded

    flat = {k: [v for r in rows for v in r[k]] for k in rows[0]}
    n = len(ids)
    assert flat["input_ids"][:n] == ids  # no token lost or reordered
    assert flat["labels"][:n] == labels
    assert flat["domain_ids"][:n] == doms
    assert flat["position_ids"][:n] == pos
    assert flat["input_ids"][n:] == [0] * n_pad and flat["labels"][n:] == [IGNORE_INDEX] * n_pad
    assert flat["domain_ids"][n:] == [-1] * n_pad and flat["position_ids"][n:] == list(range(n_pad))
    assert flat["routing_mask"] == [1] * n + [0] * n_pad  # the routers' only marker of the pad block
    # position 0 exactly at document starts (and at the start of the pad block)
    zeros = [i for i, p in enumerate(flat["position_ids"]) if p == 0]
    assert zeros == starts + ([n] if n_pad else [])


def test_split_long_documents_keeps_every_token_as_row_length_pieces():
    # max_seq_length 4; a 10-token document and a 3-token one, labels = ids + 100 (all labelled)
    long = {"input_ids": list(range(1, 11)), "labels": list(range(101, 111)), "domain_id": 1}
    short = {"input_ids": [21, 22, 23], "labels": [-100, 122, 123], "domain_id": 2}
    # truncation (the default): 4 tokens of the long document, then the short one, padded once
    rows = pack([long, short], 4, pad_token_id=0)
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4], [21, 22, 23, 0]]
    # split: pieces [1..4], [5..8], [9, 10], each a document of its own (positions restart, its
    # first label masked: nothing in its context precedes it), then the short document
    rows = pack([long, short], 4, pad_token_id=0, split_long_documents=True)
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 21, 22], [23, 0, 0, 0]]
    assert [r["labels"] for r in rows] == [[101, 102, 103, 104], [-100, 106, 107, 108], [-100, 110, -100, 122],
                                           [123, -100, -100, -100]]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 1], [2, 0, 1, 2]]
    assert [r["domain_ids"] for r in rows] == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 2, 2], [2, -1, -1, -1]]
    assert [r["routing_mask"] for r in rows] == [[1] * 4, [1] * 4, [1] * 4, [1, 0, 0, 0]]
    # unpacked: one padded row per piece
    from spectra.data import iter_padded

    rows = list(iter_padded([long], 4, pad_token_id=0, split_long_documents=True))
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    assert [r["labels"] for r in rows] == [[101, 102, 103, 104], [-100, 106, 107, 108], [-100, 110, -100, -100]]
    assert rows[2]["attention_mask"] == [1, 1, 0, 0]


def test_split_long_documents_gives_every_length_the_same_tokens(tok):
    # Sweep E's premise: with split pieces, 16-token rows hold every token 128-token rows hold,
    # and the labelled ones lose only the pieces' first tokens; truncation at 16 keeps almost no
    # assistant token (the conversations' first 16 tokens are the prompt).
    def counts(length, split):
        _, evals = build_datasets(_cfg(max_seq_length=length, max_eval_samples=20, split_long_documents=split), tok, 0)
        ids = [t for r in evals for t, m in zip(r["input_ids"], r["routing_mask"]) if m]
        return ids, sum(1 for r in evals for t in r["labels"] if t != IGNORE_INDEX)

    full, _ = counts(4096, False)  # nothing truncated at 4096
    for length in (16, 128):
        ids, _ = counts(length, True)
        assert ids == full  # the same tokens in the same order
    _, labelled_16 = counts(16, True)
    _, labelled_full = counts(4096, False)
    pieces_after_first = sum(max(0, math.ceil(len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)
                                                  ["input_ids"]) / 16) - 1)
                             for r in load_bundled_corpus()["validation"].select(range(20)))
    assert labelled_full - pieces_after_first <= labelled_16 <= labelled_full
    assert labelled_16 > 0.8 * labelled_full
    _, truncated_16 = counts(16, False)
    assert truncated_16 < 0.1 * labelled_16


def test_packed_position_ids_isolate_documents_in_a_real_model():
    # transformers 5 turns restarting position_ids (no attention_mask) into a per-document mask:
    # a packed row must give each document exactly the logits it gets on its own.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    model = LlamaForCausalLM(cfg).eval()
    a, b = torch.randint(3, 64, (1, 7)), torch.randint(3, 64, (1, 5))
    (row,) = pack([{"input_ids": a[0].tolist(), "labels": a[0].tolist()},
                   {"input_ids": b[0].tolist(), "labels": b[0].tolist()}], max_seq_length=16)
    batch = PackedCollator()([row])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone_a = model(input_ids=a, use_cache=False).logits
        alone_b = model(input_ids=b, use_cache=False).logits
    torch.testing.assert_close(packed[:, :7], alone_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[:, 7:12], alone_b, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- build_datasets + collator


def _cfg(**kw):
    base = dict(max_seq_length=128, max_train_samples=40, max_eval_samples=20)
    return DataConfig(**(base | kw))


def test_build_datasets_packed(tok, corpus):
    train, evals = build_datasets(_cfg(), tok, seed=0)
    columns = {"input_ids", "labels", "position_ids", "domain_ids", "routing_mask"}
    assert set(train.column_names) == columns
    assert get_domain_names(train) == DOMAINS
    for ds in (train, evals):
        assert all(len(r[k]) == 128 for r in ds for k in columns)
    # routing_mask is 0 exactly on the pad block: the tail of the last row
    flat_mask = [t for r in evals for t in r["routing_mask"]]

    # The eval rows hold the first 20 validation conversations, in corpus order, nothing lost.
    expected, doms = [], []
    for rec in corpus["validation"].select(range(20)):
        ids = tok.apply_chat_template(rec["messages"], tokenize=True, return_dict=True)["input_ids"][:128]
        expected += ids
        doms += [DOMAINS.index(rec["domain"])] * len(ids)
    flat_ids = [t for r in evals for t in r["input_ids"]]
    flat_dom = [t for r in evals for t in r["domain_ids"]]
    assert flat_ids[: len(expected)] == expected and flat_dom[: len(doms)] == doms
    assert set(flat_dom[len(doms):]) <= {-1} and len(flat_ids) - len(expected) < 128
    assert flat_mask == [1] * len(expected) + [0] * (len(flat_ids) - len(expected))

    # Deterministic per seed; another seed draws other training conversations.
    again, _ = build_datasets(_cfg(), tok, seed=0)
    other, _ = build_datasets(_cfg(), tok, seed=1)
    assert again["input_ids"] == train["input_ids"]
    assert other["input_ids"] != train["input_ids"]


def test_build_datasets_unpacked(tok):
    train, evals = build_datasets(_cfg(packing=False, max_eval_samples=7), tok, seed=0)
    assert len(evals) == 7 and len(train) == 40
    for r in evals:
        n = sum(r["attention_mask"])
        assert len(r["input_ids"]) == 128 and r["attention_mask"] == [1] * n + [0] * (128 - n)
        assert r["labels"][n:] == [IGNORE_INDEX] * (128 - n) and r["domain_ids"][n:] == [-1] * (128 - n)
        assert r["position_ids"] == list(range(128))
        assert r["routing_mask"] == r["attention_mask"]


def test_collator_drops_domain_ids(tok):
    train, _ = build_datasets(_cfg(), tok, seed=0)
    rows = [train[i] for i in range(3)]
    batch = PackedCollator()(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids", "routing_mask"}
    for k, v in batch.items():
        assert v.dtype == torch.long and v.shape == (3, 128)
        assert v.tolist() == [r[k] for r in rows]
    unpacked, _ = build_datasets(_cfg(packing=False), tok, seed=0)
    batch = PackedCollator()([unpacked[0], unpacked[1]])
    assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask", "routing_mask"}
    assert "domain_ids" in PackedCollator(include_domain_ids=True)(rows)
    # a model without the routing pre-hook (dense) must not receive routing_mask
    assert set(PackedCollator(include_routing_mask=False)(rows)) == {"input_ids", "labels", "position_ids"}


def test_bundled_files_are_listed_with_hashes_in_stats():
    # stats.json records what the builder produced; it must describe the shipped files.
    stats = json.loads((Path(BUNDLED_CORPUS).parent / "stats.json").read_text())
    assert stats["compressed_bytes"] == BUNDLED_CORPUS.stat().st_size
    assert stats["sha256"] == hashlib.sha256(BUNDLED_CORPUS.read_bytes()).hexdigest()


def test_smoltalk_path_with_a_stand_in_hub(monkeypatch, tok):
    # No network in tests: stand in for datasets.load_dataset and check the schema mapping and
    # the domain vocabulary that build_datasets derives from smoltalk's `source` column.
    import datasets

    def conv(i, src):
        return {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}"},
                             {"role": "assistant", "content": f"answer number {i}"}], "source": src}

    fake = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([conv(i, ["smol-rewrite", "apigen-80k"][i % 2]) for i in range(12)]),
        "test": datasets.Dataset.from_list([conv(100 + i, "smol-rewrite") for i in range(3)]),
    })
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or fake)
    from spectra.data import load_smoltalk

    st = load_smoltalk("all", max_samples=5)
    assert calls[0] == ("HuggingFaceTB/smoltalk", "all")
    assert len(st["train"]) == 5 and len(st["validation"]) == 3
    assert st["train"][1]["domain"] == "apigen-80k" and st["train"][1]["source"] == "smoltalk:apigen-80k"
    assert [m["role"] for m in st["train"][0]["messages"]] == ["system", "user", "assistant"]

    train, evals = build_datasets(_cfg(name="smoltalk", max_train_samples=None, max_eval_samples=None, max_seq_length=32),
                                  tok, seed=0)
    assert get_domain_names(train) == ("apigen-80k", "smol-rewrite")
    # Every (truncated) token of the 12 training conversations is in the rows, under its source's id.
    expected = {0: 0, 1: 0}
    for c in fake["train"]:
        ids = tok.apply_chat_template(c["messages"], tokenize=True, return_dict=True)["input_ids"]
        expected[("apigen-80k", "smol-rewrite").index(c["source"])] += min(len(ids), 32)
    flat = [d for row in train["domain_ids"] for d in row]
    assert {k: flat.count(k) for k in (0, 1)} == expected
    assert len(flat) - sum(expected.values()) < 32  # only the last row is padded
