"""Training throughput of `make demo`'s model: router=spectra vs router=topk, in one process.

The demo's config (`experiment=demo`: tiny Llama upcycled to E=8, k=2 MoE layers, sequences of 128
tokens, batches of 8, the bundled corpus) composed with Hydra, the model built and upcycled as
`spectra.train.run` builds it (`load_base_model` + `upcycle`), and trained in training mode:
forward, cross-entropy + the routers' aux losses, backward, gradient clipping, AdamW step over the
Trainer's parameter groups, the routers' per-step hook and the routing recorder, as `MoETrainer`
runs them. Both models train on the same batches, in alternation: a block of steps of one router,
then of the other, several rounds; tokens/s counts every token of a step (batch × sequence length,
as `summary.json`'s tokens_per_s does) over the block's wall time, and SPECTRA / top-k is the median
of the per-round ratios. Evaluation, logging and checkpoints (inside a demo run's train time) are
left out.

When `make demo` has left outputs/demo/{topk,spectra}/summary.json, their tokens/s ratio is shown
too, as a second figure (separate processes, possibly under different load).

    python -m benchmarks.bench_demo_train [--quick]
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.harness import Env, Section, md_table, section_main, sync, verdict
from benchmarks.targets import threshold
from spectra.config import SpectraConfig, load_config, validate
from spectra.data import PackedCollator, build_datasets, load_tokenizer
from spectra.metrics.recorder import RoutingRecorder
from spectra.moe import load_base_model, routers, upcycle
from spectra.train.run import cache_root
from spectra.train.trainer import param_groups

ROOT = Path(__file__).resolve().parents[1]
ROUTERS = ("spectra", "topk")
DEMO_RUNS = ROOT / "outputs" / "demo"
# Full: 8 rounds × 4 steps = 32 timed steps per router after 3 warm-up steps (~2 min on one CPU core).
ROUNDS, STEPS, WARMUP = 8, 4, 3
QUICK_ROUNDS, QUICK_STEPS, QUICK_WARMUP = 2, 2, 1
# Quick: the demo shrunk to a second of work (as bench_sweep's quick overrides); logging every 2
# steps so that the recorder's report (every logging_steps) runs too.
QUICK_OVERRIDES = ["data.max_seq_length=32", "trainer.per_device_train_batch_size=2",
                   "model.arch.num_hidden_layers=2", "data.max_train_samples=48", "trainer.logging_steps=2"]
TRAIN_SAMPLES = 400  # conversations packed into the batches (cycled): enough rows for varied batches


def demo_config(router: str, quick: bool) -> SpectraConfig:
    """`experiment=demo router=<router>` as `make demo` composes it (shrunk under --quick)."""
    overrides = ["experiment=demo", f"router={router}", f"data.max_train_samples={TRAIN_SAMPLES}",
                 "data.max_eval_samples=1"]
    return validate(load_config(overrides + (QUICK_OVERRIDES if quick else [])))


class Trainee:
    """One upcycled demo model with its optimizer: `step(batch)` is one training step."""

    def __init__(self, cfg: SpectraConfig, vocab_size: int, env: Env):
        torch.manual_seed(cfg.seed)
        model = load_base_model(cfg.model, vocab_size=vocab_size, cache_root=cache_root(), seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        upcycle(model, cfg, seed=cfg.seed)
        model.config.use_cache = False  # as run.py: packed documents are isolated only without a KV cache
        self.model = model.to(env.device).train()
        self.context = model.spectra_context
        self.routers = routers(model)
        t = cfg.trainer
        self.max_grad_norm = t.max_grad_norm
        # TrainingArguments' AdamW defaults (betas 0.9, 0.999, eps 1e-8), MoETrainer's groups.
        self.optimizer = torch.optim.AdamW(param_groups(model, t.router_lr, t.expert_lr, t.base_lr, t.weight_decay),
                                           lr=t.base_lr)
        self.recorder = RoutingRecorder()
        self.logging_steps = t.logging_steps
        self.steps = 0

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        ctx = self.context
        ctx.recording = True
        try:
            loss = self.model(**batch).loss
        finally:
            ctx.recording = False
        self.recorder.add(ctx.outputs)
        aux = ctx.aux_loss()
        if aux is not None:
            loss = loss + aux
        ctx.outputs = {}
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        for r in self.routers:
            r.on_optimizer_step(self.steps)
        ctx.step = self.steps
        if self.steps % self.logging_steps == 0:  # the Trainer's log: routing metrics read back (and reset)
            self.recorder.report(prefix="train/")


def batches(cfg: SpectraConfig, tokenizer, env: Env) -> list[dict[str, torch.Tensor]]:
    """The demo's training batches (packed rows of the bundled corpus, the Trainer's collator)."""
    train, _ = build_datasets(cfg.data, tokenizer, seed=cfg.seed)
    collate = PackedCollator(include_routing_mask=True)
    bs = cfg.trainer.per_device_train_batch_size
    rows = [train[i] for i in range(len(train) - len(train) % bs)]
    if not rows:
        raise RuntimeError(f"no full batch of {bs} rows in {len(train)} packed rows")
    return [{k: v.to(env.device) for k, v in collate(rows[i:i + bs]).items()} for i in range(0, len(rows), bs)]


def measure(env: Env) -> dict:
    """Tokens/s per router per round (alternating), plus the sizes."""
    rounds, steps, warmup = (QUICK_ROUNDS, QUICK_STEPS, QUICK_WARMUP) if env.quick else (ROUNDS, STEPS, WARMUP)
    cfgs = {r: demo_config(r, env.quick) for r in ROUTERS}
    cfg0 = cfgs[ROUTERS[0]]
    tokenizer = load_tokenizer(cfg0.data.tokenizer)
    data = batches(cfg0, tokenizer, env)
    trainees = {r: Trainee(cfg, len(tokenizer), env) for r, cfg in cfgs.items()}
    feed = {r: itertools.cycle(data) for r in ROUTERS}  # each router sees the same batches in order
    for r, tr in trainees.items():
        for _ in range(warmup):
            tr.step(next(feed[r]))
    bs, seq = cfg0.trainer.per_device_train_batch_size, cfg0.data.max_seq_length
    tokens = steps * bs * seq
    per_round: dict[str, list[float]] = {r: [] for r in ROUTERS}
    for _ in range(rounds):
        for r, tr in trainees.items():
            sync(env.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                tr.step(next(feed[r]))
            sync(env.device)
            per_round[r].append(tokens / (time.perf_counter() - t0))
    layers = len(trainees[ROUTERS[0]].routers)
    return {"per_round": per_round, "rounds": rounds, "steps": steps, "warmup": warmup, "batch": bs, "seq": seq,
            "layers": layers, "experts": cfg0.moe.num_experts, "top_k": cfg0.moe.top_k,
            "hidden": cfg0.model.arch["hidden_size"]}


def demo_runs_ratio(root: Path = DEMO_RUNS) -> tuple[float, dict[str, float]] | None:
    """SPECTRA / top-k tokens/s of `make demo`'s completed runs (summary.json), or None."""
    tps = {}
    for r in ROUTERS:
        try:
            s = json.loads((root / r / "summary.json").read_text())
        except (OSError, ValueError):
            return None
        if s.get("status") != "completed" or not s.get("tokens_per_s"):
            return None
        tps[r] = float(s["tokens_per_s"])
    return tps["spectra"] / tps["topk"], tps


def run(env: Env) -> Section:
    m = measure(env)
    pr = m["per_round"]
    med = {r: statistics.median(v) for r, v in pr.items()}
    ratios = [a / b for a, b in zip(pr["spectra"], pr["topk"])]
    ratio = statistics.median(ratios)
    figures = {"spectra_tokens_per_s": med["spectra"], "topk_tokens_per_s": med["topk"],
               "spectra_over_topk_tokens_per_s": ratio}
    rows = [[r, med[r], f"{min(v):.0f} – {max(v):.0f}"] for r, v in pr.items()]
    lines = [
        f"`experiment=demo` ({m['layers']} MoE layers, H={m['hidden']}, E={m['experts']}, k={m['top_k']}; "
        f"batch {m['batch']} × {m['seq']} tokens"
        + (", shrunk: --quick" if env.quick else "")
        + f"), fwd + bwd + AdamW step, training mode; {m['rounds']} rounds of {m['steps']} steps per router in "
        f"alternation after {m['warmup']} warm-up steps each.",
        "",
        md_table(["router", "tokens/s (median over rounds)", "range over rounds"], rows),
        "",
        f"**SPECTRA / top-k tokens/s = {ratio:.3f}** (median of the per-round ratios; rounds: "
        + ", ".join(f"{x:.2f}" for x in ratios) + ").",
    ]
    demo = demo_runs_ratio()
    if demo is not None:
        figures["demo_runs_spectra_over_topk_tokens_per_s"] = demo[0]
        lines += ["", f"From the demo runs (outputs/demo/*/summary.json, separate processes, evaluation included): "
                      f"SPECTRA {demo[1]['spectra']:.0f} tokens/s, top-k {demo[1]['topk']:.0f} tokens/s, "
                      f"ratio **{demo[0]:.3f}**."]
    else:
        lines += ["", "No completed demo runs under outputs/demo (`make demo`): no second figure."]
    verdicts = [] if env.quick else [verdict("SPECTRA / top-k training tokens/s, demo model", ratio,
                                             threshold("demo_train"), higher_is_better=True)]
    return Section("demo_train", "8. Demo training throughput: SPECTRA vs top-k", "\n".join(lines), figures, verdicts)


def main(argv: list[str] | None = None) -> None:
    section_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
