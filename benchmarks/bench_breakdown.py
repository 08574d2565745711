"""Table 9: where one SPECTRA MoE layer's forward + backward time goes.

Each stage is timed alone (forward + backward to its inputs, as inside the layer) on the tensors
the layer itself produces at that point, then compared with the whole layer's step:

    GRU routing state        router.routing_state      (token recurrence, [x; prev] -> [B, S, Dh])
    routing head             router.routing_vectors    (state -> E routing vectors)
    expression projection    router.expression         (x -> E expression vectors, P x)
    cosine                   scores.cosine_scores      (s = cos(r_e, p_e))
    Gram                     expert_directions + gram_matrix + ortho_loss (M, G = M Mᵀ, L_ortho)
    OSR cost                 osr.osr_cost
    Sinkhorn                 sinkhorn.sinkhorn (log domain, + marginal_error diagnostic)
    selection                quota capacity + quota_topk + pre-quota load + combine weights
    expert execution         grouped_mm experts (dispatch, GEMMs, combine)
    rest                     layer − Σ stages: losses, entropy, bookkeeping, autograd glue

    python -m benchmarks.bench_breakdown [--quick] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.harness import Env, Section, md_table, section_main, time_interleaved
from benchmarks.layers import DEMO, PAPER, PAPER_CPU, QUICK, Shape, hidden, layer_step, make_block
from spectra.routing.base import RoutingInputs, dispatch_counts_of
from spectra.routing.orthogonality import gram_matrix, ortho_loss
from spectra.routing.osr import osr_cost
from spectra.routing.scores import cosine_scores, expert_directions
from spectra.routing.selection import expert_capacity, quota_topk, topk_select
from spectra.routing.sinkhorn import marginal_error, sinkhorn


def shapes(env: Env) -> dict[str, Shape]:
    """The paper's layer (N capped on CPU) and the demo's, or the quick one."""
    if env.quick:
        return {"quick": QUICK}
    return {"paper": PAPER if (env.cuda or not env.cap_cpu) else PAPER_CPU, "demo": DEMO}


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _fwd_bwd(fn: Callable[..., object], *inputs: torch.Tensor, env: Env, module: torch.nn.Module) -> Callable[[], None]:
    """A closure: forward `fn(*inputs)`, then backward of Σ outputs · random weights.

    `module`'s parameter gradients are dropped before each call, as the layer step does: otherwise
    the stage would also pay for accumulating into them (for the experts, hundreds of MB).
    """
    with torch.no_grad():
        outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o.float()) if o.is_floating_point() else None for o in outs]

    def step() -> None:
        module.zero_grad(set_to_none=True)
        for t in inputs:
            t.grad = None
        res = fn(*inputs)
        res = res if isinstance(res, tuple) else (res,)
        loss = sum((r.float() * g).sum() for r, g in zip(res, grads) if g is not None and r.requires_grad)
        if torch.is_tensor(loss):
            loss.backward()

    return step


def stages(shape: Shape, env: Env) -> tuple[dict[str, Callable[[], None]], Callable[[], None]]:
    """The stage closures (name -> step) and the whole layer's step, on the layer's own tensors."""
    block = make_block("spectra", shape, env)
    router, experts = block.router, block.experts
    x = hidden(shape, env)
    n, e, k = shape.N, shape.E, shape.k
    valid2d = torch.ones(shape.B, shape.S, dtype=torch.bool, device=env.device)
    doc_start = torch.zeros_like(valid2d)
    doc_start[:, 0] = True
    valid = valid2d.reshape(-1)

    with torch.no_grad():  # the layer's intermediate tensors, once
        state = router.routing_state(x, RoutingInputs(hidden=x, valid=valid2d, doc_start=doc_start))
        feats = state.reshape(n, -1)
        r = router.routing_vectors(feats)
        p = router.expression(x.reshape(n, -1))
        s, p_norm = cosine_scores(r, p)
        cost = osr_cost(s, gram_matrix(expert_directions(p, p_norm, valid)), router.repulsion_weight,
                        router.hinge_weight, router.hinge_threshold)
        _, log_q = sinkhorn(cost, router.epsilon, router.iterations, valid, log_domain=router.log_sinkhorn, return_log=True)
        index = quota_topk(log_q, k, expert_capacity(n, k, e, router.capacity_factor), valid).index
        weight = torch.softmax(log_q.gather(1, index), dim=-1)

    def routing_state(xx):
        return router.routing_state(xx, RoutingInputs(hidden=xx, valid=valid2d, doc_start=doc_start))

    def gram(pp, pn):
        g = gram_matrix(expert_directions(pp, pn, valid))
        return g, ortho_loss(g)

    def osr(ss):
        return osr_cost(ss, gram_matrix(expert_directions(p, p_norm, valid)), router.repulsion_weight,
                        router.hinge_weight, router.hinge_threshold)

    def sink(c):
        q, lq = sinkhorn(c, router.epsilon, router.iterations, valid, log_domain=router.log_sinkhorn, return_log=True)
        return q, lq, marginal_error(q.detach(), valid)

    def select(lq):
        n_valid = int(valid.sum())
        res = quota_topk(lq, k, expert_capacity(n_valid, k, e, router.capacity_factor), valid, n_valid=n_valid)
        with torch.no_grad():
            dispatch_counts_of(topk_select(lq, k), valid.unsqueeze(1).expand(n, k), e)
        return torch.softmax(lq.gather(1, res.index), dim=-1)

    flat = x.detach().reshape(n, -1)

    def expert_exec(hh, ww):
        return experts(hh, index, ww.to(hh.dtype))

    steps = {
        "GRU routing state": _fwd_bwd(routing_state, _leaf(x), env=env, module=block),
        "routing head": _fwd_bwd(router.routing_vectors, _leaf(feats), env=env, module=block),
        "expression projection": _fwd_bwd(router.expression, _leaf(flat), env=env, module=block),
        "cosine": _fwd_bwd(lambda a, b: cosine_scores(a, b)[0], _leaf(r), _leaf(p), env=env, module=block),
        "Gram (M, G, L_ortho)": _fwd_bwd(gram, _leaf(p), _leaf(p_norm), env=env, module=block),
        "OSR cost": _fwd_bwd(osr, _leaf(s), env=env, module=block),
        "Sinkhorn": _fwd_bwd(sink, _leaf(cost), env=env, module=block),
        "selection (quota top-k)": _fwd_bwd(select, _leaf(log_q), env=env, module=block),
        "expert execution": _fwd_bwd(expert_exec, _leaf(flat), _leaf(weight), env=env, module=block),
    }
    return steps, layer_step(block, x, env)


def table(shape: Shape, env: Env) -> tuple[str, dict[str, float]]:
    """Markdown table of one shape's breakdown and its figures."""
    steps, layer = stages(shape, env)
    measured = time_interleaved({**steps, "layer": layer}, env, rounds=5)
    times = {name: measured[name].ms for name in steps}
    total = measured["layer"].ms
    rest = total - sum(times.values())
    router_ms = sum(ms for name, ms in times.items() if name != "expert execution")
    rows = [[name, ms, f"{100 * ms / total:.1f} %"] for name, ms in times.items()]
    rows += [["rest (losses, bookkeeping, autograd glue, noise)", rest, f"{100 * rest / total:.1f} %"],
             ["**whole layer**", total, "100 %"]]
    text = "\n".join([
        md_table(["stage", "ms", "% of layer"], rows),
        "",
        f"Router stages together (all but expert execution): {router_ms:.1f} ms = {100 * router_ms / total:.1f} % "
        "of the layer.",
    ])
    figures = {f"{name}_pct": 100 * ms / total for name, ms in times.items()}
    figures.update(layer_ms=total, router_pct=100 * router_ms / total)
    return text, figures


def run(env: Env) -> Section:
    parts, figures = [
        "One SPECTRA MoE layer, forward + backward. Each stage is timed alone on the tensors the layer "
        "produces at that point, in alternation with the whole layer (5 rounds, median ms); `rest` is the "
        "whole layer minus the stages, so it also absorbs the timing noise of the two large items."
    ], {}
    for label, shape in shapes(env).items():
        text, figs = table(shape, env)
        parts += ["", f"**{label} layer**: {shape.describe()}", "", text]
        figures.update({f"{label}_{k}": v for k, v in figs.items()})
    return Section("breakdown", "1. Table 9: SPECTRA layer time by stage", "\n".join(parts), figures)


def main(argv: list[str] | None = None) -> None:
    section_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
