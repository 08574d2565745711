"""Build-time source readers for the bundled corpus (used only by `build_corpus`).

Each module exposes `records(rng) -> list[dict]` returning chat records
`{"messages": [user, assistant], "domain": ..., "source": ...}` built from text that is
available offline on a Debian machine (see ../bundled/SOURCES.md for the packages).
Nothing here runs at training time: the project reads the shipped corpus file.
"""
