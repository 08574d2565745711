"""`run(cfg)`: one training run, top to bottom. `train.py` calls it; it returns the objective.

    validate config -> tokenizer -> data -> base model -> upcycle -> Trainer -> train -> eval
    -> summary.json (written last, atomically) -> objective value(s)

Read this file first: everything a run does is listed here in order.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from transformers import TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback

from spectra.config import SpectraConfig, validate
from spectra.contracts.rundir import (
    METRICS,
    SUMMARY,
    append_progress,
    cached_objective,
    config_fingerprint,
    reset_run_dir,
    write_json_atomic,
)
from spectra.data import PackedCollator, build_datasets, load_tokenizer
from spectra.data.pipeline import get_domain_names
from spectra.metrics.monitor import RoutingMonitor
from spectra.moe import load_base_model, parameter_report, save_moe_model, upcycle
from spectra.routers_catalog import NO_ROUTER
from spectra.train.callbacks import (
    CompactProgressCallback,
    JsonlMetricsCallback,
    RouterStepCallback,
    RoutingMonitorCallback,
    SectionedTensorBoardCallback,
    ThroughputCallback,
)
from spectra.train.checkpoint import check_resume_world_size, find_resumable_checkpoint, rewind_metrics
from spectra.train.deepspeed import deepspeed_dict, mark_moe_blocks_as_zero3_leaves
from spectra.train.guards import check_process_count, enable_determinism, preflight
from spectra.train.post_eval import run_eval_harness
from spectra.train.processes import export_submitit_distributed_env, launch_processes
from spectra.train.trainer import MoETrainer

log = logging.getLogger("spectra")


def cache_root() -> Path:
    """Where models built from a config are saved once (override with $SPECTRA_CACHE)."""
    return Path(os.environ.get("SPECTRA_CACHE", Path.home() / ".cache" / "spectra")) / "models"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def training_arguments(cfg: SpectraConfig, run_dir: Path):
    """TrainingArguments from the typed config (one place where our keys meet the Trainer's)."""
    t = cfg.trainer
    # TensorBoard is not named here: `_build_trainer` adds SectionedTensorBoardCallback (our tags)
    report_to = ["wandb"] if cfg.logger.wandb else []
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.base_lr,  # informational: per-group LRs come from MoETrainer.create_optimizer
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        bf16=t.bf16,
        gradient_checkpointing=t.gradient_checkpointing,
        neftune_noise_alpha=t.neftune_noise_alpha,
        dataloader_num_workers=t.dataloader_num_workers,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=report_to or "none",
        run_name=run_dir.name,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        deepspeed=deepspeed_dict(cfg.deepspeed, t.bf16),
        ddp_backend=None if torch.cuda.is_available() else ("gloo" if _world_size() > 1 else None),
        disable_tqdm=False,
    )


def objective_values(cfg: SpectraConfig, final: dict) -> dict[str, float]:
    """The metrics named by `objectives`, from the final evaluation; a missing one is an error."""
    out = {}
    for name in cfg.objectives:
        if name not in final:
            raise KeyError(f"objectives: metric {name!r} was never logged; available: {sorted(final)}")
        out[name] = float(final[name])
    return out


def _checksums_across_ranks(tensors) -> list[float]:
    """sum(|x|) over `tensors` (a model's parameters, or its buffers) on every rank: data-parallel
    replicas must agree after training. Buffers count too: nothing syncs them but our own code
    (e.g. SPECTRA's running Gram, all-reduced at each fold)."""
    local = torch.tensor([float(sum(t.detach().double().abs().sum() for t in tensors))], dtype=torch.float64)
    if not (dist.is_available() and dist.is_initialized()):
        return [float(local)]
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    gathered = [torch.zeros_like(local, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local.to(dev))
    return [float(g) for g in gathered]


def _sweep_dir() -> Path | None:
    """The multirun's sweep directory when this run is a Hydra multirun job, else None."""
    try:
        hc = HydraConfig.get()
    except ValueError:  # not inside a Hydra app
        return None
    return Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


def _launcher_config() -> dict | None:
    """The process-count keys of this job's submitit launcher (`hydra.launcher`), None otherwise
    (a single run, or the basic launcher, whose jobs have no tasks)."""
    try:
        hc = HydraConfig.get()
    except ValueError:  # not inside a Hydra app (an elastic-launch child, a notebook)
        return None
    node = hc.get("launcher")
    if hc.mode != RunMode.MULTIRUN or node is None or "submitit" not in str(node.get("_target_", "")):
        return None
    return {k: node.get(k) for k in ("nodes", "tasks_per_node", "gpus_per_node")}


def record_progress(run_dir: Path, status: str, **extra) -> None:
    """One line in the sweep's progress file (multirun jobs only; spectra.sweep reads it), tagged
    with the multirun driver that launched the job ($SPECTRA_SWEEP_WORKER, set by
    spectra.sweep.cells.SweepProgressCallback), so workers sharing a sweep directory count their own."""
    sweep = _sweep_dir()
    if sweep is not None:
        worker = os.environ.get("SPECTRA_SWEEP_WORKER")
        append_progress(sweep, run_dir, status, **({"worker": worker} if worker else {}), **extra)


def run(cfg: DictConfig | SpectraConfig):
    """Train one model as configured; returns the objective (a float, or a tuple if several)."""
    typed = validate(cfg)  # every key checked before anything is loaded
    check_process_count(typed, _launcher_config())  # ranks vs tasks vs GPUs, before any process starts
    export_submitit_distributed_env()  # submitit tasks (SLURM nodes x tasks_per_node): one rank per task
    run_dir = Path(typed.output_dir)
    fingerprint = config_fingerprint(typed)
    if typed.skip_complete:
        cached = cached_objective(run_dir, fingerprint)
        if cached is not None:  # a complete sweep cell: resume the sweep without re-training it
            log.info(f"{run_dir}: complete for this config, skipped (objective {cached})")
            if _rank() == 0:
                record_progress(run_dir, "skipped")
            return cached
    if typed.trainer.resume == "never" and _rank() == 0:
        reset_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    status: dict = {"status": "running", "started": started, "config_fingerprint": fingerprint}
    try:
        if typed.trainer.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
            # Several processes for this one trial: spawn the ranks here (torch elastic launch),
            # each re-entering run() with the resolved config; rank 0's objective comes back.
            result = launch_processes(run, typed.trainer.nproc_per_node, typed)
        else:
            result = _train(typed, run_dir, status)
    except BaseException as e:
        if _rank() == 0:
            write_json_atomic(run_dir / SUMMARY, {**status, "status": "failed", "error": f"{type(e).__name__}: {e}"})
            record_progress(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        raise
    _release_process_group()
    if _rank() == 0:
        record_progress(run_dir, "completed")
    return result


def _release_process_group() -> None:
    """Destroy torch.distributed's default group once this process's share of the run is done.
    Left to interpreter exit, gloo's worker threads can abort the process (SIGABRT, "terminate
    called without an active exception": pytorch/pytorch#190489), failing a run that finished."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # together: a rank tearing down while rank 0 still writes waits out a gloo timeout
        dist.destroy_process_group()


def _train(cfg: SpectraConfig, run_dir: Path, status: dict):
    """One process's share of a run, in order: checks and seeding, data, model, Trainer, resume
    point, train, final evaluation, then the saved model and summary.json (rank 0)."""
    preflight(cfg)  # files, model config (no weights), max positions, DeepSpeed vs hardware
    if cfg.trainer.deterministic:
        enable_determinism()
    set_seed(cfg.seed)
    tokenizer, train_ds, eval_ds = _build_data(cfg)
    model, params = _build_model(cfg, tokenizer)
    _logger_environment(cfg, run_dir)
    args = training_arguments(cfg, run_dir)
    monitor = _build_monitor(cfg, model, eval_ds, run_dir)
    t = cfg.trainer
    tokens_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * cfg.data.max_seq_length * _world_size()
    trainer = _build_trainer(cfg, args, model, tokenizer, train_ds, eval_ds, monitor, run_dir, tokens_per_step)
    resume = _resume_point(cfg, run_dir, args.output_dir)

    t0 = time.time()
    train_out = trainer.train(resume_from_checkpoint=resume)
    train_time = time.time() - t0
    final = trainer.evaluate()
    objective = _finish(cfg, run_dir, status, trainer, model, tokenizer, monitor, final=final, params=params,
                        resume=resume, train_loss=train_out.training_loss, train_time=train_time,
                        tokens_per_step=tokens_per_step)
    values = tuple(objective.values())
    return values[0] if len(values) == 1 else values


def _build_data(cfg: SpectraConfig):
    """The tokenizer and the (train, eval) row datasets of `cfg.data`."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train_ds, eval_ds = build_datasets(cfg.data, tokenizer, seed=cfg.seed)
    return tokenizer, train_ds, eval_ds


def _build_model(cfg: SpectraConfig, tokenizer):
    """The base model, upcycled to MoE unless `router.name` is NO_ROUTER; returns it with its
    parameter report (logged on rank 0)."""
    model = load_base_model(cfg.model, vocab_size=len(tokenizer), cache_root=cache_root(), seed=cfg.seed)
    # Building a config model's cache entry draws from the global RNG, loading it does not: re-seed
    # so router initialisation (upcycle) is the same on a first and a later run of one seed.
    set_seed(cfg.seed)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.data.max_seq_length > max_pos:
        raise ValueError(f"data.max_seq_length={cfg.data.max_seq_length} exceeds the model's max_position_embeddings={max_pos}")
    if cfg.router.name != NO_ROUTER:
        upcycle(model, cfg, seed=cfg.seed)
    # transformers 5 isolates packed documents via position_ids only when no KV cache is built;
    # with use_cache=True (the default) packed documents would attend to each other. generate()
    # turns the cache on by itself.
    model.config.use_cache = False
    params = parameter_report(model)
    if _rank() == 0:
        log.info("parameters: " + ", ".join(f"{k}={v:,}" for k, v in params.items()))
    if cfg.deepspeed.stage == 3:
        mark_moe_blocks_as_zero3_leaves(model)
    return model, params


def _logger_environment(cfg: SpectraConfig, run_dir: Path) -> None:
    """Point TensorBoard and wandb (when on) into the run directory, unless the caller already did."""
    if cfg.logger.tensorboard:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))
    if cfg.logger.wandb:
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_PROJECT", cfg.logger.wandb_project)


def _build_monitor(cfg: SpectraConfig, model, eval_ds, run_dir: Path) -> RoutingMonitor | None:
    """The routing monitor on the eval split's held-out slice (None when off or the model is dense)."""
    if not cfg.monitor.enabled or getattr(model, "spectra_context", None) is None:
        return None
    domains = get_domain_names(eval_ds) if "domain_ids" in eval_ds.column_names else None
    return RoutingMonitor(model, eval_ds, run_dir, cfg.monitor, PackedCollator(include_domain_ids=True),
                          num_domains=len(domains) if domains else None, domain_names=domains)


def _build_trainer(cfg: SpectraConfig, args, model, tokenizer, train_ds, eval_ds, monitor, run_dir: Path,
                   tokens_per_step: int) -> MoETrainer:
    """The MoETrainer with the project's callbacks (JSONL metrics, router schedules, the monitor,
    the compact progress line in place of the stock one)."""
    # domain_ids ride along in every batch (one collator serves training and eval) for the
    # per-domain eval losses; MoETrainer pops them before any forward, dense or MoE.
    with_domains = all("domain_ids" in ds.column_names for ds in (train_ds, eval_ds))
    domains = get_domain_names(eval_ds) if with_domains else None
    trainer = MoETrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        # routing_mask marks the packed pad block for the routers; only a model with the routing
        # pre-hook (which pops it) may receive it, so a dense model's batches go without.
        data_collator=PackedCollator(include_domain_ids=domains is not None,
                                     include_routing_mask=getattr(model, "spectra_context", None) is not None),
        processing_class=tokenizer,
        callbacks=[ThroughputCallback(tokens_per_step), JsonlMetricsCallback(run_dir), RouterStepCallback(model)]
        + ([RoutingMonitorCallback(monitor)] if monitor else [])
        + ([SectionedTensorBoardCallback()] if cfg.logger.tensorboard else []),
        spectra_cfg=cfg,
        routing_context=getattr(model, "spectra_context", None),
        domain_names=domains,  # -> eval_loss_<domain> at every evaluation
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CompactProgressCallback())
    return trainer


def _resume_point(cfg: SpectraConfig, run_dir: Path, checkpoint_dir: str) -> str | None:
    """The checkpoint to resume from (`trainer.resume`: auto = the newest complete one, never, or
    a path), with metrics.jsonl rewound to it on rank 0."""
    t = cfg.trainer
    resume = None
    if t.resume == "auto":
        resume = find_resumable_checkpoint(checkpoint_dir)  # newest *complete* one; skipped ones are warned about
    elif t.resume != "never":
        resume = t.resume
    if resume and cfg.deepspeed.stage > 0:
        check_resume_world_size(resume, _world_size())  # ZeRO partitions cannot change rank count
    if resume and _rank() == 0:
        log.info(f"resuming from {resume}")
    if _rank() == 0 and t.resume != "never":
        # metrics.jsonl back to where it was at the checkpoint (empty when starting fresh): records
        # of a lost segment would otherwise duplicate the resumed curve.
        dropped = rewind_metrics(run_dir / METRICS, resume)
        if dropped:
            log.info(f"{METRICS}: dropped {dropped} records logged after {resume or 'the start'}")
    return resume


def _finish(cfg: SpectraConfig, run_dir: Path, status: dict, trainer: MoETrainer, model, tokenizer, monitor, *,
            final: dict, params: dict, resume: str | None, train_loss: float, train_time: float,
            tokens_per_step: int) -> dict[str, float]:
    """After training: the objective and the checksums across ranks (every rank takes part), then
    on rank 0 the saved model + tokenizer and summary.json (written last, atomically). Returns the
    objective values."""
    best_eval = min((r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r), default=None)
    objective = objective_values(cfg, final)
    checksums = _checksums_across_ranks(model.parameters()) if cfg.deepspeed.stage < 3 else None
    buffer_checksums = _checksums_across_ranks(model.buffers())  # ZeRO-3 partitions parameters, not buffers
    if not trainer.is_world_process_zero():
        return objective
    model.config.use_cache = True  # the saved model is for inference: generate with the cache
    save_moe_model(trainer.model if cfg.deepspeed.stage == 0 else model, run_dir / "model")
    tokenizer.save_pretrained(run_dir / "model")
    # Before summary.json: a run killed while evaluating is not complete, so a resume evaluates it.
    harness = None
    if cfg.trainer.eval_harness:
        ok = run_eval_harness(run_dir / "model", cfg.trainer.eval_harness, cfg.trainer.eval_harness_limit)
        harness = {"status": "ok" if ok else "failed", "tasks": list(cfg.trainer.eval_harness)}
    summary = {
        **status,
        "status": "completed",
        "router": cfg.router.name,
        "seed": cfg.seed,
        "steps": trainer.state.global_step,
        "train_loss": trainer.whole_run_train_loss() or train_loss,  # all steps, across resumes
        "train_time_s": train_time,
        "wall_time_s": time.time() - status["started"],
        "tokens_per_s": trainer.state.global_step * tokens_per_step / max(train_time, 1e-9),
        "final": final,
        "best": {"eval_loss": best_eval},
        "objective": objective,
        "parameters": params,
        "world_size": _world_size(),
        "resumed_from": resume,
        "param_checksum_per_rank": checksums,
        "buffer_checksum_per_rank": buffer_checksums,
        **(monitor.summary() if monitor else {}),  # "monitor": final slice metrics, "stability": Table 12
        **({"eval_harness": harness} if harness else {}),  # results: eval_harness.json beside it
    }
    write_json_atomic(run_dir / SUMMARY, summary)
    return objective
