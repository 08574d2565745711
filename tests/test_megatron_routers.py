"""Megatron-Core / DeepSeek-V3 router options (#21): score function, group-limited top-k, drop
policy, and the routers seq_aux, global_aux, aux_free, sinkhorn_base.

Every expected value is computed here independently — Python loops over lists, `math.exp`,
numpy, brute force over all choices — never copied from the routers' output. Routers get an
identity gate (H = E, W = I) wherever a test dictates the logits: then logits = hidden.
"""

from __future__ import annotations

import itertools
import math
import signal
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import faults
from conftest import run_cli, tiny_causal_lm
from spectra.config import RouterConfig, load_config, validate
from spectra.moe import load_moe_model, save_moe_model, upcycle
from spectra.moe.loading import load_weights
from spectra.moe.upcycle import routers
from spectra.routing import build_router
from spectra.routing.base import RoutingInputs
from spectra.routing.selection import expert_capacity, group_limited_topk

# ----------------------------------------------------------------------------- helpers


def make_router(name: str, num_experts: int, **router_kw):
    """Router `name` from the registry with an identity gate (logits = hidden, H = E)."""
    router = build_router(SimpleNamespace(router=RouterConfig(name=name, **router_kw)), hidden_size=num_experts,
                          num_experts=num_experts)
    if hasattr(router, "gate"):
        with torch.no_grad():
            router.gate.weight.copy_(torch.eye(num_experts))
    return router


def inputs_of(hidden: torch.Tensor, valid: torch.Tensor | None = None, doc_start: torch.Tensor | None = None):
    """RoutingInputs for hidden [B, S, H] (or [N, H], one row)."""
    if hidden.dim() == 2:
        hidden = hidden.unsqueeze(0)
    b, s = hidden.shape[:2]
    if valid is None:
        valid = torch.ones(b, s, dtype=torch.bool)
    if doc_start is None:
        doc_start = torch.zeros(b, s, dtype=torch.bool)
        doc_start[:, 0] = True
    return RoutingInputs(hidden=hidden, valid=valid, doc_start=doc_start, teacher_forced=True)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def py_softmax(row: list[float]) -> list[float]:
    ex = [math.exp(v) for v in row]
    return [v / sum(ex) for v in ex]


def ranked(row: list[float], allowed=None) -> list[int]:
    """Experts by descending score (ties: lower index), only `allowed` ones."""
    idx = [e for e in range(len(row)) if allowed is None or e in allowed]
    return sorted(idx, key=lambda e: (-row[e], e))


def brute_group_limited(row: list[float], k: int, num_groups: int, group_topk: int) -> list[int]:
    """DeepSeek-V3 group-limited top-k by enumeration: the group_topk groups of largest
    (top-2 sum) score, then the best k experts inside them."""
    g = len(row) // num_groups
    gscore = [sum(sorted(row[i * g:(i + 1) * g], reverse=True)[:2]) for i in range(num_groups)]
    best_groups = max(itertools.combinations(range(num_groups), group_topk), key=lambda c: sum(gscore[i] for i in c))
    allowed = {e for i in best_groups for e in range(i * g, (i + 1) * g)}
    return ranked(row, allowed)[:k]


# ----------------------------------------------------------------------------- score function, groups


@pytest.mark.parametrize("num_groups, group_topk, k", [(4, 2, 3), (4, 1, 2), (2, 1, 2), (8, 3, 2), (1, 1, 3)])
def test_group_limited_topk_matches_brute_force(num_groups, group_topk, k):
    gen = torch.Generator().manual_seed(num_groups * 10 + group_topk)
    scores = torch.randn(50, 8, generator=gen)
    got = group_limited_topk(scores, k, num_groups, group_topk)
    for t, row in enumerate(scores.tolist()):
        assert got[t].tolist() == brute_group_limited(row, k, num_groups, group_topk), t


def test_group_limited_topk_by_hand():
    # 4 experts in 2 groups {0,1}, {2,3}; group scores (top-2 sums): 0.9 + 0.0 = 0.9 vs 0.5 + 0.5 = 1.0,
    # so the token keeps group {2,3} although expert 0 has the single best score.
    scores = torch.tensor([[0.9, 0.0, 0.5, 0.5]])
    assert group_limited_topk(scores, 1, num_groups=2, group_topk=1).tolist() == [[2]]
    assert group_limited_topk(scores, 1, num_groups=1, group_topk=1).tolist() == [[0]]


@pytest.mark.parametrize("name", ["topk", "switch_top2"])
def test_sigmoid_scores_weights_and_probs_by_hand(name):
    logits = [[2.0, -1.0, 0.5, 1.0], [0.0, 0.3, -2.0, 0.2]]
    r = make_router(name, 4, top_k=2, score_function="sigmoid")
    out = r(inputs_of(torch.tensor(logits)))
    for t, row in enumerate(logits):
        s = [sigmoid(v) for v in row]
        top = ranked(s)[:2]
        assert out.expert_index[t].tolist() == top
        assert out.expert_weight[t].tolist() == pytest.approx([s[e] / (s[top[0]] + s[top[1]]) for e in top], rel=1e-6)
        assert out.probs[t].tolist() == pytest.approx([v / sum(s) for v in s], rel=1e-6)


def test_switch_top1_sigmoid_weight_is_the_raw_sigmoid():
    logits = [[0.2, 1.5, -0.3]]
    out = make_router("switch_top1", 3, top_k=1, score_function="sigmoid")(inputs_of(torch.tensor(logits)))
    assert out.expert_index.tolist() == [[1]]
    assert out.expert_weight.item() == pytest.approx(sigmoid(1.5), rel=1e-6)  # not 1: the LM loss reaches the gate


@pytest.mark.parametrize("name", ["topk", "switch_top2"])
def test_routers_use_group_limited_topk(name):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 8, generator=gen)
    r = make_router(name, 8, top_k=2, num_groups=4, group_topk=2)
    out = r(inputs_of(logits))
    for t, row in enumerate(logits.softmax(-1).tolist()):
        assert out.expert_index[t].tolist() == brute_group_limited(row, 2, 4, 2), t


# ----------------------------------------------------------------------------- drop policy


def brute_capacity_keep(index: list[list[int]], weight: list[list[float]], valid: list[bool], capacity: int,
                        policy: str) -> list[list[bool]]:
    """Per expert, keep `capacity` of the real tokens' assignments: by slot-major position
    (position) or by descending weight, ties by position (probs)."""
    n, k = len(index), len(index[0])
    keep = [[False] * k for _ in range(n)]
    experts = {e for row in index for e in row}
    for e in experts:
        queue = [(t, j) for j in range(k) for t in range(n) if valid[t] and index[t][j] == e]  # position order
        if policy == "probs":
            queue.sort(key=lambda tj: -weight[tj[0]][tj[1]])  # stable: ties keep position order
        for t, j in queue[:capacity]:
            keep[t][j] = True
    return keep


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drop_policy_matches_brute_force(policy, seed):
    gen = torch.Generator().manual_seed(seed)
    e, cf = 4, 0.75
    logits = torch.randn(2, 9, e, generator=gen) * 2
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False  # left padding takes no capacity
    r = make_router("switch_top2", e, top_k=2, capacity_factor=cf, drop_policy=policy)
    out = r(inputs_of(logits, valid))
    flat_valid = valid.reshape(-1).tolist()
    n_valid = sum(flat_valid)
    capacity = math.ceil(cf * n_valid * 2 / e)  # ceil(0.75 * 15 * 2 / 4) = 6
    assert capacity == expert_capacity(n_valid, 2, e, cf) == 6
    index = out.expert_index.tolist()
    # the combine weights before dropping: softmax renormalised over the 2 choices
    weight = []
    for row, idx in zip(logits.reshape(-1, e).tolist(), index, strict=True):
        p = py_softmax(row)
        weight.append([p[i] / (p[idx[0]] + p[idx[1]]) for i in idx])
    keep = brute_capacity_keep(index, weight, flat_valid, capacity, policy)
    served = (out.valid.unsqueeze(-1) & ~out.dropped).tolist()
    assert served == keep
    assert sum(map(sum, keep)) < 2 * n_valid  # something was dropped: the test exercises the policy


def test_drop_policy_probs_keeps_the_heaviest_by_hand():
    # 3 tokens all choose expert 0 (top-1, capacity ceil(0.5 * 3 * 1 / 2) = 1 slot per expert).
    # position keeps token 0; probs keeps the token with the largest weight: token 2.
    logits = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    for policy, kept in (("position", 0), ("probs", 2)):
        out = make_router("switch_top1", 2, top_k=1, capacity_factor=0.5, drop_policy=policy)(inputs_of(logits))
        served = (~out.dropped[:, 0]).tolist()
        assert served == [t == kept for t in range(3)], policy


def test_defaults_keep_the_routing_of_before_the_keys():
    """softmax, one group, position policy: the routers route as before the keys existed."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(30, 6, generator=gen)
    out = make_router("switch_top2", 6, top_k=2, capacity_factor=1.0)(inputs_of(logits))
    p = logits.softmax(-1)
    top = p.topk(2, -1)
    assert torch.equal(out.expert_index, top.indices)
    served = out.valid.unsqueeze(-1) & ~out.dropped
    expected = torch.where(served, top.values / top.values.sum(-1, keepdim=True), 0.0)
    assert torch.allclose(out.expert_weight, expected)




# ----------------------------------------------------------------------------- aux_free


def test_aux_free_bias_update_rule_by_hand():
    # E = 4, k = 1, u = 0.1, sigmoid scores; two micro-batches of one optimizer step.
    r = make_router("aux_free", 4, top_k=1, bias_update_rate=0.1, score_function="sigmoid").train()
    mb1 = torch.tensor([[3.0, 0, 0, 0], [3.0, 0, 0, 0], [0, 3.0, 0, 0]])  # experts 0, 0, 1
    mb2 = torch.tensor([[3.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 3.0], [9.0, 0, 0, 0]])  # 0, 2, 3, padding
    r(inputs_of(mb1))
    valid2 = torch.tensor([[True, True, True, False]])
    r(inputs_of(mb2, valid2))
    assert r.expert_bias.tolist() == [0.0, 0.0, 0.0, 0.0]  # forwards only collect
    r.on_optimizer_step(1)
    # load over the step: e0 = 3, e1 = 1, e2 = 1, e3 = 1 (padding not counted); mean = 1.5
    # b = 0.1 * sign(1.5 - load) = [-0.1, +0.1, +0.1, +0.1]
    assert r.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])
    # no forward since: nothing collected, nothing changes
    r.on_optimizer_step(2)
    assert r.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])
    # an expert exactly at the mean keeps its bias: loads (2, 0, 1, 1), mean 1 -> sign (-, +, 0, 0)
    r(inputs_of(torch.tensor([[3.0, 0, 0, 0], [3.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 3.0]])))
    r.on_optimizer_step(3)
    assert r.expert_bias.tolist() == pytest.approx([-0.2, 0.2, 0.1, 0.1])


def test_aux_free_eval_and_skipped_steps_collect_nothing():
    r = make_router("aux_free", 3, top_k=1, bias_update_rate=0.5)
    x = torch.tensor([[2.0, 0, 0], [2.0, 0, 0]])
    r.eval()
    r(inputs_of(x))
    r.on_optimizer_step(1)
    assert r.expert_bias.tolist() == [0.0, 0.0, 0.0]
    r.train()
    r(inputs_of(x))
    r.on_skipped_step()
    r.on_optimizer_step(2)
    assert r.expert_bias.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("score_function", ["sigmoid", "softmax"])
def test_aux_free_bias_steers_selection_but_never_the_weights(score_function):
    logits = [[1.0, 0.5, -0.5, 0.0], [0.2, 2.0, 0.1, -1.0]]
    r = make_router("aux_free", 4, top_k=2, score_function=score_function).eval()
    bias = [0.0, 0.0, 5.0, 0.0]  # large enough to force expert 2 into every token's top-2
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor(bias))
    out = r(inputs_of(torch.tensor(logits)))
    for t, row in enumerate(logits):
        s = [sigmoid(v) for v in row] if score_function == "sigmoid" else py_softmax(row)
        top = ranked([s[e] + bias[e] for e in range(4)])[:2]
        assert top[0] == 2 and out.expert_index[t].tolist() == top
        expected = [s[e] / (s[top[0]] + s[top[1]]) for e in top]  # unbiased scores only
        assert out.expert_weight[t].tolist() == pytest.approx(expected, rel=1e-6)


def test_aux_free_gradient_does_not_reach_the_bias():
    r = make_router("aux_free", 4, top_k=2).train()
    out = r(inputs_of(torch.randn(6, 4)))
    out.expert_weight.sum().backward()
    assert r.gate.weight.grad is not None and not r.expert_bias.requires_grad
    assert "expert_bias" in r.state_dict()  # persistent: saved with the weights


def test_aux_free_bias_survives_save_and_load_bit_for_bit(tmp_path):
    cfg = validate(load_config(["router=aux_free", "moe.num_experts=4", "moe.top_k=2"]))
    model = upcycle(tiny_causal_lm("llama", seed=0), cfg)
    gen = torch.Generator().manual_seed(0)
    trained = [torch.randn(4, generator=gen) * 1e-3 for _ in routers(model)]  # not representable in few bits
    with torch.no_grad():
        for r, b in zip(routers(model), trained, strict=True):
            r.expert_bias.copy_(b)
    save_moe_model(model, tmp_path / "m")
    loaded = load_moe_model(tmp_path / "m")
    assert [r.expert_bias for r in routers(loaded)] and all(
        torch.equal(r.expert_bias, b) for r, b in zip(routers(loaded), trained, strict=True))
    # the Trainer's resume path: weights loaded into a freshly upcycled model (bias starting at 0)
    fresh = upcycle(tiny_causal_lm("llama", seed=0), cfg)
    assert all(float(r.expert_bias.abs().sum()) == 0 for r in routers(fresh))
    load_weights(fresh, tmp_path / "m")
    assert all(torch.equal(r.expert_bias, b) for r, b in zip(routers(fresh), trained, strict=True))


# ----------------------------------------------------------------------------- seq_aux


def brute_seq_aux(logits: list[list[list[float]]], valid: list[list[bool]], doc_start: list[list[bool]], k: int):
    """(loss, [(sequence positions, f)]) by loops: sequences split at rows and document starts,
    padding excluded, f_i = E/(k S) * count, P_i = mean softmax, mean over sequences of sum f P."""
    e = len(logits[0][0])
    seqs = []
    for b, row in enumerate(logits):
        cur = []
        for s in range(len(row)):
            if s > 0 and doc_start[b][s]:
                seqs.append(cur)
                cur = []
            cur.append((b, s))
        seqs.append(cur)
    losses, fs = [], []
    for seq in seqs:
        real = [(b, s) for b, s in seq if valid[b][s]]
        if not real:
            continue
        n = len(real)
        count = [0] * e
        psum = [0.0] * e
        for b, s in real:
            p = py_softmax(logits[b][s])
            for i in ranked(p)[:k]:
                count[i] += 1
            psum = [a + v for a, v in zip(psum, p, strict=True)]
        f = [e / (k * n) * c for c in count]
        fs.append((real, f))
        losses.append(sum(fi * pi / n for fi, pi in zip(f, psum, strict=True)))
    return sum(losses) / len(losses), fs


def test_seq_aux_loss_matches_the_per_sequence_brute_force_and_its_gradient_flows_through_p_only():
    gen = torch.Generator().manual_seed(5)
    e, k, alpha = 4, 2, 0.1
    logits = torch.randn(2, 6, e, generator=gen) * 2
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, :2] = False  # left padding
    valid[0, 5] = False  # right padding inside the second document of row 0
    doc_start = torch.zeros(2, 6, dtype=torch.bool)
    doc_start[0, 0] = doc_start[0, 3] = doc_start[1, 2] = True  # row 0 packs two documents
    expected, fs = brute_seq_aux(logits.tolist(), valid.tolist(), doc_start.tolist(), k)
    assert len(fs) == 3  # row 0: 3 + 2 real tokens; row 1: 4 real tokens

    r = make_router("seq_aux", e, top_k=k, aux_loss_coef=alpha)
    x = logits.clone().requires_grad_(True)
    out = r(inputs_of(x, valid, doc_start))
    assert out.diagnostics["seq_load_balancing_loss"].item() == pytest.approx(expected, rel=1e-6)
    assert out.aux_losses["seq_load_balancing"].item() == pytest.approx(alpha * expected, rel=1e-6)
    out.aux_losses["seq_load_balancing"].backward()

    # reference gradient: f held constant (a count), P differentiable
    y = logits.clone().requires_grad_(True)
    p = y.softmax(-1)
    ref = 0
    for real, f in fs:
        pm = sum(p[b, s] for b, s in real) / len(real)
        ref = ref + sum(f[i] * pm[i] for i in range(e))
    (alpha * ref / len(fs)).backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-7)


def test_seq_aux_is_one_for_perfectly_balanced_sequences():
    # every sequence of E = 2 experts, k = 1 sends one token each way with probs (0.5 ± d): f = (1, 1), P = (0.5, 0.5)
    logits = torch.tensor([[[0.3, 0.0], [0.0, 0.3]], [[0.0, 0.7], [0.7, 0.0]]])
    out = make_router("seq_aux", 2, top_k=1, aux_loss_coef=1.0)(inputs_of(logits))
    assert out.diagnostics["seq_load_balancing_loss"].item() == pytest.approx(1.0, rel=1e-6)


# ----------------------------------------------------------------------------- sinkhorn_base


def megatron_sinkhorn_numpy(logits: np.ndarray, tol: float = 1e-7) -> np.ndarray:
    """Megatron-Core's `sinkhorn` (moe_utils.py), in float64 numpy, to a tighter tolerance than its
    1e-4: d0 = 1/(N (K d1)), d1 = 1/(E (K^T d0)) until mean |d1 - d1_old| < tol; returns d1 * K * d0.
    (Its +1e-8 in the denominators makes the common scale of d0, d1 drift by ~5e-8 per sweep, which
    no row's top-k sees; hence tol 1e-7, not lower.)"""
    cost = np.exp(logits)
    d0, d1 = np.ones(cost.shape[0]), np.ones(cost.shape[1])
    error, d1_old = 1e9, d1
    for _ in range(100_000):
        if error <= tol:
            break
        d0 = (1 / d0.shape[0]) / (np.sum(d1 * cost, 1) + 1e-8)
        d1 = (1 / d1.shape[0]) / (np.sum(d0[:, None] * cost, 0) + 1e-8)
        error = np.mean(np.abs(d1_old - d1))
        d1_old = d1
    return d1 * cost * d0[:, None]


def np_topk(a: np.ndarray, k: int) -> list[list[int]]:
    return [sorted(range(a.shape[1]), key=lambda e: (-row[e], e))[:k] for row in a]


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_sinkhorn_base_training_selection_matches_megatron_numpy(k, seed):
    gen = torch.Generator().manual_seed(seed)
    e = 4
    logits = torch.randn(2, 10, e, generator=gen) * 2
    logits[:, :, 0] += 2.0  # every token leans to expert 0: plain top-k is far from balanced
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :4] = False  # padding takes no part in the assignment
    r = make_router("sinkhorn_base", e, top_k=k, sinkhorn_iterations=300).train()
    out = r(inputs_of(logits, valid))
    flat = logits.reshape(-1, e).double().numpy()
    real = valid.reshape(-1).numpy()
    q = megatron_sinkhorn_numpy(flat[real])
    expected = np_topk(q, k)
    got = out.expert_index[torch.from_numpy(real)]
    assert [sorted(row) for row in got.tolist()] == [sorted(row) for row in expected]
    # weights: sigmoid (k = 1) or softmax (k > 1) of the logits at the chosen experts, not renormalised
    act = 1 / (1 + np.exp(-flat)) if k == 1 else np.exp(flat) / np.exp(flat).sum(1, keepdims=True)
    idx = out.expert_index.numpy()
    want = np.where(real[:, None], np.take_along_axis(act, idx, 1), 0.0)
    assert np.allclose(out.expert_weight.detach().numpy(), want, rtol=1e-5)
    assert np_topk(flat[real], k) != expected  # the balanced assignment changed something


def test_sinkhorn_base_balances_by_hand_and_routes_plain_topk_at_inference():
    # 4 tokens, 2 experts, all prefer expert 0 by margins 2.0, 1.9, 1.8, 1.7. The balanced plan
    # scales column 1 by exp(c) with sum_t sigmoid(m_t - c) = 2, i.e. c between 1.8 and 1.9:
    # the two tokens with the largest margins stay on e0, the others move to e1.
    logits = torch.tensor([[2.0, 0.0], [1.9, 0.0], [1.8, 0.0], [1.7, 0.0]])
    r = make_router("sinkhorn_base", 2, top_k=1, sinkhorn_iterations=200)
    assert r.train()(inputs_of(logits)).expert_index.flatten().tolist() == [0, 0, 1, 1]
    out = r.eval()(inputs_of(logits))
    assert out.expert_index.flatten().tolist() == [0, 0, 0, 0]
    assert out.expert_weight.flatten().tolist() == pytest.approx([sigmoid(v) for v in (2.0, 1.9, 1.8, 1.7)])


# ----------------------------------------------------------------------------- global_aux


def brute_switch_loss(f: list[float], rows: list[list[float]]) -> float:
    """E * sum_e f_e * P_e with P the mean softmax of `rows` (logits of real tokens)."""
    e = len(f)
    probs = [py_softmax(r) for r in rows]
    return e * sum(f[i] * sum(p[i] for p in probs) / len(probs) for i in range(e))


def brute_counts(rows: list[list[float]], k: int) -> list[int]:
    e = len(rows[0])
    c = [0] * e
    for r in rows:
        for i in ranked(py_softmax(r))[:k]:
            c[i] += 1
    return c


def test_global_aux_accumulates_f_over_the_micro_batches_of_a_step():
    gen = torch.Generator().manual_seed(11)
    e, k = 4, 2
    a = torch.randn(5, e, generator=gen) * 2
    b = torch.randn(4, e, generator=gen) * 2
    valid_b = torch.tensor([[True, True, False, True]])
    real_b = [row for row, v in zip(b.tolist(), valid_b[0].tolist(), strict=True) if v]
    r = make_router("global_aux", e, top_k=k, aux_loss_coef=1.0).train()
    r.on_optimizer_step(0)  # train begin
    key = "global_load_balancing"

    ca, cb = brute_counts(a.tolist(), k), brute_counts(real_b, k)
    loss_a = r(inputs_of(a)).aux_losses[key].item()
    assert loss_a == pytest.approx(brute_switch_loss([c / (k * 5) for c in ca], a.tolist()), rel=1e-6)
    loss_b = r(inputs_of(b, valid_b)).aux_losses[key].item()  # f over both micro-batches, P over b
    f_ab = [(x + y) / (k * (5 + 3)) for x, y in zip(ca, cb, strict=True)]
    assert loss_b == pytest.approx(brute_switch_loss(f_ab, real_b), rel=1e-6)
    r.on_optimizer_step(1)  # a new global batch
    loss_b2 = r(inputs_of(b, valid_b)).aux_losses[key].item()
    assert loss_b2 == pytest.approx(brute_switch_loss([c / (k * 3) for c in cb], real_b), rel=1e-6)
    assert loss_b2 != pytest.approx(loss_b)
    r.eval()  # evaluation: the batch's own f, nothing accumulated
    assert r(inputs_of(a)).aux_losses[key].item() == pytest.approx(loss_a, rel=1e-6)


def _spawn(fn, tmp_path, world: int = 2, timeout: float = 120.0) -> None:
    """fn(rank, world, init_file, out_dir) in `world` spawned processes; fail (not hang) after `timeout`."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} processes did not finish within {timeout} s (a collective hung?)")


E_DP, K_DP = 4, 2


def _batch(rank: int, micro: int) -> torch.Tensor:
    return torch.randn(2, 5, E_DP, generator=torch.Generator().manual_seed(100 * rank + micro)) * 2


def _dp_routers():
    """(global_aux, aux_free) with the same random gates on every rank."""
    ga = make_router("global_aux", E_DP, top_k=K_DP, aux_loss_coef=1.0).train()
    af = make_router("aux_free", E_DP, top_k=K_DP, bias_update_rate=0.1).train()
    with torch.no_grad():
        ga.gate.weight.copy_(torch.randn(E_DP, E_DP, generator=torch.Generator().manual_seed(7)))
    return ga, af


def _dp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """A data-parallel rank: two micro-batches of its own tokens, then the optimizer step."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    ga, af = _dp_routers()
    ga.on_optimizer_step(0)
    af.on_optimizer_step(0)  # train begin: a collective with nothing collected, no change
    losses = []
    for micro in range(2):
        x = _batch(rank, micro)
        loss = ga(inputs_of(x)).aux_losses["global_load_balancing"]
        loss.backward()
        losses.append(loss.item())
        af(inputs_of(x))
    af.on_optimizer_step(1)
    torch.save({"losses": losses, "grad": ga.gate.weight.grad, "bias": af.expert_bias.clone()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_global_aux_and_aux_free_on_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    _spawn(_dp_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ga, af = _dp_routers()
    ga.on_optimizer_step(0)
    for micro in range(2):
        x = torch.cat([_batch(0, micro), _batch(1, micro)])  # the global micro-batch
        loss = ga(inputs_of(x)).aux_losses["global_load_balancing"]
        loss.backward()
        # DDP averages the ranks' losses' gradients; with equal tokens per rank the mean loss is this one
        assert sum(rk["losses"][micro] for rk in ranks) / 2 == pytest.approx(loss.item(), rel=1e-5)
        af(inputs_of(x))
    assert torch.allclose((ranks[0]["grad"] + ranks[1]["grad"]) / 2, ga.gate.weight.grad, atol=1e-6)
    af.on_optimizer_step(1)
    assert torch.equal(ranks[0]["bias"], ranks[1]["bias"]) and torch.equal(ranks[0]["bias"], af.expert_bias)
    assert float(af.expert_bias.abs().sum()) > 0
    # and the one-process value is Switch's all-slots loss on the global batch (an independent function)
    rows = torch.cat([torch.cat([_batch(0, m), _batch(1, m)]) for m in range(2)]).reshape(-1, E_DP)
    probs = (rows @ ga.gate.weight.detach().T).softmax(-1)
    last = probs[-20:]  # micro-batch 2's P, f over both micro-batches
    f = [c / (K_DP * 40) for c in brute_counts(torch.log(probs).tolist(), K_DP)]
    expected = E_DP * sum(f[i] * float(last[:, i].mean()) for i in range(E_DP))
    assert ranks[0]["losses"][1] + ranks[1]["losses"][1] == pytest.approx(2 * expected, rel=1e-5)


# ----------------------------------------------------------------------------- aux_free through train.py resume

RESUME_RUN = [
    "router=aux_free",
    "moe.num_experts=4",
    "data.max_seq_length=64",
    "data.max_train_samples=40",
    "data.max_eval_samples=8",
    "trainer.max_steps=4",
    "trainer.per_device_train_batch_size=4",
    "trainer.per_device_eval_batch_size=8",
    "trainer.router_lr=3e-3",
    "trainer.logging_steps=1",
    "trainer.eval_steps=4",
    "trainer.save_steps=2",
    "trainer.resume=auto",
    "trainer.deterministic=true",
    "monitor.enabled=false",
    "router.bias_update_rate=0.01",
    "seed=3",
]


def _final_bias(run_dir) -> dict[str, torch.Tensor]:
    weights = load_file(str(run_dir / "model" / "model.safetensors"))
    return {k: v for k, v in weights.items() if k.endswith("router.expert_bias")}


@pytest.mark.slow
def test_aux_free_bias_of_a_killed_and_resumed_run_equals_the_uninterrupted_run(tmp_path):
    def train(run_dir, *extra):
        return run_cli(["train.py", *RESUME_RUN, *extra, f"hydra.run.dir={run_dir}"],
                       env={"OMP_NUM_THREADS": "1", **faults.ENV}, timeout=600)

    a, b = tmp_path / "a", tmp_path / "b"
    # the uninterrupted run and the run to be killed are independent processes (one thread each):
    # they start together
    with ThreadPoolExecutor(max_workers=2) as pool:
        running_a = pool.submit(train, a)
        pb = train(b, faults.kill_at("step", 3))  # killed after step 3: checkpoint-2 is the resume point
        pa = running_a.result()
    assert pa.returncode == 0, pa.stderr[-3000:]
    assert pb.returncode == -signal.SIGKILL, pb.stderr[-3000:]
    pb = train(b)  # re-runs step 3 from checkpoint-2, then step 4
    assert pb.returncode == 0 and "checkpoint-2" in pb.stdout + pb.stderr, pb.stderr[-3000:]
    ba, bb = _final_bias(a), _final_bias(b)
    assert ba and set(ba) == set(bb)
    assert any(float(v.abs().sum()) > 0 for v in ba.values())  # the bias moved
    for k in ba:
        assert torch.equal(ba[k], bb[k]), k  # bit for bit
