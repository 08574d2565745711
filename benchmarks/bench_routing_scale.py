"""Sinkhorn + quota selection vs the number of tokens N and of experts E.

One "routing step" is the training branch of the SPECTRA router from the OSR cost to the combine
weights: log-domain Sinkhorn plan (ε = 0.05, 3 iterations) -> quota top-k (α = 1.25) -> softmax of
the selected log-plan entries, forward + backward to the cost. Costs are OSR costs of cosine
scores with a few experts preferred over the others, so the quota has imbalance to correct.

Targets (benchmarks/targets.py): at N = 8k, E = 32 the routing step's share of the SPECTRA layer's
forward + backward;
time grows linearly in N (log-log slope ≈ 1).

    python -m benchmarks.bench_routing_scale [--quick] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from benchmarks.harness import (
    Env,
    Section,
    loglog_slope,
    md_table,
    section_main,
    time_ms,
    verdict,
)
from benchmarks.layers import PAPER, QUICK, hidden, layer_step, make_block
from benchmarks.targets import threshold
from spectra.routing.orthogonality import gram_matrix
from spectra.routing.osr import osr_cost
from spectra.routing.selection import expert_capacity, quota_topk
from spectra.routing.sinkhorn import sinkhorn

K, EPS, ITERS, ALPHA = 4, 0.05, 3, 1.25


def osr_costs(n: int, e: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """[N, E] OSR costs of synthetic cosine scores (per-expert preference + per-token noise)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.tanh(0.5 * torch.randn(n, e, generator=gen) + 0.3 * torch.randn(e, generator=gen))  # [N, E]
    m = F.normalize(torch.randn(e, 32, generator=gen), dim=-1)  # [E, D]
    return osr_cost(s, gram_matrix(m), 0.5, 0.5, 0.7).to(device)


def routing_step(cost: torch.Tensor, k: int):
    """Closures (full step, Sinkhorn only, quota only) on a leaf copy of `cost`, and the quota rounds."""
    n, e = cost.shape
    leaf = cost.detach().clone().requires_grad_()
    valid = torch.ones(n, dtype=torch.bool, device=cost.device)
    cap = expert_capacity(n, k, e, ALPHA)
    g = torch.randn(n, k, device=cost.device)

    def plan():
        _, log_q = sinkhorn(leaf, EPS, ITERS, valid, return_log=True)  # [N, E]
        return log_q

    def full() -> None:
        leaf.grad = None
        log_q = plan()
        index = quota_topk(log_q, k, cap, valid, n_valid=n).index  # [N, k]
        weight = torch.softmax(log_q.gather(1, index), dim=-1)  # [N, k]
        (weight * g).sum().backward()

    def sinkhorn_only() -> None:
        leaf.grad = None
        (plan()[:, :k] * g).sum().backward()

    with torch.no_grad():
        log_q = plan()
    rounds = quota_topk(log_q, k, cap, valid, n_valid=n).rounds

    def quota_only() -> None:
        quota_topk(log_q, k, cap, valid, n_valid=n)

    return full, sinkhorn_only, quota_only, rounds


def sizes(env: Env) -> tuple[list[int], list[int], int]:
    """(N values at E = 32, E values at N = n_ref, n_ref)."""
    if env.quick:
        return [256, 512, 1024], [4, 8, 16], 512
    return [1024 * 2**i for i in range(8)], [8, 16, 32, 64, 128], 8192  # 1k ... 128k


def run(env: Env) -> Section:
    n_values, e_values, n_ref = sizes(env)
    e_ref = 8 if env.quick else 32
    rows_n, rows_e, totals = [], [], {}
    for n in n_values:
        full, sk, qt, rounds = routing_step(osr_costs(n, e_ref, env.device), min(K, e_ref))
        t = {name: time_ms(fn, env).ms for name, fn in (("full", full), ("sinkhorn", sk), ("quota", qt))}
        totals[n] = t["full"]
        rows_n.append([n, t["sinkhorn"], t["quota"], rounds, t["full"], f"{1e3 * t['full'] / n:.2f}"])
    for e in e_values:
        full, sk, qt, rounds = routing_step(osr_costs(n_ref, e, env.device), min(K, e))
        t = {name: time_ms(fn, env).ms for name, fn in (("full", full), ("sinkhorn", sk), ("quota", qt))}
        rows_e.append([e, t["sinkhorn"], t["quota"], rounds, t["full"]])

    # The layer at N = n_ref, E = e_ref: the paper's layer (quick: the quick layer at its N).
    shape = dataclasses.replace(QUICK, B=n_ref // QUICK.S) if env.quick else dataclasses.replace(PAPER, B=n_ref // PAPER.S)
    layer_ms = time_ms(layer_step(make_block("spectra", shape, env), hidden(shape, env), env), env,
                       warmup=1, min_run_time=0.0, min_runs=2).ms
    full_ref, _, _, _ = routing_step(osr_costs(n_ref, e_ref, env.device), min(K, e_ref))
    share = 100 * time_ms(full_ref, env).ms / layer_ms
    slope = loglog_slope(n_values, [totals[n] for n in n_values])
    growth = totals[n_values[-1]] / totals[n_values[0]]

    body = "\n".join([
        f"Routing step = Sinkhorn (ε={EPS}, {ITERS} iterations, log domain) + quota top-k (α={ALPHA}) + combine "
        "weights, forward + backward to the cost (median ms). Quota alone is forward only (no gradient).",
        "",
        f"**vs N** (E = {e_ref}, k = {min(K, e_ref)}):",
        "",
        md_table(["N", "Sinkhorn ms", "quota ms", "quota rounds", "routing step ms", "µs / token"], rows_n),
        "",
        f"Fitted log-log slope of the routing step in N: **{slope:.2f}** (1 = linear); "
        f"time({n_values[-1]}) / time({n_values[0]}) = {growth:.0f} for {n_values[-1] // n_values[0]}× the tokens.",
        "",
        f"**vs E** (N = {n_ref}, k = min(4, E)):",
        "",
        md_table(["E", "Sinkhorn ms", "quota ms", "quota rounds", "routing step ms"], rows_e),
        "",
        f"SPECTRA layer forward + backward at N = {n_ref} ({shape.describe()}): {layer_ms:.0f} ms; "
        f"the routing step is **{share:.2f} %** of it.",
    ])
    figures = {"share_pct_at_ref": share, "slope_in_n": slope, "growth": growth, "layer_ms_at_ref": layer_ms}
    verdicts = [] if env.quick else [
        verdict(f"routing step share of the layer at N={n_ref}, E={e_ref}", share, threshold("routing_share"),
                unit=" %"),
        verdict("log-log slope in N", slope, threshold("routing_slope"), unit=""),
    ]
    return Section("routing_scale", "4. Sinkhorn + quota selection vs N and E", body, figures, verdicts)


def main(argv: list[str] | None = None) -> None:
    section_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
