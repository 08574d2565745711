"""Documents of the local lm-eval tasks, built from the bundled corpus's held-out split.

The YAML files beside this module name these functions (`custom_dataset: !function bundled.…`);
lm-eval calls them with the task's metadata and `dataset_kwargs` as keyword arguments.

    spectra_bundled_ppl_<domain>   one document per validation conversation of <domain>: the
                                   messages' contents joined by a blank line ("\\n\\n"); scored
                                   with loglikelihood_rolling (word/byte perplexity, bits/byte)
    spectra_bundled_mc             the user turn as context, four candidate replies: its own
                                   assistant reply and those of the next three conversations of
                                   the same domain (validation order); the gold reply sits at
                                   position i % 4 for the domain's i-th conversation

The split is the corpus's own (`spectra.data.load_bundled_corpus`, a content hash), so no
document of these tasks was trained on by a run on the bundled corpus.
"""

from __future__ import annotations

import datasets

from spectra.data import DOMAINS, load_bundled_corpus

N_CHOICES = 4


def document_text(messages: list[dict]) -> str:
    """A conversation as one plain-text document: its contents, in order, joined by a blank line."""
    return "\n\n".join(m["content"] for m in messages)


def _validation(domain: str | None) -> datasets.Dataset:
    ds = load_bundled_corpus()["validation"]
    if domain is None:
        return ds
    if domain not in DOMAINS:
        raise ValueError(f"unknown bundled domain {domain!r}; one of {', '.join(DOMAINS)}")
    return ds.filter(lambda d: d == domain, input_columns="domain")


def ppl_dataset(domain: str | None = None, **_metadata) -> datasets.DatasetDict:
    """{'validation': rows {text, domain}} for one domain (None: all domains, file order)."""
    ds = _validation(domain)
    rows = {"text": [document_text(m) for m in ds["messages"]], "domain": list(ds["domain"])}
    return datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows)})


def _split_turns(messages: list[dict]) -> tuple[str, str]:
    """(context, reply): everything before the last assistant turn, and that turn."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return document_text(messages[:last]), messages[last]["content"]


def mc_dataset(**_metadata) -> datasets.DatasetDict:
    """{'validation': rows {query, choices, gold, domain}}: pick a conversation's own reply."""
    ds = load_bundled_corpus()["validation"]
    rows = {"query": [], "choices": [], "gold": [], "domain": []}
    for domain in DOMAINS:
        turns = [_split_turns(m) for m, d in zip(ds["messages"], ds["domain"]) if d == domain]
        n = len(turns)
        if n < N_CHOICES:
            continue
        for i, (context, reply) in enumerate(turns):
            distractors = [turns[(i + j) % n][1] for j in range(1, N_CHOICES)]
            gold = i % N_CHOICES
            choices = distractors[:gold] + [reply] + distractors[gold:]
            rows["query"].append(context + "\n\n")
            rows["choices"].append(choices)
            rows["gold"].append(gold)
            rows["domain"].append(domain)
    return datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows)})
