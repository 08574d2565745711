"""`python -m spectra.analysis table DIR...`: print the comparison table of the runs under DIRs."""

from __future__ import annotations

import argparse
import sys

from spectra.analysis.collect import collect
from spectra.analysis.tables import comparison_table, to_markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spectra.analysis", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", help="print mean ± std per variant (eval loss, load CV, tokens/s)")
    t.add_argument("dirs", nargs="+", help="sweep or run directories")
    t.add_argument("--by", default="variant", help="column to group by (default: variant = overrides minus seed)")
    args = parser.parse_args(argv)

    try:
        runs, _ = collect(args.dirs)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if runs.empty:
        print(f"error: no run directories under {' '.join(args.dirs)}", file=sys.stderr)
        return 2
    print(to_markdown(comparison_table(runs, by=args.by)))
    bad = runs[runs["status"] != "completed"]
    for _, r in bad.iterrows():
        print(f"{r['status']}: {r['run_dir']}" + (f" ({r['error']})" if r.get("error") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
