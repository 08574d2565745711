"""Atomic checkpoints and exact resume.

Layout under `<run_dir>/checkpoints/`:

    checkpoint-N/            a complete checkpoint (the Trainer's files + COMPLETE)
    checkpoint-N/COMPLETE    the completion marker: step + a manifest of every file's size and digest
    checkpoint-N/spectra_state.json   loop state the Trainer does not save (see below)
    .incomplete/checkpoint-N a checkpoint being written (or left by a kill); never resumed from

How a checkpoint is written (`AtomicCheckpointMixin._save_checkpoint`): the stock Trainer
writes everything (weights, optimizer, scheduler, scaler, RNG states of every rank, trainer
state; with DeepSpeed its `global_stepN/` shards and `latest`) into `.incomplete/checkpoint-N`;
after a barrier rank 0 adds `spectra_state.json` and the `COMPLETE` manifest (fsynced) and renames
the directory to `checkpoint-N` — the rename is the commit point. A kill at any moment leaves
either the previous checkpoints untouched or a new complete one. DeepSpeed's `latest` tag is
relative (`global_stepN`), so renaming the parent directory keeps it valid.

How a checkpoint is chosen (`find_resumable_checkpoint`): the newest `checkpoint-N` whose
marker parses, names step N, and whose files all match the manifest (size; SHA-256 for files up
to 64 MiB, SHA-256 of the first and last MiB for larger ones — cheap for multi-GB optimizer
states, and it catches the typical damage: truncated / zero-length files). Every skipped
checkpoint is reported with a warning naming its path and the reason.

Retention (`rotate_checkpoints`): keeps the `save_total_limit` newest *complete* checkpoints,
ordered by step (not mtime); an incomplete or corrupt one never counts towards the limit, so the
only complete checkpoint is never deleted. Invalid checkpoints older than the newest complete
one are removed (they can never be resumed from).

Exact resume. The Trainer restores model (buffers included: SPECTRA's `srip_step`, the Gram EMA),
optimizer, scheduler, scaler, python/numpy/torch RNG states and the data-loader position
(seedable sampler + skipping the consumed batches); `RouterStepCallback.on_train_begin` re-syncs
the routers' step. `spectra_state.json` adds what the Trainer loses on a restart: the loss
accumulated since the last log and the step of that log (so the first logged loss after a resume
averages the same steps as without the interruption), the drained loss total (so
`summary.json`'s `train_loss` covers the whole run), the numerics guard's count of skipped
steps, and the byte length of `metrics.jsonl` at the save (`rewind_metrics` cuts the file back
to it before training continues, so the curve has no duplicated or orphaned records);
`routing_recorder_<rank>.pt` holds the per-layer routing statistics accumulated since the last
log. So the first log after a resume covers the same steps as without the interruption even
when `logging_steps` does not divide `save_steps`. Not restored: wall-clock quantities
(`tokens_per_s`, runtimes, router/expert timings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import nested_gather

from spectra.config import ConfigError
from spectra.contracts.rundir import METRICS, read_jsonl
from spectra.moe.loading import load_weights

log = logging.getLogger("spectra")

MARKER = "COMPLETE"
STAGING = ".incomplete"
SPECTRA_STATE = "spectra_state.json"
RECORDER = "routing_recorder_{rank}.pt"  # the routing statistics accumulated since the last log
PREFIX = "checkpoint"
_FULL_HASH_MAX = 64 << 20
_SAMPLE = 1 << 20
_NAME = re.compile(rf"^{PREFIX}-(\d+)$")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (incomplete or corrupt) or the metrics file could not be rewound."""

def _warn(msg: str) -> None:
    log.warning(msg)
    warnings.warn(msg, CheckpointWarning, stacklevel=3)


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N for a directory named `checkpoint-N`, else None."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def _digest(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _FULL_HASH_MAX:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return h.hexdigest()
        h.update(f.read(_SAMPLE))
        f.seek(size - _SAMPLE)
        h.update(f.read(_SAMPLE))
    return "sampled:" + h.hexdigest()


def file_manifest(ckpt_dir: str | os.PathLike) -> dict[str, dict]:
    """{relative path: {size, sha256}} for every regular file under `ckpt_dir` except the marker."""
    root = Path(ckpt_dir)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.relative_to(root).as_posix() != MARKER:
            size = p.stat().st_size
            out[p.relative_to(root).as_posix()] = {"size": size, "sha256": _digest(p, size)}
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_fsync(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def write_marker(ckpt_dir: str | os.PathLike, step: int) -> dict:
    """Write `COMPLETE` (step + manifest of the directory's files); returns the marker."""
    ckpt_dir = Path(ckpt_dir)
    marker = {"step": int(step), "files": file_manifest(ckpt_dir)}
    _write_json_fsync(ckpt_dir / MARKER, marker)
    return marker


def verify_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """None when `ckpt_dir` is a complete checkpoint; otherwise why it is not (one line)."""
    ckpt_dir = Path(ckpt_dir)
    marker_path = ckpt_dir / MARKER
    if not marker_path.is_file():
        return f"no {MARKER} marker (the save was interrupted, or it predates atomic checkpoints)"
    try:
        marker = json.loads(marker_path.read_text())
        files = marker["files"]
        step = int(marker["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MARKER} marker ({type(e).__name__})"
    expected_step = checkpoint_step(ckpt_dir)
    if expected_step is not None and step != expected_step:
        return f"{MARKER} names step {step}, the directory step {expected_step}"
    if not files:
        return f"{MARKER} lists no files"
    for rel, meta in files.items():
        p = ckpt_dir / rel
        try:
            size = p.stat().st_size
        except OSError:
            return f"missing file {rel}"
        if size != meta.get("size"):
            return f"{rel} has {size} bytes, {meta.get('size')} expected (truncated or overwritten)"
        try:
            if _digest(p, size) != meta.get("sha256"):
                return f"{rel} does not match its recorded digest (corrupt)"
        except OSError as e:
            return f"{rel} unreadable ({e.strerror or type(e).__name__})"
    return None


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `checkpoint-N` directory, oldest first (by step, not mtime)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found)


def find_resumable_checkpoint(checkpoints_dir: str | os.PathLike, warn: bool = True) -> str | None:
    """The newest complete checkpoint under `checkpoints_dir` (a path string), or None.

    Each newer checkpoint that is incomplete or corrupt is skipped with a warning naming it.
    """
    for _, path in reversed(list_checkpoints(checkpoints_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return str(path)
        if warn:
            _warn(f"skipping checkpoint {path}: {problem}; trying the previous one")
    return None


def rotate_checkpoints(checkpoints_dir: str | os.PathLike, save_total_limit: int | None) -> list[Path]:
    """Keep the `save_total_limit` newest complete checkpoints; returns the removed paths.

    Incomplete/corrupt checkpoints never count towards the limit (so the only complete one is
    never deleted); those older than the newest complete one are removed, newer ones are left
    (a later save of the same step replaces them).
    """
    if not save_total_limit or save_total_limit <= 0:
        return []
    ckpts = list_checkpoints(checkpoints_dir)
    complete = [(s, p) for s, p in ckpts if verify_checkpoint(p) is None]
    if not complete:
        return []
    keep = {p for _, p in complete[-save_total_limit:]}
    newest_complete = complete[-1][0]
    removed = []
    for step, path in ckpts:
        if path in keep or step > newest_complete:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def commit_checkpoint(staged: str | os.PathLike, final: str | os.PathLike, step: int) -> None:
    """Write the marker into `staged`, then rename it to `final` (replacing an older `final`)."""
    staged, final = Path(staged), Path(final)
    write_marker(staged, step)
    _fsync_dir(staged)
    old = None
    if final.exists():  # e.g. a corrupt checkpoint of this step, skipped at resume
        old = staged.parent / f"{final.name}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    try:
        staged.parent.rmdir()  # the staging area, when nothing else is in it
    except OSError:
        pass


def read_spectra_state(ckpt_dir: str | os.PathLike | None) -> dict:
    """The checkpoint's `spectra_state.json` ({} when absent or unreadable)."""
    if not ckpt_dir:
        return {}
    try:
        return json.loads((Path(ckpt_dir) / SPECTRA_STATE).read_text())
    except (OSError, ValueError):
        return {}


def rewind_metrics(metrics_path: str | os.PathLike, ckpt_dir: str | os.PathLike | None) -> int:
    """Cut `metrics.jsonl` back to where it was when `ckpt_dir` was saved; returns records dropped.

    Uses the byte length recorded in the checkpoint; without one (or if it does not fall on a
    line end) keeps the records with `step` <= the checkpoint's step. A torn last line is dropped
    either way. `ckpt_dir=None` (a fresh start) empties the file. Rewritten atomically.
    """
    path = Path(metrics_path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    state = read_spectra_state(ckpt_dir)
    pos = 0 if ckpt_dir is None else state.get("metrics_bytes")
    if isinstance(pos, int) and 0 <= pos <= len(data) and (pos == 0 or data[pos - 1:pos] == b"\n"):
        kept = data[:pos]
    else:
        if isinstance(pos, int) and pos > len(data):
            _warn(f"{path} is shorter ({len(data)} bytes) than when {ckpt_dir} was saved ({pos}); keeping it as is")
        step = checkpoint_step(ckpt_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            records = read_jsonl(path)
        lines = [json.dumps(r, sort_keys=True) + "\n" for r in records if step is None or r.get("step", 0) <= step]
        kept = "".join(lines).encode()
    if kept == data:
        return 0
    dropped = len(data.splitlines()) - len(kept.splitlines())
    tmp = path.with_name(path.name + f".rewind{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return dropped


_ZERO_PARTITION = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def zero_partitions(ckpt_dir: str | os.PathLike) -> int | None:
    """How many data-parallel ranks the DeepSpeed ZeRO optimizer state in `ckpt_dir` is split
    over (its `global_step*/…zero_pp_rank_<r>_mp_rank_*_optim_states.pt` files); None without one."""
    ranks = {int(m.group(1)) for p in Path(ckpt_dir).glob("global_step*/*_optim_states.pt")
             if (m := _ZERO_PARTITION.search(p.name))}
    return len(ranks) or None


def check_resume_world_size(ckpt_dir: str | os.PathLike | None, world_size: int) -> None:
    """Refuse, before anything loads, a ZeRO checkpoint saved by another number of ranks:
    DeepSpeed (0.19) cannot re-partition ZeRO-1/2/3 optimizer state ("Automatic adjustment of
    ZeRO's optimizer state partitioning with a new world size is not currently supported").
    Checkpoints without ZeRO partitions (deepspeed.stage=0: full model, optimizer, one RNG file
    per rank) resume on any number of ranks."""
    if not ckpt_dir:
        return
    saved = zero_partitions(ckpt_dir)
    if saved is not None and saved != world_size:
        raise ConfigError(
            f"trainer.resume: {ckpt_dir} holds DeepSpeed ZeRO optimizer state split over {saved} ranks, this run has "
            f"{world_size}; DeepSpeed cannot re-partition it. Resume with {saved} ranks (same "
            "trainer.nproc_per_node / hydra.launcher nodes x tasks_per_node), or start afresh with trainer.resume=never "
            "(DeepSpeed's universal checkpoints, deepspeed.checkpoint.ds_to_universal, are not wired in; see launchers/README.md)")


def _plain(x):
    """Dicts (defaultdicts included) as plain dicts, recursively, for torch.save(weights_only)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _merge(live: dict, saved: dict) -> None:
    """Put `saved` into `live` (a freshly reset object's attribute dict) recursively, keeping the
    live containers (defaultdicts with their factories)."""
    for k, v in saved.items():
        if isinstance(v, dict):
            try:
                target = live[k]  # a defaultdict makes the container its owner expects
            except KeyError:
                target = live[k] = {}
            if isinstance(target, dict):
                _merge(target, v)
                continue
        live[k] = v


def _barrier(trainer) -> None:
    trainer.accelerator.wait_for_everyone()


class _LoopStateCallback(TrainerCallback):
    """Internal: restores the loop state at train begin."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.restore_loop_state()


class AtomicCheckpointMixin:
    """Mixed into MoETrainer (before `Trainer`): atomic checkpoints, step-ordered retention, and
    the loop state of `spectra_state.json` (see the module docstring)."""

    _staging_save = False
    _resume_loop_state: dict | None = None
    _resume_dir: str | None = None
    loss_sum_before_resume = 0.0  # drained training loss of the steps before the resume

    def _get_output_dir(self, trial):
        out = super()._get_output_dir(trial)
        return os.path.join(out, STAGING) if self._staging_save else out

    def _metrics_path(self) -> Path | None:
        cfg = getattr(self, "spectra_cfg", None)
        if cfg is None:
            return None
        return Path(cfg.output_dir) / METRICS

    def _save_checkpoint(self, model, trial):
        step = self.state.global_step
        final_root = Path(super()._get_output_dir(trial))
        staged = final_root / STAGING / f"{PREFIX}-{step}"
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # leftovers of a killed save
        _barrier(self)
        self._staging_save = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_save = False
        recorder = getattr(self, "train_recorder", None)
        if recorder is not None:  # routing statistics accumulated since the last log, per rank
            torch.save(_plain(vars(recorder)), staged / RECORDER.format(rank=self.args.process_index))
        _barrier(self)  # every rank's files (RNG states, DeepSpeed shards, recorder) are written
        # the loss accumulated since the last log, averaged over ranks as the next log will (all ranks call this)
        tr_loss = getattr(self, "_tr_loss", None)
        tr_loss = float(nested_gather(tr_loss, self.args.parallel_mode).mean().item()) if tr_loss is not None else 0.0
        if self.args.should_save:
            metrics = self._metrics_path()
            guard = getattr(self, "numerics", None)
            state = {
                "step": step,
                "metrics_bytes": metrics.stat().st_size if metrics is not None and metrics.exists() else 0,
                "tr_loss": tr_loss,
                "globalstep_last_logged": int(getattr(self, "_globalstep_last_logged", step)),
                "loss_sum": self.loss_sum_before_resume + float(getattr(self, "_total_loss_scalar", 0.0)),
                "bad_steps": guard.bad_steps if guard is not None else 0,
            }
            with open(staged / SPECTRA_STATE, "w") as f:
                json.dump(state, f, indent=1, sort_keys=True)
            commit_checkpoint(staged, final_root / f"{PREFIX}-{step}", step)
            for p in rotate_checkpoints(final_root, self.args.save_total_limit):
                log.info(f"deleted old checkpoint {p} (trainer.save_total_limit={self.args.save_total_limit})")
        _barrier(self)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Stock `train`, plus the loop state of `spectra_state.json` when resuming."""
        if isinstance(resume_from_checkpoint, bool):
            raise ValueError("pass the checkpoint path (see spectra.train.checkpoint.find_resumable_checkpoint)")
        self._resume_loop_state = read_spectra_state(resume_from_checkpoint) if resume_from_checkpoint else None
        self._resume_dir = resume_from_checkpoint
        self.loss_sum_before_resume = 0.0
        guard = getattr(self, "numerics", None)
        if guard is not None:
            guard.bad_steps = int((self._resume_loop_state or {}).get("bad_steps", 0))
        if not any(isinstance(cb, _LoopStateCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(_LoopStateCallback(self))
        if self.args.should_save:  # saves a previous process left half-written
            shutil.rmtree(Path(super()._get_output_dir(None)) / STAGING, ignore_errors=True)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Stock batch fetch, except when the schedule is already done: resuming from the final
        checkpoint (step = max_steps, e.g. killed before summary.json) then trains nothing.

        The stock loop checks `max_steps` only after an optimizer step, so a resume from
        checkpoint-<max_steps> that falls mid-epoch would train (and save) step max_steps + 1.
        Here the first fetch of such a resume returns no batch and stops training: the Trainer
        has restored model, optimizer, state and RNG by then, and goes straight to its end."""
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume's model weights, loaded strictly through transformers' loader (`load_weights`).

        The stock Trainer reads the safetensors file into `load_state_dict(strict=False)` and only
        warns: a key renamed on save (GPT-NeoX's `lm_head` is saved as `embed_out`) is then
        skipped and the run continues with the untrained head. Here any missing, unexpected or
        mis-shaped key stops the resume, naming the keys. FSDP / SageMaker loading (wrapped
        models) is left to the stock code; DeepSpeed resumes through its own strict loader.
        """
        if getattr(self, "is_fsdp_enabled", False) or (model is not None and model is not self.model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_weights(self.model, resume_from_checkpoint)

    def restore_loop_state(self) -> None:
        """Called at train begin (after the Trainer reset its loss accumulators)."""
        st = self._resume_loop_state
        if not st or int(st.get("step", -1)) != self.state.global_step:
            return
        self._tr_loss += float(st.get("tr_loss", 0.0))
        self._globalstep_last_logged = int(st.get("globalstep_last_logged", self.state.global_step))
        self.loss_sum_before_resume = float(st.get("loss_sum", 0.0))
        recorder = getattr(self, "train_recorder", None)
        path = Path(self._resume_dir or "") / RECORDER.format(rank=self.args.process_index)
        if recorder is not None and path.is_file():
            recorder.reset()
            _merge(vars(recorder), torch.load(path, weights_only=True))

    def log(self, logs, *args, **kwargs):
        """The Trainer's end-of-training record: `train_loss` over the whole run, not just the
        steps since the last resume."""
        if "train_loss" in logs and "train_runtime" in logs:
            whole = self.whole_run_train_loss()
            if whole is not None:
                logs["train_loss"] = whole
        return super().log(logs, *args, **kwargs)

    def whole_run_train_loss(self) -> float | None:
        """Mean training loss over every step of the run, across resumes (after `train`)."""
        steps = self.state.global_step
        if steps <= 0:
            return None
        return (self.loss_sum_before_resume + float(getattr(self, "_total_loss_scalar", 0.0))) / steps
