"""Guards: bad input is refused before anything loads; non-finite numbers stop training.

`preflight(cfg)` — the checks that need the machine or files, run by `run()` after `validate`
(pure config rules, config.py) and before the tokenizer, data or weights are loaded: data and
tokenizer paths exist, the model's config loads (only its config.json: no weights), the model
type is known, `data.max_seq_length` fits the model's positions, DeepSpeed/bf16 vs the
hardware, flash-attention availability, an explicit `trainer.resume` checkpoint is complete,
every `trainer.callbacks` entry imports and takes its arguments.
Each failure is a `ConfigError` or `FileNotFoundError` whose one-line message names the key;
`train.py` prints it as `error: <message>` and exits with code 2.

`NumericsGuardMixin` (mixed into MoETrainer) — every training micro-batch records its CE loss
and each router aux-loss term per layer (`layer2/ortho`, `layer0/aux`, ...); before the
optimizer step the recorded terms and every parameter's gradient norm are checked for
finiteness in one device→host sync (a flag all-reduced across ranks, so all ranks agree). A
non-finite step either

- raises `NonFiniteError` naming the step, the non-finite terms (CE vs router terms listed
  separately) and the parameters whose gradients went non-finite; nothing is saved after it, so
  the last good checkpoint stays intact and `run()` records status "failed" in summary.json; or
- with `trainer.max_bad_steps: n > 0`, is skipped (all gradients dropped, so AdamW leaves
  weights and moments untouched; floating-point buffers the forward updated, such as SPECTRA's
  Gram EMA, are restored; the LR schedule and the SRIP step still advance) up to n times per run.

With DeepSpeed the engine steps inside backward, so a non-finite gradient norm is only seen
after that step: training stops (the last checkpoint is intact), skipping is refused
(`trainer.max_bad_steps > 0` needs `deepspeed.stage=0`), and parameter names are unavailable.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from huggingface_hub.constants import HF_HUB_CACHE
from omegaconf import OmegaConf
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from spectra.config import ConfigError, SpectraConfig
from spectra.routing.base import Router
from spectra.train.callbacks import callback_class
from spectra.train.checkpoint import find_resumable_checkpoint, verify_checkpoint

log = logging.getLogger("spectra")

_MAX_NAMES = 5


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss term or gradient; the message names step and terms."""


# ----------------------------------------------------------------------------- preflight


def _one_line(e: BaseException) -> str:
    """An exception's message (and its cause's) on one line."""
    text = " ".join(str(e).split())
    if e.__cause__ is not None and str(e.__cause__) not in str(e):
        text += f" ({' '.join(str(e.__cause__).split())})"
    return text


def _looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(name))


def _model_config(cfg: SpectraConfig):
    """The transformers config of the base model (config.json only; no weights are read)."""
    m = cfg.model
    if m.source == "config":
        arch = dict(OmegaConf.to_container(OmegaConf.create(dict(m.arch)), resolve=True))
        model_type = arch.pop("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ConfigError(f"model.arch.model_type: unknown model type {model_type!r} (not a transformers architecture)")
        try:
            return AutoConfig.for_model(model_type, **arch)
        except Exception as e:  # TypeError, ValueError, huggingface_hub's strict-dataclass errors
            raise ConfigError(f"model.arch: invalid {model_type} config: {_one_line(e)}") from None
    path = m.pretrained
    if _looks_like_local_path(path) and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"model.pretrained: no such file or directory: {path}")
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as e:
        if hub_offline() and not _looks_like_local_path(path):
            raise FileNotFoundError(offline_message("model.pretrained", path)) from None
        raise FileNotFoundError(f"model.pretrained={path!r} could not be loaded: {str(e).splitlines()[0]}") from None
    except Exception as e:  # an unknown model_type, a malformed config.json
        raise ConfigError(f"model.pretrained={path!r}: unsupported model config: {_one_line(e)}") from None


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids downloads (the Makefile sets it, except for SCALE=paper)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline_message(key: str, name: str) -> str:
    """The error for a hub name that is not cached while downloads are off."""
    return (f"{key}={name!r} is not in the local Hugging Face cache ({HF_HUB_CACHE}) and "
            f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')} forbids downloading it: run with HF_HUB_OFFLINE=0 "
            f"(`make sweep-… SCALE=paper` does), or fetch it once with `hf download {name}`")


def max_positions(model_config) -> int | None:
    """The longest sequence the model's position embeddings cover (None if it does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(model_config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    text = getattr(model_config, "text_config", None)
    return max_positions(text) if text is not None and text is not model_config else None


def preflight(cfg: SpectraConfig) -> None:
    """Environment- and file-dependent checks, before any model or data is loaded (see module doc)."""
    d = cfg.data
    if d.name == "bundled" and d.path is not None and not Path(d.path).expanduser().is_file():
        raise FileNotFoundError(f"data.path: no such file: {d.path}")
    if d.tokenizer != "bundled" and _looks_like_local_path(d.tokenizer) and not Path(d.tokenizer).expanduser().exists():
        raise FileNotFoundError(f"data.tokenizer: no such file or directory: {d.tokenizer}")

    mc = _model_config(cfg)
    limit = max_positions(mc)
    if limit is not None and d.max_seq_length > limit:
        key = "max_position_embeddings" if hasattr(mc, "max_position_embeddings") else "positions"
        raise ConfigError(f"data.max_seq_length: {d.max_seq_length} exceeds the model's {key}={limit}")

    if cfg.model.attn_implementation == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401  # optional dependency (the gpu extra): only checked when asked for
        except ImportError:
            raise ConfigError("model.attn_implementation: flash_attention_2 needs the flash-attn package (not installed)") from None
        if not torch.cuda.is_available():
            raise ConfigError("model.attn_implementation: flash_attention_2 needs a CUDA device")

    if cfg.deepspeed.stage > 0:
        try:
            import deepspeed  # noqa: F401  # optional at run time: a CPU install may lack it; only checked when stage > 0
        except ImportError:
            raise ConfigError(f"deepspeed.stage: {cfg.deepspeed.stage} needs the deepspeed package (not installed)") from None
        if cfg.trainer.bf16 and not torch.cuda.is_available():
            raise ConfigError("trainer.bf16: DeepSpeed bf16 needs a CUDA device; on CPU set trainer.bf16=false "
                              f"(or deepspeed.stage=0), got deepspeed.stage={cfg.deepspeed.stage}")

    r = cfg.trainer.resume
    if r not in ("auto", "never"):
        p = Path(r).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"trainer.resume: no such checkpoint directory: {r}")
        problem = verify_checkpoint(p)
        if problem is not None:
            if (p / "COMPLETE").exists() or not (p / "trainer_state.json").exists():
                raise ConfigError(f"trainer.resume: {r} is not a complete checkpoint: {problem}")
            log.warning(f"trainer.resume: {r} has no completion marker (saved before atomic checkpoints); using it as given")

    if cfg.trainer.callbacks:
        for i, spec in enumerate(cfg.trainer.callbacks):
            callback_class(spec, f"trainer.callbacks[{i}]")  # imports, is a TrainerCallback, takes these arguments


def check_process_count(cfg: SpectraConfig, launcher=None, visible_gpus: int | None = None) -> None:
    """Refuse inconsistent process counts before anything starts, naming the keys.

    Ranks come either from `trainer.nproc_per_node` (spawned inside the job) or from the
    submitit launcher's tasks (`hydra.launcher.tasks_per_node` x `nodes`, one rank per task),
    never from both: with tasks, `nproc_per_node` would be ignored. On CUDA, the ranks on a node
    must not outnumber `hydra.launcher.gpus_per_node` nor the devices this process sees
    (`visible_gpus`, from CUDA_VISIBLE_DEVICES); on CPU any number of gloo ranks is allowed.
    `launcher`: the job's `hydra.launcher` node (None outside a launcher job)."""
    launcher = launcher or {}
    nproc = int(cfg.trainer.nproc_per_node)
    tasks = int(launcher.get("tasks_per_node") or 1)
    nodes = int(launcher.get("nodes") or 1)
    if tasks * nodes > 1 and nproc > 1:
        raise ConfigError(
            f"trainer.nproc_per_node={nproc} with hydra.launcher.tasks_per_node={tasks}, hydra.launcher.nodes={nodes}: "
            "the launcher's tasks are the ranks (one per task, nproc_per_node would be ignored); "
            f"set trainer.nproc_per_node=1, or hydra.launcher.tasks_per_node=1 and nodes=1 to spawn {nproc} ranks in the job")
    per_node = tasks if tasks * nodes > 1 else nproc
    where = "hydra.launcher.tasks_per_node" if tasks * nodes > 1 else "trainer.nproc_per_node"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or 0)  # set by torchrun for its ranks
    if tasks * nodes == 1 and local_world > per_node:
        per_node, where = local_world, "torchrun --nproc_per_node (LOCAL_WORLD_SIZE)"
    if visible_gpus is None:
        visible_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible_gpus == 0:
        return  # CPU: gloo ranks share the cores
    gpus = launcher.get("gpus_per_node")
    if gpus is not None and int(gpus) > 0 and per_node > int(gpus):
        raise ConfigError(f"{where}={per_node} ranks per node but hydra.launcher.gpus_per_node={gpus}: "
                          "one rank per GPU; lower the ranks or request more GPUs")
    # Every rank of a node must see the node's GPUs: the Trainer takes cuda:LOCAL_RANK (so a SLURM
    # task bound to a single GPU, e.g. by --gpus-per-task, is refused here rather than crashing later).
    if per_node > visible_gpus:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(f"{where}={per_node} ranks per node but this node shows {visible_gpus} CUDA device"
                          f"{'s' if visible_gpus != 1 else ''}"
                          + (f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else "")
                          + ": one rank per GPU")


def enable_determinism() -> None:
    """Deterministic kernels (`trainer.deterministic=true`): torch deterministic algorithms
    (warn-only where none exists), cuDNN deterministic, the cuBLAS workspace setting. Unlike
    transformers' `full_determinism` it does not force CUDA_LAUNCH_BLOCKING."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    os.environ.setdefault("FLASH_ATTENTION_DETERMINISTIC", "1")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


# ----------------------------------------------------------------------------- numerics


class NumericsGuard:
    """Records a step's loss terms; checks them and the gradients once per optimizer step."""

    def __init__(self, max_bad_steps: int = 0):
        self.max_bad_steps = int(max_bad_steps)
        self.bad_steps = 0  # steps skipped so far in this run (restored on resume)
        self._names: list[str] = []
        self._values: list[torch.Tensor] = []

    def term(self, name: str, value: torch.Tensor) -> None:
        """Record one scalar term of this micro-batch for the next `check`."""
        self._names.append(name)
        self._values.append(value.detach().float().reshape(()))

    def reset(self) -> None:
        self._names, self._values = [], []

    def check(self, step: int, named_grads: list[tuple[str, torch.Tensor]], device) -> str | None:
        """None if every recorded term and gradient is finite (on every rank), else a message."""
        terms = torch.stack(self._values).to(device) if self._values else torch.zeros(0, device=device)
        grad_norms = torch.stack(torch._foreach_norm([g for _, g in named_grads])).float().to(device) if named_grads else torch.zeros(0, device=device)
        local_bad = ~torch.cat([torch.isfinite(terms), torch.isfinite(grad_norms)]).all()
        flag = local_bad.to(torch.float32).reshape(1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            comm = flag.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(comm, op=dist.ReduceOp.MAX)
            flag = comm
        names, values = self._names, terms
        self.reset()
        if float(flag.item()) == 0.0:
            return None
        parts = []
        if bool(local_bad):
            vals = values.cpu().tolist()
            bad_terms = [(n, v) for n, v in zip(names, vals) if not math.isfinite(v)]
            ce = [f"CE loss={v}" for n, v in bad_terms if n == "ce"]
            router = sorted({f"{n}={v}" for n, v in bad_terms if n != "ce"})
            if ce:
                parts.append(", ".join(sorted(set(ce))))
            if router:
                parts.append("router loss terms " + ", ".join(router[:_MAX_NAMES]) + (f" (+{len(router) - _MAX_NAMES} more)" if len(router) > _MAX_NAMES else ""))
            norms = grad_norms.cpu().tolist()
            bad_grads = [n for (n, _), v in zip(named_grads, norms) if not math.isfinite(v)]
            if bad_grads:
                listed = ", ".join(bad_grads[:_MAX_NAMES]) + (f" (+{len(bad_grads) - _MAX_NAMES} more)" if len(bad_grads) > _MAX_NAMES else "")
                parts.append(f"non-finite gradients in {listed}")
        else:
            parts.append("another rank saw a non-finite loss term or gradient")
        return f"non-finite values at step {step}: " + "; ".join(parts)


def _strip_wrapper(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


class NumericsGuardMixin:
    """Mixed into MoETrainer (before `Trainer`); see the module docstring."""

    _numerics: NumericsGuard | None = None

    @property
    def numerics(self) -> NumericsGuard:
        if self._numerics is None:
            cfg = getattr(self, "spectra_cfg", None)
            self._numerics = NumericsGuard(getattr(getattr(cfg, "trainer", None), "max_bad_steps", 0) if cfg else 0)
        return self._numerics

    def _guard_step(self) -> int:
        return self.state.global_step + 1  # the optimizer step being computed, 1-based as logged

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Stock loss; while training, the CE term is recorded for the finiteness check."""
        if model.training and self.numerics.max_bad_steps > 0 and getattr(self, "_buffers_step", None) != self._guard_step():
            # buffers a forward updates (SPECTRA's Gram EMA) are restored if this step is skipped
            self._buffers_step = self._guard_step()
            self._buffers_before = {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()}
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not model.training:
            return out
        self.numerics.term("ce", out[0] if return_outputs else out)
        return out

    def guarded_aux_loss(self, ctx) -> torch.Tensor | None:
        """`ctx.aux_loss()` (same terms, same summation order), each term recorded as `layer{i}/{name}`."""
        total = None
        for layer, out in ctx.outputs.items():
            for name, v in out.aux_losses.items():
                self.numerics.term(f"layer{layer}/{name}", v)
                total = v if total is None else total + v
        return total

    def _clip_grad_norm(self, model):
        step = self._guard_step()
        guard = self.numerics
        if self.is_deepspeed_enabled:  # DeepSpeed stepped inside backward: check after the fact
            norm = super()._clip_grad_norm(model)
            problem = guard.check(step, [], self.args.device)
            if problem is None and norm is not None and not torch.isfinite(torch.as_tensor(norm)).all():
                problem = f"non-finite values at step {step}: gradient norm {float(norm)} (DeepSpeed: per-parameter names unavailable)"
            if problem is not None:
                self._stop_non_finite(problem)
            return norm
        grads = [(_strip_wrapper(n), p.grad) for n, p in model.named_parameters() if p.grad is not None]
        problem = guard.check(step, grads, self.args.device)
        if problem is None:
            return super()._clip_grad_norm(model)
        if guard.bad_steps >= guard.max_bad_steps:
            self._stop_non_finite(problem)
        guard.bad_steps += 1
        log.warning(f"{problem}; skipping this optimizer step ({guard.bad_steps} of trainer.max_bad_steps={guard.max_bad_steps})")
        for p in model.parameters():
            p.grad = None  # AdamW skips parameters without gradients: no update, no moment change
        for module in model.modules():
            if isinstance(module, Router):
                module.on_skipped_step()  # e.g. SPECTRA's running Gram ignores this step's batches
        saved = getattr(self, "_buffers_before", None) or {}
        with torch.no_grad():
            for n, buf in model.named_buffers():
                if n in saved:
                    buf.copy_(saved[n])
        return torch.tensor(float("nan"))

    def _stop_non_finite(self, problem: str):
        guard = self.numerics
        budget = f"trainer.max_bad_steps={guard.max_bad_steps} exhausted; " if guard.max_bad_steps else ""
        last = find_resumable_checkpoint(self._get_output_dir(None), warn=False) if self.args.should_save else None
        if self.args.should_save:
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
        else:
            where = "rank 0 names the last good checkpoint"
        raise NonFiniteError(f"{problem} ({budget}training stopped; {where})")

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self.numerics.bad_steps:
            logs["skipped_steps"] = self.numerics.bad_steps
        return super().log(logs, *args, **kwargs)
