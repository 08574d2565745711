"""Bad configuration fails at composition/validation time with a message naming the key."""

from __future__ import annotations

import dataclasses

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from spectra.config import ConfigError, RouterConfig, load_config, validate


def _error_of(overrides, kind=ConfigError):
    """The error composing + validating `overrides` raises, and its message: a `kind` (validation's
    ConfigError unless Hydra's composition refuses first), not just any exception."""
    with pytest.raises(kind) as info:
        validate(load_config(overrides))
    return info.value, str(info.value)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["router.top_k=9"], "router.top_k"),  # k > E (E = 8)
        (["moe.num_experts=0"], "moe.num_experts"),
        (["moe.num_experts=1"], "moe.num_experts"),  # an MoE router needs >= 2 experts
        (["router.name=nonsense"], "router.name"),
        (["+moe.experts=4"], "moe.experts"),  # unknown key added with +
        (["quota.capacity_factor=0.8"], "quota.capacity_factor"),  # alpha < 1 with quota on
        (["osr.epsilon=0"], "osr.epsilon"),
        (["osr.iterations=0"], "osr.iterations"),
        (["trainer.max_steps=0"], "trainer.max_steps"),
        (["trainer.warmup_ratio=1.5"], "trainer.warmup_ratio"),
        (["deepspeed.stage=4"], "deepspeed.stage"),
        (["model.attn_implementation=fast"], "model.attn_implementation"),
        (["moe.shared_expert_weight=1.0"], "moe.shared_expert_weight"),
        (["router=switch_top1", "router.top_k=2"], "router.top_k"),
        (["data.max_seq_length=4"], "data.max_seq_length"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    err, text = _error_of(overrides)
    assert text.startswith(f"{key}: "), f"{overrides}: message does not start with {key!r}: {text}"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["router.top_k=abc"], "router.top_k"),  # wrong type
        (["router.unknown_knob=1"], "router.unknown_knob"),  # unknown key (without +)
    ],
)
def test_composition_refuses_wrong_types_and_unknown_keys(overrides, key):
    err, text = _error_of(overrides, ConfigCompositionException)
    assert key in text, f"{overrides}: message does not name {key!r}: {text}"


@pytest.mark.parametrize(
    "node, key",
    [
        ({"router": {"top_k": "abc"}}, "router.top_k"),  # wrong type
        ({"router": {"nope": 1}}, "router.nope"),  # unknown key
        ({"osr": {"epsilon": 0.0}}, "osr.epsilon"),  # impossible value
    ],
)
def test_validate_names_the_key_of_a_config_built_without_hydra(node, key):
    """A DictConfig from a notebook skips Hydra's composition: `validate` alone refuses it."""
    with pytest.raises(ConfigError) as info:
        validate(OmegaConf.create({**node, "model": {"arch": {"model_type": "llama"}}}))
    assert str(info.value).startswith(f"{key}: "), info.value


def test_valid_defaults_and_demo_compose():
    cfg = validate(load_config(["experiment=demo"]))
    assert cfg.router.name == "topk" and cfg.moe.num_experts == 8
    assert cfg.trainer.max_steps == 200  # the demo overlay applied on top of the defaults


def test_quota_below_one_allowed_when_quota_off():
    cfg = validate(load_config(["quota=off", "quota.capacity_factor=0.8"]))
    assert cfg.quota.enabled is False


@pytest.mark.parametrize("model", ["tiny", "smollm2_135m"])
def test_model_configs_compose(model):
    cfg = validate(load_config([f"model={model}"]))
    assert cfg.model.name == model


@pytest.mark.parametrize("overrides", [["router=spectra", "moe.top_k=1"], ["router=spectra", "router.top_k=1"]])
def test_spectra_with_one_expert_per_token_is_refused(overrides):
    # k = 1: SPECTRA's weight Q_sel / sum Q_sel is identically 1, so the router would get no
    # gradient from the LM loss. The message names the key and the reason.
    err, text = _error_of(overrides)
    assert isinstance(err, ConfigError)
    assert "router.top_k" in text and "moe.top_k" in text and "no gradient" in text
    assert validate(load_config(["router=spectra", "moe.top_k=2"])).router.top_k == 2


def test_router_names_are_stated_once_in_the_catalog():
    """config validation, the router registry and the tables all read spectra.routers_catalog."""
    from spectra import config
    from spectra.analysis import tables
    from spectra.routers_catalog import DISPLAY_NAMES, NO_ROUTER, ROUTER_NAMES
    from spectra.routing import ROUTERS

    assert set(ROUTERS) == set(ROUTER_NAMES) - {NO_ROUTER}
    assert config.ROUTER_NAMES is ROUTER_NAMES and tables.ROUTER_NAMES is DISPLAY_NAMES
    assert tables.variant_labels(["router=switch_top2", "router=dense"]) == {"router=switch_top2": "Switch Top-2",
                                                                            "router=dense": "Dense"}
    with pytest.raises(ValueError, match="routers_catalog"):
        from spectra.routing.base import register_router

        register_router("not_in_catalog")


@pytest.mark.parametrize(
    "router, overrides, group, expected",
    [
        ("switch_top2", ["router.capacity_factor=1.5", "router.aux_loss_variant=all_slots"], "SwitchTop2RouterConfig",
         dict(top_k=2, aux_loss_coef=0.01, capacity_factor=1.5, aux_loss_variant="all_slots")),
        ("expert_choice", ["moe.top_k=3", "router.ec_inference=causal"], "ExpertChoiceRouterConfig",
         dict(top_k=3, ec_capacity_factor=None, capacity_factor=3.0, ec_inference="causal")),
        ("hash", [], "HashRouterConfig", dict(top_k=1, hash_per_layer=True)),  # hash.yaml: k = 1
        ("topk", ["router.jitter=0.1"], "GateRouterConfig", dict(top_k=2, jitter=0.1, entropy_coef=0.0)),
        ("spectra", ["osr.epsilon=0.2", "quota.capacity_factor=1.5", "router.recurrence=depth"], "SpectraRouterConfig",
         dict(top_k=2, recurrence="depth")),
    ],
)
def test_each_router_receives_its_typed_group_built_from_the_flat_keys(router, overrides, group, expected):
    from spectra import config
    from spectra.routing import ROUTERS

    cfg = validate(load_config([f"router={router}", *overrides]))
    cls = getattr(config, group)
    assert ROUTERS[router].config_class is cls
    g = cls.from_run_config(cfg)
    for key, value in expected.items():
        assert getattr(g, key) == value, key
    if router == "spectra":
        assert g.osr.epsilon == 0.2 and g.quota.capacity_factor == 1.5
    # a group carries only its family's knobs
    assert not hasattr(g, "name") and (router == "switch_top2" or not hasattr(g, "z_loss_coef"))
    assert config.ROUTER_GROUPS[router] is cls


def test_router_groups_keep_defaults_for_keys_older_saved_models_lack():
    from spectra.config import ExpertChoiceRouterConfig, HashRouterConfig, SpectraRouterConfig, SwitchRouterConfig

    old = {"name": "switch_top2", "top_k": 2}  # a router record saved before the newer keys
    assert SwitchRouterConfig.from_router_keys(OmegaConf.create(old)).aux_loss_variant == "first_choice"
    assert ExpertChoiceRouterConfig.from_router_keys(old).ec_inference == "batch"
    assert HashRouterConfig.from_router_keys(old).hash_per_layer is False
    assert SpectraRouterConfig.from_router_keys(old).gram_ema_decay == 0.99
    with pytest.raises(ConfigError, match=r"router\.ec_capacity_factor"):
        ExpertChoiceRouterConfig.from_router_keys({"ec_capacity_factor": 0.0})


@pytest.mark.parametrize("key, choices", [("router.recurrence", "token_and_depth, depth, none"),
                                          ("router.ec_inference", "batch, causal"),
                                          ("router.aux_loss_variant", "first_choice, all_slots")])
def test_router_choices_are_enums_refused_at_composition(key, choices):
    with pytest.raises(ConfigCompositionException) as e:
        load_config([f"{key}=sometimes"])
    assert key.split(".")[1] in str(e.value.__cause__ or e.value) and choices in str(e.value.__cause__ or e.value)


def test_router_choice_enums_read_and_save_as_plain_strings():
    from spectra.config import ECInference, Recurrence

    cfg = load_config(["router=spectra", "router.recurrence=depth", "router.ec_inference=causal"])
    assert cfg.router.recurrence is Recurrence.depth and cfg.router.recurrence == "depth"
    assert "recurrence: depth" in OmegaConf.to_yaml(cfg) and "ec_inference: causal" in OmegaConf.to_yaml(cfg)
    typed = validate(cfg)
    assert typed.router.ec_inference is ECInference.causal and f"{typed.router.recurrence}" == "depth"


# ----------------------------------------------------------------- router keys stated once (#17 D1)


def test_flat_router_keys_are_the_union_of_the_groups_fields_each_stated_once():
    from spectra import config

    flat = {f.name: f for f in dataclasses.fields(RouterConfig)}
    group_fields = {}
    for group in set(config.ROUTER_GROUPS.values()) | set(config._GROUPS):
        for f in dataclasses.fields(group):
            if f.name not in ("osr", "quota"):
                group_fields.setdefault(f.name, set()).add((repr(f.default), group.__name__))
    assert set(flat) == {"name"} | set(group_fields)
    for name, stated in group_fields.items():
        defaults = {d for d, _ in stated}
        assert defaults == {repr(flat[name].default)}, (name, stated)  # one default, the group's
    # the schema composes and type-checks the generated keys like any structured config
    cfg = load_config(["router=switch_top2", "router.drop_policy=probs", "router.score_function=sigmoid"])
    assert cfg.router.drop_policy == "probs" and cfg.router.score_function == "sigmoid"
    with pytest.raises(ConfigCompositionException):
        load_config(["router.num_groups=many"])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["router=switch_top2", "router.drop_policy=sometimes"], "drop_policy"),
        (["router=topk", "router.score_function=tanh"], "score_function"),
    ],
)
def test_new_router_choices_are_enums_refused_at_composition(overrides, key):
    with pytest.raises(ConfigCompositionException) as e:
        load_config(overrides)
    assert key in str(e.value.__cause__ or e.value)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["router=topk", "router.num_groups=3"], "router.num_groups"),  # 3 does not divide E = 8
        (["router=topk", "router.num_groups=0"], "router.num_groups"),
        (["router=topk", "router.num_groups=4", "router.group_topk=5"], "router.group_topk"),
        (["router=topk", "moe.top_k=4", "router.num_groups=4", "router.group_topk=1"], "router.group_topk"),  # 2 < k
        (["router=switch_top2", "router.num_groups=4", "router.group_topk=0"], "router.group_topk"),
        (["router=switch_top1", "router.top_k=2"], "router.top_k"),
        (["router=switch_top2", "router.top_k=1"], "router.top_k"),
        (["router=spectra", "moe.top_k=1"], "router.top_k"),
    ],
)
def test_router_checks_that_need_num_experts_are_stated_once_in_the_group(overrides, key):
    """SpectraConfig validation and the router constructor both run the group's `check_for`."""
    from types import SimpleNamespace

    from spectra import config
    from spectra.routing import build_router

    cfg = load_config(overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)
    group = config.ROUTER_GROUPS[cfg.router.name]
    if group is not config.SpectraRouterConfig:  # spectra.py's constructor is another module's
        raw = SimpleNamespace(router=SimpleNamespace(**OmegaConf.to_container(cfg.router, resolve=True)))
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            build_router(raw, hidden_size=8, num_experts=cfg.moe.num_experts)


def test_cell_directory_names_leave_out_exactly_the_volatile_keys_and_the_sweep_groups():
    """A cell's directory name holds what it computes: the keys the config fingerprint ignores
    (contracts.rundir's volatile list) and the sweep/scale group choice stay out of it."""
    from spectra.config import cell_dirname

    computing = ["moe.top_k=4", "router=spectra", "seed=1", "osr.epsilon=0.1", "trainer.max_steps=7"]
    volatile = ["sweep=A", "scale=cpu_tiny", "seeds=[0,1]", "trainer.resume=never", "skip_complete=false",
                "hydra.launcher.n_jobs=2", "+tags=[x]", "output_dir=/tmp/o", "sweep_name=A", "scale_name=s",
                "sweep_values.seq_lengths=[1]"]
    assert cell_dirname(computing + volatile) == cell_dirname(computing)
    assert set(cell_dirname(computing, {"seed": "0,1"}).split(",")) == set(computing)


def test_a_key_added_at_its_default_leaves_recorded_fingerprints_unchanged():
    """data.split_long_documents came after runs were recorded: at its default (false, what those
    runs did) it is not part of the fingerprint, so their fingerprints and cached objectives stay
    valid; set to true it is a different config."""
    import dataclasses
    import hashlib
    import json

    from spectra.config import load_config, validate
    from spectra.contracts.rundir import VOLATILE_KEYS, config_fingerprint

    cfg = validate(load_config(["experiment=results", "router=topk", "seed=0"]))
    d = dataclasses.asdict(cfg)
    for k in VOLATILE_KEYS:
        d.pop(k, None)
    d["trainer"].pop("resume")
    assert d["data"].pop("split_long_documents") is False
    # the fingerprint as it was computed before the key existed
    before = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert config_fingerprint(cfg) == before
    split = validate(load_config(["experiment=results", "router=topk", "seed=0", "data.split_long_documents=true"]))
    assert split.data.split_long_documents is True and config_fingerprint(split) != before
