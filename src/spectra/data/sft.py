"""SFT formatting (chat template -> input_ids + labels) and packing into fixed-length rows.

Label conventions (the causal LM shifts labels inside the model: logits at position t are
scored against labels[t + 1], so labels are aligned with input_ids, not pre-shifted):
  * IGNORE_INDEX (-100) marks tokens that carry no loss.
  * With assistant-only loss, only the assistant turns' content and their closing
    `<|im_end|>` are labelled (what the `{% generation %}` block of the template marks).
  * The first token of every conversation is always IGNORE_INDEX. Nothing in the document
    precedes it, so it is never a prediction target of its own document; in a packed row the
    only token that could "predict" it is the previous document's last token, and masking it
    means no loss term ever crosses a document boundary (with all-token loss too).

Packed rows (what `pack` yields), each list exactly `max_seq_length` long:
    input_ids     token ids of consecutive documents, then padding at the tail of the LAST row only
    labels        as above; IGNORE_INDEX on padding
    position_ids  0, 1, 2, ... restarting at 0 at every document start. transformers 5 derives
                  the packed-sequence attention mask from this (a new sequence wherever the
                  position does not increase by exactly 1; the collator then sends no
                  attention_mask), and the recurrent router resets its state there. A document
                  that continues into the next row keeps counting (e.g. 180, 181, ...).
                  The padding block gets its own 0, 1, 2, ... so it is a separate pseudo-document
                  that no real token can attend to.
                  CAVEAT: transformers only does this when the forward pass has no KV cache, i.e.
                  with use_cache=False (config or call). With the default config.use_cache=True a
                  DynamicCache is created even in training and documents attend across boundaries.
    domain_ids    the document's domain index for each token (see pipeline.get_domain_names), -1 on padding
                  (and on real tokens of documents without a domain: -1 does not mean "padding")
    routing_mask  1 on real tokens, 0 on the pad block (ROUTING_MASK). Packed rows carry no
                  attention_mask (see position_ids), so this is the only marker of padding the
                  routers get: the model's routing pre-hook (spectra.moe.context) pops it from the
                  forward's kwargs -- the model itself never receives it -- and routes the pad block
                  as padding: no Sinkhorn mass, no quota capacity, not in the Gram means, aux losses
                  or routing metrics (METHOD.md §2b).

Padded rows (`iter_padded`, data.packing=false) have the same columns plus attention_mask; their
routing_mask equals the attention_mask.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

IGNORE_INDEX = -100
PAD_DOMAIN = -1
ROUTING_MASK = "routing_mask"  # row column: 1 = real token, 0 = padding (module docstring)


def tokenize_conversation(tokenizer, messages: list[dict], assistant_only_loss: bool = True) -> dict[str, list[int]]:
    """Render `messages` with the tokenizer's chat template and label them.

    Returns {"input_ids": [T], "labels": [T]}: labels = input_ids on assistant tokens (content
    + end-of-turn token) and IGNORE_INDEX elsewhere; with assistant_only_loss=False every token
    is labelled. In both cases labels[0] = IGNORE_INDEX (see the module docstring).
    Raises ValueError if assistant-only loss is asked for but the template marks no assistant
    tokens (a template without `{% generation %}`; `load_tokenizer` swaps such templates out).
    """
    enc = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=False,
        return_assistant_tokens_mask=assistant_only_loss,
    )
    ids = [int(t) for t in enc["input_ids"]]
    if assistant_only_loss:
        mask = enc["assistant_masks"]
        if not any(mask) and any(m["role"] == "assistant" and m["content"] for m in messages):
            raise ValueError("the chat template marks no assistant tokens: it needs {% generation %} blocks "
                             "for assistant-only loss (use spectra.data.load_tokenizer, or assistant_only_loss=False)")
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, mask)]
    else:
        labels = list(ids)
    if labels:
        labels[0] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def _pieces(ex: dict, max_seq_length: int, split: bool) -> Iterator[tuple[list[int], list[int]]]:
    """A document's (input_ids, labels) as it enters rows: its first max_seq_length tokens
    (split=False: the rest is dropped), or every token, cut into consecutive pieces of
    max_seq_length (split=True). A piece after the first is a document of its own (its positions
    restart at 0, it attends only to itself), so its first token has no context to be
    predicted from: its label is IGNORE_INDEX, as a document's first token's is."""
    if len(ex["input_ids"]) != len(ex["labels"]):
        raise ValueError(f"input_ids and labels differ in length ({len(ex['input_ids'])} vs {len(ex['labels'])})")
    starts = range(0, len(ex["input_ids"]), max_seq_length) if split else range(min(1, len(ex["input_ids"])))
    for start in starts:
        ids = list(ex["input_ids"][start:start + max_seq_length])
        labels = list(ex["labels"][start:start + max_seq_length])
        if start:
            labels[0] = IGNORE_INDEX
        yield ids, labels


def _documents(examples: Iterable[dict], max_seq_length: int, split: bool) -> Iterator[tuple[list[int], list[int], int]]:
    """(input_ids, labels, domain_id) of every non-empty document piece entering rows (_pieces)."""
    for ex in examples:
        dom = int(ex.get("domain_id", PAD_DOMAIN))
        for ids, labels in _pieces(ex, max_seq_length, split):
            if ids:
                yield ids, labels, dom


def iter_packed(examples: Iterable[dict], max_seq_length: int, pad_token_id: int = 0,
                split_long_documents: bool = False) -> Iterator[dict]:
    """Greedy streaming packing: concatenate documents in order and cut rows of max_seq_length.

    examples: dicts with "input_ids", "labels" (equal length) and optionally "domain_id" (int,
    default PAD_DOMAIN). A document longer than max_seq_length is truncated to its first
    max_seq_length tokens (the only way tokens are dropped), or, with split_long_documents, cut
    into max_seq_length pieces that enter as documents of their own (no token dropped; see
    _pieces); a document may start in one row and continue in the next. Only the last row is
    padded (input_ids=pad_token_id, labels=IGNORE_INDEX, domain_ids=-1, position_ids 0.. and
    routing_mask 0 for the pad block). Yields dicts of five lists, each exactly max_seq_length
    long (format: module docstring).
    """
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be >= 1, got {max_seq_length}")
    keys = ("input_ids", "labels", "position_ids", "domain_ids", ROUTING_MASK)
    buf: dict[str, list[int]] = {k: [] for k in keys}
    for ids, labels, dom in _documents(examples, max_seq_length, split_long_documents):
        buf["input_ids"] += ids
        buf["labels"] += labels
        buf["position_ids"] += range(len(ids))
        buf["domain_ids"] += [dom] * len(ids)
        buf[ROUTING_MASK] += [1] * len(ids)
        while len(buf["input_ids"]) >= max_seq_length:
            yield {k: buf[k][:max_seq_length] for k in keys}
            buf = {k: buf[k][max_seq_length:] for k in keys}
    n_pad = max_seq_length - len(buf["input_ids"])
    if buf["input_ids"]:
        yield {
            "input_ids": buf["input_ids"] + [pad_token_id] * n_pad,
            "labels": buf["labels"] + [IGNORE_INDEX] * n_pad,
            "position_ids": buf["position_ids"] + list(range(n_pad)),
            "domain_ids": buf["domain_ids"] + [PAD_DOMAIN] * n_pad,
            ROUTING_MASK: buf[ROUTING_MASK] + [0] * n_pad,
        }


def pack(examples: Iterable[dict], max_seq_length: int, pad_token_id: int = 0,
         split_long_documents: bool = False) -> list[dict]:
    """All rows of `iter_packed` as a list (see there for the format and truncation rule)."""
    return list(iter_packed(examples, max_seq_length, pad_token_id, split_long_documents))


def iter_padded(examples: Iterable[dict], max_seq_length: int, pad_token_id: int = 0,
                split_long_documents: bool = False) -> Iterator[dict]:
    """No packing: one document per row, truncated to max_seq_length (or, with
    split_long_documents, one row per max_seq_length piece: _pieces), right-padded.

    Rows have the packed columns plus attention_mask (1 on tokens, 0 on padding); the model
    needs it here because position_ids run 0..max_seq_length-1 straight through the padding,
    so they cannot mark where the document ends. routing_mask equals attention_mask.
    """
    for ids, labels, dom in _documents(examples, max_seq_length, split_long_documents):
        n_pad = max_seq_length - len(ids)
        yield {
            "input_ids": ids + [pad_token_id] * n_pad,
            "labels": labels + [IGNORE_INDEX] * n_pad,
            "position_ids": list(range(max_seq_length)),
            "domain_ids": [dom] * len(ids) + [PAD_DOMAIN] * n_pad,
            ROUTING_MASK: [1] * len(ids) + [0] * n_pad,
            "attention_mask": [1] * len(ids) + [0] * n_pad,
        }
