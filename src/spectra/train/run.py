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
from omegaconf import DictConfig

from spectra.config import SpectraConfig, validate
from spectra.train.rundir import SUMMARY, write_json_atomic

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
    from transformers import TrainingArguments

    from spectra.train.deepspeed import deepspeed_dict

    t = cfg.trainer
    report_to = [name for name, on in (("wandb", cfg.logger.wandb), ("tensorboard", cfg.logger.tensorboard)) if on]
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


def _param_checksums_across_ranks(model) -> list[float]:
    """sum(|p|) of the model on every rank: data-parallel replicas must agree after training."""
    import torch.distributed as dist

    local = torch.tensor([float(sum(p.detach().double().abs().sum() for p in model.parameters()))], dtype=torch.float64)
    if not (dist.is_available() and dist.is_initialized()):
        return [float(local)]
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    gathered = [torch.zeros_like(local, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local.to(dev))
    return [float(g) for g in gathered]


def run(cfg: DictConfig | SpectraConfig):
    """Train one model as configured; returns the objective (a float, or a tuple if several)."""
    typed = validate(cfg)  # every key checked before anything is loaded
    run_dir = Path(typed.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    status: dict = {"status": "running", "started": started}
    try:
        result = _train(typed, run_dir, status)
    except BaseException as e:
        if _rank() == 0:
            write_json_atomic(run_dir / SUMMARY, {**status, "status": "failed", "error": f"{type(e).__name__}: {e}"})
        raise
    return result


def _train(cfg: SpectraConfig, run_dir: Path, status: dict):
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from spectra.data import PackedCollator, build_datasets, load_tokenizer
    from spectra.moe import load_base_model, parameter_report, save_moe_model, upcycle
    from spectra.train.callbacks import JsonlMetricsCallback, RouterStepCallback
    from spectra.train.deepspeed import mark_moe_blocks_as_zero3_leaves
    from spectra.train.trainer import MoETrainer

    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train_ds, eval_ds = build_datasets(cfg.data, tokenizer, seed=cfg.seed)
    model = load_base_model(cfg.model, vocab_size=len(tokenizer), cache_root=cache_root(), seed=cfg.seed)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.data.max_seq_length > max_pos:
        raise ValueError(f"data.max_seq_length={cfg.data.max_seq_length} exceeds the model's max_position_embeddings={max_pos}")
    if cfg.router.name != "dense":
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

    if cfg.logger.tensorboard:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))
    if cfg.logger.wandb:
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_PROJECT", cfg.logger.wandb_project)
    args = training_arguments(cfg, run_dir)
    t = cfg.trainer
    tokens_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * cfg.data.max_seq_length * _world_size()
    trainer = MoETrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=PackedCollator(),
        processing_class=tokenizer,
        callbacks=[JsonlMetricsCallback(run_dir, tokens_per_step), RouterStepCallback(model)],
        spectra_cfg=cfg,
        routing_context=getattr(model, "spectra_context", None),
    )

    resume = None
    if t.resume == "auto":
        resume = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    elif t.resume != "never":
        resume = t.resume
    from transformers.trainer_callback import ProgressCallback

    from spectra.train.callbacks import CompactProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CompactProgressCallback())
    if resume and _rank() == 0:
        log.info(f"resuming from {resume}")

    t0 = time.time()
    train_out = trainer.train(resume_from_checkpoint=resume)
    train_time = time.time() - t0
    final = trainer.evaluate()
    best_eval = min((r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r), default=None)
    objective = objective_values(cfg, final)
    checksums = _param_checksums_across_ranks(model) if cfg.deepspeed.stage < 3 else None

    if trainer.is_world_process_zero():
        model.config.use_cache = True  # the saved model is for inference: generate with the cache
        save_moe_model(trainer.model if cfg.deepspeed.stage == 0 else model, run_dir / "model")
        tokenizer.save_pretrained(run_dir / "model")
        summary = {
            **status,
            "status": "completed",
            "router": cfg.router.name,
            "seed": cfg.seed,
            "steps": trainer.state.global_step,
            "train_loss": train_out.training_loss,
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
        }
        write_json_atomic(run_dir / SUMMARY, summary)
    values = tuple(objective.values())
    return values[0] if len(values) == 1 else values
