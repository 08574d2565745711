"""Learning SPECTRA's balanced plan into its inference scores (routing/balance_learning.py, #21):
(a) the distillation loss, (b) the expert bias on the inference selection.

References are independent: numpy arithmetic on the router's own logged tensors (−C = logits, the
plan Q = probs in training), hand-computed loads and sign updates, and fixed key lists; never the
balance_learning functions' output for the same input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_causal_lm
from spectra.config import load_config, validate
from spectra.moe import load_moe_model, save_moe_model, upcycle
from spectra.routing.balance_learning import distill_kl, expert_bias_step, plan_target, selected_target
from spectra.routing.spectra import SpectraRouter
from test_spectra_router import E, H, inputs, make

EPS = 0.05  # osr.epsilon of conf/osr/default.yaml


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    ez = np.exp(z)
    return ez / ez.sum(axis=-1, keepdims=True)


def _kl_rows(pi: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Σ_e π log(π / p) per row, 0 log 0 = 0 (float64)."""
    out = np.zeros(pi.shape[0])
    for t in range(pi.shape[0]):
        for e in range(pi.shape[1]):
            if pi[t, e] > 0:
                out[t] += pi[t, e] * np.log(pi[t, e] / p[t, e])
    return out


# ------------------------------------------------------------------------- (a) distillation, unit
def test_distill_kl_matches_a_hand_computed_example():
    # 3 tokens, 3 experts, ε = 0.5; token 2 is padding with a cost that would dominate the mean.
    neg_cost = torch.tensor([[0.0, 0.5, -0.5], [1.0, 0.0, 0.0], [50.0, -50.0, 0.0]])
    plan = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.0], [1.0, 0.0, 0.0]])  # row 1 sums to 0.2
    valid = torch.tensor([True, True, False])
    pi = plan_target(torch.log(plan), valid)
    # by hand: row 0 is already normalised; row 1 -> [0.5, 0.5, 0]; padding row -> 0
    assert torch.allclose(pi, torch.tensor([[0.2, 0.5, 0.3], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]), atol=1e-6)
    p0 = np.exp([0.0, 1.0, -1.0]) / np.exp([0.0, 1.0, -1.0]).sum()  # softmax(−C/0.5), token 0
    p1 = np.exp([2.0, 0.0, 0.0]) / np.exp([2.0, 0.0, 0.0]).sum()
    kl0 = sum(a * np.log(a / b) for a, b in zip([0.2, 0.5, 0.3], p0, strict=True))
    kl1 = 0.5 * np.log(0.5 / p1[0]) + 0.5 * np.log(0.5 / p1[1])  # the zero entry contributes 0
    got = distill_kl(neg_cost, 0.5, pi, valid)
    assert got.item() == pytest.approx((kl0 + kl1) / 2, rel=1e-5)


def test_selected_target_is_uniform_over_the_picks_and_zero_at_padding():
    index = torch.tensor([[2, 0], [1, 3], [0, 1]])
    pi = selected_target(index, 4, torch.tensor([True, True, False]))
    want = torch.tensor([[0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5], [0, 0, 0, 0]])
    assert torch.equal(pi, want)


def test_distill_kl_ignores_padding_rows_entirely():
    gen = torch.Generator().manual_seed(0)
    neg_cost = torch.randn(5, 4, generator=gen)
    pi = torch.softmax(torch.randn(5, 4, generator=gen), dim=-1)
    valid = torch.tensor([True, False, True, True, False])
    ref = distill_kl(neg_cost[valid], 0.1, pi[valid], torch.ones(3, dtype=torch.bool))
    garbage = neg_cost.clone()
    garbage[~valid] = 1e4  # whatever sits at padding changes nothing
    assert distill_kl(garbage, 0.1, pi, valid).item() == pytest.approx(ref.item(), rel=1e-6)


# ----------------------------------------------------------------------- (a) distillation, router
@pytest.mark.parametrize("target", ["plan", "selected"])
def test_router_distill_loss_equals_numpy_kl_over_real_tokens(target):
    coef = 0.3
    r = make(router={"balance_distill_coef": coef, "balance_distill_target": target}).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, H, generator=gen)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[0, :2] = False  # left padding
    out = r(inputs(x, valid=valid))
    v = valid.reshape(-1).numpy()
    neg_c = out.logits.detach().double().numpy()[v]  # −C
    p = _softmax(neg_c / EPS)
    if target == "plan":
        q = out.probs.detach().double().numpy()[v]  # the Sinkhorn plan in training
        pi = q / q.sum(axis=1, keepdims=True)
    else:
        pi = np.zeros_like(p)
        for row, picks in enumerate(out.expert_index.numpy()[v]):
            pi[row, picks] = 0.5  # k = 2
    want = _kl_rows(pi, p).mean()
    assert out.diagnostics["balance_distill"].item() == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert out.aux_losses["balance_distill"].item() == pytest.approx(coef * want, rel=1e-4, abs=1e-7)


def test_router_distill_loss_does_not_see_padded_positions():
    r = make(router={"balance_distill_coef": 1.0}).train()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, H, generator=gen)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False  # right padding
    a = r(inputs(x, valid=valid)).aux_losses["balance_distill"]
    y = x.clone()
    y[1, 4:] = 100 * torch.randn(2, H, generator=gen)  # change only the padded hidden states
    b = r(inputs(y, valid=valid)).aux_losses["balance_distill"]
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_distill_gradient_reaches_every_router_parameter():
    r = make(router={"balance_distill_coef": 1.0}).train()
    out = r(inputs(torch.randn(2, 6, H, generator=torch.Generator().manual_seed(3))))
    out.aux_losses["balance_distill"].backward()
    for name, prm in r.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name


def test_distill_changes_no_routing_decision():
    """The loss is an extra term only: training and eval selections and weights are bit-equal to
    the router without it (same seed, same parameters)."""
    x = torch.randn(2, 8, H, generator=torch.Generator().manual_seed(4))
    base, distilled = make(seed=5), make(seed=5, router={"balance_distill_coef": 0.5})
    for mode in (True, False):
        a, b = base.train(mode)(inputs(x)), distilled.train(mode)(inputs(x))
        assert torch.equal(a.expert_index, b.expert_index) and torch.equal(a.expert_weight, b.expert_weight)
    assert "balance_distill" not in base.train()(inputs(x)).aux_losses


# ------------------------------------------------------------------------- (b) expert bias, unit
def test_bias_sign_rule_by_hand():
    b = torch.tensor([0.0, 0.1, -0.2, 0.0])
    expert_bias_step(b, torch.tensor([5.0, 1.0, 3.0, 3.0]), 0.25)  # mean 3: over, under, equal, equal
    assert torch.allclose(b, torch.tensor([-0.25, 0.35, -0.2, 0.0]))
    expert_bias_step(b, torch.zeros(4), 0.25)  # nothing routed: unchanged
    assert torch.allclose(b, torch.tensor([-0.25, 0.35, -0.2, 0.0]))


# ----------------------------------------------------------------------- (b) expert bias, router
def _topk_load(neg_cost: np.ndarray, bias: np.ndarray, k: int) -> np.ndarray:
    load = np.zeros(neg_cost.shape[1])
    for row in neg_cost + bias:
        for e in np.argsort(-row, kind="stable")[:k]:
            load[e] += 1
    return load


def test_router_bias_update_follows_the_inference_rule_load_over_the_step():
    u = 0.01
    r = make(router={"balance_bias_rate": u}).train()
    gen = torch.Generator().manual_seed(6)
    bias0 = torch.tensor([0.3, -0.2, 0.0, 0.1, 0.0, -0.4])
    r.expert_bias.copy_(bias0)
    load = np.zeros(E)
    for _ in range(2):  # two micro-batches of one optimizer step, one with padding
        x = torch.randn(2, 5, H, generator=gen)
        valid = torch.ones(2, 5, dtype=torch.bool)
        valid[1, 3:] = False
        out = r(inputs(x, valid=valid))
        v = valid.reshape(-1).numpy()
        load += _topk_load(out.logits.detach().double().numpy()[v], bias0.double().numpy(), 2)
    assert torch.equal(r.expert_bias, bias0)  # forwards only collect
    r.on_optimizer_step(1)
    want = bias0.double().numpy() - u * np.sign(load - load.mean())
    assert np.allclose(r.expert_bias.double().numpy(), want, atol=1e-7)
    # nothing collected since: the next step (and a switch to eval) moves nothing
    before = r.expert_bias.clone()
    r.eval()
    r.on_optimizer_step(2)
    assert torch.equal(r.expert_bias, before)


def test_skipped_step_drops_the_collected_load():
    r = make(router={"balance_bias_rate": 0.1}).train()
    r(inputs(torch.randn(2, 6, H)))
    r.on_skipped_step()
    r.on_optimizer_step(1)
    assert torch.equal(r.expert_bias, torch.zeros(E))


def test_bias_moves_selection_but_never_the_combine_weights():
    r = make(router={"balance_bias_rate": 1e-3}).eval()
    x = torch.randn(2, 6, H, generator=torch.Generator().manual_seed(7))
    plain = r(inputs(x))
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0, 0.0, 0.0]))  # expert 3 wins every token
    biased = r(inputs(x))
    assert torch.equal(biased.probs, plain.probs) and torch.equal(biased.logits, plain.logits)
    assert (biased.expert_index == 3).any(dim=1).all()
    # weights: softmax(−C/ε) over the chosen experts, from the logits alone (no bias)
    neg_c = biased.logits.detach().double().numpy()
    for t, picks in enumerate(biased.expert_index.numpy()):
        want = _softmax(neg_c[t, picks] / EPS)
        assert np.allclose(biased.expert_weight[t].detach().double().numpy(), want, atol=1e-6)
    # and the second choice is the best of the rest by −C, i.e. the bias only forced expert 3 in
    for t, picks in enumerate(biased.expert_index.numpy()):
        rest = [e for e in np.argsort(-neg_c[t], kind="stable") if e != 3]
        assert set(picks) == {3, rest[0]}


def test_bias_stays_out_of_training_selection():
    x = torch.randn(2, 8, H, generator=torch.Generator().manual_seed(8))
    base, biased = make(seed=9), make(seed=9, router={"balance_bias_rate": 1e-3})
    biased.expert_bias.fill_(0.0)[2] = 50.0
    a, b = base.train()(inputs(x)), biased.train()(inputs(x))
    assert torch.equal(a.expert_index, b.expert_index) and torch.equal(a.expert_weight, b.expert_weight)


# ------------------------------------------------------------- state dict, old checkpoints, resume
PRE_21_KEYS = [  # a SPECTRA router's state_dict before #21 (token_and_depth, expression on)
    "srip_step",
    "expert_repr_ema",
    "expert_repr_ema_ready",
    "gru.weight_ih_l0",
    "gru.weight_hh_l0",
    "gru.bias_ih_l0",
    "gru.bias_hh_l0",
    "head.weight",
    "projector.weight",
]


def test_knobs_off_keep_the_state_dict_keys_of_older_models():
    assert list(make().state_dict()) == PRE_21_KEYS
    assert list(make(router={"balance_distill_coef": 0.5}).state_dict()) == PRE_21_KEYS
    assert (
        list(make(router={"balance_bias_rate": 1e-3}).state_dict())
        == PRE_21_KEYS[:3] + ["expert_bias"] + PRE_21_KEYS[3:]
    )


def _spectra_model(*overrides):
    model = tiny_causal_lm("llama", seed=0)
    cfg = validate(load_config(["router=spectra", "moe.num_experts=4", "moe.top_k=2", *overrides]))
    upcycle(model, cfg, seed=0)
    return model.eval()


def _routers(model) -> list[SpectraRouter]:
    return [m for m in model.modules() if isinstance(m, SpectraRouter)]


def test_bias_survives_save_and_load_bit_for_bit(tmp_path):
    model = _spectra_model("router.balance_bias_rate=0.001")
    gen = torch.Generator().manual_seed(10)
    for r in _routers(model):
        r.expert_bias.copy_(torch.randn(4, generator=gen) * 1e-3)  # not representable in a short decimal
    save_moe_model(model, tmp_path / "m")
    again = load_moe_model(tmp_path / "m")
    got, want = _routers(again), _routers(model)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert a.balance_bias_rate == 0.001
        assert a.expert_bias.dtype == b.expert_bias.dtype and torch.equal(a.expert_bias, b.expert_bias)


def test_a_model_saved_before_the_knobs_still_loads(tmp_path):
    model = _spectra_model()
    save_moe_model(model, tmp_path / "m")
    # make the record look like one written before #21: no balance_* keys at all
    cfg_file = tmp_path / "m" / "config.json"
    record = json.loads(cfg_file.read_text())
    router = record["spectra_moe"]["router"]
    for key in [k for k in router if k.startswith("balance_")]:
        del router[key]
    cfg_file.write_text(json.dumps(record))
    again = load_moe_model(tmp_path / "m")  # strict: a missing expert_bias key would raise
    for r in _routers(again):
        assert r.expert_bias is None and r.balance_distill_coef == 0.0
    x = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)


# ------------------------------------------------------------------------- ablation and sweep files
@pytest.mark.parametrize(
    ("ablation", "coef", "target", "rate"),
    [
        ("balance_distill", 0.1, "plan", 0.0),
        ("balance_distill_selected", 0.1, "selected", 0.0),
        ("balance_bias", 0.0, "plan", 1e-2),
        ("balance_both", 0.1, "plan", 1e-2),
    ],
)
def test_ablation_files_build_the_knobs(ablation, coef, target, rate):
    r = make(ablation)
    assert (r.balance_distill_coef, r.balance_distill_target, r.balance_bias_rate) == (coef, target, rate)
    assert (r.expert_bias is not None) == (rate > 0)


def test_balance_learning_sweep_composes_beside_the_ablations():
    from hydra import compose, initialize_config_dir

    from spectra.config import config_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir())):
        cfg = compose("config", ["+sweep=balance_learning", "seeds=[0]"], return_hydra_config=True)
        old = compose("config", ["+sweep=ablations", "seeds=[0]"], return_hydra_config=True)
    assert cfg.sweep_name == "balance_learning" and cfg.router.name == "spectra"
    cells = cfg.hydra.sweeper.params["ablation"].split(",")
    assert cells == ["full", "balance_distill", "balance_distill_selected", "balance_bias", "balance_both"]
    # the paper's grid is unchanged (sweep resume keys on its cells)
    assert old.hydra.sweeper.params["ablation"] == "full,no_expression,no_gru,no_repulsion,no_quota,no_ortho,no_all"
    for a in cells:
        validate(load_config(["+sweep=balance_learning", f"ablation={a}"]))


# ------------------------------------------------------------------------- data parallel (2 gloo ranks)
def _bias_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """Each rank routes its own batches; only rank 0 collects in step 2 (the other still joins)."""
    import torch.distributed as dist

    from test_distributed import _init_group

    _init_group(rank, world, init_file)
    router = make(router={"balance_bias_rate": 0.01}).train()  # same seed: identical weights
    torch.manual_seed(100 + rank)  # different tokens per rank
    logits = []
    with torch.no_grad():
        router.on_optimizer_step(0)  # train begin: nothing collected on any rank
        logits.append(router(inputs(torch.randn(2, 6, H))).logits)
        router.on_optimizer_step(1)
        bias1 = router.expert_bias.clone()
        if rank == 0:
            logits.append(router(inputs(torch.randn(2, 6, H))).logits)
        router.on_optimizer_step(2)
    torch.save({"logits": logits, "bias1": bias1, "bias2": router.expert_bias.clone()}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_bias_update_uses_the_load_summed_over_ranks(tmp_path):
    from test_distributed import _spawn

    _spawn(_bias_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["bias1"], r1["bias1"]) and torch.equal(r0["bias2"], r1["bias2"])
    zero = np.zeros(E)
    load1 = sum(_topk_load(r["logits"][0].double().numpy(), zero, 2) for r in (r0, r1))
    want1 = -0.01 * np.sign(load1 - load1.mean())
    assert np.allclose(r0["bias1"].double().numpy(), want1, atol=1e-7)
    load2 = _topk_load(r0["logits"][1].double().numpy(), r0["bias1"].double().numpy(), 2)  # rank 0's only
    assert np.allclose(r0["bias2"].double().numpy(), want1 - 0.01 * np.sign(load2 - load2.mean()), atol=1e-7)
    # a rank alone would have moved by its own load: different here
    alone = -0.01 * np.sign(_topk_load(r1["logits"][0].double().numpy(), zero, 2) - 2 * 12 / E)
    assert not np.allclose(alone, want1) or not np.allclose(
        -0.01 * np.sign(_topk_load(r0["logits"][0].double().numpy(), zero, 2) - 2 * 12 / E), want1
    )


# ------------------------------------------------------------------- the plan's column potential
def test_plan_column_potential_recovers_the_expert_scaling_of_a_plan():
    from spectra.routing.balance_learning import plan_column_potential
    from spectra.routing.sinkhorn import sinkhorn

    gen = torch.Generator().manual_seed(11)
    eps = 0.1
    neg_cost = torch.randn(9, 4, generator=gen)
    f = torch.randn(9, 1, generator=gen)
    g = torch.tensor([0.3, -0.1, 0.0, 0.4])  # mean 0.15
    log_q = neg_cost / eps + f + g  # a plan with row potentials f and column potentials g
    valid = torch.ones(9, dtype=torch.bool)
    valid[4] = False
    log_q[4] = 1e3  # a padding row says nothing
    got = plan_column_potential(log_q, neg_cost, eps, valid)
    assert torch.allclose(got, eps * torch.tensor([0.15, -0.25, -0.15, 0.25]), atol=1e-5)
    # on a real Sinkhorn plan, top-k of (−C + b) is the plan's own top-k, token by token
    cost = torch.randn(40, 6, generator=gen) * 0.3
    _, lq = sinkhorn(cost, 0.05, 3, None, return_log=True)
    b = plan_column_potential(lq, -cost, 0.05, torch.ones(40, dtype=torch.bool))
    assert torch.equal((-cost + b).topk(2).indices.sort(1).values, lq.topk(2).indices.sort(1).values)
    assert not torch.equal((-cost).topk(2).indices.sort(1).values, lq.topk(2).indices.sort(1).values)


def test_distill_gradient_stays_in_the_router():
    """The term trains the router's parameters only: no gradient into the hidden states or the
    previous MoE layer's routing state (it is computed on a detached recompute of C)."""
    r = make(router={"balance_distill_coef": 1.0}).train()
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 6, H, generator=gen, requires_grad=True)
    prev = torch.randn(2, 6, r.state_size, generator=gen, requires_grad=True)
    out = r(inputs(x, prev_state=prev))
    out.aux_losses["balance_distill"].backward()
    assert x.grad is None and prev.grad is None
    assert r.head.weight.grad.abs().sum() > 0
    # while the routing weights themselves still carry gradient into the hidden states
    out = r(inputs(x, prev_state=prev))
    out.expert_weight.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
