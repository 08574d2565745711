"""The bundled multi-domain chat corpus, and smoltalk from the hub, in one record schema.

Record schema (smoltalk's chat format plus two fields):
    {"messages": [{"role": "user", "content": str}, {"role": "assistant", "content": str}, ...],
     "domain": str,   # one of DOMAINS for the bundled corpus; smoltalk's `source` for smoltalk
     "source": str}   # where the text came from (file, man page, generator kind, ...)

The bundled file `bundled/corpus.jsonl.gz` also carries `"split": "train" | "validation"`,
fixed at build time by `assign_split` (a hash of the content), so the split never depends on
load order; `load_bundled_corpus` recomputes it for files that lack the column.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import datasets

# Fixed order: domain_ids in packed rows index into this tuple.
DOMAINS: tuple[str, ...] = ("code", "docs", "math", "quotes", "dictionary")
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED_CORPUS = BUNDLED_DIR / "corpus.jsonl.gz"
VALIDATION_PERCENT = 5  # share of records (by content hash) in the validation split

MESSAGE_FEATURES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
RECORD_FEATURES = datasets.Features(
    {"messages": MESSAGE_FEATURES, "domain": datasets.Value("string"), "source": datasets.Value("string")}
)


def content_key(messages: list[dict]) -> str:
    """Whitespace-normalised text of a conversation (roles included): what 'same content' means."""
    return "\x1e".join(f"{m['role']}\x1f{' '.join(m['content'].split())}" for m in messages)


def content_hash(messages: list[dict]) -> str:
    """sha256 hex digest of `content_key`: stable across Python processes and machines."""
    return hashlib.sha256(content_key(messages).encode("utf-8")).hexdigest()


def assign_split(messages: list[dict]) -> str:
    """'validation' for VALIDATION_PERCENT% of conversations, chosen by content hash, else 'train'.

    Hash-based (not order-based) so a record's split never changes when others are added or
    removed, and identical conversations always land in the same split.
    """
    return "validation" if int(content_hash(messages)[:8], 16) % 100 < VALIDATION_PERCENT else "train"


def load_bundled_corpus(path: str | None = None) -> datasets.DatasetDict:
    """Load the bundled corpus (or a file in the same schema) as splits 'train' and 'validation'.

    path: a .jsonl or .jsonl.gz file; None = the copy shipped in the package.
    Returns a DatasetDict with columns messages, domain, source (file order kept in each split).
    Raises FileNotFoundError (one line, naming the path) if the file is missing or unreadable.
    """
    p = Path(path) if path is not None else BUNDLED_CORPUS
    if not p.is_file():
        raise FileNotFoundError(f"corpus file not found: {p} (build it with `python -m spectra.data.build_corpus`)")
    try:
        # datasets' json loader reads .gz transparently and caches the Arrow table, so a second
        # load of the same (unchanged) file is a cache hit; it never touches the network.
        ds = datasets.load_dataset("json", data_files=str(p), split="train")
        if "split" not in ds.column_names:
            ds = ds.map(lambda m: {"split": assign_split(m)}, input_columns="messages")
        missing = {"messages", "domain", "source"} - set(ds.column_names)
        if missing:
            raise ValueError(f"missing columns {sorted(missing)}")
    except Exception as e:  # malformed JSON, bad gzip, wrong schema: one clear line, naming the file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FileNotFoundError(f"corpus file unreadable: {p} ({type(e).__name__}: {first_line})") from None
    splits = {}
    for name in ("train", "validation"):
        part = ds.filter(lambda s, name=name: s == name, input_columns="split")
        splits[name] = part.select_columns(["messages", "domain", "source"])
    return datasets.DatasetDict(splits)


def _smoltalk_record(example: dict) -> dict:
    src = example.get("source") or "smoltalk"
    return {
        "messages": [{"role": m["role"], "content": m["content"]} for m in example["messages"]],
        "domain": src,
        "source": f"smoltalk:{src}",
    }


def load_smoltalk(subset: str = "all", max_samples: int | None = None,
                  dataset: str = "HuggingFaceTB/smoltalk") -> datasets.DatasetDict:
    """smoltalk from the hub (needs network) mapped to the bundled schema.

    Returns DatasetDict(train=..., validation=...) from smoltalk's 'train' and 'test' splits,
    each capped at the first `max_samples` records if given. `domain` is smoltalk's `source`
    column (e.g. 'smol-magpie-ultra') when present, else 'smoltalk'.
    """
    raw = datasets.load_dataset(dataset, subset)
    out = {}
    for src_split, dst_split in (("train", "train"), ("test", "validation")):
        if src_split not in raw:
            continue
        d = raw[src_split]
        if max_samples is not None:
            d = d.select(range(min(max_samples, len(d))))
        out[dst_split] = d.map(_smoltalk_record, remove_columns=d.column_names, features=RECORD_FEATURES)
    return datasets.DatasetDict(out)
