"""Router replacement in DeepSeek-V3 (transformers `deepseek_v3`; moe/replace.py): every router
replaces the sigmoid / group-limited gate, the routed experts stay bit-equal, the shared experts
stay the model's own and are added unweighted, the routed scaling factor is kept, the dense-first
layers stay dense; references are the original HF model / block with only the gate's decision
swapped; save / load / generate round trip; the tiny model config and a train.py run."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from conftest import ROOT, assert_ok, run_cli, tiny_causal_lm
from spectra.config import ConfigError, load_config, validate
from spectra.moe import load_moe_model, moe_blocks, save_moe_model, upcycle
from spectra.moe.replace import is_moe_model, replace_routers
from spectra.routers_catalog import NO_ROUTER, ROUTER_NAMES
from spectra.routing.base import ROUTERS
from test_upcycle_models import one_thread, train_steps  # noqa: F401 (fixture)

E, K, DENSE = 8, 2, 1  # routed experts, the model's experts per token, dense-first layers
# Every router of the catalog (routers added later are tested without editing this file).
ALL_ROUTERS = [name for name in ROUTER_NAMES if name != NO_ROUTER]


_MLA = dict(q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
# The family's members in transformers: the same block (gate + experts + shared_experts, y = experts
# with the gate's weights times routed_scaling_factor + shared_experts(x)), their own gates.
_FAMILY_ARCH = {
    "deepseek_v3": dict(norm_topk_prob=True, **_MLA),  # sigmoid, groups by top-2 sums, correction bias
    "deepseek_v2": dict(topk_method="group_limited_greedy", **_MLA),  # softmax, groups by their max
    "glm4_moe": dict(head_dim=8, norm_topk_prob=True),  # GLM-4.5: DeepSeek-V3's gate, plain attention
}


def tiny_deepseek(seed: int = 0, model_type: str = "deepseek_v3", **overrides):
    """A tiny DeepSeek-V3 (or family member; 3 layers: 1 dense + 2 MoE; H=32, E=8 in 4 groups,
    top-2 groups, k=2, one shared expert, MLA with tiny ranks) with gate weights drawn at random
    (transformers initialises the gate to zeros) and a non-zero e_score_correction_bias where the
    gate has one."""
    arch = dict(num_hidden_layers=3, first_k_dense_replace=DENSE, n_routed_experts=E, n_shared_experts=1,
                num_experts_per_tok=K, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                moe_intermediate_size=16, num_key_value_heads=4, **_FAMILY_ARCH[model_type])
    arch.update(overrides)
    model = tiny_causal_lm(model_type, seed=seed, **arch)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers[DENSE:]:
            layer.mlp.gate.weight.normal_(0.0, 32**-0.5, generator=gen)
            if hasattr(layer.mlp.gate, "e_score_correction_bias"):
                layer.mlp.gate.e_score_correction_bias.uniform_(-0.1, 0.1, generator=gen)
    return model


def router_cfg(name: str, *overrides: str):
    """The run config of router `name` with k = 2, or with the router's own k where it fixes one."""
    try:
        return validate(load_config([f"router={name}", f"router.top_k={K}", *overrides]))
    except ConfigError:
        return validate(load_config([f"router={name}", *overrides]))


def _require_router(name: str) -> None:
    """Routers are written concurrently: skip (saying why) if one does not import."""
    try:
        import spectra.routing  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the state of the tree
        pytest.skip(f"spectra.routing not importable: {type(e).__name__}: {e}")
    if name not in ROUTERS:  # pragma: no cover
        pytest.skip(f"router {name!r} is listed but not registered yet")


def _tokens(seed: int, shape=(2, 11)) -> torch.Tensor:
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("router", ALL_ROUTERS)
def test_every_router_replaces_the_gates_keeping_experts_shared_experts_and_dense_layers(router):
    _require_router(router)
    original = tiny_deepseek()
    model = copy.deepcopy(original)
    kept = {i: (layer.mlp.experts, layer.mlp.shared_experts) for i, layer in enumerate(model.model.layers) if i >= DENSE}
    dense = model.model.layers[0].mlp
    cfg = router_cfg(router)  # run config says moe.num_experts=8, num_shared_experts=1 (defaults)
    assert is_moe_model(model)
    upcycle(model, cfg)  # the train.py path: an MoE model goes to replace_routers

    blocks = moe_blocks(model)
    assert [b.layer_idx for b in blocks] == [1, 2] and model.spectra_context.moe_layers == [1, 2]
    # The dense-first layer is untouched: same module, same weights.
    assert model.model.layers[0].mlp is dense and type(dense).__name__ == "DeepseekV3MLP"
    for k, v in dense.state_dict().items():
        assert torch.equal(v, original.model.layers[0].mlp.state_dict()[k]), k
    for b in blocks:
        orig = original.model.layers[b.layer_idx].mlp
        experts, shared = kept[b.layer_idx]
        assert b.experts is experts and b.shared_expert is shared  # the model's own modules ...
        for mine, theirs in ((b.experts, orig.experts), (b.shared_expert, orig.shared_experts)):
            for k, v in mine.state_dict().items():
                assert torch.equal(v, theirs.state_dict()[k]), k  # ... bit-equal to the original's
        assert b.shared_expert_added and b.shared_expert_gate is None and b.routed_scaling_factor == 2.5
        assert isinstance(b.router, ROUTERS[router]) and b.router.num_experts == E
    # The gates (weight and e_score_correction_bias) are gone from the modules and the state dict.
    assert not any(type(m).__name__ == "DeepseekV3TopkRouter" for m in model.modules())
    assert not any(".mlp.gate." in k or "e_score_correction_bias" in k for k in model.state_dict())
    spec = model.config.spectra_moe
    assert spec["mode"] == "replace" and spec["router"]["name"] == router
    assert spec["moe"]["num_experts"] == E and spec["moe"]["num_shared_experts"] == 1 and cfg.moe.num_experts == E
    # The shared experts follow moe.shared_expert_trainable (default false: frozen, as upcycling's copy).
    assert not any(p.requires_grad for b in blocks for p in b.shared_expert.parameters())
    assert all(p.requires_grad for b in blocks for p in b.experts.parameters())


class _GateDecision(nn.Module):
    """Stands in for a DeepSeek-V3 gate: returns a given decision, scaled by the model's
    routed_scaling_factor the way DeepseekV3TopkRouter.forward scales its own weights."""

    def __init__(self, index: torch.Tensor, weight: torch.Tensor, scale: float):
        super().__init__()
        self.index, self.weight, self.scale = index, weight, scale

    def forward(self, hidden_states):
        return None, self.weight * self.scale, self.index


@pytest.mark.parametrize("router", ALL_ROUTERS)
@pytest.mark.parametrize("training", [False, True])
def test_each_block_is_the_original_deepseek_block_with_the_routers_decision(router, training):
    """Independent reference: the original HF DeepseekV3MoE forward (its experts kernel, its
    `+ shared_experts(x)`, its routed_scaling_factor), fed the new router's decision in place of
    its gate's, gives the replaced block's output, for every router and in both modes."""
    _require_router(router)
    original = tiny_deepseek()
    model = copy.deepcopy(original)
    replace_routers(model, router_cfg(router), seed=2)
    model.train(training)
    seen = {}
    for b in moe_blocks(model):
        def grab(block, args, out, idx=b.layer_idx):
            seen[idx] = (args[0].detach(), out.detach())
        b.register_forward_hook(grab)
        b.router.register_forward_hook(lambda mod, args, out, idx=b.layer_idx: seen.setdefault(("r", idx), out))
    with torch.no_grad():
        model(_tokens(0))
        for b in moe_blocks(model):
            hidden, got = seen[b.layer_idx]
            decision = seen[("r", b.layer_idx)]
            ref_block = original.model.layers[b.layer_idx].mlp
            ref_block.gate = _GateDecision(decision.expert_index, decision.expert_weight, 2.5)
            # the outputs are ~1e-3 (std 0.02 init): a relative tolerance, or a lost 0.1 % would pass
            torch.testing.assert_close(got, ref_block(hidden), rtol=1e-6, atol=0)


class _TopkRuleGate(nn.Module):
    """The `topk` router's rule (linear -> softmax -> top-k -> renormalise), hand-written as a
    DeepSeek-V3 gate (fp32 logits, weights times the routed scaling factor), for the reference."""

    def __init__(self, weight: torch.Tensor, k: int, scale: float):
        super().__init__()
        self.w, self.k, self.scale = weight, k, scale

    def forward(self, hidden_states):
        logits = nn.functional.linear(hidden_states.reshape(-1, self.w.shape[1]).float(), self.w.float())
        top_p, top_i = logits.softmax(-1).topk(self.k, dim=-1)
        return logits, top_p / top_p.sum(-1, keepdim=True) * self.scale, top_i


@pytest.mark.parametrize("scale", [2.5, 1.0])
def test_topk_with_the_old_gate_weights_equals_the_hf_model_with_a_topk_gate(scale):
    """Whole-model reference, logits level: the original HF DeepSeek-V3 (MLA attention, dense
    first layer, shared experts, routed_scaling_factor `scale`) whose gates follow the topk rule
    with the old gate weights = our replaced model whose topk routers got those weights."""
    original = tiny_deepseek(routed_scaling_factor=scale).eval()
    replaced = copy.deepcopy(original)
    weights = [layer.mlp.gate.weight.detach().clone() for layer in original.model.layers[DENSE:]]
    x = _tokens(1)
    with torch.no_grad():
        hf_own = original(x).logits  # the model with its own sigmoid / group-limited / biased gate
        for layer, w in zip(original.model.layers[DENSE:], weights):
            layer.mlp.gate = _TopkRuleGate(w, K, scale)
        want = original(x).logits
        replace_routers(replaced, router_cfg("topk"), seed=1)
        replaced.eval()
        assert (replaced(x).logits - want).abs().max() > 1e-4  # fresh routers: a different model
        for block, w in zip(moe_blocks(replaced), weights):
            block.router.gate.weight.copy_(w)
        torch.testing.assert_close(replaced(x).logits, want, rtol=1e-6, atol=0)
    assert (hf_own - want).abs().max() > 1e-4  # the gate's rule matters: the test can tell them apart


# DeepSeek-V3's own gate rule: sigmoid scores, selection by top-k of scores + e_score_correction_bias
# within the token's best topk_group of n_group groups, weights = selected sigmoids / their sum.
_DEEPSEEK_RULE = ("router.score_function=sigmoid", "router.num_groups=4", "router.group_topk=2")


@pytest.mark.parametrize("router, with_bias", [("topk", False), ("aux_free", True)])
def test_a_router_with_deepseeks_rule_and_the_old_gate_reproduces_the_original_model(router, with_bias):
    """Independent reference: the original HF DeepSeek-V3, gates untouched. Our router with
    DeepSeek-V3's rule (score_function sigmoid, 4 groups keep 2) given the removed gate's weight
    -- and, for aux_free, its e_score_correction_bias as the selection bias -- gives the original
    logits: so the replaced model differs from DeepSeek-V3 by the router alone (routed experts,
    shared experts added unweighted, routed_scaling_factor 2.5 and the dense layer as they were).
    topk has no selection bias: the original's bias is set to 0 for it."""
    _require_router(router)
    original = tiny_deepseek().eval()
    gates = [layer.mlp.gate for layer in original.model.layers[DENSE:]]
    if not with_bias:
        for g in gates:
            g.e_score_correction_bias.zero_()
    replaced = copy.deepcopy(original)
    replace_routers(replaced, router_cfg(router, *_DEEPSEEK_RULE), seed=1)
    replaced.eval()
    x = _tokens(6)
    with torch.no_grad():
        want = original(x).logits
        assert (replaced(x).logits - want).abs().max() > 1e-4 * want.abs().max()  # fresh routers differ
        for block, g in zip(moe_blocks(replaced), gates):
            block.router.gate.weight.copy_(g.weight)
            if with_bias:
                assert not g.e_score_correction_bias.eq(0).all()  # a bias that changes the selection
                block.router.expert_bias.copy_(g.e_score_correction_bias)
        torch.testing.assert_close(replaced(x).logits, want, rtol=1e-5, atol=1e-7)
    if with_bias:  # without the bias the selection (and the logits) would differ: the test sees it
        with torch.no_grad():
            for block in moe_blocks(replaced):
                block.router.expert_bias.zero_()
            assert (replaced(x).logits - want).abs().max() > 1e-4 * want.abs().max()


@pytest.mark.parametrize("router", ALL_ROUTERS)
def test_replaced_deepseek_trains_saves_loads_and_generates_identically(tmp_path, router):
    _require_router(router)
    model = tiny_deepseek()
    upcycle(model, router_cfg(router), seed=3)
    learned = [p for b in moe_blocks(model) for p in b.router.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in learned]
    losses = train_steps(model, steps=2)  # routers and experts away from their initial values
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert not learned or any(not torch.equal(a, p.detach()) for a, p in zip(before, learned))
    # train_steps leaves the context recording (a trainer forward); the comparisons below are the
    # plain forwards a saved model gets (Expert Choice routes those causally, not by batch).
    model.spectra_context.recording = False

    save_moe_model(model, tmp_path / "m")
    record = json.loads((tmp_path / "m" / "config.json").read_text())
    # (saved as its own model type with the base's type beside it where the directory carries
    # modeling code, moe/hf_native.py; as the base's type otherwise)
    assert record.get("spectra_base_model_type", record["model_type"]) == "deepseek_v3"
    assert record["spectra_moe"]["mode"] == "replace"
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "m" / "model.safetensors")))
    # The module's own layout (not transformers' legacy per-expert one), no gate, no correction bias.
    assert {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.shared_expert.down_proj.weight",
            "model.layers.0.mlp.down_proj.weight"} <= keys
    assert not any(".mlp.gate." in k or "e_score_correction_bias" in k for k in keys)

    again = load_moe_model(tmp_path / "m")
    assert [type(b.router) for b in moe_blocks(again)] == [type(b.router) for b in moe_blocks(model)]
    assert type(again.model.layers[0].mlp).__name__ == "DeepseekV3MLP"
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    x = _tokens(4, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, rtol=0, atol=0)
    prompt = x[:1, :4]
    outs = [m.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=c, pad_token_id=0)
            for m in (model, again) for c in (True, False)]
    assert outs[0].shape[1] == 10
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_tiny_deepseek_v3_config_composes_and_builds_the_model_it_describes():
    """The arch keys are real transformers keys: 4 layers, the first dense, E=8 in 4 groups, one
    shared expert, MLA ranks as written; replacement then keeps layer 0 dense."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = validate(load_config(["model=tiny_deepseek_v3", "router=topk"]))
    arch = dict(cfg.model.arch)
    assert cfg.model.source == "config" and arch["max_position_embeddings"] >= 512 and arch["hidden_size"] % 8 == 0
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=97, **arch)
    for key, value in arch.items():
        assert getattr(config, key) == value, key  # no key silently dropped or renamed
    model = AutoModelForCausalLM.from_config(config)
    layers = model.model.layers
    assert len(layers) == 4 and type(layers[0].mlp).__name__ == "DeepseekV3MLP"
    assert all(type(layer.mlp).__name__ == "DeepseekV3MoE" for layer in layers[1:])
    assert layers[1].mlp.experts.gate_up_proj.shape == (8, 2 * 128, 128)
    assert layers[1].mlp.gate.num_group == 4 and layers[1].mlp.gate.topk_group == 2
    attn = layers[0].self_attn
    assert (attn.q_a_proj.out_features, attn.kv_a_layernorm.weight.shape[0]) == (64, 32)
    upcycle(model, cfg)
    assert [b.layer_idx for b in moe_blocks(model)] == [1, 2, 3] and type(layers[0].mlp).__name__ == "DeepseekV3MLP"


@pytest.mark.slow
def test_train_py_runs_tiny_deepseek_v3_with_spectra_and_the_run_model_reloads(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(["train.py", "experiment=demo", "model=tiny_deepseek_v3", "router=spectra", "trainer.max_steps=3",
                    "trainer.eval_steps=3", "trainer.logging_steps=1", "trainer.save_steps=3",
                    "trainer.per_device_train_batch_size=4", "trainer.per_device_eval_batch_size=8",
                    "data.max_seq_length=64", "data.max_train_samples=64", "data.max_eval_samples=8",
                    f"hydra.run.dir={run_dir}"], cwd=ROOT, env={"OMP_NUM_THREADS": "1"})
    assert_ok(proc)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary.get("status", "completed") != "failed"
    model = load_moe_model(run_dir / "model")
    assert [b.layer_idx for b in moe_blocks(model)] == [1, 2, 3]
    assert type(model.model.layers[0].mlp).__name__ == "DeepseekV3MLP"
    assert model.config.spectra_moe["router"]["name"] == "spectra"
    with torch.no_grad():
        assert torch.isfinite(model(_tokens(5, (1, 8))).logits).all()


@pytest.mark.parametrize("router", ["topk", "spectra"])
@pytest.mark.parametrize("model_type", ["deepseek_v2", "glm4_moe"])
def test_deepseek_v2_and_glm4_moe_are_replaced_as_deepseek_v3(tmp_path, model_type, router):
    """DeepSeek-V2 and GLM-4.5 (glm4_moe) have DeepSeek-V3's block: the same checks, shorter. The
    dense first layer stays; routed and shared experts are the model's own, bit-equal; each block
    is the original HF block fed the router's decision (shared experts added unweighted, the
    model's routed_scaling_factor); save / load gives equal logits."""
    _require_router(router)
    original = tiny_deepseek(model_type=model_type).eval()
    model = copy.deepcopy(original)
    dense = model.model.layers[0].mlp
    upcycle(model, router_cfg(router), seed=2)
    assert model.model.layers[0].mlp is dense and [b.layer_idx for b in moe_blocks(model)] == [1, 2]
    assert model.config.spectra_moe["moe"]["num_shared_experts"] == 1
    seen = {}
    for b in moe_blocks(model):
        orig = original.model.layers[b.layer_idx].mlp
        for mine, theirs in ((b.experts, orig.experts), (b.shared_expert, orig.shared_experts)):
            assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in mine.state_dict().items())
        b.register_forward_hook(lambda m, args, out, idx=b.layer_idx: seen.__setitem__(idx, (args[0], out)))
        b.router.register_forward_hook(lambda m, args, out, idx=b.layer_idx: seen.__setitem__(("r", idx), out))
    x = _tokens(7)
    with torch.no_grad():
        logits = model(x).logits
        for b in moe_blocks(model):
            (hidden, got), decision = seen[b.layer_idx], seen[("r", b.layer_idx)]
            ref_block = original.model.layers[b.layer_idx].mlp
            ref_block.gate = _GateDecision(decision.expert_index, decision.expert_weight, 2.5)
            torch.testing.assert_close(got, ref_block(hidden), rtol=1e-6, atol=0)
    save_moe_model(model, tmp_path / "m")
    again = load_moe_model(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, logits, rtol=0, atol=0)
