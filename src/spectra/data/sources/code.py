"""`code` domain: functions from the Python standard library with their docstrings.

User: "Write a Python function `name(args)` that <docstring summary>."
Assistant: the function's real source in a ```python fence (docstring included).
Licence: Python Software Foundation License (the stdlib of the Python running the build).
"""

from __future__ import annotations

import ast
import os
import random
import sysconfig
import textwrap

# Packages that are tests, demos, GUI glue or vendored copies: not representative library code.
_SKIP_DIRS = {
    "test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip",
    "turtledemo", "__pycache__", "pydoc_data", "tkinter", "unittest", "distutils",
}
_MIN_CHARS, _MAX_CHARS = 150, 1000  # source length bounds: long enough to say something, short enough to fit a row
_PER_FILE_CAP = 40  # at most this many functions from one module, so no single module dominates
TARGET = 1500
# Docstring openings that are imperative verbs and can be conjugated ("Return" -> "returns").
_IMPERATIVES = set(
    "Return Create Get Set Make Convert Parse Compute Add Remove Check Read Write Open Close Send Build "
    "Find Test Format Encode Decode Handle Process Update Initialize Load Save Run Start Stop Register "
    "Determine Emit Print Generate Copy Split Join Call Raise Change Extract Yield Wait Try Construct Look "
    "Append Insert Delete Reset Apply Flush Fetch Put Validate Normalize Translate Search Match Compile "
    "Quote Unquote Escape Resolve Replace Execute Install Accept Receive Retrieve Prepare Clear Mark Release "
    "Acquire Schedule Cancel Fill Strip Expand Lock Unlock Compare Count Collect Guess Iterate List Map "
    "Pop Push Render Report Restore Select Serialize Show Sort Store Unpack Pack Verify Wrap Unwrap".split()
)


def _summary(doc: str) -> str | None:
    """First sentence of a docstring as an instruction clause, or None if it is unusable."""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    first = " ".join(first.split())
    if len(first) < 15 or len(first) > 220 or first.startswith((">>>", ":", "(")):
        return None
    first = first.rstrip(".")
    # "Return the x" -> "returns the x" reads naturally after "that"; other openings
    # ("Called when ...", "no-fold-literal = ...") are quoted verbatim instead.
    word, _, rest = first.partition(" ")
    if word in _IMPERATIVES and rest:
        verb = word.lower()
        verb += "es" if verb.endswith(("sh", "ch", "x", "s")) else "s"
        return f"that {verb} {rest}"
    if word.endswith("s") and word[:-1] in _IMPERATIVES | {w + "e" for w in _IMPERATIVES} and rest:
        return f"that {word.lower()} {rest}"  # already third person: "Returns the ..."
    return f'matching this description: "{first}"'


def _has_body(node: ast.FunctionDef) -> bool:
    """False for stubs whose body is only a docstring, `pass`, `...` or `raise NotImplementedError`."""
    for stmt in node.body[1:]:
        if isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
            continue
        if isinstance(stmt, ast.Raise) and "NotImplementedError" in ast.unparse(stmt):
            continue
        return True
    return False


def _signature(node: ast.FunctionDef) -> str:
    """`name(arg, kw=...)` as written, without annotations' noise beyond what ast.unparse gives."""
    return f"{node.name}({ast.unparse(node.args)})"


def _candidates(root: str) -> list[tuple[str, str, str, str]]:
    """(relpath, qualname, prompt, source) for every documented function in the stdlib tree."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = os.path.join(dirpath, fn)
            try:
                with open(path, encoding="utf-8") as f:
                    src = f.read()
                tree = ast.parse(src)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            rel = os.path.relpath(path, root)
            per_file = []
            # Walk classes one level deep so methods are named Class.method.
            for top in tree.body:
                items = [(None, top)]
                if isinstance(top, ast.ClassDef):
                    items = [(top.name, n) for n in top.body]
                for cls, node in items:
                    if not isinstance(node, ast.FunctionDef) or node.name.startswith("__"):
                        continue
                    doc = ast.get_docstring(node)
                    seg = ast.get_source_segment(src, node)
                    if not doc or not seg or not (_MIN_CHARS <= len(seg) <= _MAX_CHARS) or not _has_body(node):
                        continue
                    summ = _summary(doc)
                    if summ is None:
                        continue
                    sig = _signature(node)
                    module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    if cls is None:
                        prompt = f"Write a Python function `{sig}` for the `{module}` module {summ}."
                    else:
                        prompt = f"Write the method `{cls}.{sig}` of the `{module}` module's `{cls}` class {summ}."
                    # Methods are indented in the file; the first line of the segment is not.
                    body = textwrap.dedent(" " * node.col_offset + seg)
                    per_file.append((rel, f"{cls + '.' if cls else ''}{node.name}", prompt, body))
            out.extend(per_file[:_PER_FILE_CAP])
    return out


def records(rng: random.Random, target: int = TARGET) -> list[dict]:
    """Sample `target` documented stdlib functions deterministically (sorted walk + seeded rng)."""
    root = sysconfig.get_paths()["stdlib"]
    cands = _candidates(root)
    rng.shuffle(cands)
    out = []
    for rel, qual, prompt, body in cands[:target]:
        out.append({
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": f"```python\n{body}\n```"},
            ],
            "domain": "code",
            "source": f"python-stdlib:{rel}:{qual}",
        })
    return out
