"""Fault injection for the end-to-end tests, as TrainerCallbacks that a run adds through the
config key `trainer.callbacks` (src/spectra/config.py), so a `train.py` subprocess gets them from
its command line. Nothing under src/ knows about them.

    KillAt(point="step", step=N)   SIGKILL right after the training log of optimizer step N (its
                                   record is already in metrics.jsonl)
    KillAt(point="save", step=N)   SIGKILL while checkpoint N is being saved: every file written
                                   into the staging directory, not yet committed (the call to
                                   `spectra.train.checkpoint.commit_checkpoint` is replaced; that
                                   is rank 0, the rank that commits)
    PoisonLoss(step=N, term="ce")  multiply one training loss term by NaN in every forward of
                                   optimizer step N (1-based, as logged): `ce`, the model's loss,
                                   or a router term `layer{i}/{name}`, MoE layer i's
                                   `RoutingOutput.aux_losses[name]`; the numerics guard then sees
                                   it as the run would see a real NaN (a forward hook on the model)

`kill_at(...)` / `poison(...)` return the Hydra override; `ENV` puts this directory on a
subprocess's PYTHONPATH so that `faults` imports there (pytest already has it on sys.path).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from transformers import TrainerCallback

TESTS = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)}


def kill_at(point: str, step: int) -> str:
    return f"trainer.callbacks=[{{_target_:faults.KillAt,point:{point},step:{int(step)}}}]"


def poison(step: int, term: str = "ce") -> str:
    return f"trainer.callbacks=[{{_target_:faults.PoisonLoss,step:{int(step)},term:'{term}'}}]"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(TrainerCallback):
    """SIGKILL this process after the training log of step `step` or while saving checkpoint `step`."""

    def __init__(self, point: str, step: int):
        if point not in ("step", "save"):
            raise ValueError(f"KillAt: point must be 'step' or 'save', got {point!r}")
        self.point, self.step = point, int(step)
        self._restore = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.point != "save" or self._restore is not None:
            return
        import spectra.train.checkpoint as ckpt

        commit = ckpt.commit_checkpoint

        def commit_or_die(staged, final, step):
            if step == self.step:
                _die()
            return commit(staged, final, step)

        ckpt.commit_checkpoint = commit_or_die
        self._restore = lambda: setattr(ckpt, "commit_checkpoint", commit)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.point == "step" and logs and "loss" in logs and state.global_step == self.step:
            _die()

    def on_train_end(self, args, state, control, **kwargs):
        if self._restore is not None:
            self._restore()
            self._restore = None


class PoisonLoss(TrainerCallback):
    """Multiply the training loss term `term` by NaN at optimizer step `step` (see the module doc)."""

    def __init__(self, step: int, term: str = "ce"):
        self.step, self.term = int(step), str(term)
        if self.term != "ce":
            layer, _, name = self.term.partition("/")
            if not (layer.startswith("layer") and layer[5:].isdigit() and name):
                raise ValueError(f"PoisonLoss: term must be 'ce' or 'layer<i>/<name>', got {term!r}")
        self._state = None
        self._handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._state = state
        if self._handle is None:
            self._handle = model.register_forward_hook(self._poison)

    def on_step_begin(self, args, state, control, **kwargs):
        self._state = state

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _poison(self, module, inputs, output):
        if not module.training or self._state is None or self._state.global_step + 1 != self.step:
            return None
        if self.term == "ce":
            output["loss"] = output["loss"] * float("nan")
            return output
        layer, _, name = self.term.partition("/")
        routed = module.spectra_context.outputs[int(layer[5:])]  # recorded by this forward
        routed.aux_losses[name] = routed.aux_losses[name] * float("nan")
        return output
