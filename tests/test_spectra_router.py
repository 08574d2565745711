"""The SPECTRA router (routing/spectra.py, osr.py, orthogonality.py) and its Hydra group files.

Expected values come from hand arithmetic, from running the same sequence in a different
arrangement (alone / packed / padded / split into decoding calls), or from composing the shipped
YAML files — never from the router's own output for the same input.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from spectra.config import RouterConfig, SpectraConfig
from spectra.routing import build_router
from spectra.routing.base import RoutingInputs
from spectra.routing.orthogonality import expert_representations, gram_matrix, newton_schulz, ortho_loss, srip_lambda
from spectra.routing.osr import osr_cost
from spectra.routing.selection import expert_capacity
from spectra.routing.spectra import SpectraRouter

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
H, E, DH, D = 16, 6, 8, 4
ABLATIONS = ["full", "no_expression", "no_gru", "no_repulsion", "no_quota", "no_ortho", "no_all"]


def compose(ablation: str = "full", quota: str = "on", **overrides):
    """The shipped group files (router=spectra, osr=default, quota, ablation) on the schema."""
    cfg = OmegaConf.merge(
        OmegaConf.structured(SpectraConfig),
        {
            "router": OmegaConf.load(CONF / "router" / "spectra.yaml"),
            "osr": OmegaConf.load(CONF / "osr" / "default.yaml"),
            "quota": OmegaConf.load(CONF / "quota" / f"{quota}.yaml"),
        },
        OmegaConf.load(CONF / "ablation" / f"{ablation}.yaml"),
        {"router": {"gru_hidden_size": DH, "router_dim": D}, "moe": {"num_experts": E}},
        overrides,
    )
    for group in ("router", "osr", "quota"):
        OmegaConf.to_object(cfg[group])  # runs the dataclass __post_init__ checks
    return cfg


def make(ablation: str = "full", seed: int = 0, **overrides) -> SpectraRouter:
    torch.manual_seed(seed)
    router = build_router(compose(ablation, **overrides), hidden_size=H, num_experts=E)
    assert isinstance(router, SpectraRouter)
    return router


def inputs(hidden, valid=None, doc_start=None, **kw) -> RoutingInputs:
    b, s, _ = hidden.shape
    if valid is None:
        valid = torch.ones(b, s, dtype=torch.bool)
    if doc_start is None:
        doc_start = torch.zeros(b, s, dtype=torch.bool)
        doc_start[:, 0] = True
    return RoutingInputs(hidden=hidden, valid=valid, doc_start=doc_start, **kw)


def trained_eval(router: SpectraRouter) -> SpectraRouter:
    """One training forward (fills the running Gram used at inference), then eval mode."""
    router.train()
    with torch.no_grad():
        router(inputs(torch.randn(4, 12, H)))
    return router.eval()


def rows_of(t: torch.Tensor, b: int, s: int) -> torch.Tensor:
    return t.reshape(b, s, *t.shape[1:])


# ------------------------------------------------------------------------- pure pieces


def test_osr_cost_hand_computed():
    s = torch.tensor([[0.9, -0.2, 0.1], [0.0, 0.8, -0.75]])
    g = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.0]])
    # (G off-diagonal)^2 = [[0, .25, 0], [.25, 0, .04], [0, .04, 0]]
    # row 0: |s| @ off^2 = [.05, .229, .008], hinge = [(.9-.7)^2, 0, 0] = [.04, 0, 0]
    # row 1: |s| @ off^2 = [.2, .03, .032],   hinge = [0, .01, .0025]
    want = torch.tensor(
        [
            [-0.9 + 0.5 * 0.05 + 0.5 * 0.04, 0.2 + 0.5 * 0.229, -0.1 + 0.5 * 0.008],
            [0.0 + 0.5 * 0.2, -0.8 + 0.5 * 0.03 + 0.5 * 0.01, 0.75 + 0.5 * 0.032 + 0.5 * 0.0025],
        ]
    )
    torch.testing.assert_close(osr_cost(s, g, 0.5, 0.5, 0.7), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(osr_cost(s, g, 0.0, 0.0, 0.7), -s)


def test_gram_and_ortho_loss_hand_computed():
    # Token 0: e0 -> (1,0), e1 -> (0,1); token 1: e0 -> (0,1), e1 -> (1,0) (after normalising).
    p = torch.tensor([[[2.0, 0.0], [0.0, 3.0]], [[0.0, 0.5], [4.0, 0.0]]])  # [N=2, E=2, D=2]
    m = expert_representations(p)  # both means (.5, .5) -> (1/sqrt2, 1/sqrt2)
    g = gram_matrix(m)
    torch.testing.assert_close(g, torch.ones(2, 2))
    # G - I = [[0,1],[1,0]]: ||.||_F^2 = 2, spectral norm 1 -> 0.7*2 + 0.3*1 = 1.7
    assert float(ortho_loss(g)) == pytest.approx(1.7, abs=1e-6)
    # Token 1 masked out: M = I, G = I, loss 0.
    m = expert_representations(p, torch.tensor([True, False]))
    torch.testing.assert_close(gram_matrix(m), torch.eye(2))
    assert float(ortho_loss(gram_matrix(m))) == pytest.approx(0.0, abs=1e-7)


def test_srip_lambda_formula():
    assert float(srip_lambda(0, 0.02, 10)) == 0.0
    assert float(srip_lambda(3, 0.02, 10)) == pytest.approx(0.006)
    assert float(srip_lambda(25, 0.02, 10)) == pytest.approx(0.02)
    assert float(srip_lambda(3, 0.02, 10, enabled=False)) == pytest.approx(0.02)


def test_newton_schulz_flattens_spectrum_and_keeps_scale():
    torch.manual_seed(0)
    w = torch.randn(24, 16) @ torch.diag(torch.linspace(0.2, 3.0, 16))
    out = newton_schulz(w, 30)
    sv = torch.linalg.svdvals(out)
    rms = float(w.norm() / 16**0.5)
    torch.testing.assert_close(sv, torch.full((16,), rms), rtol=1e-3, atol=0)
    assert newton_schulz(w, 0) is w


def test_projector_init_orthogonal_times_0_1():
    router = make()
    sv = torch.linalg.svdvals(router.projector.weight.detach())  # [min(E*D, H)]
    torch.testing.assert_close(sv, torch.full_like(sv, 0.1), atol=1e-5, rtol=0)
    assert router.gru.hidden_size == DH  # config value, not E*D


def test_newton_schulz_steps_reorthogonalise_the_projector():
    router = make(router={"newton_schulz_steps": 12}).train()
    with torch.no_grad():  # drift away from orthogonal, as training would
        router.projector.weight.mul_(torch.linspace(0.3, 3.0, H))
    raw = torch.linalg.svdvals(router.projector.weight.detach())
    eff = torch.linalg.svdvals(router.projector_weight().detach())
    assert float(raw.max() / raw.min()) > 5.0
    assert float(eff.max() / eff.min()) < 1.05
    out = router(inputs(torch.randn(2, 5, H)))
    out.expert_weight.sum().backward()
    assert torch.isfinite(router.projector.weight.grad).all()


def test_scores_are_cosines_of_head_and_projector():
    router = make().eval()
    x = torch.randn(5, H)
    feats = torch.randn(5, DH)
    s, _ = router.scores(x, feats, torch.ones(5, dtype=torch.bool))
    r = router.head(feats).reshape(5, E, D)
    p = router.projector(x).reshape(5, E, D)
    torch.testing.assert_close(s, F.cosine_similarity(r, p, dim=-1), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------- router behaviour


@pytest.mark.parametrize("recurrence", ["token_and_depth", "depth", "none"])
def test_eval_routing_is_causal(recurrence):
    router = trained_eval(make(router={"recurrence": recurrence}))
    torch.manual_seed(1)
    b, s = 2, 10
    x = torch.randn(b, s, H)
    prev = torch.randn(b, s, DH)
    base = router(inputs(x, prev_state=prev))
    changed_tail = False
    for t in (0, 3, 7):
        y, p2 = x.clone(), prev.clone()
        y[:, t + 1 :] = torch.randn(b, s - t - 1, H)
        p2[:, t + 1 :] = torch.randn(b, s - t - 1, DH)
        out = router(inputs(y, prev_state=p2))
        i0, i1 = rows_of(base.expert_index, b, s), rows_of(out.expert_index, b, s)
        assert torch.equal(i0[:, : t + 1], i1[:, : t + 1])
        w0, w1 = rows_of(base.expert_weight, b, s), rows_of(out.expert_weight, b, s)
        torch.testing.assert_close(w0[:, : t + 1], w1[:, : t + 1], atol=1e-6, rtol=0)
        changed_tail |= not torch.equal(i0[:, t + 1 :], i1[:, t + 1 :])
    assert changed_tail  # the perturbation does reach the router


def test_eval_routing_is_batch_independent():
    router = trained_eval(make())
    torch.manual_seed(2)
    x = torch.randn(3, 9, H)
    together = router(inputs(x))
    alone = router(inputs(x[1:2]))
    assert torch.equal(rows_of(together.expert_index, 3, 9)[1], alone.expert_index)
    torch.testing.assert_close(rows_of(together.expert_weight, 3, 9)[1], alone.expert_weight, atol=1e-6, rtol=0)


def test_incremental_decoding_equals_full_pass():
    router = trained_eval(make())
    torch.manual_seed(3)
    b, s, cut = 2, 11, 7
    x = torch.randn(b, s, H)
    prev = torch.randn(b, s, DH)
    full = router(inputs(x, prev_state=prev))
    first = router(inputs(x[:, :cut], prev_state=prev[:, :cut]))
    cached = first.state[:, -1]  # [B, Dh]
    rest_parts = []
    state = cached
    # The rest in two calls: a 3-token chunk, then single decoding steps.
    for lo, hi in ((cut, cut + 3), (cut + 3, cut + 4)):
        no_start = torch.zeros(b, hi - lo, dtype=torch.bool)
        out = router(inputs(x[:, lo:hi], doc_start=no_start, prev_state=prev[:, lo:hi], cached_state=state))
        rest_parts.append(out)
        state = out.state[:, -1]
    idx = torch.cat([rows_of(first.expert_index, b, cut)] + [rows_of(o.expert_index, b, o.state.shape[1]) for o in rest_parts], 1)
    wts = torch.cat([rows_of(first.expert_weight, b, cut)] + [rows_of(o.expert_weight, b, o.state.shape[1]) for o in rest_parts], 1)
    states = torch.cat([first.state] + [o.state for o in rest_parts], 1)
    assert torch.equal(idx, rows_of(full.expert_index, b, s))
    torch.testing.assert_close(wts, rows_of(full.expert_weight, b, s), atol=1e-5, rtol=0)
    torch.testing.assert_close(states, full.state, atol=1e-5, rtol=0)
    # Without the cache the continuation would start from zeros and differ.
    fresh = router(inputs(x[:, cut:], doc_start=torch.zeros(b, s - cut, dtype=torch.bool), prev_state=prev[:, cut:]))
    assert not torch.allclose(fresh.state, full.state[:, cut:], atol=1e-3)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_packed_documents_reset_state(mode):
    router = trained_eval(make())
    router.train(mode == "train")
    torch.manual_seed(4)
    j, s = 4, 10
    doc_a, doc_b = torch.randn(1, j, H), torch.randn(1, s - j, H)
    packed_start = torch.zeros(1, s, dtype=torch.bool)
    packed_start[0, [0, j]] = True
    packed = router(inputs(torch.cat([doc_a, doc_b], 1), doc_start=packed_start))
    alone_b = router(inputs(doc_b))
    alone_a = router(inputs(doc_a))
    torch.testing.assert_close(packed.state[:, j:], alone_b.state, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.state[:, :j], alone_a.state, atol=1e-5, rtol=0)
    if mode == "eval":  # in training Sinkhorn couples the tokens of a batch, by design
        assert torch.equal(packed.expert_index[j:], alone_b.expert_index)
        torch.testing.assert_close(packed.expert_weight[j:], alone_b.expert_weight, atol=1e-5, rtol=0)
    # Without the reset, document B would see document A's state.
    no_reset = router(inputs(torch.cat([doc_a, doc_b], 1)))
    assert not torch.allclose(no_reset.state[:, j:], alone_b.state, atol=1e-3)


@pytest.mark.parametrize("start_at", ["first_real", "none"])
def test_left_padding_routes_like_the_sequence_alone(start_at):
    router = trained_eval(make())
    torch.manual_seed(5)
    pad, n_real, s = 3, 6, 9
    seq = torch.randn(1, n_real, H)
    other = torch.randn(1, s, H)
    x = torch.cat([torch.cat([torch.randn(1, pad, H) * 50, seq], 1), other], 0)  # garbage padding
    valid = torch.ones(2, s, dtype=torch.bool)
    valid[0, :pad] = False
    doc_start = torch.zeros(2, s, dtype=torch.bool)
    doc_start[1, 0] = True
    if start_at == "first_real":
        doc_start[0, pad] = True  # position_ids == 0 at the first real token (HF left padding)
    out = router(inputs(x, valid=valid, doc_start=doc_start))
    alone = router(inputs(seq))
    idx, wts = rows_of(out.expert_index, 2, s), rows_of(out.expert_weight, 2, s)
    assert torch.equal(idx[0, pad:], alone.expert_index)
    torch.testing.assert_close(wts[0, pad:], alone.expert_weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.state[0, pad:], alone.state[0], atol=1e-5, rtol=0)
    assert torch.equal(wts[0, :pad], torch.zeros(pad, router.top_k))
    torch.testing.assert_close(out.dispatch_counts.sum(), torch.tensor(float((n_real + s) * router.top_k)))


def test_state_carried_through_padding():
    router = trained_eval(make())
    torch.manual_seed(10)
    b, s = 2, 7
    x = torch.randn(b, s, H)
    h0 = torch.randn(b, DH)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[0, 4:] = False  # right padding
    valid[1, :2] = False  # left padding
    valid[1, 4] = False  # a hole in the middle
    no_start = torch.zeros(b, s, dtype=torch.bool)
    out = router(inputs(x, valid=valid, doc_start=no_start, cached_state=h0))
    st = out.state
    for t in range(4, s):  # right padding keeps the last real token's state (what gets cached)
        torch.testing.assert_close(st[0, t], st[0, 3], atol=0, rtol=0)
    torch.testing.assert_close(st[1, :2], h0[1].expand(2, DH), atol=0, rtol=0)  # before any real token
    torch.testing.assert_close(st[1, 4], st[1, 3], atol=0, rtol=0)
    # The hole does not advance the state: row 1 equals its real tokens run contiguously.
    real = router(inputs(x[1:2, [2, 3, 5, 6]], doc_start=torch.zeros(1, 4, dtype=torch.bool), cached_state=h0[1:2]))
    torch.testing.assert_close(st[1, [2, 3, 5, 6]], real.state[0], atol=1e-5, rtol=0)


def test_padding_excluded_in_training():
    router = make().train()
    torch.manual_seed(6)
    b, s = 3, 8
    x = torch.randn(b, s, H)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[0, :3] = False
    valid[2, 5:] = False
    y = x.clone()
    y[~valid] = torch.randn(int((~valid).sum()), H) * 100
    a, c = router(inputs(x, valid=valid)), router(inputs(y, valid=valid))
    v = valid.reshape(-1)
    assert torch.equal(a.expert_index[v], c.expert_index[v])
    torch.testing.assert_close(a.probs, c.probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.gram, c.gram, atol=1e-6, rtol=0)
    assert torch.equal(a.probs[~v], torch.zeros(int((~v).sum()), E))
    n_valid = int(v.sum())
    torch.testing.assert_close(a.dispatch_counts.sum(), torch.tensor(float(n_valid * router.top_k)))
    cap = expert_capacity(n_valid, router.top_k, E, 1.25)
    assert int(a.dispatch_counts.max()) <= cap
    torch.testing.assert_close(a.probs.sum(1)[v], torch.ones(n_valid), atol=1e-5, rtol=0)


def test_training_weights_are_renormalised_plan_and_quota_holds():
    router = make().train()
    torch.manual_seed(7)
    x = torch.randn(2, 16, H)
    x[:] = x[:1, :1]  # every token identical: all prefer the same experts
    out = router(inputs(x))
    q_sel = out.probs.gather(1, out.expert_index)
    torch.testing.assert_close(out.expert_weight, q_sel / q_sel.sum(1, keepdim=True), atol=1e-6, rtol=0)
    assert int(out.dispatch_counts.max()) <= expert_capacity(32, router.top_k, E, 1.25)
    assert all(len(set(r)) == router.top_k for r in out.expert_index.tolist())
    assert not out.dropped.any()
    assert "sinkhorn_marginal_error" in out.diagnostics


def test_inference_default_is_per_token_topk_of_negative_cost():
    router = trained_eval(make())
    torch.manual_seed(8)
    out = router(inputs(torch.randn(2, 7, H)))
    z = out.logits / 0.05  # logits = -C; epsilon from conf/osr/default.yaml
    torch.testing.assert_close(out.probs, torch.softmax(z, -1), atol=1e-6, rtol=0)
    assert torch.equal(out.expert_index, z.topk(router.top_k, -1).indices)
    assert "sinkhorn_marginal_error" not in out.diagnostics
    sk = trained_eval(make(osr={"sinkhorn_inference": True}))
    out2 = sk(inputs(torch.randn(2, 7, H)))
    assert "sinkhorn_marginal_error" in out2.diagnostics  # osr.sinkhorn_inference is read


def bf16_pair(seed: int):
    """(fp32 router, bf16 copy) with identical, bf16-representable weights and buffers."""
    r32 = trained_eval(make(seed=seed))
    r16 = copy.deepcopy(r32).to(torch.bfloat16)
    with torch.no_grad():
        for a, b in zip(r32.state_dict().values(), r16.state_dict().values()):
            a.copy_(b.to(a.dtype))
    return r32, r16


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_router_matches_fp32_reference(seed):
    # The module and its inputs in bf16: GRU, routing head and projector run in bf16 (the state
    # comes out bf16); cosines, cost, Sinkhorn and quota run in fp32. Reference: the same router in
    # fp32 with the same bf16-representable weights and inputs, so only bf16 rounding differs.
    # Tolerance: bf16 keeps 8 significant bits (relative rounding <= 2^-9 ~ 0.002 per op). The
    # scores are cosines (|s| <= 1) of vectors that went through ~10 rounded ops (GRU gates over
    # 6 tokens, head, projector): |ds| <~ 10 * 0.002 = 0.02; allowed 0.03 (measured <= 0.017
    # over 5 seeds). The cost -s + 0.5 |s| @ off(G)^2 + hinge moves with s and the batch Gram:
    # allowed 0.05 (measured <= 0.017). The GRU state is in (-1, 1): allowed 0.02 (<= 0.007).
    r32, r16 = bf16_pair(seed)
    torch.manual_seed(100 + seed)
    x = torch.randn(2, 6, H).to(torch.bfloat16)
    for training in (True, False):
        r32.train(training)
        r16.train(training)
        out16, out32 = r16(inputs(x)), r32(inputs(x.float()))
        assert out16.state.dtype == torch.bfloat16  # bf16 arithmetic really ran
        for t in (out16.expert_weight, out16.probs, out16.logits, out16.state):
            assert torch.isfinite(t.float()).all()
        torch.testing.assert_close(out16.scores.float(), out32.scores, atol=0.03, rtol=0)
        torch.testing.assert_close(out16.logits.float(), out32.logits, atol=0.05, rtol=0)
        torch.testing.assert_close(out16.state.float(), out32.state, atol=0.02, rtol=0)
        k = r16.top_k
        if training:  # the quota still holds on the bf16-computed cost
            assert int(out16.dispatch_counts.max()) <= expert_capacity(12, k, E, 1.25)
            assert all(len(set(r)) == k for r in out16.expert_index.tolist())
        else:
            # Per-token top-k of -C: a token whose fp32 k-th and (k+1)-th logits are further
            # apart than twice the logit tolerance must select the same experts in bf16.
            top = out32.logits.topk(k + 1, dim=1).values  # [N, k+1]
            clear = (top[:, -2] - top[:, -1]) > 0.1  # [N]
            assert int(clear.sum()) >= 6
            assert torch.equal(out16.expert_index[clear].sort(1).values, out32.expert_index[clear].sort(1).values)


def test_single_expert_per_token_is_refused():
    # k = 1 would make the weight Q_sel / sum Q_sel identically 1: no LM-loss gradient for the
    # router. Config validation refuses it (tests/test_config.py); so does the router itself, for
    # configs built without `validate`.
    with pytest.raises(ValueError, match="router.top_k"):
        make(router={"top_k": 1})


# ------------------------------------------------------------------------- ablations


def signature(router: SpectraRouter, out) -> dict:
    return {
        "gru": type(router.gru).__name__ if router.gru is not None else None,
        "state": out.state is not None,
        "projector": router.projector is not None,
        "expert_keys": router.expert_keys is not None,
        "repulsion": router.repulsion_weight,
        "quota": "quota_capacity" in out.diagnostics,
        "ortho_term": "ortho" in out.aux_losses,
    }


EXPECTED_CHANGES = {
    "full": {},
    "no_expression": {"projector": False, "expert_keys": True},
    "no_gru": {"gru": None, "state": False},
    "no_repulsion": {"repulsion": 0.0},
    "no_quota": {"quota": False},
    "no_ortho": {"ortho_term": False},
    "no_all": {"projector": False, "expert_keys": True, "gru": None, "state": False, "repulsion": 0.0, "ortho_term": False},
}


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_ablation_changes_exactly_its_component(ablation):
    assert (CONF / "ablation" / f"{ablation}.yaml").read_text().startswith("# @package _global_")
    x = torch.randn(2, 6, H)
    full = make("full").train()
    abl = make(ablation).train()
    sig_full, sig_abl = signature(full, full(inputs(x))), signature(abl, abl(inputs(x)))
    assert sig_full == {"gru": "GRU", "state": True, "projector": True, "expert_keys": False,
                        "repulsion": 0.5, "quota": True, "ortho_term": True}
    diff = {k: v for k, v in sig_abl.items() if v != sig_full[k]}
    assert diff == EXPECTED_CHANGES[ablation]


def test_no_repulsion_cost_is_score_plus_hinge():
    router = make("no_repulsion").train()
    x = torch.randn(1, 5, H)
    out = router(inputs(x))
    s, _ = router.scores(x.reshape(5, H), out.state.reshape(5, DH), torch.ones(5, dtype=torch.bool))
    torch.testing.assert_close(out.logits, s - 0.5 * torch.relu(s.abs() - 0.7) ** 2, atol=1e-6, rtol=0)


def test_group_files_match_schema_defaults():
    router_yaml = OmegaConf.to_object(compose().router)
    assert isinstance(router_yaml, RouterConfig) and router_yaml.name == "spectra"
    assert compose().osr == OmegaConf.structured(SpectraConfig).osr  # osr/default.yaml = schema defaults
    assert compose(quota="off").quota.enabled is False


def test_recurrence_depth_is_per_token_gru_cell():
    router = make(router={"recurrence": "depth"}).eval()
    assert isinstance(router.gru, nn.GRUCell)
    x, prev = torch.randn(1, 4, H), torch.randn(1, 4, DH)
    out = router(inputs(x, prev_state=prev))
    torch.testing.assert_close(out.state[0], router.gru(x[0], prev[0]), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------- losses and training


def test_srip_schedule_advances_and_survives_resume():
    over = {"router": {"so_warmup_steps": 10, "so_lambda_max": 0.02}}
    router = make(**over).train()
    x = torch.randn(2, 6, H)
    assert float(router(inputs(x)).diagnostics["lambda_ortho"]) == 0.0
    for step in range(1, 4):
        router.on_optimizer_step(step)
    out = router(inputs(x))
    assert float(out.diagnostics["lambda_ortho"]) == pytest.approx(0.02 * 3 / 10)
    torch.testing.assert_close(out.aux_losses["ortho"], 0.006 * out.diagnostics["ortho_loss"])
    assert "srip_step" in router.state_dict()

    resumed = make(seed=1, **over).train()
    resumed.load_state_dict(router.state_dict())
    assert float(resumed.lambda_ortho()) == pytest.approx(0.006)
    for step in range(4, 8):
        resumed.on_optimizer_step(step)
    assert float(resumed.lambda_ortho()) == pytest.approx(0.014)
    resumed.on_optimizer_step(50)
    assert float(resumed.lambda_ortho()) == pytest.approx(0.02)

    constant = make(router={"srip_enabled": False, "so_lambda_max": 0.02})
    assert float(constant.lambda_ortho()) == pytest.approx(0.02)


def test_entropy_loss_sign_and_scale():
    router = make(router={"entropy_coef": 0.1}).train()
    out = router(inputs(torch.randn(2, 6, H)))
    q = out.probs
    h = -(q * torch.log(q.clamp_min(1e-20))).sum(1).mean()
    torch.testing.assert_close(out.aux_losses["entropy"], 0.1 * h, atol=1e-6, rtol=0)
    assert "entropy" not in make().train()(inputs(torch.randn(2, 6, H))).aux_losses


@pytest.mark.parametrize("packed", [False, True])
def test_gradients_reach_gru_projector_and_head(packed):
    router = make().train()
    router.on_optimizer_step(50)  # lambda_ortho > 0
    torch.manual_seed(9)
    x = torch.randn(2, 8, H)
    valid = torch.ones(2, 8, dtype=torch.bool)
    doc_start = torch.zeros(2, 8, dtype=torch.bool)
    doc_start[:, 0] = True
    if packed:
        valid[0, :2] = False
        doc_start[1, 5] = True
    out = router(inputs(x, valid=valid, doc_start=doc_start))
    loss = (out.expert_weight * torch.randn_like(out.expert_weight)).sum() + sum(out.aux_losses.values())
    loss.backward()
    for name in ("gru.weight_ih_l0", "gru.weight_hh_l0", "head.weight", "projector.weight"):
        grad = dict(router.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


# ------------------------------------------------------------------------- running Gram (EMA)


def _train_tiny_moe(checkpointing: str, accum: int, steps: int = 3, decay: float = 0.5):
    """Train an upcycled tiny Llama with SPECTRA routers for `steps` optimizer steps of `accum`
    micro-batches, routers told of each step by the Trainer's RouterStepCallback.

    Returns (per router: running Gram buffer [E, D], the M of every router call in order).
    """
    from types import SimpleNamespace

    from conftest import tiny_causal_lm
    from spectra.config import load_config, validate
    from spectra.moe import upcycle
    from spectra.moe.upcycle import routers
    from spectra.train.callbacks import RouterStepCallback

    cfg = validate(load_config(["router=spectra", "moe.num_experts=4", "moe.top_k=2", f"router.gram_ema_decay={decay}",
                                "router.gru_hidden_size=8", "router.router_dim=4"]))
    model = upcycle(tiny_causal_lm("llama"), cfg, seed=0)
    if checkpointing != "off":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    model.train()
    calls: list[list[torch.Tensor]] = [[] for _ in routers(model)]
    for i, r in enumerate(routers(model)):
        r.register_forward_hook(lambda mod, args, out, i=i: calls[i].append(out.expert_repr.detach().clone()))
    callback = RouterStepCallback(model)
    model.spectra_context.recording = True  # as MoETrainer.compute_loss does: aux losses join the loss
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # large: M moves visibly from step to step
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        for _ in range(accum):
            ids = torch.randint(0, 97, (2, 10), generator=gen)
            out = model(input_ids=ids, labels=ids, use_cache=False)
            (out.loss + model.spectra_context.aux_loss()).backward()
        opt.step()
        opt.zero_grad()
        callback.on_step_end(None, SimpleNamespace(global_step=step), None)
    return [r.expert_repr_ema.clone() for r in routers(model)], calls


def _hand_ema(ms: list[torch.Tensor], accum: int, decay: float) -> torch.Tensor:
    """The documented running Gram: per optimizer step, mean of its micro-batch M's; the first
    step copies, later ones blend ema <- d * ema + (1 - d) * mean."""
    ema = None
    for lo in range(0, len(ms), accum):
        mean = torch.stack(ms[lo : lo + accum]).mean(0)
        ema = mean if ema is None else decay * ema + (1 - decay) * mean
    return ema


@pytest.mark.parametrize("accum", [1, 2])
def test_running_gram_updates_once_per_optimizer_step(accum):
    # With gradient checkpointing the decoder layer (router included) runs again inside backward;
    # that recompute must not blend M a second time, and with gradient accumulation the update is
    # once per optimizer step (the mean of its micro-batches), not once per micro-batch.
    steps, decay = 3, 0.5
    buffers = {}
    for mode in ("off", "non_reentrant", "reentrant"):
        ema, calls = _train_tiny_moe(mode, accum, steps, decay)
        for i, ms in enumerate(calls):
            if mode == "off":
                assert len(ms) == steps * accum
                batch_ms = ms
            else:  # forward, then its recompute in backward: the same micro-batch, the same M
                assert len(ms) == 2 * steps * accum
                batch_ms = ms[0::2]
                for a, b in zip(ms[0::2], ms[1::2]):
                    torch.testing.assert_close(a, b, atol=0, rtol=0)
            torch.testing.assert_close(ema[i], _hand_ema(batch_ms, accum, decay), atol=1e-6, rtol=0)
        buffers[mode] = ema
    # transformers' default (non-reentrant) checkpointing trains exactly like no checkpointing, so
    # the buffers end identical. (Reentrant checkpointing drifts in the trajectory itself.)
    for a, b in zip(buffers["off"], buffers["non_reentrant"]):
        assert torch.equal(a, b)


def test_running_gram_folds_at_eval_and_skips_non_finite_steps():
    router = make(router={"gram_ema_decay": 0.5}).train()
    torch.manual_seed(11)
    with torch.no_grad():
        m1 = router(inputs(torch.randn(2, 6, H))).expert_repr
        m2 = router(inputs(torch.randn(2, 6, H))).expert_repr
    assert not bool(router.expert_repr_ema_ready)  # forwards only collect
    router.eval()  # no optimizer step followed: eval folds the collected mean (first: a copy)
    torch.testing.assert_close(router.expert_repr_ema, (m1 + m2) / 2, atol=1e-7, rtol=0)
    before = router.expert_repr_ema.clone()
    router.train()
    router.collect_expert_repr(torch.full_like(m1, float("nan")))  # a non-finite step
    router.on_optimizer_step(1)
    assert torch.equal(router.expert_repr_ema, before)
    with torch.no_grad():
        m3 = router(inputs(torch.randn(2, 6, H))).expert_repr
    router.on_optimizer_step(2)
    torch.testing.assert_close(router.expert_repr_ema, 0.5 * before + 0.5 * m3, atol=1e-7, rtol=0)


@pytest.mark.parametrize("training", [True, False])
def test_expert_slots_per_token_is_k_over_real_tokens(training):
    """SPECTRA serves all k slots of every real token (the quota never drops), so the compute it
    reports is exactly k per real token, padding excluded from both counts."""
    router = make()
    router.train(training)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False  # 4 padding positions
    out = router(inputs(torch.randn(2, 10, H), valid=valid))
    k = out.top_k
    served_real = int((out.expert_weight[valid.reshape(-1)] > 0).sum())
    assert served_real == 16 * k
    assert out.diagnostics["expert_slots_per_token"].item() == pytest.approx(served_real / 16)
