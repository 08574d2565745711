"""Build the bundled corpus and tokenizer: `python -m spectra.data.build_corpus [--out DIR]`.

Run once (the results are committed under src/spectra/data/bundled/); rerunning on a machine
with the same inputs reproduces the files byte for byte. Inputs (see bundled/SOURCES.md):
the stdlib of the Python running this script, Debian packages manpages, manpages-dev,
fortunes and wordnet-base, and the seeded math generator.

    apt-get install -y man-db manpages manpages-dev fortunes wordnet-base
    python -m spectra.data.build_corpus

Outputs in DIR (default: the package's bundled/ directory):
    corpus.jsonl.gz   one record per line, sorted by content hash (so domains interleave and
                      the first N validation records are a domain mix), gzip with mtime=0
    tokenizer/        byte-level BPE trained on the train split (save_pretrained format)
    stats.json        record counts per domain and split, sizes, input versions
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import platform
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

from .corpus import BUNDLED_DIR, DOMAINS, assign_split, content_hash, content_key
from .sft import tokenize_conversation
from .sources import code, dictionary, docs, mathgen, quotes
from .tokenizer import DEFAULT_VOCAB_SIZE, train_tokenizer

SOURCES = {"code": code, "docs": docs, "math": mathgen, "quotes": quotes, "dictionary": dictionary}
DEBIAN_PACKAGES = ("manpages", "manpages-dev", "fortunes", "wordnet-base", "man-db")
assert tuple(SOURCES) == DOMAINS


def collect(seed: int, per_domain: int) -> list[dict]:
    """All domains' records, deduplicated, each with its split, sorted by content hash."""
    records, seen_full, seen_answer = [], set(), set()
    for domain in DOMAINS:
        # A string seed is hashed with sha512 by `random`: stable across processes and machines.
        recs = SOURCES[domain].records(random.Random(f"{seed}:{domain}"), target=per_domain)
        kept = 0
        for r in recs:
            answer = " ".join(r["messages"][-1]["content"].split())
            key = content_key(r["messages"])
            # Dedupe on the whole conversation and on the answer alone: the same answer under two
            # prompts would otherwise be able to sit in both splits.
            if key in seen_full or answer in seen_answer:
                continue
            seen_full.add(key)
            seen_answer.add(answer)
            records.append({**r, "split": assign_split(r["messages"])})
            kept += 1
        print(f"  {domain}: {kept} records ({len(recs) - kept} duplicates dropped)", file=sys.stderr)
    records.sort(key=lambda r: content_hash(r["messages"]))
    return records


def write_jsonl_gz(records: list[dict], path: Path) -> None:
    """Deterministic gzip: no file name or timestamp in the header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        for r in records:
            gz.write((json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))


def _package_versions() -> dict[str, str]:
    out = {}
    for pkg in DEBIAN_PACKAGES:
        res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
        out[pkg] = res.stdout.strip() if res.returncode == 0 else "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=BUNDLED_DIR, help="output directory (default: the package's bundled/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-domain", type=int, default=1500, help="target records per domain before dedupe")
    ap.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = ap.parse_args(argv)

    print("collecting records:", file=sys.stderr)
    records = collect(args.seed, args.per_domain)
    corpus_path = args.out / "corpus.jsonl.gz"
    write_jsonl_gz(records, corpus_path)

    print("training tokenizer on the train split:", file=sys.stderr)
    train_texts = (m["content"] for r in records if r["split"] == "train" for m in r["messages"])
    tok = train_tokenizer(train_texts, vocab_size=args.vocab_size)
    tok.save_pretrained(str(args.out / "tokenizer"))

    # Token lengths (chat template applied) tell which max_seq_length truncates what.
    lengths: dict[str, list[int]] = {d: [] for d in DOMAINS}
    for r in records:
        lengths[r["domain"]].append(len(tokenize_conversation(tok, r["messages"])["input_ids"]))
    token_stats = {}
    for d, ls in lengths.items():
        ls.sort()
        token_stats[d] = {"mean": round(sum(ls) / len(ls), 1), "p90": ls[int(0.9 * len(ls))], "max": ls[-1],
                          "over_256": sum(n > 256 for n in ls)}

    counts = Counter((r["domain"], r["split"]) for r in records)
    stats = {
        "records": len(records),
        "per_domain": {d: {s: counts[(d, s)] for s in ("train", "validation")} for d in DOMAINS},
        "compressed_bytes": corpus_path.stat().st_size,
        "sha256": hashlib.sha256(corpus_path.read_bytes()).hexdigest(),
        "uncompressed_chars": sum(len(m["content"]) for r in records for m in r["messages"]),
        "vocab_size": len(tok),
        "tokens_per_conversation": token_stats,
        "seed": args.seed,
        "python": platform.python_version(),
        "debian_packages": _package_versions(),
    }
    (args.out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
