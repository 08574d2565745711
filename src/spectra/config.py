"""Typed configuration: one dataclass per concern, registered as Hydra structured configs.

The config keys are the user's API. Hydra/OmegaConf reject unknown keys and wrong types at
composition time (the schemas below are the `defaults` base of `conf/config.yaml`); impossible
values and cross-field conflicts are rejected by `validate(cfg)`, which instantiates these
dataclasses (running every `__post_init__`) before any model or data is touched. Every error
names the offending key.

Paper names map 1:1 onto these keys (see README "Config keys and the paper's names").
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from spectra.contracts.rundir import is_volatile_override
from spectra.routers_catalog import NO_ROUTER, ROUTER_NAMES  # router.name choices, stated once there


class Recurrence(StrEnum):
    """router.recurrence: SPECTRA's routing state (METHOD.md §2; `none` is the -GRU ablation)."""

    token_and_depth = "token_and_depth"
    depth = "depth"
    none = "none"


class StateCell(StrEnum):
    """router.state_cell: the cell of SPECTRA's routing state (`gru` = the paper's; `mingru` = the
    cheaper minimal GRU, routing/min_gru.py, see SpectraRouterConfig)."""

    gru = "gru"
    mingru = "mingru"


class ECInference(StrEnum):
    """router.ec_inference: how an eval-mode Expert Choice forward routes (see RouterConfig)."""

    batch = "batch"
    causal = "causal"


class DistillTarget(StrEnum):
    """router.balance_distill_target: what SPECTRA's inference distribution is pulled toward (see SpectraRouterConfig)."""

    plan = "plan"
    selected = "selected"


class ScoreFunction(StrEnum):
    """router.score_function: how a token-choice gate turns logits into scores (see GateRouterConfig)."""

    softmax = "softmax"
    sigmoid = "sigmoid"


class DropPolicy(StrEnum):
    """router.drop_policy: which assignments an over-full expert keeps (see AuxLossRouterConfig)."""

    probs = "probs"
    position = "position"


class AuxLossVariant(StrEnum):
    """router.aux_loss_variant: which assignments f_e of Switch's balance loss counts (see RouterConfig)."""

    first_choice = "first_choice"
    all_slots = "all_slots"


# Member names equal their values: OmegaConf converts a user's string by member name, and a StrEnum
# prints, compares, hashes and serialises (JSON, OmegaConf YAML) as that same string.
EXPERT_IMPLS = ("auto", "eager", "grouped_mm", "batched_mm")
# transformers schedulers that need no extra arguments
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")


class ConfigError(ValueError):
    """A configuration value is impossible; the message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _choice(enum_cls, value, key: str):
    """`value` as a member of `enum_cls` (composition already converts the user's string; this
    covers configs built in Python and records saved before a key became an Enum)."""
    try:
        return enum_cls(value)
    except ValueError:
        raise ConfigError(f"{key}: unknown {value!r}; choose one of {[m.value for m in enum_cls]}") from None


@dataclass
class ModelConfig:
    """Which causal LM to start from.

    source: 'config' builds `arch` (a transformers config dict) and saves/reloads it with
    save_pretrained/from_pretrained; 'pretrained' loads `pretrained` (hub id or local path).
    """

    name: str = "tiny"
    source: str = "config"
    pretrained: str | None = None
    # A transformers config as a dict (model.source=config). Empty in the schema so a model
    # group's arch replaces rather than merges with another architecture's keys.
    arch: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2
    dtype: str = "float32"  # weights dtype at load time; mixed precision is trainer.bf16

    def __post_init__(self) -> None:
        _check(self.source in ("config", "pretrained"), "model.source", f"must be 'config' or 'pretrained', got {self.source!r}")
        if self.source == "pretrained":
            _check(bool(self.pretrained), "model.pretrained", "needs a hub id or local path when model.source=pretrained")
        # arch.model_type is checked in `validate` (the schema's default arch is empty on purpose).
        _check(
            self.attn_implementation in ("auto", "sdpa", "eager", "flash_attention_2"),
            "model.attn_implementation",
            f"unknown {self.attn_implementation!r}; choose auto, sdpa, eager or flash_attention_2",
        )
        _check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"unknown dtype {self.dtype!r}")


@dataclass
class MoEConfig:
    """How dense MLPs become MoE blocks (METHOD.md §1)."""

    num_experts: int = 8  # E, routed experts per MoE layer
    # k for routers whose k is a free choice (topk, spectra, Expert Choice's inference
    # fallback): their router yamls read `top_k: ${moe.top_k}`; Switch top-1/top-2 and Hash fix
    # their own. Scales and experiments set this, so a baseline grid never conflicts with k.
    top_k: int = 2
    first_k_dense_replace: int = 0  # the first f decoder layers stay dense
    num_shared_experts: int = 1  # 0 or 1: a copy of the dense MLP mixed in with weight a
    shared_expert_weight: float = 0.5  # a in y = (1-a) routed + a shared
    shared_expert_trainable: bool = False  # the shared expert is frozen by default
    upcycle_noise: float = 1e-2  # relative std of the symmetry-breaking perturbation
    experts_implementation: str = "auto"  # transformers experts kernels: auto|eager|grouped_mm|batched_mm

    def __post_init__(self) -> None:
        _check(self.num_experts >= 1, "moe.num_experts", f"must be >= 1, got {self.num_experts}")
        _check(self.top_k >= 1, "moe.top_k", f"must be >= 1, got {self.top_k}")
        _check(self.first_k_dense_replace >= 0, "moe.first_k_dense_replace", f"must be >= 0, got {self.first_k_dense_replace}")
        _check(self.num_shared_experts in (0, 1), "moe.num_shared_experts", f"must be 0 or 1, got {self.num_shared_experts}")
        _check(0.0 <= self.shared_expert_weight < 1.0, "moe.shared_expert_weight", f"must be in [0, 1), got {self.shared_expert_weight}")
        _check(self.upcycle_noise >= 0.0, "moe.upcycle_noise", f"must be >= 0, got {self.upcycle_noise}")
        _check(
            self.experts_implementation in EXPERT_IMPLS,
            "moe.experts_implementation",
            f"unknown {self.experts_implementation!r}; choose one of {list(EXPERT_IMPLS)}",
        )


@dataclass
class OSRConfig:
    """Orthogonal Sinkhorn Routing (METHOD.md §2 steps 5-6)."""

    repulsion_weight: float = 0.5  # lambda (paper: osr_repulsion_weight; Sweep C)
    hinge_weight: float = 0.5  # beta
    hinge_threshold: float = 0.7  # tau
    epsilon: float = 0.05  # Sinkhorn temperature (paper: sinkhorn_epsilon; Sweep B)
    iterations: int = 3  # Sinkhorn iterations (paper: sinkhorn_iterations; Sweep B)
    log_sinkhorn: bool = True  # log-domain Sinkhorn (paper: log_sinkhorn_enabled)
    sinkhorn_inference: bool = False  # Sinkhorn at inference too (batch-dependent!)

    def __post_init__(self) -> None:
        _check(self.repulsion_weight >= 0.0, "osr.repulsion_weight", f"must be >= 0, got {self.repulsion_weight}")
        _check(self.hinge_weight >= 0.0, "osr.hinge_weight", f"must be >= 0, got {self.hinge_weight}")
        _check(0.0 <= self.hinge_threshold <= 1.0, "osr.hinge_threshold", f"must be in [0, 1], got {self.hinge_threshold}")
        _check(self.epsilon > 0.0, "osr.epsilon", f"must be > 0, got {self.epsilon}")
        _check(self.iterations >= 1, "osr.iterations", f"must be >= 1, got {self.iterations}")

    @classmethod
    def of(cls, group) -> OSRConfig:
        """`group` when it is an OSRConfig, else one built (and checked) from its keys."""
        return group if isinstance(group, cls) else cls(**_keys_of(group, cls))


@dataclass
class QuotaConfig:
    """Quota-constrained selection: hard capacity ceil(alpha * N * k / E) per expert (Sweep A)."""

    enabled: bool = True
    capacity_factor: float = 1.25  # alpha (paper: expert_choice_capacity_factor)

    def __post_init__(self) -> None:
        _check(self.capacity_factor > 0.0, "quota.capacity_factor", f"must be > 0, got {self.capacity_factor}")
        if self.enabled:
            _check(
                self.capacity_factor >= 1.0,
                "quota.capacity_factor",
                f"must be >= 1 when quota.enabled=true (alpha < 1 cannot serve every token), got {self.capacity_factor}",
            )

    @classmethod
    def of(cls, group) -> QuotaConfig:
        """`group` when it is a QuotaConfig, else one built (and checked) from its keys."""
        return group if isinstance(group, cls) else cls(**_keys_of(group, cls))


# ---------------------------------------------------------------- typed router groups
# Each router family receives its own typed group, built by `build_router` from the flat user keys
# (`router.*`, and `osr.*` / `quota.*` for SPECTRA): the keys stay the user's API, a router sees
# only its knobs, and each knob's check and default is written once, in the group that reads it.
# The flat `RouterConfig` (the `router.*` schema) is generated from these groups' fields (below).


def _keys_of(source, cls, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of dataclass `cls` (but `skip`) that `source` has: a dataclass, namespace, dict
    or DictConfig with those keys. A key absent from `source` (a model saved before the key
    existed) keeps the group's default, which is the default such models were trained with."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if isinstance(source, (dict, DictConfig)):
            if f.name in source:
                out[f.name] = source[f.name]
        elif hasattr(source, f.name):
            out[f.name] = getattr(source, f.name)
    return out


class _RouterGroup:
    """How a typed router group is built from the flat user keys, and its checks that need the
    number of experts (`check_for`, called by `SpectraConfig` validation and by the router's
    constructor, so each is stated once)."""

    top_k: int

    @classmethod
    def from_router_keys(cls, router, **groups):
        """The group from the `router.*` keys (RouterConfig, DictConfig or namespace); `groups`
        fills the fields that are whole groups (SPECTRA's osr and quota)."""
        return cls(**_keys_of(router, cls, skip=tuple(groups) or ("osr", "quota")), **groups)

    @classmethod
    def from_run_config(cls, cfg):
        """The group from a run config (anything with a `.router` group)."""
        return cls.from_router_keys(cfg.router)

    @classmethod
    def of(cls, config):
        """`config` itself when it is this group, else the group built from it as a run config
        (routers accept either: `build_router` passes the group, older callers a run config)."""
        return config if isinstance(config, cls) else cls.from_run_config(config)

    def check_for(self, num_experts: int) -> _RouterGroup:
        """The checks that need E = moe.num_experts (k <= E here; subclasses add theirs).
        Returns self, so a constructor can write `rc = Group.of(config).check_for(E)`."""
        _check(self.top_k <= num_experts, "router.top_k", f"k={self.top_k} exceeds moe.num_experts={num_experts}")
        return self


@dataclass
class LinearGateConfig(_RouterGroup):
    """The linear gate shared by every learned gate router (routing/softmax_gate.py): router.top_k
    (k), router.jitter (multiplicative U(1-j, 1+j) input noise in training), router.entropy_coef
    (lambda_ent; positive sharpens routing)."""

    top_k: int = 2
    entropy_coef: float = 0.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, "router.top_k", f"must be >= 1, got {self.top_k}")
        _check(self.jitter >= 0.0, "router.jitter", f"must be >= 0, got {self.jitter}")


@dataclass
class GateRouterConfig(LinearGateConfig):
    """topk (and the base of every token-choice gate router): the gate's knobs plus
    score_function: softmax (default) | sigmoid. sigmoid (DeepSeek-V3): s = sigmoid(logits),
                    combine weights = s at the selected experts / their sum (k > 1; the raw s for
                    k = 1), `probs` = s / sum_e s (what balance losses and metrics read).
    num_groups, group_topk: group-limited top-k (DeepSeek-V3): the E experts form num_groups
                    groups of E / num_groups; a group scores the sum of its top-2 selection scores;
                    each token keeps its best group_topk groups and takes its top-k among their
                    experts. num_groups = 1 = off (default)."""

    score_function: ScoreFunction = ScoreFunction.softmax
    num_groups: int = 1
    group_topk: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.score_function = _choice(ScoreFunction, self.score_function, "router.score_function")
        _check(self.num_groups >= 1, "router.num_groups", f"must be >= 1 (1 = no group-limited routing), got {self.num_groups}")
        _check(1 <= self.group_topk <= self.num_groups, "router.group_topk",
               f"must be in [1, router.num_groups={self.num_groups}], got {self.group_topk}")

    def check_for(self, num_experts: int) -> GateRouterConfig:
        super().check_for(num_experts)
        _check(num_experts % self.num_groups == 0, "router.num_groups",
               f"must divide moe.num_experts={num_experts}, got {self.num_groups}")
        reachable = self.group_topk * (num_experts // self.num_groups)
        _check(self.top_k <= reachable, "router.group_topk",
               f"router.group_topk={self.group_topk} groups of {num_experts // self.num_groups} experts hold "
               f"{reachable} < k={self.top_k} experts")
        return self


@dataclass
class AuxLossRouterConfig(GateRouterConfig):
    """Token-choice gate routers with a balance loss and optional capacity (switch_top1/2, seq_aux,
    global_aux): aux_loss_coef (alpha of the router's balance loss), z_loss_coef (ST-MoE router
    z-loss), capacity_factor (null = no token dropping; else each expert takes at most
    ceil(cf * N * k / E) assignments) and drop_policy, which assignments an over-full expert keeps:
        position  slot-major position order, GShard's (every token's first choice before any
                  token's second choice, in token order); the default, and the behaviour before the key.
        probs     the highest combine weights (Megatron-Core's moe_token_drop_policy=probs)."""

    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    capacity_factor: float | None = None
    drop_policy: DropPolicy = DropPolicy.position

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.aux_loss_coef >= 0.0, "router.aux_loss_coef", f"must be >= 0, got {self.aux_loss_coef}")
        _check(self.z_loss_coef >= 0.0, "router.z_loss_coef", f"must be >= 0, got {self.z_loss_coef}")
        if self.capacity_factor is not None:
            _check(self.capacity_factor > 0.0, "router.capacity_factor", f"must be > 0 (or null for no dropping), got {self.capacity_factor}")
        self.drop_policy = _choice(DropPolicy, self.drop_policy, "router.drop_policy")


@dataclass
class SwitchRouterConfig(AuxLossRouterConfig):
    """switch_top1 / switch_top2: the balance loss E * sum_e f_e P_e with
    aux_loss_variant: which assignments f_e counts for top-2 (identical for top-1):
        first_choice  f_e = share of tokens whose *first* choice is e (default). The paper (5.3)
                      gives Switch top-2 "the same load balancing as Top-1", and Switch's f_e
                      (Fedus et al. 2021, eq. 5) counts each token's argmax; GShard (where top-2
                      gating comes from), fairscale and DeepSpeed count first choices too.
        all_slots     f_e = share of all N * k assignments that go to e (Megatron-Core).
    The subclasses fix k (`fixed_k`)."""

    aux_loss_variant: AuxLossVariant = AuxLossVariant.first_choice  # the default of models saved before the key
    fixed_k: ClassVar[int | None] = None
    router_name: ClassVar[str] = "switch"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.aux_loss_variant = _choice(AuxLossVariant, self.aux_loss_variant, "router.aux_loss_variant")

    def check_for(self, num_experts: int) -> SwitchRouterConfig:
        if self.fixed_k is not None:
            s = "" if self.fixed_k == 1 else "s"
            _check(self.top_k == self.fixed_k, "router.top_k",
                   f"{self.router_name} routes to exactly {self.fixed_k} expert{s}, got {self.top_k}")
        super().check_for(num_experts)
        return self


@dataclass
class SwitchTop1RouterConfig(SwitchRouterConfig):
    """switch_top1: k = 1."""

    fixed_k: ClassVar[int | None] = 1
    router_name: ClassVar[str] = "switch_top1"


@dataclass
class SwitchTop2RouterConfig(SwitchRouterConfig):
    """switch_top2: k = 2."""

    fixed_k: ClassVar[int | None] = 2
    router_name: ClassVar[str] = "switch_top2"


@dataclass
class AuxFreeRouterConfig(GateRouterConfig):
    """aux_free (routing/aux_free.py): the gate's knobs plus bias_update_rate (u, DeepSeek-V3's
    bias update speed gamma = 1e-3): each optimizer step moves every expert's selection bias by
    u * sign(mean load - load). conf/router/aux_free.yaml sets score_function: sigmoid (DeepSeek-V3)."""

    bias_update_rate: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.bias_update_rate >= 0.0, "router.bias_update_rate", f"must be >= 0, got {self.bias_update_rate}")


@dataclass
class SinkhornBaseRouterConfig(LinearGateConfig):
    """sinkhorn_base (routing/sinkhorn_base.py): the linear gate's knobs plus sinkhorn_iterations,
    the column + row sweeps of the training-time balanced assignment."""

    sinkhorn_iterations: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.sinkhorn_iterations >= 1, "router.sinkhorn_iterations", f"must be >= 1, got {self.sinkhorn_iterations}")


@dataclass
class ExpertChoiceRouterConfig(LinearGateConfig):
    """expert_choice: the linear gate's knobs plus
    ec_capacity_factor: cf; null = top_k, i.e. compute-matched with token-choice top-k: each expert
        takes ceil(N * cf / E) tokens, so cf expert applications per token, the EC paper's c = k.
    ec_inference: how an eval-mode forward routes. batch = a teacher-forced forward of the trainer /
        monitor routes as in training, over the whole batch; generation and other calls use the
        causal token-choice top-k fallback. causal = every eval-mode forward uses the fallback."""

    ec_capacity_factor: float | None = None
    ec_inference: ECInference = ECInference.batch  # the default of models saved before the key

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ec_capacity_factor is not None:
            _check(self.ec_capacity_factor > 0.0, "router.ec_capacity_factor", f"must be > 0 (or null for top_k), got {self.ec_capacity_factor}")
        self.ec_inference = _choice(ECInference, self.ec_inference, "router.ec_inference")

    @property
    def capacity_factor(self) -> float:
        """cf: ec_capacity_factor, or top_k when it is null (compute-matched)."""
        return float(self.ec_capacity_factor if self.ec_capacity_factor is not None else self.top_k)


@dataclass
class HashRouterConfig(_RouterGroup):
    """hash: router.top_k and router.hash_per_layer (true = each layer hashes with its own
    constants, salted by its layer index, as Roller et al. draw one random hash per layer;
    conf/router/hash.yaml sets it. The default false keeps models saved before the key rebuilding
    the unsalted hash they trained with)."""

    top_k: int = 2
    hash_per_layer: bool = False

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, "router.top_k", f"must be >= 1, got {self.top_k}")


@dataclass
class SpectraRouterConfig(_RouterGroup):
    """spectra: its `router.*` knobs and the `osr` and `quota` groups. recurrence, gru_hidden_size,
    router_dim (D), use_expression, newton_schulz_steps, ortho_loss, srip_enabled, so_warmup_steps,
    so_lambda_max: METHOD.md §2-3; gram_ema_decay: running expert directions for the
    inference-time (causal) cost. state_cell: the recurrence's cell, `gru` (the paper's GRU, the
    default) or `mingru` (the minimal GRU of Feng et al. 2024, gates from the input only, so the
    token recurrence is a parallel linear scan: cheaper at small H; not the paper's method;
    routing/min_gru.py). gru_hidden_size is the state size Dh for either cell."""

    top_k: int = 2
    entropy_coef: float = 0.0
    recurrence: Recurrence = Recurrence.token_and_depth
    state_cell: StateCell = StateCell.gru  # the default of models saved before the key
    gru_hidden_size: int = 128
    router_dim: int = 32
    use_expression: bool = True
    newton_schulz_steps: int = 0
    ortho_loss: bool = True
    srip_enabled: bool = True
    so_warmup_steps: int = 100
    so_lambda_max: float = 1e-2
    gram_ema_decay: float = 0.99  # the default of models saved before the key
    # Learning the balanced plan into the inference-time scores (issue: balance carried into
    # inference; METHOD-style docs in routing/spectra.py). Both off by default = the paper's method.
    # balance_distill_coef: weight of a term pulling the per-token distribution softmax(-C/eps)
    # toward the training plan (target plan = the Sinkhorn plan's rows, selected = uniform over
    # the quota-selected experts); balance_bias_rate: update rate u of a per-expert bias added to
    # -C (selection only), moved once per optimizer step against the quota's overflow.
    balance_distill_coef: float = 0.0
    balance_distill_target: DistillTarget = DistillTarget.plan
    balance_bias_rate: float = 0.0
    osr: OSRConfig = field(default_factory=OSRConfig)
    quota: QuotaConfig = field(default_factory=QuotaConfig)

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, "router.top_k", f"must be >= 1, got {self.top_k}")
        self.recurrence = _choice(Recurrence, self.recurrence, "router.recurrence")
        self.state_cell = _choice(StateCell, self.state_cell, "router.state_cell")
        _check(self.gru_hidden_size >= 1, "router.gru_hidden_size", f"must be >= 1, got {self.gru_hidden_size}")
        _check(self.router_dim >= 1, "router.router_dim", f"must be >= 1, got {self.router_dim}")
        _check(self.newton_schulz_steps >= 0, "router.newton_schulz_steps", f"must be >= 0, got {self.newton_schulz_steps}")
        _check(self.so_warmup_steps >= 0, "router.so_warmup_steps", f"must be >= 0, got {self.so_warmup_steps}")
        _check(self.so_lambda_max >= 0.0, "router.so_lambda_max", f"must be >= 0, got {self.so_lambda_max}")
        _check(0.0 <= self.gram_ema_decay < 1.0, "router.gram_ema_decay", f"must be in [0, 1), got {self.gram_ema_decay}")
        _check(self.balance_distill_coef >= 0.0, "router.balance_distill_coef", f"must be >= 0, got {self.balance_distill_coef}")
        self.balance_distill_target = _choice(DistillTarget, self.balance_distill_target, "router.balance_distill_target")
        _check(self.balance_bias_rate >= 0.0, "router.balance_bias_rate", f"must be >= 0, got {self.balance_bias_rate}")

    def check_for(self, num_experts: int) -> SpectraRouterConfig:
        # w = Q_sel / Σ Q_sel over the k selected experts is identically 1 when k = 1, so the LM
        # loss would send the router no gradient at all (it would learn from aux losses only).
        _check(self.top_k >= 2, "router.top_k",
               f"router=spectra needs k >= 2 (set moe.top_k, which router.top_k reads): with k={self.top_k} "
               "the renormalised weight is always 1 and the router gets no gradient from the LM loss")
        super().check_for(num_experts)
        return self

    @classmethod
    def from_run_config(cls, cfg):
        """The group from a run config's `router`, `osr` and `quota` groups."""
        osr, quota = OSRConfig.of(cfg.osr), QuotaConfig.of(cfg.quota)
        return cls.from_router_keys(cfg.router, osr=osr, quota=quota)


# router.name -> the typed group its router receives (`Router.config_class` must be this class;
# spectra.routing checks it when it registers the routers). `dense` has no router.
ROUTER_GROUPS: dict[str, type[_RouterGroup]] = {
    "topk": GateRouterConfig,
    "spectra": SpectraRouterConfig,
    "switch_top1": SwitchTop1RouterConfig,
    "switch_top2": SwitchTop2RouterConfig,
    "expert_choice": ExpertChoiceRouterConfig,
    "hash": HashRouterConfig,
    "aux_free": AuxFreeRouterConfig,
    "seq_aux": AuxLossRouterConfig,
    "global_aux": AuxLossRouterConfig,
    "sinkhorn_base": SinkhornBaseRouterConfig,
}
# Every group, in the order their keys appear in RouterConfig.
_GROUPS = (GateRouterConfig, AuxLossRouterConfig, SwitchRouterConfig, AuxFreeRouterConfig, SinkhornBaseRouterConfig,
           ExpertChoiceRouterConfig, HashRouterConfig, SpectraRouterConfig)


def router_group(cfg) -> _RouterGroup:
    """The typed group of the router `cfg.router.name` names, built from run config `cfg`."""
    return ROUTER_GROUPS[cfg.router.name].from_run_config(cfg)


_WHOLE_GROUPS = ("osr", "quota")  # SpectraRouterConfig fields that are their own top-level groups


def _router_keys() -> list[tuple[str, Any, Any]]:
    """(key, type, dataclasses.field) of every `router.*` key: `name`, then the union of the
    groups' fields, each stated once. Two groups sharing a key must agree on its type and default
    (checked here, at import)."""
    keys: dict[str, tuple[Any, Any]] = {}
    for group in _GROUPS:
        hints = typing.get_type_hints(group)
        for f in dataclasses.fields(group):
            if f.name in _WHOLE_GROUPS:
                continue
            if f.name in keys:
                t, default = keys[f.name]
                if (t, default) != (hints[f.name], f.default):
                    raise TypeError(f"router.{f.name}: {group.__name__} states type/default "
                                    f"{hints[f.name]}/{f.default!r}, another group {t}/{default!r}")
                continue
            keys[f.name] = (hints[f.name], f.default)
    out: list[tuple[str, Any, Any]] = [("name", str, field(default="topk"))]
    out += [(name, t, field(default=default)) for name, (t, default) in keys.items()]
    return out


def _router_config_post_init(self) -> None:
    _check(self.name in ROUTER_NAMES, "router.name", f"unknown router {self.name!r}; choose one of {list(ROUTER_NAMES)}")
    # Every knob is checked by the typed group of the router family that reads it, whichever
    # router is chosen, so a wrong value fails at composition, naming its key.
    for group in _GROUPS:
        built = group.from_router_keys(self)
        for f in dataclasses.fields(group):  # choices given as strings become the groups' Enum members
            if isinstance(getattr(built, f.name), StrEnum):
                setattr(self, f.name, getattr(built, f.name))


RouterConfig = dataclasses.make_dataclass(
    "RouterConfig",
    _router_keys(),
    namespace={"__post_init__": _router_config_post_init, "__module__": __name__},
)
RouterConfig.__doc__ = """Router choice and its knobs: the flat `router.*` keys of the user's API.

Generated from the typed groups (ROUTER_GROUPS: GateRouterConfig, AuxLossRouterConfig,
SwitchRouterConfig, AuxFreeRouterConfig, SinkhornBaseRouterConfig, ExpertChoiceRouterConfig,
HashRouterConfig, SpectraRouterConfig): `name` plus the union of their fields, so each key, its
type and default are stated once, in the group that reads it (see those groups for what each
key means). A router never sees this object: `build_router` gives each router its own group built
from these keys, and those groups hold every check; knobs a router does not use are still
checked here, at composition (`__post_init__` builds every group).
"""


@dataclass
class DataConfig:
    """Training data: the bundled multi-domain corpus or smoltalk from the hub (real hosts)."""

    name: str = "bundled"  # bundled | smoltalk
    path: str | None = None  # bundled corpus file; null = the copy shipped in the package
    hub_dataset: str = "HuggingFaceTB/smoltalk"
    hub_subset: str = "all"
    tokenizer: str = "bundled"  # 'bundled' = the locally trained BPE; else a hub id or path
    max_seq_length: int = 256
    max_train_samples: int | None = None
    max_eval_samples: int | None = 256
    packing: bool = True
    # A conversation longer than max_seq_length: false = its first max_seq_length tokens (the
    # rest is dropped); true = cut into max_seq_length pieces, each a document of its own, so
    # every length trains and evaluates on the same tokens (Sweep E compares lengths this way).
    split_long_documents: bool = False
    assistant_only_loss: bool = True
    num_proc: int = 1

    def __post_init__(self) -> None:
        _check(self.name in ("bundled", "smoltalk"), "data.name", f"unknown dataset {self.name!r}; choose bundled or smoltalk")
        _check(self.max_seq_length >= 8, "data.max_seq_length", f"must be >= 8, got {self.max_seq_length}")
        for key in ("max_train_samples", "max_eval_samples"):
            v = getattr(self, key)
            _check(v is None or v >= 1, f"data.{key}", f"must be >= 1 or null, got {v}")
        _check(self.num_proc >= 1, "data.num_proc", f"must be >= 1, got {self.num_proc}")
        _check(bool(self.tokenizer), "data.tokenizer", "must be 'bundled', a hub id or a path")


@dataclass
class TrainerConfig:
    """Optimisation and bookkeeping (maps onto transformers.TrainingArguments).

    The defaults are stated here only: conf/trainer/default.yaml lists no key that equals them.
    """

    max_steps: int = 200
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    # Paper defaults for a pretrained base model: router 5e-5, experts 1e-5, everything else 1e-5.
    router_lr: float = 5e-5
    expert_lr: float = 1e-5
    base_lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    eval_steps: int = 50
    logging_steps: int = 10
    save_steps: int = 100
    save_total_limit: int = 2
    bf16: bool = False
    gradient_checkpointing: bool = False
    neftune_noise_alpha: float | None = None
    nproc_per_node: int = 1
    dataloader_num_workers: int = 0
    resume: str = "auto"  # auto | never | <checkpoint path>
    report_every_step_metrics: bool = True
    max_bad_steps: int = 0  # non-finite steps skipped before training stops (0 = stop at the first)
    deterministic: bool = False  # deterministic kernels (exact resume on CPU holds without it too)
    # Extra transformers TrainerCallbacks, added after the project's own: an import path
    # "pkg.module.Class" (constructed without arguments) or {_target_: pkg.module.Class, <kwarg>: value}.
    callbacks: list[Any] = field(default_factory=list)
    # Downstream evaluation after training (python -m spectra.eval on the saved model, in a
    # subprocess, rank 0): lm-eval task names or sets (bundled = the offline tasks from the bundled
    # corpus, paper = MMLU/ARC/HellaSwag/GSM8K); empty = off. Writes <run dir>/eval_harness.json.
    eval_harness: list[str] = field(default_factory=list)
    eval_harness_limit: int | None = None  # documents per task (null = all)

    def __post_init__(self) -> None:
        for key in ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "eval_steps", "logging_steps", "save_steps", "nproc_per_node"):
            _check(getattr(self, key) >= 1, f"trainer.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in ("router_lr", "expert_lr", "base_lr"):
            _check(getattr(self, key) >= 0.0, f"trainer.{key}", f"must be >= 0, got {getattr(self, key)}")
        _check(0.0 <= self.warmup_ratio < 1.0, "trainer.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _check(self.max_grad_norm > 0.0, "trainer.max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        _check(self.save_total_limit >= 1, "trainer.save_total_limit", f"must be >= 1, got {self.save_total_limit}")
        if self.neftune_noise_alpha is not None:
            _check(self.neftune_noise_alpha > 0, "trainer.neftune_noise_alpha", f"must be > 0 or null, got {self.neftune_noise_alpha}")
        _check(self.lr_scheduler in LR_SCHEDULERS, "trainer.lr_scheduler", f"unknown {self.lr_scheduler!r}; choose one of {list(LR_SCHEDULERS)}")
        _check(self.weight_decay >= 0.0, "trainer.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.dataloader_num_workers >= 0, "trainer.dataloader_num_workers", f"must be >= 0, got {self.dataloader_num_workers}")
        _check(self.max_bad_steps >= 0, "trainer.max_bad_steps", f"must be >= 0, got {self.max_bad_steps}")
        _check(bool(self.resume), "trainer.resume", "must be auto, never or a checkpoint path")
        for i, task in enumerate(self.eval_harness):
            _check(isinstance(task, str) and bool(task.strip()) and "," not in task, f"trainer.eval_harness[{i}]",
                   f"needs one lm-eval task name or set (bundled, paper, ...), got {task!r}")
        if self.eval_harness_limit is not None:
            _check(self.eval_harness_limit >= 1, "trainer.eval_harness_limit", f"must be >= 1 or null, got {self.eval_harness_limit}")
        for i, cb in enumerate(self.callbacks):
            target = cb.get("_target_") if isinstance(cb, dict) else cb
            _check(isinstance(target, str) and "." in target and all(target.split(".")), f"trainer.callbacks[{i}]",
                   f"needs an import path 'pkg.module.Class' or {{_target_: pkg.module.Class, ...}}, got {cb!r}")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO stage (0 = DeepSpeed off) and its knobs; turned into a DS config dict."""

    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False

    def __post_init__(self) -> None:
        _check(self.stage in (0, 1, 2, 3), "deepspeed.stage", f"must be 0, 1, 2 or 3, got {self.stage}")
        if self.offload_param:
            _check(self.stage == 3, "deepspeed.offload_param", "parameter offload needs deepspeed.stage=3")


@dataclass
class LoggerConfig:
    """metrics.jsonl is always written; wandb and TensorBoard are optional."""

    wandb: bool = False
    wandb_project: str = "spectra"
    tensorboard: bool = False


@dataclass
class MonitorConfig:
    """Routing monitor (metrics/monitor.py): every metric per MoE layer on a fixed held-out slice
    at each eval, router vs expert time (paper Table 9), and routing snapshots for stability
    across checkpoints (paper Table 12) at `snapshot_fractions` of trainer.max_steps."""

    enabled: bool = True
    num_sequences: int = 16  # the slice: the first rows of the eval split (same data config => same tokens)
    snapshot_fractions: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 1.0])
    timing: bool = True  # router/expert wall time per layer on the slice forward

    def __post_init__(self) -> None:
        _check(self.num_sequences >= 1, "monitor.num_sequences", f"must be >= 1, got {self.num_sequences}")
        for f in self.snapshot_fractions:
            _check(0.0 < f <= 1.0, "monitor.snapshot_fractions", f"every fraction must be in (0, 1], got {f}")


@dataclass
class SpectraConfig:
    """The whole run. `objective` names the metric `train.py` returns (for Optuna)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    osr: OSRConfig = field(default_factory=OSRConfig)
    quota: QuotaConfig = field(default_factory=QuotaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    seed: int = 0
    output_dir: str = "outputs/run"
    objectives: list[str] = field(default_factory=lambda: ["eval_loss"])
    tags: list[str] = field(default_factory=list)
    # Sweeps (sweeps/*.yaml): the name and scale key the deterministic sweep directory
    # outputs/sweeps/<sweep_name>/<scale_name>/<overrides>; `seeds` feeds the grid's seed axis.
    sweep_name: str = "adhoc"
    scale_name: str = "custom"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    sweep_values: dict[str, Any] = field(default_factory=dict)  # scale-dependent sweep axes
    # A cell whose summary.json is complete for the same resolved config is not re-run: its
    # recorded objective is returned (how an interrupted sweep resumes). false = always train.
    skip_complete: bool = True

    def __post_init__(self) -> None:
        r, m = self.router, self.moe
        if r.name != NO_ROUTER:
            _check(m.num_experts >= 2, "moe.num_experts", f"an MoE router needs >= 2 experts, got {m.num_experts}")
            router_group(self).check_for(m.num_experts)  # k and the router's other E-dependent checks
        if self.trainer.bf16 and self.deepspeed.stage > 0:
            pass  # DeepSpeed bf16 is configured from trainer.bf16 (see train/deepspeed.py)
        _check(len(self.objectives) >= 1, "objectives", "needs at least one metric name")
        for name in self.objectives:  # objectives are read from the final evaluation's metrics
            _check(str(name).startswith(("eval_", "eval/", "monitor/")), "objectives",
                   f"{name!r} is not an evaluation metric (e.g. eval_loss, eval/cv_mean, monitor/gram_orthogonality_mean)")
        _check(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed}")
        if self.trainer.max_bad_steps > 0:
            _check(self.deepspeed.stage == 0, "trainer.max_bad_steps",
                   f"skipping non-finite steps needs deepspeed.stage=0 (DeepSpeed steps inside backward), got stage {self.deepspeed.stage}")
        _check(len(self.seeds) >= 1, "seeds", "needs at least one seed")


def _csv(values) -> str:
    """OmegaConf resolver `${csv:${seeds}}` -> "0,1,2": a list as a Hydra sweep value."""
    return ",".join(str(v) for v in values)


# The config groups that pick the sweep and its scale: the directories above a cell name them
# (outputs/sweeps/<sweep>/<scale>/<cell>), so cell names leave them out.
SWEEP_GROUP_SELECTORS = ("sweep", "scale")


def names_cell(override_key: str) -> bool:
    """Whether a command-line override belongs in a sweep cell's directory name: not a volatile
    key (contracts.rundir: changes nothing a run computes, the one list the config fingerprint and
    analysis' variant labels use too) and not the sweep/scale group selection."""
    key = override_key.lstrip("+~")
    return not is_volatile_override(key) and key not in SWEEP_GROUP_SELECTORS


def _swept_keys_of(sweep_dir) -> set[str]:
    """Keys swept on the command line (`k=a,b`, `k=range(...)`), read from the multirun.yaml
    that Hydra's sweeper writes into the sweep directory before launching any cell."""
    if not sweep_dir:
        return set()
    f = Path(str(sweep_dir)) / "multirun.yaml"
    if not f.exists():
        return set()
    try:
        task = ((yaml.safe_load(f.read_text()) or {}).get("hydra") or {}).get("overrides", {}).get("task") or []
    except Exception:
        return set()
    keys = set()
    for o in task:
        key, _, value = str(o).partition("=")
        if ("," in value and not value.strip().startswith(("[", "{"))) or value.startswith(("range(", "choice(", "glob(")):
            keys.add(key.lstrip("+~"))
    return keys


def cell_dirname(task_overrides, sweep_params=None, sweep_dir=None, max_len: int = 120) -> str:
    """Resolver `${cell_dirname:${hydra.overrides.task},${hydra.sweeper.params},${hydra.sweep.dir}}`:
    a sweep cell's directory name from its overrides — deterministic, so a re-run finds the same
    cell.

    The swept keys (hydra.sweeper.params, `k=a,b` on the command line) and seed come first;
    when the whole `k=v,...` string is longer than `max_len`, the tail is replaced by a hash of
    the full string (unique, and within filesystem limits).
    """
    axes = set((sweep_params or {}).keys()) | {"seed"} | _swept_keys_of(sweep_dir)
    items = []
    for o in task_overrides or []:
        key = str(o).split("=", 1)[0].lstrip("+~")
        if names_cell(key):
            items.append((key not in axes, str(o).lstrip("+~").replace("/", "_")))
    items.sort()
    full = ",".join(text for _, text in items) or "defaults"
    if len(full) <= max_len:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:10]
    head = ""
    for _, text in items:
        if len(head) + len(text) + 1 > max_len - 12:
            break
        head = f"{head},{text}" if head else text
    return f"{head}-{digest}"


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (conf/config.yaml uses `spectra_schema`)
    and the `csv` resolver used by sweep grids."""
    if not OmegaConf.has_resolver("csv"):
        OmegaConf.register_resolver("csv", _csv, annotation_validation="off")
    if not OmegaConf.has_resolver("cell_dirname"):
        OmegaConf.register_resolver("cell_dirname", cell_dirname, annotation_validation="off")

    cs = ConfigStore.instance()
    cs.store(name="spectra_schema", node=SpectraConfig, replace=True)


def config_dir() -> Path:
    """The repository's `conf/` directory (found from this file: src/spectra/config.py)."""
    return Path(__file__).resolve().parents[2] / "conf"


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose `conf/<config_name>.yaml` with Hydra overrides, outside a Hydra app (tests,
    notebooks). The result is validated like `train.py`'s config."""
    register_configs()
    overrides = list(overrides or [])
    with initialize_config_dir(config_dir=str(config_dir())):
        cfg = compose(config_name=config_name, overrides=overrides)
    if not any(o.split("=")[0].lstrip("+") == "output_dir" for o in overrides):
        cfg.output_dir = "outputs/runs/composed"  # ${hydra:runtime.output_dir} needs a Hydra app
    return cfg


# Free-form dict fields whose keys are not ours to check (a transformers config).
_FREE_FORM = {"model.arch", "sweep_values"}


def _reject_unknown_keys(cfg: DictConfig) -> None:
    """Hydra's `+key=value` can add keys to a structured config; refuse any the schema lacks."""
    def walk(node, schema_cls, prefix):
        fields = {f.name: f for f in dataclasses.fields(schema_cls)}
        for key in node.keys():
            full = f"{prefix}{key}"
            if key not in fields:
                raise ConfigError(f"{full}: unknown config key (valid keys under '{prefix.rstrip('.') or 'the root'}': {sorted(fields)})")
            sub = node.get(key) if not OmegaConf.is_missing(node, key) else None
            ftype = fields[key].type
            sub_cls = globals().get(ftype) if isinstance(ftype, str) else ftype
            if full not in _FREE_FORM and isinstance(sub, DictConfig) and dataclasses.is_dataclass(sub_cls):
                walk(sub, sub_cls, full + ".")

    walk(cfg, SpectraConfig, "")


def validate(cfg: DictConfig | SpectraConfig) -> SpectraConfig:
    """Check every key and cross-field rule; returns the typed config or raises ConfigError.

    Runs before any model or data is loaded. OmegaConf type errors (e.g. a string where an
    int is expected) are re-raised as ConfigError with the full key.
    """
    if isinstance(cfg, SpectraConfig):
        return cfg
    _reject_unknown_keys(cfg)
    try:
        base = OmegaConf.structured(SpectraConfig)
        merged = OmegaConf.merge(base, cfg)
        obj = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:  # unknown key, wrong type, missing value
        key = getattr(e, "full_key", None) or ""
        raise ConfigError(f"{key}: {e.msg if hasattr(e, 'msg') else e}".strip()) from None
    assert isinstance(obj, SpectraConfig)
    if obj.model.source == "config":
        _check("model_type" in obj.model.arch, "model.arch.model_type", "model.source=config needs arch.model_type (e.g. llama)")
    return obj
