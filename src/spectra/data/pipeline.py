"""`build_datasets`: config -> (train, eval) `datasets.Dataset`s of fixed-length token rows.

Steps: load conversations (bundled corpus or smoltalk) -> train: shuffle with `seed`, then
keep the first `max_train_samples`; eval: file order, first `max_eval_samples` -> tokenize
with the chat template (`datasets.map`, `num_proc` workers, cached) -> pack (or pad) rows.

Row columns (every list exactly max_seq_length long):
    input_ids, labels, position_ids: int32 lists; domain_ids: list of ClassLabel indices
    (-1 = padding or no domain) whose names are `get_domain_names(ds)`; routing_mask: int8
    (1 = real token, 0 = padding: the routers' only marker of the packed pad block); plus
    attention_mask when data_cfg.packing is False. See `spectra.data.sft` for the exact conventions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import datasets

from .corpus import DOMAINS, load_bundled_corpus, load_smoltalk
from .sft import ROUTING_MASK, iter_packed, iter_padded, tokenize_conversation

_CHUNK_ROWS = 1024  # rows materialised as Python lists at a time while building the Arrow table


def _row_features(domain_names: tuple[str, ...], packing: bool) -> datasets.Features:
    ints = datasets.List(datasets.Value("int32"))
    feats = {
        "input_ids": ints,
        "labels": ints,
        "position_ids": ints,
        "domain_ids": datasets.List(datasets.ClassLabel(names=list(domain_names))),
        ROUTING_MASK: datasets.List(datasets.Value("int8")),
    }
    if not packing:
        feats["attention_mask"] = datasets.List(datasets.Value("int8"))
    return datasets.Features(feats)


def get_domain_names(ds: datasets.Dataset) -> tuple[str, ...]:
    """Names behind the `domain_ids` indices of a dataset made by `build_datasets`."""
    return tuple(ds.features["domain_ids"].feature.names)


def _tokenizer_fingerprint(tokenizer) -> str:
    """Stable content hash of a tokenizer (vocab, merges, template), for datasets' map cache.

    datasets would otherwise hash the Python object with dill, which is slow and can differ
    between processes, forcing a re-tokenisation (and a new cache file) on every run.
    """
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    h.update(str(tokenizer.chat_template).encode())
    return h.hexdigest()[:16]


def _tokenize_batch(batch: dict, tokenizer, assistant_only_loss: bool, domain_names: tuple[str, ...]) -> dict:
    index = {d: i for i, d in enumerate(domain_names)}
    out: dict[str, list] = {"input_ids": [], "labels": [], "domain_id": []}
    for messages, domain in zip(batch["messages"], batch["domain"]):
        enc = tokenize_conversation(tokenizer, messages, assistant_only_loss)
        out["input_ids"].append(enc["input_ids"])
        out["labels"].append(enc["labels"])
        out["domain_id"].append(index.get(domain, -1))
    return out


def tokenize_dataset(ds: datasets.Dataset, tokenizer, assistant_only_loss: bool,
                     domain_names: tuple[str, ...], num_proc: int = 1) -> datasets.Dataset:
    """Conversations -> columns input_ids, labels (per document, unpadded) and domain_id (int)."""
    fp = hashlib.sha256(
        f"{ds._fingerprint}|{_tokenizer_fingerprint(tokenizer)}|{assistant_only_loss}|{domain_names}".encode()
    ).hexdigest()[:16]
    return ds.map(
        _tokenize_batch,
        batched=True,
        batch_size=256,
        fn_kwargs={"tokenizer": tokenizer, "assistant_only_loss": assistant_only_loss, "domain_names": domain_names},
        remove_columns=ds.column_names,
        num_proc=num_proc if num_proc > 1 else None,
        new_fingerprint=fp,
        desc="tokenizing",
    )


def _iter_docs(tok: datasets.Dataset) -> Iterator[dict]:
    for batch in tok.iter(batch_size=1024):
        for ids, labels, dom in zip(batch["input_ids"], batch["labels"], batch["domain_id"]):
            yield {"input_ids": ids, "labels": labels, "domain_id": dom}


def rows_to_dataset(rows: Iterator[dict], features: datasets.Features) -> datasets.Dataset:
    """Materialise a row iterator chunk by chunk (bounded Python memory) into one in-memory Dataset."""
    parts, chunk = [], []
    for row in rows:
        chunk.append(row)
        if len(chunk) == _CHUNK_ROWS:
            parts.append(datasets.Dataset.from_list(chunk, features=features))
            chunk = []
    if chunk or not parts:
        parts.append(datasets.Dataset.from_list(chunk, features=features))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_conversations(data_cfg) -> tuple[datasets.DatasetDict, tuple[str, ...]]:
    """The configured corpus as DatasetDict(train, validation) and its domain names in id order."""
    if data_cfg.name == "bundled":
        return load_bundled_corpus(data_cfg.path), DOMAINS
    if data_cfg.name == "smoltalk":
        raw = load_smoltalk(data_cfg.hub_subset, dataset=data_cfg.hub_dataset)
        names = sorted(set().union(*(raw[s].unique("domain") for s in raw)))
        return raw, tuple(names)
    raise ValueError(f"data.name: unknown dataset {data_cfg.name!r}; choose bundled or smoltalk")


def build_datasets(data_cfg, tokenizer, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Train and eval datasets of fixed-length rows for `data_cfg` (a spectra.config.DataConfig).

    Deterministic for a given seed: the train conversations are shuffled with `seed` before
    capping and packing; the eval conversations keep the corpus order (fixed, so eval losses
    are comparable across runs and seeds). Caps count conversations, not rows.
    """
    convs, domain_names = load_conversations(data_cfg)
    train = convs["train"].shuffle(seed=seed)
    if data_cfg.max_train_samples is not None:
        train = train.select(range(min(data_cfg.max_train_samples, len(train))))
    evals = convs["validation"]
    if data_cfg.max_eval_samples is not None:
        evals = evals.select(range(min(data_cfg.max_eval_samples, len(evals))))

    features = _row_features(domain_names, data_cfg.packing)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for split in (train, evals):
        tok = tokenize_dataset(split, tokenizer, data_cfg.assistant_only_loss, domain_names, data_cfg.num_proc)
        make_rows = iter_packed if data_cfg.packing else iter_padded
        rows = make_rows(_iter_docs(tok), data_cfg.max_seq_length, pad_id, data_cfg.split_long_documents)
        out.append(rows_to_dataset(rows, features))
    return out[0], out[1]
