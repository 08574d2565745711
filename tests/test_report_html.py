"""index.html of `build_report`, checked headless: the report directory is served over HTTP
(127.0.0.1, an ephemeral port), the page fetched and parsed, and every image and link in it
fetched back.

`check_served_index(directory)` is the reusable checker: it works on any report directory
(a fabricated one here, the real results/ elsewhere) and cross-checks index.html against the
index.md beside it.
"""

from __future__ import annotations

import contextlib
import re
import threading
import urllib.error
import urllib.request
from functools import partial
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

from spectra.analysis.html_index import PROBLEMS_TABLE
from spectra.analysis.report import build_report
from test_analysis import make_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = '<script>alert("x")</script> & \'quotes\''  # a failed run's error: must show as text


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@contextlib.contextmanager
def serve(directory: str | Path):
    """Serve `directory` on 127.0.0.1 (port chosen by the OS) in a thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def fetch(url: str) -> tuple[int, str, bytes]:
    """(HTTP status, content type, body) of a GET; an HTTP error is returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get_content_type(), r.read()
    except urllib.error.HTTPError as e:
        return e.code, "", b""


class IndexParser(HTMLParser):
    """Collects the page's tables (name, header cells, body rows as cell texts), images,
    links, and anything that would load from outside the page (scripts, stylesheets)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[dict] = []
        self.images: list[dict] = []
        self.links: list[str] = []
        self.external: list[str] = []  # <script>, <link>, <iframe>... anything fetched from elsewhere
        self.styles: list[str] = []
        self.text: list[str] = []
        self._part = None  # "thead" / "tbody" inside the current table
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append({"name": a.get("data-table"), "header": [], "rows": [], "spans": []})
        elif tag in ("thead", "tbody"):
            self._part = tag
        elif tag == "tr":
            self._row = []
        elif tag in ("th", "td") and self._row is not None:
            self._cell = []
            self.tables[-1]["spans"].append(int(a.get("colspan", 1)))
        elif tag == "img":
            self.images.append({"src": a.get("src"), "figure": a.get("data-figure"), "alt": a.get("alt")})
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif tag in ("script", "link", "iframe", "object", "embed", "base"):
            self.external.append(tag)
        elif tag == "style":
            self._in_style = True

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            t = self.tables[-1]
            if self._part == "thead":
                t["header"] = self._row
            else:
                t["rows"].append(self._row)
            self._row = None
        elif tag in ("thead", "tbody"):
            self._part = None
        elif tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)
        elif self._cell is not None:
            self._cell.append(data)
        self.text.append(data)


def _local(base: str, ref: str) -> str:
    """The absolute URL of a reference in the page, which must be relative (the page is
    self-contained: no scheme, no host, no absolute path)."""
    parts = urlsplit(ref)
    assert not parts.scheme and not parts.netloc and not ref.startswith("/"), f"not a relative link: {ref!r}"
    return urljoin(base + "index.html", ref)


def _check_tables(tables: list[dict]) -> None:
    """Every table: a header row of cells, at least one body row, rows as wide as the header."""
    for t in tables:
        assert t["name"], "a <table> without data-table"
        assert t["header"] and any(t["header"][1:]), f"{t['name']}: no header cells"
        assert t["rows"], f"{t['name']}: no <tbody> rows"
        for row in t["rows"]:
            assert len(row) == len(t["header"]) or row == ["(no rows)"], (t["name"], row, t["header"])


def _check_images(base: str, images: list[dict]) -> None:
    """Every <img> is served (200) and is a PNG or an SVG."""
    for img in images:
        status, _, body = fetch(_local(base, img["src"]))
        assert status == 200, (img["src"], status)
        assert body.startswith(PNG_MAGIC) or b"<svg" in body[:2048], f"{img['src']}: neither PNG nor SVG"


def _check_links(base: str, links: list[str]) -> list[str]:
    """Every link to a file is served (200, not empty; a .pdf is a PDF); in-page #anchors are
    skipped. Returns the file links."""
    files = [h for h in links if not h.startswith("#")]
    for href in files:
        status, _, body = fetch(_local(base, href))
        assert status == 200 and body, (href, status)
        if href.endswith(".pdf"):
            assert body.startswith(b"%PDF"), href
    return files


def _check_against_markdown(directory: Path, names: list[str], srcs: list[str]) -> None:
    """index.md beside the page lists the same tables and figures in the same order (only an
    index.md that build_report wrote, which starts with "# spectra report")."""
    md = directory / "index.md"
    text = md.read_text() if md.is_file() else ""
    if not text.startswith("# spectra report"):
        return
    md_tables = re.findall(r"\[md\]\(tables/([^)]+)\.md\)", text)
    md_images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert [n for n in names if n != PROBLEMS_TABLE] == md_tables
    assert [unquote(s) for s in srcs] == md_images
    assert (PROBLEMS_TABLE in names) == ("## Runs not counted" in text)


def check_served_index(directory: str | Path, against_markdown: bool = True) -> dict:
    """Serve a report directory over HTTP and check its index.html; returns what it found.

    Fetches /index.html (200, text/html) and parses it; asserts it loads nothing from outside
    (no script/link/iframe, no absolute or external URLs, no url()/@import in its <style>);
    every <table> has header cells and at least one <tbody> row as wide as the header; every
    <img src> is served (200) as a PNG or SVG; every <a href> to a file is served (200). With
    `against_markdown` and build_report's index.md beside it, both list the same tables and
    figures in the same order.

    Returns {"tables": [data-table names], "table_rows": {name: [[cell, ...], ...]},
    "headers": {name: [cell, ...]}, "images": [src], "figures": [data-figure names],
    "links": [file hrefs], "text": the page's text, "html": the page's source}.
    """
    directory = Path(directory)
    with serve(directory) as base:
        status, ctype, body = fetch(base + "index.html")
        assert status == 200 and ctype == "text/html", (status, ctype)
        page = body.decode("utf-8")
        p = IndexParser()
        p.feed(page)
        p.close()
        assert not p.external, f"external resources: {p.external}"
        assert not re.search(r"url\(|@import", "".join(p.styles)), "the <style> loads something"
        _check_tables(p.tables)
        _check_images(base, p.images)
        files = _check_links(base, p.links)
    names, srcs = [t["name"] for t in p.tables], [i["src"] for i in p.images]
    if against_markdown:
        _check_against_markdown(directory, names, srcs)
    return {"tables": names, "table_rows": {t["name"]: t["rows"] for t in p.tables},
            "headers": {t["name"]: t["header"] for t in p.tables}, "images": srcs,
            "figures": [i["figure"] for i in p.images], "links": files, "text": "".join(p.text), "html": page}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report (figures included) over 3 routers x 2 fabricated seeds, one failed run whose
    error holds markup, and a variant that logs no Gram orthogonality."""
    tmp = tmp_path_factory.mktemp("html")
    root = tmp / "sweep"
    root.mkdir()
    (root / "multirun.yaml").write_text("{}")
    for router in ("hash", "spectra", "topk"):
        for seed in (0, 1):
            gram = {} if router == "hash" else {"train/gram_orthogonality_mean": 0.5 + 0.01 * seed}
            recs = [{"step": s, "loss": 3.0 - 0.1 * s + 0.01 * seed, "train/cv_mean": 0.1 * s, **gram} for s in (1, 2, 3)]
            make_run(root / f"{router}_s{seed}", router, seed, loss=2.0 + 0.1 * seed, cv=0.1 + 0.01 * seed,
                     records=recs + [{"step": 3, "eval_loss": 2.0 + 0.1 * seed}])
    make_run(root / "spectra_s2", "spectra", 2, status="failed", extra_summary={"error": EVIL})
    return build_report([root], tmp / "rep")


def test_index_html_serves_every_table_figure_and_link(report):
    got = check_served_index(report.out)
    assert report.html == report.out / "index.html"
    # what the report recorded, in index.md's order: the runs not counted, then every table
    assert got["tables"] == [PROBLEMS_TABLE] + [t.name for t in report.tables]
    assert got["figures"] == list(report.figures) and len(got["images"]) == len(report.figures) >= 3
    for name, (png, pdf) in report.figures.items():
        assert f"figures/{png.name}" in got["images"] and f"figures/{pdf.name}" in got["links"]
        assert report.captions[name] in got["text"]
    for t in report.tables:  # the same cells as the markdown / LaTeX, with the same row labels
        assert got["headers"][t.name] == [str(t.display.index.name or ""), *map(str, t.display.columns)]
        assert got["table_rows"][t.name] == [[str(i), *map(str, r.tolist())] for i, r in t.display.iterrows()]
        assert {f"tables/{t.name}.{ext}" for ext in ("md", "tex", "csv")} <= set(got["links"])
        assert t.title in got["text"]


def test_index_html_escapes_text(report):
    got = check_served_index(report.out)
    assert "<script>" not in got["html"] and "&lt;script&gt;" in got["html"]
    (failed,) = [r for r in got["table_rows"][PROBLEMS_TABLE] if r[0] == "failed"]
    assert failed[-1] == EVIL  # shown as the text it is


def test_checker_catches_a_missing_image_an_external_script_and_an_empty_table(report, tmp_path):
    import shutil

    def broken(edit) -> Path:
        d = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(report.out, d)
        edit(d)
        return d

    def page_edit(old, new):
        return lambda d: (d / "index.html").write_text((d / "index.html").read_text().replace(old, new, 1))

    missing_png = broken(lambda d: next((d / "figures").glob("*.png")).unlink())
    external = broken(page_edit("</head>", '<script src="https://cdn.example/x.js"></script></head>'))
    empty = broken(lambda d: (d / "index.html").write_text(
        re.sub(r"(<table data-table=\"comparison\">.*?<tbody>).*?(</tbody>)", r"\1\2",
               (d / "index.html").read_text(), count=1, flags=re.S)))
    for d, why in ((missing_png, r"\(404|404\)"), (external, "external"), (empty, "no <tbody> rows")):
        with pytest.raises(AssertionError, match=why):
            check_served_index(d)
