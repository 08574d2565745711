"""Expert execution: grouped_mm experts vs a dense MLP of k× the FFN width vs a loop over experts.

At top-k routing each token runs k experts of width I, so the dense-equivalent is one SwiGLU MLP
of width k·I over every token: the same multiply-adds, no dispatch. Measured forward + backward:

    grouped_mm    transformers' grouped_mm experts (sort by expert, grouped GEMMs, combine)
    eager         transformers' reference: a Python loop over the experts that got tokens
    batched_mm    gathers each assignment's expert weights (memory N·k·3·H·I: skipped when large)
    MoE block     grouped_mm experts + the top-k router + dispatch bookkeeping (the whole block)
    dense         SwiGLU MLP, width k·I
Target (benchmarks/targets.py): MoE block / dense and grouped_mm / dense, at the largest N.

    python -m benchmarks.bench_experts [--quick] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from benchmarks.harness import (
    Env,
    Section,
    Timing,
    md_table,
    paired_ratio,
    section_main,
    time_interleaved,
    time_ms,
    verdict,
)
from benchmarks.layers import PAPER, PAPER_CPU, QUICK, Shape, hidden, layer_step, make_block, make_experts
from benchmarks.targets import threshold

_BATCHED_MAX_BYTES = 1 << 30  # batched_mm materialises every assignment's weights


def shapes(env: Env) -> list[Shape]:
    """Token counts to measure, smallest first. Per expert a grouped GEMM gets N·k/E rows, and its
    efficiency grows with them: the paper's N = 8k gives 1024; on CPU N stops at 4096 (512 rows)."""
    if env.quick:
        return [QUICK]
    if env.cuda or not env.cap_cpu:
        return [PAPER_CPU, PAPER]
    return [PAPER_CPU, dataclasses.replace(PAPER, S=1024)]


class DenseSwiGLU(torch.nn.Module):
    """The dense-equivalent MLP: down(silu(gate(x)) * up(x)) with width k·I."""

    def __init__(self, h: int, width: int):
        super().__init__()
        self.gate_up = torch.nn.Linear(h, 2 * width, bias=False)  # [2·kI, H]
        self.down = torch.nn.Linear(width, h, bias=False)  # [H, kI]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def _step(module, args: tuple, inputs: list[torch.Tensor], env: Env):
    """Closure: forward + backward of `module(*args)` against a fixed random output gradient."""
    with torch.no_grad():
        g = torch.randn_like(module(*args).float())

    def step() -> None:
        module.zero_grad(set_to_none=True)
        for t in inputs:
            t.grad = None
        y = module(*args)
        (y.float() * g).sum().backward()

    return step


def measure(shape: Shape, env: Env, references: bool) -> dict[str, Timing]:
    """Timings per implementation at one shape (reference loops only when `references`)."""
    n, k, e = shape.N, shape.k, shape.E
    x = env.tensor(n, shape.H).requires_grad_()  # [N, H]
    gen = torch.Generator().manual_seed(0)
    index = torch.rand(n, e, generator=gen).argsort(dim=1)[:, :k].to(env.device)  # [N, k] distinct, balanced
    weight = torch.softmax(torch.randn(n, k, generator=gen), dim=-1).to(env.device, env.dtype).requires_grad_()  # [N, k]

    fns, slow = {}, {}
    for impl in ("grouped_mm", "eager", "batched_mm") if references else ("grouped_mm",):
        if impl == "batched_mm" and n * k * 3 * shape.H * shape.I * 4 > _BATCHED_MAX_BYTES:
            continue
        experts = make_experts(shape, impl).to(env.device, env.dtype)
        # The reference loops are far off the target: timed once each, outside the alternation.
        (fns if impl == "grouped_mm" else slow)[impl] = _step(experts, (x, index, weight), [x, weight], env)
    dense = DenseSwiGLU(shape.H, k * shape.I).to(env.device, env.dtype)
    fns["dense"] = _step(dense, (x,), [x], env)
    fns["MoE block"] = layer_step(make_block("topk", shape, env), hidden(shape, env), env)
    timings = time_interleaved(fns, env, rounds=5, warmup=1 if n > 2048 else 2)
    timings.update({name: time_ms(fn, env, warmup=1, min_run_time=0.0, min_runs=1) for name, fn in slow.items()})
    return timings


def _over_dense(timings: dict[str, Timing], name: str) -> float:
    """name's time / dense's: paired per round where both were alternated, else of the medians."""
    if timings[name].rounds_ms and timings["dense"].rounds_ms:
        return paired_ratio(timings[name], timings["dense"])
    return timings[name].ms / timings["dense"].ms


def run(env: Env) -> Section:
    rows, figures, verdicts, notes = [], {}, [], []
    all_shapes = shapes(env)
    for i, shape in enumerate(all_shapes):
        timings = measure(shape, env, references=i == 0)
        ms = {name: t.ms for name, t in timings.items()}
        best = {name: t.best_ms for name, t in timings.items()}
        over = {name: _over_dense(timings, name) for name in timings}
        rows += [[shape.N, name, t, f"{over[name]:.3f}", f"{best[name] / best['dense']:.3f}"] for name, t in ms.items()]
        block_ratio, grouped_ratio = over["MoE block"], over["grouped_mm"]
        figures.update({f"N{shape.N}_block_over_dense": block_ratio, f"N{shape.N}_grouped_over_dense": grouped_ratio})
        if "eager" in ms:
            figures[f"N{shape.N}_eager_over_dense"] = over["eager"]
        notes.append(f"- N = {shape.N}: {shape.describe()}; {shape.N * shape.k // shape.E} rows per expert")
        if i == len(all_shapes) - 1:  # the targets' figures: the largest N
            figures.update(largest_block_over_dense=block_ratio, largest_grouped_over_dense=grouped_ratio)
            if not env.quick:  # quick sizes are per-op overhead, not the target's figure
                verdicts = [verdict(f"MoE block (top-k router + grouped_mm) / dense, N={shape.N}", block_ratio,
                                    threshold("experts_block")),
                            verdict(f"grouped_mm experts / dense, N={shape.N}", grouped_ratio,
                                    threshold("experts_grouped"))]
    body = "\n".join([
        "Forward + backward; dense = SwiGLU MLP of width k·I; routing: k random distinct experts per token "
        "(balanced). grouped_mm, dense and the block are measured in alternation (5 rounds, median ms; "
        "× dense is the median of the per-round ratios), the reference loops once and at the smallest N only "
        "(batched_mm only where its gathered weights fit in 1 GiB).",
        "",
        md_table(["N", "implementation", "ms (median)", "× dense", "× dense (fastest runs)"], rows),
        "",
        *notes,
    ])
    return Section("experts", "3. Expert execution vs the dense equivalent", body, figures, verdicts)


def main(argv: list[str] | None = None) -> None:
    section_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
