"""`write_index_html(report)`: a report's `index.md` as one self-contained HTML page, `index.html`.

Same sections in the same order as index.md (sources, run status, runs not counted, tables,
figures, notes). Every table is a real <table> (<thead> of header cells, <tbody> of rows) built
from the same `Table.display` cells the markdown and LaTeX come from (best cells in <strong>),
with its title, its notes and links to its .md/.tex/.csv; every figure is an <img> of its PNG
with its caption and a link to its PDF. Paths are relative to the page, so the directory can be
moved or served as it is. No external CSS, JS or fonts: one inline <style>. All text and
attribute values are HTML-escaped; link targets are also percent-encoded.

Marks a checker can rely on: each table carries `data-table="<name>"` (the runs-not-counted
table: `data-table="runs_not_counted"`), each figure's <img> `data-figure="<name>"`.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from spectra.analysis.collect import seed_text
from spectra.analysis.rendered_table import MISSING, Table

if TYPE_CHECKING:  # report.py imports this module; only the type is needed here
    from spectra.analysis.report import Report

PROBLEMS_TABLE = "runs_not_counted"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 80em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f0; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-style: italic; margin-top: 0.3em; }
code { background: #f4f4f4; padding: 0 0.2em; }
.links a { margin-right: 0.8em; }
"""


def _e(x) -> str:
    """Text or attribute value, escaped (quotes too, so it is safe inside attributes)."""
    return html.escape(str(x), quote=True)


def _href(path: str | Path, root: Path) -> str:
    """`path` relative to the page's directory `root`, as an escaped href/src: '/' kept,
    everything else percent-encoded (a space or '#' in a file name would otherwise break it)."""
    return _e(quote(Path(os.path.relpath(path, root)).as_posix(), safe="/"))


def _html_table(name: str, headers: list[str], rows: list[list[str]], strong=None) -> str:
    """<table data-table=name> with one <thead> row of `headers` and a <tbody> row per row.
    strong(i, j) -> bool: cell j of row i is emphasised (the markdown's **bold**)."""
    head = "".join(f"<th scope=\"col\">{_e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = [f"<th scope=\"row\">{_e(row[0])}</th>"] if row else []
        for j, v in enumerate(row[1:]):
            text = _e(v)
            cells.append(f"<td><strong>{text}</strong></td>" if strong and strong(i, j) and v != MISSING else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not body:  # say so rather than leave a bare header (markdown shows just the header row)
        body.append(f"<tr class=\"empty\"><td colspan=\"{max(len(headers), 1)}\">(no rows)</td></tr>")
    return (f"<table data-table=\"{_e(name)}\">\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
            + "\n".join(body) + "\n</tbody>\n</table>")


def table_html(t: Table, table_dir: Path, root: Path) -> str:
    """One report table: its title, links to its .md/.tex/.csv in `table_dir` (relative to the
    page's directory `root`), the <table>, its notes."""
    headers = [str(t.display.index.name or "")] + [str(c) for c in t.display.columns]
    rows = [[str(idx), *(str(v) for v in row.tolist())] for idx, row in t.display.iterrows()]
    links = " ".join(f"<a href=\"{_href(table_dir / f'{t.name}.{ext}', root)}\">{ext}</a>" for ext in ("md", "tex", "csv"))
    parts = [f"<section id=\"table-{_e(t.name)}\">", f"<h3>{_e(t.title)}</h3>", f"<p class=\"links\">{links}</p>",
             _html_table(t.name, headers, rows, strong=t._is_best)]
    if t.notes:
        parts.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in t.notes) + "</ul>")
    return "\n".join(parts + ["</section>"])


def shown_path(run_dir, out: Path) -> str:
    """A run directory as the index shows it: relative to the report when inside it (a results
    page committed to the repository names no machine's absolute path), else as collected."""
    try:
        return str(Path(run_dir).resolve().relative_to(Path(out).resolve()))
    except ValueError:
        return str(run_dir)


def shown_text(text: str, out: Path) -> str:
    """A reason that names run directories (a duplicate's "counted instead"), with the paths under
    the report shown relative to it, as shown_path does."""
    for root in dict.fromkeys((str(Path(out).resolve()), str(Path(out).absolute()))):
        text = text.replace(root + os.sep, "")
    return text


def _problems_html(rep: Report) -> str:
    """The runs not counted (failed / incomplete / duplicate), as index.md lists them."""
    if rep.problems is None or rep.problems.empty:
        return ""
    rows = [[str(r.problem), shown_path(r.run_dir, rep.out), str(r.variant), seed_text(r.seed),
             shown_text(str(r.reason), rep.out)[:400]]
            for r in rep.problems.itertuples()]
    table = _html_table(PROBLEMS_TABLE, ["problem", "run", "variant", "seed", "reason"], rows)
    return f"<section id=\"{PROBLEMS_TABLE}\">\n<h2>Runs not counted</h2>\n{table}\n</section>"


def figure_html(name: str, png: Path, pdf: Path, caption: str, root: Path) -> str:
    """One figure: heading, <img> of its PNG (path relative to `root`), caption, PDF link."""
    return "\n".join([
        f"<section id=\"figure-{_e(name)}\">", f"<h3>{_e(name)}</h3>", "<figure>",
        f"<img src=\"{_href(png, root)}\" alt=\"{_e(caption or name)}\" data-figure=\"{_e(name)}\">",
        f"<figcaption>{_e(caption or name)}</figcaption>", "</figure>",
        f"<p class=\"links\"><a href=\"{_href(pdf, root)}\">PDF</a></p>", "</section>"])


def render_index_html(rep: Report, root: Path | None = None) -> str:
    """The page's text: the sections of index.md, in its order, as HTML; file links relative
    to `root`, the directory the page will be in (default `rep.out`)."""
    root = Path(root) if root is not None else Path(rep.out)
    table_dir = Path(rep.out) / "tables"  # where build_report wrote them
    sources = ", ".join(f"<code>{_e(shown_path(p, rep.out))}</code>" for p in rep.sources)
    parts = ["<!DOCTYPE html>", "<html lang=\"en\">", "<head>", "<meta charset=\"utf-8\">",
             "<title>spectra report</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
             "<h1>spectra report</h1>", f"<p>Sources: {sources}</p>", f"<p>{_e(rep.status_line())}</p>",
             _problems_html(rep), "<h2>Tables</h2>", *(table_html(t, table_dir, root) for t in rep.tables), "<h2>Figures</h2>"]
    parts += [figure_html(name, png, pdf, rep.captions.get(name, ""), root) for name, (png, pdf) in rep.figures.items()]
    if not rep.figures:
        parts.append("<p>(none)</p>")
    if rep.notes:
        parts += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in rep.notes) + "</ul>"]
    return "\n".join(p for p in parts + ["</body>", "</html>"] if p) + "\n"


def write_index_html(rep: Report, out_dir: str | Path | None = None) -> Path:
    """Write `index.html` for `rep` into `out_dir` (default `rep.out`, where its tables/ and
    figures/ are, which its links are relative to) and return its path."""
    out_dir = Path(out_dir) if out_dir is not None else Path(rep.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    path.write_text(render_index_html(rep, out_dir), encoding="utf-8")
    return path
