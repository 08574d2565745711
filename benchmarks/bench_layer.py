"""SPECTRA MoE layer vs a Switch top-k MoE layer at the same E, k, H, N (forward + backward).

Both layers are the same `MoEBlock` with the same grouped_mm experts; only the router differs.
Switch runs at SPECTRA's k (softmax top-k, renormalised weights, load-balancing loss); plain
top-k (no aux loss) is listed too. Targets (benchmarks/targets.py): SPECTRA / Switch ≤ 1.3 at the
demo's layer and ≤ 1.05 at the paper's, judged on the default SPECTRA (router.state_cell=gru, the
paper's GRU). SPECTRA with router.state_cell=mingru (the cheaper minimal-GRU routing state,
routing/min_gru.py; not the paper's method), SPECTRA with a router sized to the layer
(router.gru_hidden_size = min(Dh, H/4), router.router_dim = min(D, 16): the paper's Dh=128, D=32
give the router as many multiply-adds as the experts at H=128) and both together are measured
beside it, in the same alternation, and their ratios to Switch are printed for information only.

    python -m benchmarks.bench_layer [--quick] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

from benchmarks.harness import (
    Env,
    Section,
    Timing,
    md_table,
    paired_ratio,
    section_main,
    time_interleaved,
    verdict,
)
from benchmarks.layers import DEMO, PAPER, PAPER_CPU, QUICK, Shape, hidden, layer_step, make_block
from benchmarks.targets import threshold

TARGETS = {"demo": "layer_demo", "paper": "layer_paper"}  # shape label -> benchmarks.targets key
ROUTERS = ("spectra", "switch", "topk")
# Extra measured variants: name -> (label, router, shape -> router overrides). Informational, never a target.
def _small_router(s: Shape) -> dict:
    return {"gru_hidden_size": min(s.Dh, s.H // 4), "router_dim": min(s.D, 16)}


VARIANTS = {
    "spectra_mingru": ("SPECTRA-minGRU", "spectra", lambda s: {"state_cell": "mingru"}),
    "spectra_small_router": ("SPECTRA-small-router", "spectra", _small_router),
    "spectra_small_mingru": ("SPECTRA-small-router-minGRU", "spectra", lambda s: {"state_cell": "mingru", **_small_router(s)}),
}
ROUNDS = 15  # one fwd+bwd per router per round on CPU: single runs vary by ~10 %, so many rounds


def shapes(env: Env) -> dict[str, Shape]:
    """Named shapes to compare: the demo's layer and the paper's (capped in N on CPU)."""
    if env.quick:
        return {"quick": QUICK}
    paper = PAPER if (env.cuda or not env.cap_cpu) else PAPER_CPU
    return {"demo": DEMO, "paper": paper}


def flop_floor(shape: Shape, state_cell: str = "gru", gru_hidden_size: int | None = None,
               router_dim: int | None = None) -> float:
    """SPECTRA / Switch if only matmul multiply-adds counted (per token; backward scales both alike).

    Experts 3·k·H·I; Switch router H·E; SPECTRA router: GRU input (H + Dh)·3Dh and recurrent
    Dh·3Dh (state_cell=mingru: input (H + Dh)·2Dh, no recurrent matmul), routing head Dh·E·D,
    expression projection H·E·D. Dh and D default to the shape's (router overrides replace them).
    """
    h, dh = shape.H, gru_hidden_size or shape.Dh
    ed = shape.E * (router_dim or shape.D)
    experts = 3 * shape.k * h * shape.I
    cell = (h + dh) * 2 * dh if state_cell == "mingru" else (h + dh) * 3 * dh + dh * 3 * dh
    spectra = cell + dh * ed + h * ed
    return (experts + spectra) / (experts + h * shape.E)


def measure(shape: Shape, env: Env) -> dict[str, Timing]:
    """Fwd+bwd timings of one layer per router (and per extra variant), measured interleaved."""
    x = hidden(shape, env)
    steps = {name: layer_step(make_block(name, shape, env), x, env) for name in ROUTERS}
    for name, (_, router, overrides) in VARIANTS.items():
        steps[name] = layer_step(make_block(router, shape, env, **overrides(shape)), x, env)
    return time_interleaved(steps, env, rounds=ROUNDS)


def run(env: Env) -> Section:
    rows, figures, verdicts, notes, extra = [], {}, [], [], []
    for label, shape in shapes(env).items():
        t = measure(shape, env)
        ms = {name: x.ms for name, x in t.items()}
        ratio = paired_ratio(t["spectra"], t["switch"])
        best = t["spectra"].best_ms / t["switch"].best_ms
        figures[f"{label}_spectra_over_switch"] = ratio
        figures[f"{label}_spectra_over_topk"] = paired_ratio(t["spectra"], t["topk"])
        row = [label, ms["spectra"], ms["switch"], ms["topk"], f"{ratio:.3f} ({best:.3f})",
               f"{paired_ratio(t['spectra'], t['topk']):.3f}", f"{flop_floor(shape):.3f}"]
        for name, (vlabel, _, overrides) in VARIANTS.items():
            v = paired_ratio(t[name], t["switch"])
            figures[f"{label}_{name}_over_switch"] = v
            row.append(f"{v:.3f}")
            ovs = overrides(shape)
            floor = flop_floor(shape, ovs.get("state_cell", "gru"), ovs.get("gru_hidden_size"), ovs.get("router_dim"))
            extra.append(f"- {vlabel} ({', '.join(f'router.{k}={x}' for k, x in ovs.items())}) / Switch, {label} "
                         f"layer: {v:.3f}× (paired; {t[name].ms:.2f} ms; its matmul floor {floor:.3f}×; "
                         f"default SPECTRA: {ratio:.3f}×)")
        rows.append(row)
        figures[f"{label}_spectra_over_switch_best"] = best
        figures[f"{label}_flop_floor"] = flop_floor(shape)
        notes.append(f"- `{label}`: {shape.describe()}")
        if label in TARGETS:  # quick sizes are per-op overhead, not the figure a target is about
            verdicts.append(verdict(f"SPECTRA / Switch, {label} layer (paired; fastest runs: {best:.3f}×, "
                                    f"matmul floor {flop_floor(shape):.3f}×)", ratio, threshold(TARGETS[label])))
    body = "\n".join([
        "Forward + backward of one MoE layer (router + grouped_mm experts, training mode), median ms; "
        f"the routers measured in alternation, {ROUNDS} rounds. Ratios are paired: the median over rounds "
        "of the two routers' times in the same round, so a burst of load from other work spoils one pair "
        "rather than the figure. In brackets: the ratio of the fastest runs (interference only adds time).",
        "",
        md_table(["layer", "SPECTRA ms", "Switch top-k ms", "top-k ms", "SPECTRA / Switch", "SPECTRA / top-k",
                  "matmul floor", *(f"{v[0]} / Switch" for v in VARIANTS.values())], rows),
        "",
        *notes,
        "",
        "Cheaper SPECTRA configurations, measured in the same alternation, for information (the targets "
        "are judged on the default SPECTRA, the paper's): `router.state_cell=mingru` (the minimal GRU, "
        "routing/min_gru.py: gates from the input only, a parallel scan over tokens; not the paper's GRU), and "
        "the paper's router with smaller dimensions (`router.gru_hidden_size`, `router.router_dim`): the "
        "paper's Dh=128, D=32 were chosen for H=576, and at the demo's H=128 they give the router about as "
        "many multiply-adds as the experts, a floor that no implementation gets under; and both together.",
        "",
        *extra,
        "",
        "`matmul floor`: SPECTRA / Switch if time were proportional to matmul multiply-adds (experts 3·k·H·I "
        "per token; SPECTRA's router adds the GRU's (H + Dh)·3Dh + Dh·3Dh, the routing head Dh·E·D and the "
        "expression projection H·E·D; Switch's adds H·E). A reference point rather than a bound: the routers "
        "also differ in how evenly they load the experts, which changes the grouped GEMMs' efficiency.",
    ])
    return Section("layer", "2. SPECTRA layer vs Switch top-k layer", body, figures, verdicts)


def main(argv: list[str] | None = None) -> None:
    section_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
