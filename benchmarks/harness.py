"""Shared benchmark plumbing: command-line options, timing, peak memory, tables and verdicts.

Timing uses `torch.utils.benchmark.Timer.blocked_autorange` (it synchronises CUDA around each
block and reports the median) after explicit warm-up calls, so one-off costs (allocator growth,
lazy initialisation, autotuning) stay out of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers
from torch.utils import benchmark

from benchmarks.targets import MET, NOT_MET, met

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Env:
    """Where and how a benchmark runs."""

    device: torch.device
    dtype: torch.dtype
    quick: bool
    threads: int
    min_run_time: float  # seconds of timed runs per measurement (after warm-up)
    cap_cpu: bool = True  # on CPU, cap the paper's largest sizes (see each section)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def tensor(self, *shape: int) -> torch.Tensor:
        """A standard-normal tensor of env.dtype on env.device."""
        return torch.randn(*shape, device=self.device, dtype=self.dtype)


@dataclass
class Section:
    """One benchmark's result: markdown for RESULTS.md plus its headline figures."""

    key: str
    title: str
    body: str
    figures: dict[str, float] = field(default_factory=dict)
    verdicts: list[str] = field(default_factory=list)  # "figure = x (target ≤ y): met"

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", self.body.strip(), ""]
        if self.verdicts:
            lines += ["**Against the targets:**", "", *[f"- {v}" for v in self.verdicts], ""]
        return "\n".join(lines)


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--quick, --device, --dtype, --threads, --min-run-time, --no-cap (shared by every script)."""
    parser.add_argument("--quick", action="store_true", help="small sizes: seconds per section (smoke runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda | cuda:1 ...")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="parameter and activation dtype (routers still do their routing math in fp32)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds of timed runs per figure")
    parser.add_argument("--no-cap", action="store_true", help="on CPU too, run the paper's largest sizes")
    return parser


def section_main(run: Callable[[Env], Section], doc: str, argv: list[str] | None = None) -> None:
    """Command line of a benchmark script that is one section: common options -> run -> markdown."""
    parser = add_common_args(argparse.ArgumentParser(description=doc.splitlines()[0]))
    print(run(make_env(parser.parse_args(argv))).markdown())


def make_env(args: argparse.Namespace) -> Env:
    """Apply the common options (threads, seed) and return the Env."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    torch.manual_seed(0)
    min_run = args.min_run_time if args.min_run_time is not None else (0.05 if args.quick else 0.5)
    return Env(device=device, dtype=DTYPES[args.dtype], quick=args.quick, threads=torch.get_num_threads(),
               min_run_time=min_run, cap_cpu=not args.no_cap)


def sync(device: torch.device) -> None:
    """Wait for queued kernels (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Median, interquartile range and fastest run of one measurement, in milliseconds.

    rounds_ms: for `time_interleaved`, the median of each round, in order (for paired ratios).
    """

    ms: float
    iqr_ms: float
    runs: int
    best_ms: float = float("nan")
    rounds_ms: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.ms:.2f} ms"


def _timer(fn: Callable[[], object]) -> benchmark.Timer:
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def _summary(times_s: list[float], runs: int) -> Timing:
    q = statistics.quantiles(times_s, n=4) if len(times_s) > 1 else [times_s[0]] * 3
    return Timing(ms=statistics.median(times_s) * 1e3, iqr_ms=(q[2] - q[0]) * 1e3, runs=runs, best_ms=min(times_s) * 1e3)


def _block(timer: benchmark.Timer, min_run_time: float, min_blocks: int) -> tuple[list[float], int]:
    """Per-call times of one `blocked_autorange`, topped up to `min_blocks` single calls for slow fns."""
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times, runs = list(m.times), len(m.times) * m.number_per_run
    while len(times) < min_blocks:  # a call slower than min_run_time gives one block only
        times.append(timer.timeit(number=1).times[0])
        runs += 1
    return times, runs


def time_ms(fn: Callable[[], object], env: Env, warmup: int = 2, min_run_time: float | None = None,
            min_runs: int = 3) -> Timing:
    """Median wall time of `fn()` after `warmup` calls (torch.utils.benchmark, CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    sync(env.device)
    times, runs = _block(_timer(fn), env.min_run_time if min_run_time is None else min_run_time, min_runs)
    return _summary(times, runs)


def time_interleaved(fns: dict[str, Callable[[], object]], env: Env, rounds: int = 3, warmup: int = 2) -> dict[str, Timing]:
    """Median times of several functions measured in alternation (A B C A B C ...).

    For ratios: when the machine's load drifts (a shared host), every function sees the same
    drift, so the ratio of medians stays meaningful where back-to-back blocks would not.
    """
    timers = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        timers[name] = _timer(fn)
    sync(env.device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    per_round: dict[str, list[float]] = {name: [] for name in fns}
    runs = dict.fromkeys(fns, 0)
    for _ in range(rounds):
        for name, timer in timers.items():
            t, n = _block(timer, env.min_run_time / rounds, 1)
            times[name] += t
            per_round[name].append(statistics.median(t) * 1e3)
            runs[name] += n
    out = {name: _summary(times[name], runs[name]) for name in fns}
    for name in fns:
        out[name].rounds_ms = per_round[name]
    return out


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of a's time / b's time in the same round (from `time_interleaved`).

    Robust to load bursts on a shared machine: a burst inflates one round's pair, not the median.
    """
    return statistics.median(x / y for x, y in zip(a.rounds_ms, b.rounds_ms))


def cuda_peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """CUDA: peak memory allocated by `fn()` above what was allocated before it, in MiB."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def rss_mb() -> float:
    """Current resident set size of this process, MiB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def run_json_subprocess(module: str, args: list[str], timeout: int = 600) -> dict:
    """Run `python -m module args...` (same interpreter, repo root) and parse its last stdout line as JSON.

    Used where a figure needs a fresh process, e.g. a CPU peak-RSS measurement, which is a
    process-wide high-water mark that earlier work in this process would mask.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=root, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x: 1 = linear growth, 2 = quadratic."""
    return float(np.polyfit(np.log(xs), np.log(np.maximum(ys, 1e-12)), 1)[0])


def md_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table; floats with 2 decimals unless already formatted."""

    def cell(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(name: str, value: float, target: float, unit: str = "×", higher_is_better: bool = False) -> str:
    """'name = 1.07× (target ≤ 1.1×): met' (or 'NOT met'); thresholds come from benchmarks.targets."""
    ok = met(value, target, higher_is_better)
    sign = "≥" if higher_is_better else "≤"
    return f"{name} = {value:.3g}{unit} (target {sign} {target:g}{unit}): **{MET if ok else NOT_MET}**"


def machine_description(env: Env) -> list[str]:
    """Lines describing the machine and software versions (for RESULTS.md)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    lines = [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores visible; torch intra-op threads: {env.threads}",
        f"- device: {env.device}" + (f" ({torch.cuda.get_device_name(env.device)})" if env.cuda else "")
        + f", dtype {str(env.dtype).replace('torch.', '')}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"- OS: {platform.platform()}",
    ]
    return lines
