"""`quotes` domain: quotations, aphorisms and short literary passages from Debian `fortunes`.

User: a request for a quote on the fortune file's topic (or by its attributed author).
Assistant: the fortune text verbatim (tabs expanded). Licence: BSD (fortune-mod), see
/usr/share/doc/fortunes/copyright. Only the non-offensive `fortunes` package is used, and
categories dominated by politics, ethnicity, drugs or gender jokes are left out.
"""

from __future__ import annotations

import os
import random
import re

FORTUNE_DIR = "/usr/share/games/fortunes"
TARGET = 1500
# file -> topic phrase used in the prompt
TOPICS = {
    "art": "art", "computers": "computers", "education": "education", "food": "food",
    "humorists": "humour", "kids": "children", "law": "the law", "linux": "Linux",
    "literature": "literature", "love": "love", "medicine": "medicine", "people": "people",
    "pets": "pets", "riddles": "riddles", "science": "science", "songs-poems": "songs and poetry",
    "sports": "sports", "startrek": "Star Trek", "tao": "the Tao", "wisdom": "wisdom", "work": "work",
}
_TEMPLATES = (
    "Share a quotation about {topic}.",
    "Give me a memorable quote on the subject of {topic}.",
    "Tell me something witty about {topic}.",
    "Do you know a good saying about {topic}?",
    "Quote a short passage related to {topic}.",
)
_AUTHOR_RE = re.compile(r"^\s+--\s*([A-Z][\w.' -]{2,40}?)(?:,|$)", re.MULTILINE)
_MIN_CHARS, _MAX_CHARS = 40, 700
_PER_FILE_CAP = 110  # keeps the big files (people, computers) from swamping the small ones


def _fortunes(name: str) -> list[str]:
    """Entries of one fortune file (UTF-8 `.u8` copy), '%'-separated, tabs expanded."""
    with open(os.path.join(FORTUNE_DIR, name + ".u8"), encoding="utf-8") as f:
        raw = f.read()
    out = []
    for entry in raw.split("\n%\n"):
        text = entry.strip("\n%").expandtabs(8).rstrip()
        text = "\n".join(ln.rstrip() for ln in text.splitlines())
        if "\b" in text or not (_MIN_CHARS <= len(text) <= _MAX_CHARS):
            continue  # overstruck (bold/underline) entries and one-liners/very long pieces
        out.append(text)
    return out


def records(rng: random.Random, target: int = TARGET) -> list[dict]:
    """Sample fortunes per topic (capped per file), then `target` overall, deterministically."""
    cands = []
    for name in sorted(TOPICS):
        entries = _fortunes(name)
        rng.shuffle(entries)
        for text in entries[:_PER_FILE_CAP]:
            m = _AUTHOR_RE.search(text)
            if m and rng.random() < 0.3:
                prompt = f"Give me a quote by {m.group(1).strip()}."
            else:
                prompt = rng.choice(_TEMPLATES).format(topic=TOPICS[name])
            cands.append({
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}],
                "domain": "quotes",
                "source": f"fortunes:{name}",
            })
    rng.shuffle(cands)
    return cands[:target]
