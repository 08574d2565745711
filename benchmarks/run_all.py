"""Run every benchmark section and write the results file (RESULTS.md).

    python -m benchmarks.run_all                       # full mode -> benchmarks/RESULTS.md
    python -m benchmarks.run_all --quick               # seconds per section -> outputs/benchmarks/RESULTS.quick.md
    python -m benchmarks.run_all --only layer,gru --out /tmp/r.md
    python -m benchmarks.run_all --device cuda --dtype bfloat16

A section that fails is written with its error and makes the exit status 1; the others still run.
The output ends with the Targets table (benchmarks/targets.py): every target's figure, threshold
and met / NOT met.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

from benchmarks import (
    bench_breakdown,
    bench_demo_train,
    bench_experts,
    bench_gru,
    bench_hf_block,
    bench_layer,
    bench_routing_scale,
    bench_sweep,
)
from benchmarks.harness import Env, Section, add_common_args, machine_description, make_env
from benchmarks.targets import Row, evaluate, summary_line, targets_markdown
from spectra.contracts.rundir import write_atomic

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {  # key -> (module, title used when it fails)
    "breakdown": (bench_breakdown, "1. Table 9: SPECTRA layer time by stage"),
    "layer": (bench_layer, "2. SPECTRA layer vs Switch top-k layer"),
    "experts": (bench_experts, "3. Expert execution vs the dense equivalent"),
    "routing_scale": (bench_routing_scale, "4. Sinkhorn + quota selection vs N and E"),
    "gru": (bench_gru, "5. Router GRU vs sequence length"),
    "sweep": (bench_sweep, "6. Sweep overhead per trial"),
    "hf_block": (bench_hf_block, "7. Our MoE block vs Hugging Face's Qwen3-MoE block"),
    "demo_train": (bench_demo_train, "8. Demo training throughput: SPECTRA vs top-k"),
}


def run_sections(env: Env, only: list[str]) -> tuple[list[Section], dict[str, float], bool]:
    """Run the chosen sections in order; returns (sections, seconds per section, all succeeded)."""
    sections, seconds, ok = [], {}, True
    for key in only:
        module, title = SECTIONS[key]
        t0 = time.perf_counter()
        print(f"[bench] {key} ...", file=sys.stderr, flush=True)
        try:
            sections.append(module.run(env))
        except Exception:  # keep going: one broken section should not hide the others
            ok = False
            sections.append(Section(key, title, f"**failed:**\n\n```\n{traceback.format_exc()}```"))
        seconds[key] = time.perf_counter() - t0
        print(f"[bench] {key} done in {seconds[key]:.0f} s", file=sys.stderr, flush=True)
    return sections, seconds, ok


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def target_rows(env: Env, sections: list[Section]) -> list[Row]:
    """The Targets table's rows from the sections' figures (a target whose section did not run or
    failed is 'not measured'); the demo-training row also shows the demo runs' ratio when there is one."""
    figures = {s.key: s.figures for s in sections}
    demo_runs = figures.get("demo_train", {}).get("demo_runs_spectra_over_topk_tokens_per_s")
    notes = {"demo_train": f"in-process, paired; demo runs' summary.json: {demo_runs:.3f}×"} if demo_runs else {}
    return evaluate(figures, quick=env.quick, notes=notes)


def render(env: Env, sections: list[Section], seconds: dict[str, float], command: str, note: str, load: str) -> str:
    """The results file: header (command, machine, versions, note), summary of verdicts, every section,
    then the Targets table."""
    verdicts = [v for s in sections for v in s.verdicts]
    rows = target_rows(env, sections)
    lines = [
        "# Benchmarks: routing overhead and scaling",
        "",
        f"Written by `{command}` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} "
        f"({'quick' if env.quick else 'full'} mode, {sum(seconds.values()):.0f} s in all). "
        "Every ratio below is of two timings taken in the same process, in alternation where a section "
        "compares implementations, so load from other work on the machine shifts both sides alike.",
        "",
        "**Machine**",
        "",
        *machine_description(env),
        f"- load average (1, 5, 15 min) at the start: {load}; at the end: {_load()}",
        *([f"- note: {note}"] if note else []),
        "",
        "**Against the targets**",
        "",
        f"- {summary_line(rows)}" + (" (quick mode: at the quick sizes, not the targets')" if env.quick else ""),
        *[f"- {v}" for v in verdicts],
        "",
    ]
    for s in sections:
        lines += [s.markdown(), f"_Section time: {seconds.get(s.key, 0.0):.0f} s._", ""]
    lines.append(targets_markdown(rows, quick=env.quick))
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    parser.add_argument("--note", default="", help="a line for the results file's header (e.g. what else ran)")
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/RESULTS.md; "
                                                    "--quick: outputs/benchmarks/RESULTS.quick.md)")
    args = parser.parse_args(argv)
    only = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in only if k not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    env = make_env(args)
    out = Path(args.out) if args.out else ROOT / ("outputs/benchmarks/RESULTS.quick.md" if env.quick else "benchmarks/RESULTS.md")
    load = _load()
    sections, seconds, ok = run_sections(env, only)
    text = render(env, sections, seconds, " ".join(["python -m benchmarks.run_all", *map(shlex.quote, argv)]),
                  args.note, load)
    write_atomic(out, lambda f: f.write(text))  # an interrupted write never leaves half a results file
    print(text)
    print(f"[bench] wrote {out}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
