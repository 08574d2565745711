"""Check that the running interpreter's packages are exactly the committed lock.

    python requirements/check_lock.py requirements/lock.txt

Exit 0 when every `name==version` line of the lock is installed at that version; otherwise
print each difference (missing, or installed at another version) and exit 1. `make setup` runs
it last, so an install that drifted from the lock fails there instead of in a test or a run.
Standard library only: it runs before anything else is known to be importable.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path


def canonical(name: str) -> str:
    """PEP 503 normalised project name (`Foo_bar` and `foo-bar` are one project)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """`name==version` lines of a lock file -> {canonical name: version}; comments skipped."""
    pins = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "==" not in line:
            raise SystemExit(f"{path}:{number}: not a 'name==version' pin: {raw!r}")
        name, version = (part.strip() for part in line.split("==", 1))
        pins[canonical(name.split("[", 1)[0])] = version
    return pins


def differences(pins: dict[str, str]) -> list[str]:
    """One line per locked package that is missing or installed at another version."""
    # The first distribution of a name along sys.path is the one `import` and metadata.version()
    # resolve; later ones are shadowed copies, e.g. the packages setuptools vendors in
    # setuptools/_vendor, which it appends to sys.path once something imports it.
    installed: dict[str, str] = {}
    for d in metadata.distributions():
        installed.setdefault(canonical(d.metadata["Name"]), d.version)
    out = []
    for name, version in sorted(pins.items()):
        have = installed.get(name)
        if have is None:
            out.append(f"{name}: locked {version}, not installed")
        elif have != version:
            out.append(f"{name}: locked {version}, installed {have}")
    return out


def main(argv: list[str]) -> int:
    path = Path(argv[1] if len(argv) > 1 else "requirements/lock.txt")
    if not path.is_file():
        print(f"error: lock file {path} not found (run `make lock` to create it)", file=sys.stderr)
        return 2
    diff = differences(read_lock(path))
    if diff:
        print(f"error: installed packages differ from {path}:", file=sys.stderr)
        for line in diff:
            print(f"  {line}", file=sys.stderr)
        print("  (`make setup` installs the lock; `make lock` regenerates it from the newest releases)", file=sys.stderr)
        return 1
    print(f"{len(read_lock(path))} packages match {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
