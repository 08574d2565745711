"""Our MoE block beside Hugging Face's Qwen3-MoE sparse block, at the demo's and the paper's layer.

Forward + backward, training mode, the same weights: HF's `Qwen3MoeSparseMoeBlock`
(transformers.models.qwen3_moe: linear gate, softmax, top-k, renormalised weights, stacked SwiGLU
experts) gets our top-k block's gate and expert weights, so both route every token to the same
experts and do the same multiply-adds (the outputs are checked equal). Measured in alternation:

    HF <impl>         Qwen3MoeSparseMoeBlock with experts_implementation = grouped_mm, eager (where
                      E ≤ 8: a loop over experts, far off at E = 32) and, on CUDA, batched_mm (where
                      its gathered weights fit in 1 GiB; on CPU it is 20× grouped_mm even at the quick
                      layer); the target's reference is the fastest of them
    ours: top-k       MoEBlock(top-k router, grouped_mm experts): the router records its routing output
                      (diagnostics, dispatch counts) as in training
    ours: SPECTRA     MoEBlock(SPECTRA router, grouped_mm experts), for scale (no target here)

Target (benchmarks/targets.py): our top-k block / HF's best ≤ 1.0 at both layers.

    python -m benchmarks.bench_hf_block [--quick] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from benchmarks.harness import Env, Section, Timing, md_table, paired_ratio, section_main, time_interleaved, verdict
from benchmarks.layers import DEMO, PAPER, PAPER_CPU, QUICK, Shape, hidden, layer_step, make_block
from benchmarks.targets import threshold
from spectra.moe.block import MoEBlock

ROUNDS = 9
_BATCHED_MAX_BYTES = 1 << 30  # batched_mm materialises every assignment's expert weights
_EAGER_MAX_E = 8  # eager loops over the experts in Python: far off the others at E = 32 (section 3)


def shapes(env: Env) -> dict[str, Shape]:
    """The demo's layer and the paper's (N capped on CPU), or the quick one."""
    if env.quick:
        return {"quick": QUICK}
    return {"demo": DEMO, "paper": PAPER if (env.cuda or not env.cap_cpu) else PAPER_CPU}


def hf_impls(shape: Shape, env: Env) -> list[str]:
    """HF experts implementations worth timing at `shape`."""
    impls = ["grouped_mm"]
    if env.cuda and shape.N * shape.k * 3 * shape.H * shape.I * 4 <= _BATCHED_MAX_BYTES:
        impls.append("batched_mm")
    if shape.E <= _EAGER_MAX_E:
        impls.append("eager")
    return impls


def hf_block(ours: MoEBlock, shape: Shape, impl: str, env: Env) -> Qwen3MoeSparseMoeBlock:
    """HF's Qwen3-MoE sparse block holding `ours`' gate and expert weights (copies)."""
    cfg = Qwen3MoeConfig(hidden_size=shape.H, moe_intermediate_size=shape.I, num_experts=shape.E,
                         num_experts_per_tok=shape.k, norm_topk_prob=True, hidden_act="silu")
    cfg._experts_implementation = impl
    block = Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.gate.weight)  # [E, H]
        block.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)  # [E, 2I, H]
        block.experts.down_proj.copy_(ours.experts.down_proj)  # [E, H, I]
    return block.to(env.device, env.dtype).train()


def _hf_step(block: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of HF's block on x against a fixed random output gradient (as `layer_step`)."""
    g = torch.randn_like(x, dtype=torch.float32)
    params = [p for p in block.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        (block(x).float() * g).sum().backward()

    return step


def measure(shape: Shape, env: Env) -> tuple[dict[str, Timing], float]:
    """Timings per block at one shape, in alternation; and max |ours − HF| of the outputs."""
    ours = make_block("topk", shape, env)
    x = hidden(shape, env)
    hf = {impl: hf_block(ours, shape, impl, env) for impl in hf_impls(shape, env)}
    with torch.no_grad():
        ref = ours(x)
        diff = max(float((blk(x) - ref).abs().max()) for blk in hf.values())
    fns = {f"HF {impl}": _hf_step(blk, x) for impl, blk in hf.items()}
    fns["ours: top-k"] = layer_step(ours, x, env)
    fns["ours: SPECTRA"] = layer_step(make_block("spectra", shape, env), x, env)
    return time_interleaved(fns, env, rounds=ROUNDS, warmup=1 if shape.N * shape.H > 2**19 else 2), diff


def run(env: Env) -> Section:
    rows, figures, verdicts, notes = [], {}, [], []
    for label, shape in shapes(env).items():
        t, diff = measure(shape, env)
        best = min((name for name in t if name.startswith("HF ")), key=lambda name: t[name].ms)
        for name, timing in t.items():
            ratio = paired_ratio(timing, t[best])
            rows.append([label, name, timing.ms, f"{ratio:.3f}", f"{timing.best_ms / t[best].best_ms:.3f}"])
        ratio = paired_ratio(t["ours: top-k"], t[best])
        figures[f"{label}_topk_over_hf"] = ratio
        figures[f"{label}_spectra_over_hf"] = paired_ratio(t["ours: SPECTRA"], t[best])
        figures[f"{label}_max_abs_diff"] = diff
        notes.append(f"- `{label}`: {shape.describe()}; HF's fastest: {best.removeprefix('HF ')}; "
                     f"max |ours − HF| of the top-k block's output: {diff:.2g}")
        if not env.quick:  # quick sizes are per-op overhead, not the target's figure
            verdicts.append(verdict(f"our top-k MoE block / HF Qwen3-MoE block ({best.removeprefix('HF ')}), "
                                    f"{label} layer", ratio, threshold(f"hf_block_{label}")))
    body = "\n".join([
        "Forward + backward, training mode, median ms; every block measured in alternation "
        f"({ROUNDS} rounds; × HF best is the median over rounds of the paired ratio, in brackets the ratio of "
        "the fastest runs). HF's Qwen3MoeSparseMoeBlock holds our top-k block's gate and expert weights, so "
        "both send every token to the same experts.",
        "",
        md_table(["layer", "block", "ms (median)", "× HF best", "× HF best (fastest runs)"], rows),
        "",
        *notes,
    ])
    return Section("hf_block", "7. Our MoE block vs Hugging Face's Qwen3-MoE block", body, figures, verdicts)


def main(argv: list[str] | None = None) -> None:
    section_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
