"""The SPECTRA router's GRU routing state over sequence length S: time and memory, one row (B = 1).

The router's token recurrence over [x; prev] (what `router.routing_state` runs), forward + backward,
at the paper's sizes H = 576, Dh = 128. Memory, three ways:
    saved for backward   bytes of the distinct activation tensors autograd keeps between forward and
                         backward (saved-tensor hooks, parameters excluded): exact, device-independent;
    peak (CUDA)          torch.cuda.max_memory_allocated above what was allocated before;
    peak RSS (CPU)       growth of the resident set over one forward + backward, sampled, each S in
                         a fresh process (so earlier sizes leave no cached memory behind); --quick:
                         the largest S only, in this process (a smoke check of the sampler).
Target: time and memory linear in S (log-log slope ≈ 1). Up to S = 8k the nn.GRU-autograd
reference (`token_recurrence(fused=False)`, what CPU ran before the hand-written backward) is
timed too.

    python -m benchmarks.bench_gru [--quick] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch

from benchmarks.harness import (
    DTYPES,
    Env,
    Section,
    add_common_args,
    cuda_peak_mb,
    loglog_slope,
    make_env,
    md_table,
    paired_ratio,
    rss_mb,
    run_json_subprocess,
    time_interleaved,
    verdict,
)
from benchmarks.layers import PAPER, Shape, make_router
from benchmarks.targets import threshold
from spectra.routing.base import RoutingInputs
from spectra.routing.gru import token_recurrence

REFERENCE_MAX = 8192


def lengths(env: Env) -> list[int]:
    if env.quick:
        return [64, 128, 256]
    return [2048, 8192, 32768, 131072]  # 128k: ~20 s per forward + backward on one CPU core


class _Step:
    """Forward + backward of router.routing_state on one row of S tokens."""

    def __init__(self, s: int, env: Env, fused: bool | None = None):
        shape = Shape(B=1, S=s, H=PAPER.H, I=PAPER.I, E=PAPER.E, k=PAPER.k)
        self.router = make_router("spectra", shape).to(env.device, env.dtype).train()
        self.x = env.tensor(1, s, shape.H).requires_grad_()
        self.prev = env.tensor(1, s, shape.Dh)  # a middle MoE layer's input state
        valid = torch.ones(1, s, dtype=torch.bool, device=env.device)
        doc_start = torch.zeros_like(valid)
        doc_start[:, 0] = True
        self.inputs = RoutingInputs(hidden=self.x, valid=valid, doc_start=doc_start, prev_state=self.prev)
        self.g = torch.randn(1, s, shape.Dh, device=env.device)
        self.h0 = torch.zeros(1, shape.Dh, device=env.device, dtype=env.dtype)
        self.env, self.fused = env, fused

    def forward(self) -> torch.Tensor:
        """What router.routing_state does for token_and_depth: GRU over [x; prev], states [1, S, Dh]."""
        inp = torch.cat([self.x, self.prev], dim=-1)  # [1, S, H + Dh]
        return token_recurrence(self.router.gru, inp, self.inputs.valid, self.inputs.doc_start, self.h0, fused=self.fused)

    def __call__(self) -> None:
        self.router.zero_grad(set_to_none=True)
        self.x.grad = None
        y = self.forward()
        (y.float() * self.g).sum().backward()


def saved_for_backward_mb(step: _Step) -> float:
    """MiB of distinct activation storages autograd saves for backward during one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in step.router.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = step.forward()
    del y
    return sum(seen.values()) / 2**20


def peak_rss_child(s: int, threads: int, dtype: torch.dtype) -> dict:
    """In a fresh process: peak RSS above the start, sampled every 0.2 ms over one forward + backward.

    Sampled rather than read from ru_maxrss: the import of torch leaves a high-water mark that
    would hide the smaller sizes.
    """
    torch.set_num_threads(threads)
    env = Env(device=torch.device("cpu"), dtype=dtype, quick=False, threads=threads, min_run_time=0.0)
    _Step(256, env)()  # warm up allocator and lazy initialisation at a small size
    step = _Step(s, env)
    base = rss_mb()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(2e-4)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    step()
    done.set()
    sampler.join()
    return {"s": s, "peak_rss_growth_mb": max(peak[0] - base, 0.0)}


def run(env: Env) -> Section:
    xs = lengths(env)
    steps = {s: _Step(s, env) for s in xs}
    fns: dict[str, object] = {f"scan {s}": steps[s] for s in xs}
    fns.update({f"nn.GRU {s}": _Step(s, env, fused=False) for s in xs if s <= REFERENCE_MAX})
    # Every length (and the reference) in alternation, so load from other work hits them alike.
    timed = time_interleaved(fns, env, rounds=3, warmup=1)
    rows, times, saved = [], [], []
    for s in xs:
        step = steps[s]
        t = timed[f"scan {s}"].ms
        ref = ""
        if s <= REFERENCE_MAX:
            ref = f"{timed[f'nn.GRU {s}'].ms:.1f} ({paired_ratio(timed[f'nn.GRU {s}'], timed[f'scan {s}']):.2f}×)"
        mb = saved_for_backward_mb(step)
        if env.cuda:
            peak = cuda_peak_mb(step, env.device)
        elif env.quick:  # quick: no child process (seconds of start-up); in this process, largest S only
            peak = peak_rss_child(s, env.threads, env.dtype)["peak_rss_growth_mb"] if s == xs[-1] else "—"
        else:
            child = ["--peak-rss-of", str(s), "--threads", str(env.threads), "--dtype", str(env.dtype).replace("torch.", "")]
            peak = run_json_subprocess("benchmarks.bench_gru", child)["peak_rss_growth_mb"]
        times.append(t)
        saved.append(mb)
        rows.append([s, t, f"{1e3 * t / s:.1f}", ref, mb, peak])
    slope_t, slope_m = loglog_slope(xs, times), loglog_slope(xs, saved)
    tail = (times[-1] / xs[-1]) / (times[-2] / xs[-2])  # per-token time, largest S over the one before
    peak_name = "peak allocated MiB (CUDA)" if env.cuda else "peak RSS growth MiB"
    body = "\n".join([
        f"GRU routing state ([x; prev] -> token recurrence) forward + backward, one row of S tokens, H={PAPER.H}, Dh={PAPER.Dh} "
        f"(median ms; all lengths and the reference measured in alternation, 3 rounds). 'nn.GRU autograd' is "
        f"the reference path for S ≤ {REFERENCE_MAX} (its time, and × the default path's, paired).",
        "",
        md_table(["S", "ms", "µs / token", "nn.GRU autograd ms", "saved for backward MiB", peak_name], rows),
        "",
        f"Fitted log-log slopes in S: time **{slope_t:.2f}**, saved memory **{slope_m:.2f}** (1 = linear). "
        f"Time per token at S = {xs[-1]} over S = {xs[-2]}: {tail:.2f} (the cleaner linearity figure on CPU, "
        "where the smallest S can run with its working set in cache).",
    ])
    figures = {"slope_time": slope_t, "slope_memory": slope_m, "per_token_tail_ratio": tail}
    verdicts = [] if env.quick else [
        verdict("GRU time, log-log slope in S", slope_t, threshold("gru_time_slope"), unit=""),
        verdict("GRU saved memory, log-log slope in S", slope_m, threshold("gru_memory_slope"), unit=""),
    ]
    return Section("gru", "5. Router GRU vs sequence length", body, figures, verdicts)


def main(argv: list[str] | None = None) -> None:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--peak-rss-of", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    if args.peak_rss_of is not None:
        print(json.dumps(peak_rss_child(args.peak_rss_of, args.threads or torch.get_num_threads(), DTYPES[args.dtype])))
        return
    print(run(make_env(args)).markdown())


if __name__ == "__main__":
    main()
