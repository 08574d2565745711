"""`docs` domain: technical prose from the Linux man-pages project (Debian `manpages`, `manpages-dev`).

Each page is rendered to plain text with man-db (`man -l`, 80 columns, no hyphenation or
justification) and cut into its sections; a page yields up to three question/answer pairs:
what it does (NAME + DESCRIPTION), what it returns (RETURN VALUE), and its C synopsis.
Licence: the pages' own licences (mostly "Linux-man-pages-copyleft", a verbatim-copying
licence; a few GPL/BSD), recorded per page in each file's header.
"""

from __future__ import annotations

import os
import random
import re
import subprocess

PACKAGES = ("manpages", "manpages-dev")
TARGET = 1500
_MAX_CHARS = 900  # answer length cap; cut at a paragraph (or sentence) boundary
_SECTION_KIND = {
    "1": "command", "2": "system call", "3": "library function", "4": "special file",
    "5": "file format", "6": "game", "7": "overview page", "8": "administration command",
}


def _package_pages() -> list[str]:
    """Real (non-symlink) man page files shipped by PACKAGES, sorted."""
    out = subprocess.run(["dpkg", "-L", *PACKAGES], capture_output=True, text=True, check=True).stdout
    pages = []
    for line in out.splitlines():
        if re.search(r"/usr/share/man/man\d/[^/]+\.gz$", line) and not os.path.islink(line):
            pages.append(line)
    return sorted(set(pages))


def _render(path: str) -> str:
    """Plain-text rendering of one page ('' if man fails or the page is only a `.so` link)."""
    env = dict(os.environ, MANWIDTH="80", MANPAGER="cat", LC_ALL="C.UTF-8")
    res = subprocess.run(["man", "--nj", "--nh", "-E", "UTF-8", "-l", path], capture_output=True, text=True, env=env)
    return res.stdout if res.returncode == 0 else ""


def _sections(text: str) -> dict[str, str]:
    """Split a rendered page into {HEADING: dedented body}; headings are unindented caps lines."""
    secs: dict[str, list[str]] = {}
    cur = None
    lines = text.splitlines()[1:-1]  # drop the running header and footer lines
    for line in lines:
        if line and not line[0].isspace() and line.upper() == line:
            cur = line.strip()
            secs[cur] = []
        elif cur is not None:
            secs[cur].append(line)
    out = {}
    for k, body in secs.items():
        # Body text is indented 7 columns, subsection headings 3: remove the common indent.
        nonblank = [ln for ln in body if ln.strip()]
        if not nonblank:
            continue
        ind = min(len(ln) - len(ln.lstrip()) for ln in nonblank)
        out[k] = "\n".join(ln[ind:].rstrip() for ln in body).strip("\n")
    return out


def _truncate(text: str, limit: int = _MAX_CHARS) -> str:
    """Whole paragraphs up to `limit` chars; a too-long first paragraph is cut after a sentence."""
    paras = text.split("\n\n")
    kept, n = [], 0
    for p in paras:
        if n + len(p) > limit:
            break
        kept.append(p)
        n += len(p) + 2
    if kept:
        return "\n\n".join(kept)
    head = paras[0][:limit]
    cut = head.rfind(". ")
    return head[: cut + 1] if cut > 0 else ""


def _page_records(path: str) -> list[dict]:
    text = _render(path)
    secs = _sections(text)
    if "NAME" not in secs or "DESCRIPTION" not in secs:
        return []
    name_line = " ".join(secs["NAME"].split())
    names, sep, summary = name_line.partition(" - ")
    if not sep:
        return []
    section = re.search(r"\.(\d)\w*\.gz$", path).group(1)
    first = names.split(",")[0].strip()
    kind = _SECTION_KIND.get(section, "manual page")
    src = f"man-pages:{os.path.basename(path)[:-3]}"
    recs = []

    def add(q: str, a: str) -> None:
        if a and len(a) >= 80:
            recs.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                         "domain": "docs", "source": src})

    desc = _truncate(secs["DESCRIPTION"])
    add(f"What does the {kind} `{first}` ({first}({section}) in the Linux manual) do?",
        f"{names.strip()} - {summary.strip()}\n\n{desc}")
    if "RETURN VALUE" in secs:
        add(f"What does `{first}` return, according to its manual page ({first}({section}))?",
            _truncate(secs["RETURN VALUE"]))
    if "SYNOPSIS" in secs and section in ("2", "3"):
        add(f"Show the C synopsis of `{first}`: the headers to include and its declaration.",
            _truncate(secs["SYNOPSIS"]))
    return recs


def records(rng: random.Random, target: int = TARGET) -> list[dict]:
    """Up to `target` records sampled (seeded): every page's description first, then the rest.

    Descriptions are the most prose-like pairs, so they are preferred over return-value and
    synopsis pairs when the target is smaller than the number of candidates.
    """
    first, rest = [], []
    for path in _package_pages():
        recs = _page_records(path)
        first.extend(recs[:1])
        rest.extend(recs[1:])
    rng.shuffle(first)
    rng.shuffle(rest)
    return (first + rest)[:target]
