"""MoE layers and inputs for the benchmarks, built from the project's real config and modules.

A benchmarked layer is one `MoEBlock` (router + grouped_mm experts, no shared expert: a shared
expert costs the same under every router, so leaving it out makes the ratios stricter) in
training mode. One "step" is forward + backward of `(y · g).sum() + Σ aux losses`, as the
Trainer's loss would run it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.harness import Env
from spectra.config import SpectraConfig, SwitchRouterConfig, load_config, validate
from spectra.moe.block import MoEBlock
from spectra.moe.context import RoutingContext
from spectra.moe.experts import ExpertsImplConfig, GatedExperts
from spectra.routing import build_router
from spectra.routing.base import Router
from spectra.routing.switch import SwitchRouter


@dataclass(frozen=True)
class Shape:
    """Sizes of one MoE layer's forward: B rows of S tokens (N = B·S), hidden H, expert FFN I."""

    B: int
    S: int
    H: int
    I: int
    E: int
    k: int
    D: int = 32  # router_dim
    Dh: int = 128  # GRU hidden size

    @property
    def N(self) -> int:
        return self.B * self.S

    def describe(self) -> str:
        return (f"N = {self.N} tokens (B={self.B} × S={self.S}), H={self.H}, I={self.I}, E={self.E}, "
                f"k={self.k}, D={self.D}, Dh={self.Dh}")


# The paper's layer (SmolLM2-135M upcycled: H=576, I=1536, E=32, k=4, D=32) at 4 × 2k tokens.
PAPER = Shape(B=4, S=2048, H=576, I=1536, E=32, k=4)
# The same layer with 8× shorter rows, for CPU runs: N = 1024. The paper's 4 rows are kept because
# the GRU's time per token depends on the rows it advances per step (B), not on S.
PAPER_CPU = dataclasses.replace(PAPER, S=256)
QUICK = Shape(B=2, S=64, H=64, I=128, E=8, k=2, D=8, Dh=32)
# The demo's layer (model=tiny, experiment=demo): where `make demo`'s tokens/s are measured.
DEMO = Shape(B=8, S=128, H=128, I=256, E=8, k=2)


def config(router: str, shape: Shape, **router_overrides) -> SpectraConfig:
    """The shipped defaults for `router` (its conf/router/*.yaml), resized to `shape`."""
    cfg = validate(load_config([f"router={router}", f"moe.num_experts={shape.E}", f"moe.top_k={shape.k}"]))
    rc = dataclasses.replace(cfg.router, **{"router_dim": shape.D, "gru_hidden_size": shape.Dh, **router_overrides})
    return dataclasses.replace(cfg, router=rc)


def make_router(name: str, shape: Shape, **router_overrides) -> Router:
    """'spectra', 'topk' or 'switch' (Switch at k = shape.k) for `shape`, fp32 parameters.

    Each router gets its own typed group, as in training (`build_router`). 'switch' is Switch's
    balancing loss with softmax top-k and renormalised weights at SPECTRA's k: the registered
    switch_top1/2 groups fix k = 1 or 2, so the unregistered `SwitchRouter` is built from the
    `SwitchRouterConfig` group, which fixes no k.
    """
    if name == "switch":
        # conf/router/switch_top2.yaml's knobs (balancing loss 0.01, no z-loss, no dropping) at any k,
        # composed on router=topk because the config schema pins switch_top2 to k = 2.
        cfg = config("topk", shape, aux_loss_coef=0.01, z_loss_coef=0.0, capacity_factor=None, **router_overrides)
        return SwitchRouter(SwitchRouterConfig.from_run_config(cfg), hidden_size=shape.H, num_experts=shape.E)
    return build_router(config(name, shape, **router_overrides), hidden_size=shape.H, num_experts=shape.E)


def make_experts(shape: Shape, impl: str = "grouped_mm") -> GatedExperts:
    """E SwiGLU experts [E, 2I, H] / [E, H, I], initialised like a small pretrained MLP."""
    experts = GatedExperts(ExpertsImplConfig(impl), shape.E, shape.H, shape.I, torch.nn.SiLU())
    torch.nn.init.normal_(experts.gate_up_proj, std=shape.H**-0.5)
    torch.nn.init.normal_(experts.down_proj, std=shape.I**-0.5)
    return experts


def make_block(router: str, shape: Shape, env: Env, impl: str = "grouped_mm", **router_overrides) -> MoEBlock:
    """A training-mode MoE block (router + experts, no shared expert), env.dtype on env.device."""
    ctx = RoutingContext(moe_layers=[0])
    ctx.recording = True  # keep the RoutingOutput so the step can add the aux losses
    block = MoEBlock(make_router(router, shape, **router_overrides), make_experts(shape, impl), None, 0.0, 0, ctx)
    return block.to(env.device, env.dtype).train()


def hidden(shape: Shape, env: Env) -> torch.Tensor:
    """[B, S, H] hidden states entering the layer (requires grad, as inside a model)."""
    return env.tensor(shape.B, shape.S, shape.H).requires_grad_()


def layer_step(block: MoEBlock, x: torch.Tensor, env: Env) -> Callable[[], None]:
    """A closure running one forward + backward of `block` on x (aux losses included)."""
    g = torch.randn_like(x, dtype=torch.float32)
    params = [p for p in block.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        y = block(x)  # [B, S, H]
        loss = (y.float() * g).sum()
        aux = block.context.aux_loss()
        if aux is not None:
            loss = loss + aux
        loss.backward()

    return step
