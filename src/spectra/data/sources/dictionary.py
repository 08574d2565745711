"""`dictionary` domain: word definitions from WordNet 3.0 (Debian `wordnet-base`).

User: "What does the word X mean (as a noun)?" (a few phrasings).
Assistant: up to four numbered senses, each a gloss with its usage example(s) and synonyms.
Licence: WordNet 3.0 licence (permissive, attribution), /usr/share/doc/wordnet-base/copyright.
"""

from __future__ import annotations

import os
import random

WORDNET_DIR = "/usr/share/wordnet"
TARGET = 1500
POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
_MAX_SENSES = 4
_TEMPLATES = (
    "What does the word \"{w}\" mean as {an} {pos}?",
    "Define \"{w}\" ({pos}).",
    "Give the dictionary definitions of the {pos} \"{w}\".",
    "What are the meanings of \"{w}\" when used as {an} {pos}?",
)


def _index(pos: str) -> list[tuple[str, list[int]]]:
    """(lemma, synset offsets in sense-frequency order) for familiar single-word lemmas.

    Only lemmas with at least one sense tagged in the semantic concordance (tagsense_cnt > 0)
    are kept: those are words people actually use, not obscure taxonomy entries.
    """
    out = []
    with open(os.path.join(WORDNET_DIR, f"index.{pos}"), encoding="utf-8") as f:
        for line in f:
            if line.startswith(" "):
                continue  # licence header
            parts = line.split()
            lemma, p_cnt = parts[0], int(parts[3])
            rest = parts[4 + p_cnt:]
            sense_cnt, tagsense_cnt = int(rest[0]), int(rest[1])
            offsets = [int(x) for x in rest[2:2 + sense_cnt]]
            if tagsense_cnt > 0 and lemma.isalpha() and len(lemma) >= 3:
                out.append((lemma, offsets))
    return out


def _synset(fh, offset: int) -> tuple[list[str], str, list[str]]:
    """(words, definition, examples) of the synset at byte `offset` of a data.<pos> file."""
    fh.seek(offset)
    line = fh.readline().decode("utf-8")
    head, _, gloss = line.partition(" | ")
    parts = head.split()
    w_cnt = int(parts[3], 16)
    words = [parts[4 + 2 * i].replace("_", " ") for i in range(w_cnt)]
    # Adjective markers like "(a)" / "(p)" are syntax tags, not part of the word.
    words = [w.split("(")[0] for w in words]
    pieces = [p.strip() for p in gloss.strip().split(";")]
    definition = "; ".join(p for p in pieces if not p.startswith('"'))
    examples = [p.strip('"') for p in pieces if p.startswith('"')]
    return words, definition, examples


def _entry(lemma: str, pos_name: str, senses: list[tuple[list[str], str, list[str]]]) -> str:
    # The index is lower-cased; show the word as the first sense spells it ("Anglican").
    shown = next((w for w in senses[0][0] if w.lower() == lemma), lemma) if senses else lemma
    lines = [f"{shown} ({pos_name}):"]
    for i, (words, definition, examples) in enumerate(senses, 1):
        line = f"{i}. {definition}."
        if examples:
            label = "Example" if len(examples) == 1 else "Examples"
            line += f" {label}: " + "; ".join(f'"{e}"' for e in examples[:2]) + "."
        syn = [w for w in dict.fromkeys(words) if w.lower() != lemma]
        if syn:
            line += " Synonyms: " + ", ".join(syn[:5]) + "."
        lines.append(line)
    return "\n".join(lines)


def records(rng: random.Random, target: int = TARGET) -> list[dict]:
    """`target` (lemma, part of speech) entries sampled deterministically across the four POS files."""
    cands = []
    for pos in sorted(POS):
        cands.extend((pos, lemma, offs) for lemma, offs in _index(pos))
    rng.shuffle(cands)
    handles = {pos: open(os.path.join(WORDNET_DIR, f"data.{pos}"), "rb") for pos in POS}
    try:
        out = []
        for pos, lemma, offs in cands[:target]:
            senses = [_synset(handles[pos], o) for o in offs[:_MAX_SENSES]]
            pos_name = POS[pos]
            an = "an" if pos_name[0] in "aeiou" else "a"
            prompt = rng.choice(_TEMPLATES).format(w=lemma, pos=pos_name, an=an)
            out.append({
                "messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": _entry(lemma, pos_name, senses)}],
                "domain": "dictionary",
                "source": f"wordnet-3.0:{pos}:{lemma}",
            })
        return out
    finally:
        for fh in handles.values():
            fh.close()
