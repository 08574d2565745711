"""Trainer callbacks: JSONL metrics, throughput, TensorBoard tags, router step schedules, the routing monitor;
and the `trainer.callbacks` entries named by import path in the config (`callback_class`,
`user_callbacks`; `preflight` checks them, `MoETrainer` adds them)."""

from __future__ import annotations

import importlib
import inspect
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.integrations.integration_utils import TensorBoardCallback, rewrite_logs
from transformers.trainer_callback import ProgressCallback

from spectra.config import ConfigError
from spectra.contracts.rundir import METRICS, append_jsonl
from spectra.metrics.monitor import RoutingMonitor
from spectra.moe.upcycle import routers


class JsonlMetricsCallback(TrainerCallback):
    """Append every `on_log` record (train and eval) to `<run_dir>/metrics.jsonl` (rank 0 only)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        append_jsonl(self.path, {"step": state.global_step, **logs})


class ThroughputCallback(TrainerCallback):
    """`tokens_per_s` for training logs: tokens processed since the previous training log divided
    by the wall time since then (all ranks, gradient accumulation included).

    `MoETrainer.log` asks for it (`training_log_metrics`) before the Trainer hands the record to
    the callbacks, so metrics.jsonl, TensorBoard and wandb all receive it."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._last_time: float | None = None
        self._last_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_step = state.global_step

    def training_log_metrics(self, state) -> dict[str, float]:
        """{"tokens_per_s": ...} since the previous call (empty before training or without progress)."""
        if self._last_time is None:
            return {}
        now = time.perf_counter()
        steps = state.global_step - self._last_step
        out = {}
        if steps > 0 and now > self._last_time:
            out["tokens_per_s"] = steps * self.tokens_per_step / (now - self._last_time)
        self._last_time, self._last_step = now, state.global_step
        return out


def tensorboard_tags(logs: dict) -> dict:
    """TensorBoard tags for a log record: a key that already names its section (`train/layer0/cv`,
    `eval/cv_mean`, `monitor/...`) is its own tag; the Trainer's plain keys get transformers' tags
    (`loss` -> `train/loss`, `eval_loss` -> `eval/loss`)."""
    plain = rewrite_logs({k: v for k, v in logs.items() if "/" not in k})
    return {**plain, **{k: v for k, v in logs.items() if "/" in k}}


class SectionedTensorBoardCallback(TensorBoardCallback):
    """transformers' TensorBoardCallback with `tensorboard_tags`: stock it would prefix `train/` to
    every key not starting with `eval_`, so `train/layer0/cv` became `train/train/layer0/cv` and the
    evaluation routing `train/eval/layer0/cv`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.tb_writer is None:
            self._init_summary_writer(args)
        if self.tb_writer is None:
            return
        for tag, v in tensorboard_tags(logs or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb_writer.add_scalar(tag, v, state.global_step)
            elif isinstance(v, str):
                self.tb_writer.add_text(tag, v, state.global_step)
        self.tb_writer.flush()


class RoutingMonitorCallback(TrainerCallback):
    """The Trainer's side of the routing monitor (the computations live in metrics/monitor.py):
    its snapshot schedule at train begin, snapshots after optimizer steps, and the eval metrics
    that `MoETrainer.evaluation_loop` pulls through `evaluation_metrics`."""

    def __init__(self, monitor: RoutingMonitor):
        self.monitor = monitor

    def on_train_begin(self, args, state, control, **kwargs):
        self.monitor.begin(state.global_step, state.max_steps, state.is_world_process_zero)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.monitor.step_end(model, state.global_step, state.max_steps, bool(args.bf16), state.is_world_process_zero)

    def evaluation_metrics(self, model, args, state) -> dict[str, float]:
        return self.monitor.evaluation_metrics(model, args, state)


class RouterStepCallback(TrainerCallback):
    """After each optimizer step, tell every router (schedules such as SRIP) and the context."""

    def __init__(self, model):
        self.routers = routers(model)
        self.context = getattr(model, "spectra_context", None)

    def _sync(self, step: int) -> None:
        for r in self.routers:
            r.on_optimizer_step(step)
        if self.context is not None:
            self.context.step = step

    def on_train_begin(self, args, state, control, **kwargs):
        self._sync(state.global_step)  # after a resume, global_step is the restored step

    def on_step_end(self, args, state, control, **kwargs):
        self._sync(state.global_step)


class CompactProgressCallback(ProgressCallback):
    """The Trainer's progress bar, printing only aggregate metrics (per-layer and monitor keys
    go to metrics.jsonl / loggers, not the console)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {k: v for k, v in (logs or {}).items() if "/layer" not in k and not k.startswith("monitor/")}
        super().on_log(args, state, control, logs=logs, **kwargs)


def callback_class(spec, key: str = "trainer.callbacks") -> tuple[type, dict]:
    """One `trainer.callbacks` entry ("pkg.module.Class" or {_target_: ..., **kwargs}) as
    (TrainerCallback subclass, keyword arguments), checked without constructing it: a ConfigError
    naming `key` if it does not import, is no TrainerCallback, or does not take these arguments."""
    kwargs = dict(spec) if isinstance(spec, dict) else {}
    path = str(kwargs.pop("_target_", spec))
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{key}: cannot import {path!r} ({type(e).__name__}: {e})") from None
    if not (isinstance(cls, type) and issubclass(cls, TrainerCallback)):
        raise ConfigError(f"{key}: {path!r} is not a transformers TrainerCallback subclass")
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{key}: {path}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {e}") from None
    return cls, kwargs


def user_callbacks(specs) -> list[TrainerCallback]:
    """The `trainer.callbacks` entries, constructed (a ConfigError names the entry that fails)."""
    out = []
    for i, spec in enumerate(specs or []):
        cls, kwargs = callback_class(spec, f"trainer.callbacks[{i}]")
        out.append(cls(**kwargs))
    return out
