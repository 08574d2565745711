"""Data layer: the bundled multi-domain corpus, its tokenizer, chat formatting, packing, collation.

    load_bundled_corpus / load_smoltalk   conversations (DatasetDict train/validation)
    load_tokenizer                        the bundled BPE (or a hub tokenizer) with a ChatML template
    tokenize_conversation, pack           one conversation -> ids + labels; documents -> fixed rows
    build_datasets                        DataConfig -> (train, eval) row datasets
    PackedCollator                        rows -> model batch (drops domain_ids)

Rebuild the shipped corpus and tokenizer with `python -m spectra.data.build_corpus`.
"""

from .collate import PackedCollator
from .corpus import (
    BUNDLED_CORPUS,
    DOMAINS,
    assign_split,
    content_hash,
    content_key,
    load_bundled_corpus,
    load_smoltalk,
)
from .pipeline import build_datasets, get_domain_names, load_conversations, tokenize_dataset
from .sft import IGNORE_INDEX, iter_packed, iter_padded, pack, tokenize_conversation
from .tokenizer import BUNDLED_TOKENIZER_DIR, CHATML_TEMPLATE, SPECIAL_TOKENS, load_tokenizer

__all__ = [
    "BUNDLED_CORPUS",
    "BUNDLED_TOKENIZER_DIR",
    "CHATML_TEMPLATE",
    "DOMAINS",
    "IGNORE_INDEX",
    "SPECIAL_TOKENS",
    "PackedCollator",
    "assign_split",
    "build_datasets",
    "content_hash",
    "content_key",
    "get_domain_names",
    "iter_packed",
    "iter_padded",
    "load_bundled_corpus",
    "load_conversations",
    "load_smoltalk",
    "load_tokenizer",
    "pack",
    "tokenize_conversation",
    "tokenize_dataset",
]
