"""MoE block, experts kernels, upcycling (save/load and decoding: tests/test_decoding.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_causal_lm
from spectra.config import load_config, validate
from spectra.moe import UnsupportedMLPError, moe_blocks, parameter_report, upcycle
from spectra.moe.experts import ExpertsImplConfig, GatedExperts, PlainExperts
from spectra.train.trainer import param_groups


def _cfg(*overrides):
    return validate(load_config(list(overrides)))


def _reference_moe(x, gate_up, down, index, weight, act):
    """Per-token, per-slot loop: y_t = sum_j w_tj * down_e(act(gate_e x) * up_e x), e = index_tj."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(index.shape[1]):
            e = int(index[t, j])
            g, u = (gate_up[e] @ x[t]).chunk(2)
            out[t] += weight[t, j] * (down[e] @ (act(g) * u))
    return out


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_gated_experts_match_loop_reference(impl):
    torch.manual_seed(0)
    E, H, I, T, k = 5, 8, 12, 20, 2
    experts = GatedExperts(ExpertsImplConfig(impl), E, H, I, torch.nn.SiLU())
    torch.nn.init.normal_(experts.gate_up_proj)
    torch.nn.init.normal_(experts.down_proj)
    x = torch.randn(T, H)
    index = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    weight = torch.rand(T, k)
    ref = _reference_moe(x, experts.gate_up_proj.detach(), experts.down_proj.detach(), index, weight, torch.nn.functional.silu)
    got = experts(x, index, weight)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_plain_experts_with_bias_match_reference(impl):
    torch.manual_seed(1)
    E, H, I, T = 3, 8, 16, 9
    ex = PlainExperts(ExpertsImplConfig(impl), E, H, I, torch.nn.GELU())
    for p in ex.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(T, H)
    index = torch.randint(0, E, (T, 1))
    weight = torch.ones(T, 1)
    ref = torch.stack([
        ex.down_proj[e] @ torch.nn.functional.gelu(ex.up_proj[e] @ x[t] + ex.up_proj_bias[e]) + ex.down_proj_bias[e]
        for t, e in enumerate(index[:, 0].tolist())
    ]).detach()
    torch.testing.assert_close(ex(x, index, weight), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gated", [True, False])
def test_eager_experts_skip_zero_weight_slots_with_identical_output_and_gradients(gated, monkeypatch):
    """Expert Choice's layout: k_max slots per token, most of weight 0 (unpicked fillers, padding).
    The eager kernel computes only the non-zero slots, and its output and its gradients (experts'
    weights, hidden states, the served weights) equal a float64 per-slot loop that computes every slot."""
    torch.manual_seed(2)
    E, H, I, T, k = 6, 8, 12, 15, 4
    cls, act = (GatedExperts, torch.nn.SiLU()) if gated else (PlainExperts, torch.nn.GELU())
    ex = cls(ExpertsImplConfig("eager"), E, H, I, act)
    for prm in ex.parameters():
        torch.nn.init.normal_(prm, std=0.5)
    x = torch.randn(T, H, requires_grad=True)
    index = torch.stack([torch.randperm(E)[:k] for _ in range(T)])  # [T, k] distinct experts
    keep = torch.rand(T, k) < 0.3  # ~30 % served, like EC's picks among k_max slots
    keep[0] = False  # a token no expert served
    w_raw = torch.rand(T, k, requires_grad=True)
    weight = torch.where(keep, w_raw, 0.0)  # as the routers make them: zero slots are constants

    rows = []  # rows each expert application computed
    up = cls._up
    monkeypatch.setattr(cls, "_up", staticmethod(lambda m, h, e: (rows.append(h.shape[0]), up(m, h, e))[1]))
    got = ex(x, index, weight)
    assert sum(rows) == int(keep.sum()) < T * k  # only the served slots were computed

    # float64 reference: every slot, y_t = sum_j w_tj * Expert_e(x_t), by a per-token loop
    params = {n: prm.detach().double().requires_grad_() for n, prm in ex.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    w64 = w_raw.detach().double().requires_grad_()
    weight64 = torch.where(keep, w64, 0.0)

    def expert64(e, xt):
        if gated:
            g, u = (params["gate_up_proj"][e] @ xt).chunk(2)
            return params["down_proj"][e] @ (torch.nn.functional.silu(g) * u)
        h = torch.nn.functional.gelu(params["up_proj"][e] @ xt + params["up_proj_bias"][e])
        return params["down_proj"][e] @ h + params["down_proj_bias"][e]

    ref = torch.stack([sum(weight64[t, j] * expert64(int(index[t, j]), x64[t]) for j in range(k)) for t in range(T)])
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
    g_out = torch.randn(T, H)
    got.backward(g_out)
    ref.backward(g_out.double())
    for n, prm in ex.named_parameters():
        torch.testing.assert_close(prm.grad.double(), params[n].grad, rtol=1e-4, atol=1e-4, msg=n)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w_raw.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("shared", [0, 1])
def test_upcycling_preserves_the_dense_function(model_type, shared):
    """Noise 0: identical experts, weights summing to 1 (+ shared mixed, not summed) = the dense MLP."""
    dense = tiny_causal_lm(model_type)
    cfg = _cfg("moe.upcycle_noise=0", f"moe.num_shared_experts={shared}", "moe.num_experts=4", "router.top_k=2")
    moe = upcycle(copy.deepcopy(dense), cfg).eval()
    x = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=0, atol=1e-5)


def test_upcycling_noise_breaks_symmetry_by_a_bounded_amount():
    dense = tiny_causal_lm("llama")
    cfg = _cfg("moe.upcycle_noise=0.01", "moe.num_shared_experts=0", "moe.num_experts=4")
    moe = upcycle(copy.deepcopy(dense), cfg).eval()
    w = moe_blocks(moe)[0].experts.gate_up_proj
    assert not torch.equal(w[0], w[1])  # experts are not bit-identical
    x = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        diff = (moe(x).logits - dense(x).logits).abs().max().item()
    assert 0 < diff < 0.05


def test_first_k_dense_replace_keeps_early_layers_dense():
    dense = tiny_causal_lm("llama", num_hidden_layers=3)
    moe = upcycle(copy.deepcopy(dense), _cfg("moe.first_k_dense_replace=1"))
    assert [b.layer_idx for b in moe_blocks(moe)] == [1, 2]
    assert type(moe.model.layers[0].mlp) is type(dense.model.layers[0].mlp)


def test_unrecognised_mlp_names_module_path_and_class():
    model = tiny_causal_lm("llama")

    class OddMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in = torch.nn.Linear(32, 64)

    model.model.layers[1].mlp = OddMLP()
    with pytest.raises(UnsupportedMLPError, match=r"model\.layers\.1\.mlp \(OddMLP\)"):
        upcycle(model, _cfg("moe.first_k_dense_replace=0"))


def test_parameter_report_counts_by_hand():
    dense = tiny_causal_lm("llama")
    E, k = 4, 2
    moe = upcycle(copy.deepcopy(dense), _cfg(f"moe.num_experts={E}", f"router.top_k={k}", "moe.num_shared_experts=1"))
    rep = parameter_report(moe)
    H, I, L = 32, 64, 2
    mlp = 3 * H * I
    assert rep["routed_experts"] == L * E * mlp
    assert rep["router"] == L * H * E  # linear gate, no bias
    assert rep["frozen"] == L * mlp  # the shared experts
    dense_total = sum(p.numel() for p in dense.parameters())
    assert rep["total"] == dense_total + L * (E * mlp + H * E)  # + experts + routers (shared = old MLP)
    assert rep["active_per_token"] == rep["total"] - L * E * mlp + L * k * mlp


def test_param_groups_give_differential_learning_rates():
    moe = upcycle(tiny_causal_lm("llama"), _cfg("moe.num_shared_experts=1", "moe.shared_expert_trainable=true"))
    groups = param_groups(moe, router_lr=5e-5, expert_lr=1e-5, base_lr=2e-5, weight_decay=0.1)
    by_id = {id(p): g for g in groups for p in g["params"]}
    block = moe_blocks(moe)[0]
    assert by_id[id(block.router.gate.weight)]["lr"] == 5e-5
    assert by_id[id(block.experts.gate_up_proj)]["lr"] == 1e-5
    assert by_id[id(block.shared_expert.up_proj.weight)]["lr"] == 1e-5
    assert by_id[id(moe.model.layers[0].self_attn.q_proj.weight)]["lr"] == 2e-5
    assert by_id[id(moe.model.norm.weight)]["weight_decay"] == 0.0  # 1-D: no decay
    n_trainable = sum(1 for p in moe.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable  # each parameter exactly once


def test_aux_losses_reach_the_training_loss_and_gradients_reach_router():
    moe = upcycle(tiny_causal_lm("llama"), _cfg("router.entropy_coef=0.5"))
    moe.train()
    ctx = moe.spectra_context
    ctx.recording = True
    x = torch.randint(0, 97, (2, 7))
    out = moe(x, labels=x)
    aux = ctx.aux_loss()
    assert aux is not None and aux.item() > 0
    # the recorded entropy term is 0.5 * the mean token entropy, recomputed here independently
    probs = ctx.outputs[0].probs
    ent = -(probs * probs.log()).sum(-1).mean()
    assert len(ctx.outputs) == 2
    torch.testing.assert_close(ctx.outputs[0].aux_losses["entropy"], 0.5 * ent)
    (out.loss + aux).backward()
    assert moe_blocks(moe)[0].router.gate.weight.grad.abs().sum() > 0
