"""`python -m spectra.analysis` — from sweep directories to tables and figures.

    table  DIR...                 print the Table-7-style comparison (mean ± std over seeds per
                                  variant) and list failed / incomplete / duplicate runs
    report DIR... --out OUT       write every table (md/tex/csv), figure (png/pdf) and OUT/index.md
    latest [ROOT] [--count N]     print the newest sweep directories under ROOT (default outputs/),
                                  one per line (what `make report` reports on by default)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spectra.analysis.collect import collect, find_sweep_dirs, problems
from spectra.analysis.tables import comparison_table, to_markdown


def _print_problems(runs) -> None:
    for r in problems(runs).itertuples():
        print(f"{r.problem}: {r.run_dir}" + (f" ({r.reason})" if r.reason else ""))


def _table(args) -> int:
    try:
        runs, _ = collect(args.dirs)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if runs.empty:
        print(f"error: no run directories under {' '.join(args.dirs)}", file=sys.stderr)
        return 2
    t = comparison_table(runs, by=args.by)
    print(to_markdown(t))
    _print_problems(runs)
    return 0


def _report(args) -> int:
    from spectra.analysis.report import build_report  # deliberately lazy: matplotlib only for `report`

    try:
        rep = build_report(args.dirs, args.out, baseline=args.baseline, figures=not args.no_figures, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(rep.runs)} runs ({int(rep.runs['counted'].sum())} counted), {len(rep.tables)} tables, "
          f"{len(rep.figures)} figures -> {rep.index}")
    _print_problems(rep.runs)
    for note in rep.notes:
        print(f"note: {note}")
    return 0


def _latest(args) -> int:
    cwd = Path.cwd().resolve()
    for d in find_sweep_dirs(args.root, args.count):
        print(d.relative_to(cwd) if d.is_relative_to(cwd) else d)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spectra.analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", help="print the comparison table (mean ± std per variant) and problem runs")
    t.add_argument("dirs", nargs="+", help="sweep or run directories")
    t.add_argument("--by", default="variant", help="column to group by (default: variant = overrides minus seed)")
    r = sub.add_parser("report", help="write all tables, figures and index.md")
    r.add_argument("dirs", nargs="+", help="sweep or run directories")
    r.add_argument("--out", required=True, help="output directory (index.md, tables/, figures/)")
    r.add_argument("--baseline", default=None,
                   help="Table 13 baseline variant (full override string, short label, or a unique substring); "
                        "default: the ablation=full / router=spectra variant if present, else the first")
    r.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    r.add_argument("--no-figures", action="store_true", help="tables only")
    la = sub.add_parser("latest", help="print the newest sweep directories (holding multirun.yaml)")
    la.add_argument("root", nargs="?", default="outputs")
    la.add_argument("--count", type=int, default=5)
    args = parser.parse_args(argv)
    return {"table": _table, "report": _report, "latest": _latest}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
