"""`python -m spectra.results` — train the results plan and turn it into tables and verdicts.

    run    [--plan P] [--workers N] [--no-commit] [--family F ...] [--bases-only]
                         train every unfinished cell (bases first), committing each finished
                         cell's small outputs; re-run to resume (`make results` = run + report)
    status [--plan P]    cells completed / failed / incomplete (training, or stopped) / not started
                         per family, wall time so far
    report [--out DIR]   tables (md/tex/csv), figures, index.html and README verdicts from results/runs
    verify CELL... [--tol T] [--fresh]
                         train committed cells again (outputs/verify/) and compare their numbers
                         with the committed ones: bit-identical, within seed noise, or not
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spectra.results.plan import PlanError, load_plan
from spectra.results.runner import run_plan, status_rows

DEFAULT_PLAN = "results/plan.yaml"


def _run(args) -> int:
    plan = load_plan(args.plan)
    failed = run_plan(plan, Path.cwd(), Path(args.root), workers=args.workers, commit=not args.no_commit,
                      families=args.family or None, bases_only=args.bases_only)
    if failed:
        print(f"error: {len(failed)} task(s) failed; re-run to retry them:", file=sys.stderr)
        for f in failed:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


def _status(args) -> int:
    import pandas as pd

    rows = status_rows(load_plan(args.plan), Path(args.root))
    frame = pd.DataFrame(rows)
    total = frame.drop(columns="family").sum()
    frame.loc[len(frame)] = {"family": "all", **total.to_dict()}
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    return 0


def _report(args) -> int:
    from spectra.results.report import write_results  # lazy: matplotlib only for `report`

    out = write_results(Path(args.root), load_plan(args.plan), Path(args.out or args.root))
    print(f"wrote {out}")
    return 0


def _verify(args) -> int:
    from spectra.results.verify import verify_cells

    out = Path(args.out)
    verdicts = verify_cells(load_plan(args.plan), Path.cwd(), Path(args.root), args.cells, out_root=out,
                            tol=args.tol, fresh=args.fresh, report=out / "verify.json")
    bad = [f"{v.label} ({v.verdict})" for v in verdicts if not v.ok]
    print(f"verify: {len(verdicts) - len(bad)} of {len(verdicts)} cell(s) reproduced; details in {out / 'verify.json'}")
    if bad:
        print("error: not reproduced: " + ", ".join(bad), file=sys.stderr)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spectra.results", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", default=DEFAULT_PLAN, help=f"the results plan (default {DEFAULT_PLAN})")
    parser.add_argument("--root", default="results", help="results directory (runs/, base/, tables; default results)")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train every unfinished cell of the plan")
    r.add_argument("--workers", type=int, default=2, help="cells trained at once (default 2; threads = cores / workers)")
    r.add_argument("--no-commit", action="store_true", help="do not commit finished cells to git")
    r.add_argument("--family", action="append", help="only this family (repeatable)")
    r.add_argument("--bases-only", action="store_true", help="only the dense base models (make base-model)")
    sub.add_parser("status", help="progress per family")
    rp = sub.add_parser("report", help="tables, figures, index.html and verdicts")
    rp.add_argument("--out", default=None, help="output directory (default: the results directory)")
    v = sub.add_parser("verify", help="train committed cells again and compare with the committed numbers")
    v.add_argument("cells", nargs="+", help="cell labels <family>/<cell>, shell patterns allowed ('sweep_B/*')")
    v.add_argument("--out", default="outputs/verify", help="where the re-runs go (default outputs/verify)")
    v.add_argument("--tol", type=float, default=0.0,
                   help="|Δ eval_loss| always accepted on top of the seed-noise bound (default 0)")
    v.add_argument("--fresh", action="store_true", help="retrain even when a finished re-run is already there")
    args = parser.parse_args(argv)
    try:
        return {"run": _run, "status": _status, "report": _report, "verify": _verify}[args.command](args)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
