"""Sweep overhead: what a Hydra multirun spends per trial besides training.

Runs a real 2-cell multirun, `train.py -m experiment=demo router=topk,spectra` shortened to a few
steps, in a temporary directory, and compares the driver process's wall time with each trial's own
record in its `summary.json` (`wall_time_s`: the trial from start to summary; `train_time_s`:
`trainer.train()` alone). Per trial, overhead = wall − train (config, model build and upcycling,
data preparation, final evaluation and routing monitor, saving); the driver adds Python/Hydra
start-up and the sweep report once. The trials' tokens/s give SPECTRA ÷ top-k at demo scale as a
by-product.

    python -m benchmarks.bench_sweep [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import Env, Section, add_common_args, make_env, md_table

ROOT = Path(__file__).resolve().parents[1]
ROUTERS = ("topk", "spectra")
# Shrinks experiment=demo to seconds per trial (as tests/conftest.py's TINY_TRAIN does).
QUICK_OVERRIDES = ["data.max_seq_length=64", "data.max_train_samples=64", "data.max_eval_samples=8",
                   "trainer.per_device_train_batch_size=2", "trainer.per_device_eval_batch_size=4",
                   "model.arch.num_hidden_layers=2", "moe.num_experts=4"]


def run_sweep(env: Env, steps: int, out: Path) -> tuple[float, dict[str, dict]]:
    """Run the multirun into `out`; returns (driver wall seconds, router -> summary.json)."""
    args = [sys.executable, "train.py", "-m", "experiment=demo", f"router={','.join(ROUTERS)}",
            f"trainer.max_steps={steps}", "trainer.logging_steps=1", f"hydra.sweep.dir={out}"]
    if env.quick:
        args += QUICK_OVERRIDES
    child_env = {**os.environ, "OMP_NUM_THREADS": str(env.threads), "WANDB_MODE": "offline",
                 "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not env.cuda:
        child_env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu on a GPU host: the trials too
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"sweep failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    summaries = {}
    for path in sorted(out.glob("*/summary.json")):
        s = json.loads(path.read_text())
        summaries[s.get("router", path.parent.name)] = s
    return wall, summaries


def run(env: Env, steps: int | None = None) -> Section:
    steps = steps or (2 if env.quick else 30)
    with tempfile.TemporaryDirectory(prefix="spectra-bench-sweep-") as tmp:
        wall, sums = run_sweep(env, steps, Path(tmp) / "sweep")
    rows = []
    for i, (router, s) in enumerate(sorted(sums.items(), key=lambda kv: kv[1].get("started", 0.0))):
        trial_wall, train = float(s["wall_time_s"]), float(s["train_time_s"])
        rows.append([f"{i + 1}. {router}", trial_wall, train, trial_wall - train,
                     f"{100 * (trial_wall - train) / trial_wall:.0f} %", s.get("tokens_per_s", float("nan"))])
    n = len(sums)
    sum_wall = sum(float(s["wall_time_s"]) for s in sums.values())
    sum_train = sum(float(s["train_time_s"]) for s in sums.values())
    per_trial = (wall - sum_train) / max(n, 1)
    figures = {"overhead_per_trial_s": per_trial, "driver_s": wall - sum_wall}
    tps = {r: float(s.get("tokens_per_s", 0.0)) for r, s in sums.items()}
    ratio = ""
    if tps.get("topk") and tps.get("spectra"):
        figures["spectra_over_topk_tokens_per_s"] = tps["spectra"] / tps["topk"]
        ratio = (f" In these runs SPECTRA trains at {tps['spectra'] / tps['topk']:.2f}× top-k's tokens/s "
                 f"({steps} steps, so noisy).")
    body = "\n".join([
        f"`train.py -m experiment=demo router={','.join(ROUTERS)} trainer.max_steps={steps}`"
        + (" (+ quick shrinking overrides)" if env.quick else "") + ", seconds.",
        "",
        md_table(["trial", "trial wall", "training", "overhead", "overhead share", "tokens/s"], rows),
        "",
        f"Driver process: {wall:.1f} s for {n} trials; outside the trials (Python, Hydra, sweep report): "
        f"{wall - sum_wall:.1f} s. **Overhead per trial = (driver wall − Σ training) / trials = {per_trial:.1f} s.** "
        "The first trial also pays one-off work the next ones reuse in the same process or from the on-disk "
        "cache (lazy imports, dataset preparation)." + ratio,
    ])
    return Section("sweep", "6. Sweep overhead per trial", body, figures)


def main(argv: list[str] | None = None) -> None:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--steps", type=int, default=None, help="training steps per trial")
    args = parser.parse_args(argv)
    print(run(make_env(args), args.steps).markdown())


if __name__ == "__main__":
    main()
