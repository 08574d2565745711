"""Run lm-evaluation-harness on a saved model and write `eval_harness.json`.

Two ways to load the model, one switch (`via`):

    via="moe"  spectra.moe.load_moe_model(dir), handed to lm-eval's `hf` backend as an instance
               (HFLM(pretrained=<model>, tokenizer=...)): works for every model spectra saves
    via="hf"   lm-eval's own loading, HFLM(pretrained=<dir>, trust_remote_code=True): what any
               user of lm-eval gets with `--model hf --model_args pretrained=<dir>,trust_remote_code=True`;
               needs checkpoints that are Hugging Face models (auto_map + modeling code, #19)

Both use the same tokenizer object and the same lm-eval code after loading, so on CPU they must
give the same numbers (tests/test_eval_harness.py).

Tasks: `bundled` (the default; offline) is the local tasks in tasks/ built from the bundled
corpus's held-out split; `paper` is the paper's downstream list (MMLU, ARC-Easy/Challenge,
HellaSwag, GSM8K, HumanEval), which needs the datasets from the hub, and HumanEval runs model-
written code, so it is skipped unless `allow_code_execution` is set. Any other lm-eval task name
works too. A task of `paper` that this lm-eval does not know is skipped with its reason; any other
unknown name is an error.

The result file (RESULTS_FILE) holds, besides lm-eval's raw per-task results:
    metrics     {task: {metric: value}} (lm-eval's "<metric>,<filter>" keys, ",none" dropped)
    scores      {task: value} for tasks with an accuracy-like metric (SCORE_METRICS), a fraction
    avg_score   the mean of `scores` (the paper's "Avg Score", as a fraction), None if none
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectra.contracts.rundir import EVAL_HARNESS, write_json_atomic
from spectra.data import DOMAINS
from spectra.eval.tasks import TASKS_DIR

logger = logging.getLogger(__name__)

RESULTS_FILE = EVAL_HARNESS  # the run directory's name for it (contracts/rundir.py)
MODEL_SUBDIR = "model"  # a run directory's model (contracts/rundir.py)
PAPER_TASKS = ("mmlu", "arc_easy", "arc_challenge", "hellaswag", "gsm8k", "humaneval")
BUNDLED_TASKS = ("spectra_bundled_mc", *(f"spectra_bundled_ppl_{d}" for d in DOMAINS))
TASK_SETS = {"paper": PAPER_TASKS, "bundled": BUNDLED_TASKS}
UNSAFE_TASKS = ("humaneval",)  # run code the model wrote
# The score of a task for "Avg Score": its first metric here that lm-eval reported.
SCORE_METRICS = {
    "mmlu": ("acc",),
    "arc_easy": ("acc",),
    "arc_challenge": ("acc_norm",),
    "hellaswag": ("acc_norm",),
    "gsm8k": ("exact_match,strict-match", "exact_match,flexible-extract"),
    "humaneval": ("pass@1,create_test", "pass_at_k,create_test", "pass@1"),
    "spectra_bundled_mc": ("acc",),
}
DEFAULT_SCORE_METRICS = ("acc_norm", "acc", "exact_match", "pass@1")
VIAS = ("moe", "hf")


class EvalError(Exception):
    """A bad model directory, tokenizer or task list: one line for the user."""


@dataclass
class EvalRequest:
    model_dir: Path
    tasks: list[str] = field(default_factory=lambda: ["bundled"])
    limit: int | float | None = None
    out: Path | None = None
    via: str = "moe"
    tokenizer: str | None = None  # None: the model directory's own tokenizer
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str = "float32"
    batch_size: int | str = 1
    num_fewshot: int | None = None
    allow_code_execution: bool = False


def default_out(model_dir: Path) -> Path:
    """The run directory's RESULTS_FILE: beside `model/` (its parent), else inside the model dir."""
    model_dir = Path(model_dir)
    return (model_dir.parent if model_dir.name == MODEL_SUBDIR else model_dir) / RESULTS_FILE


def expand_tasks(names: list[str], known: set[str], allow_code_execution: bool) -> tuple[list[str], dict[str, str]]:
    """Task sets expanded, duplicates dropped (order kept) -> (tasks to run, {skipped: reason})."""
    tasks, skipped = [], {}
    for name in names:
        for task in TASK_SETS.get(name, (name,)):
            if task in tasks or task in skipped:
                continue
            if task not in known:
                if name == "paper":
                    skipped[task] = "not a task of this lm-eval install"
                    continue
                raise EvalError(f"unknown lm-eval task {task!r} (task sets: {', '.join(TASK_SETS)})")
            if task in UNSAFE_TASKS and not allow_code_execution:
                skipped[task] = "runs model-written code: pass --allow-code-execution to include it"
                continue
            tasks.append(task)
    if not tasks:
        raise EvalError("no task to run" + (f" (skipped: {skipped})" if skipped else ""))
    return tasks, skipped


def load_tokenizer_for(model_dir: Path, name: str | None):
    """`name` ('bundled', a hub id or a path), else the tokenizer saved in the model directory."""
    from spectra.data import load_tokenizer

    if name is None:
        if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise EvalError(f"no tokenizer in {model_dir}; pass --tokenizer bundled (or a path / hub id)")
        name = str(model_dir)
    try:
        return load_tokenizer(name)
    except OSError as e:
        raise EvalError(str(e)) from None


def build_lm(req: EvalRequest, tokenizer):
    """lm-eval's `hf` backend (HFLM) on the saved model, loaded as `req.via` says."""
    import torch
    from lm_eval.models.huggingface import HFLM

    device = req.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if req.via == "hf":
        return HFLM(pretrained=str(req.model_dir), backend="causal", trust_remote_code=True, tokenizer=tokenizer,
                    device=device, dtype=req.dtype, batch_size=req.batch_size)
    if req.via != "moe":
        raise EvalError(f"via must be one of {VIAS}, not {req.via!r}")
    from spectra.moe import load_moe_model

    dtype = getattr(torch, req.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise EvalError(f"unknown dtype {req.dtype!r}")
    try:
        model = load_moe_model(req.model_dir, dtype=dtype)
    except (OSError, ValueError) as e:
        raise EvalError(f"cannot load {req.model_dir}: {str(e).splitlines()[0]}") from None
    return HFLM(pretrained=model.to(device), backend="causal", tokenizer=tokenizer, batch_size=req.batch_size)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's results (and group results) -> {task: {metric: value}}, ",none" dropped."""
    out: dict[str, dict[str, float]] = {}
    for block in ("results", "groups"):
        for task, res in (results.get(block) or {}).items():
            out.setdefault(task, {}).update(
                {k.removesuffix(",none"): float(v) for k, v in res.items() if k != "alias" and _number(v)})
    return out


def task_score(task: str, metrics: dict[str, float]) -> tuple[str, float] | None:
    """(metric, value) of a task's score (SCORE_METRICS), or None for tasks without one (perplexity)."""
    for m in SCORE_METRICS.get(task, DEFAULT_SCORE_METRICS):
        v = metrics.get(m)
        if v is not None and math.isfinite(v):
            return m, v
    return None


def evaluate(req: EvalRequest) -> dict:
    """Run lm-eval on `req.model_dir`, write the results JSON, return what was written."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    req.model_dir = Path(req.model_dir)
    if not (req.model_dir / "config.json").is_file():
        raise EvalError(f"not a saved model (no config.json): {req.model_dir}")
    out = Path(req.out) if req.out is not None else default_out(req.model_dir)
    requested = [t for t in req.tasks if t]
    only_local = all(t in BUNDLED_TASKS or t == "bundled" for t in requested)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not only_local)
    tasks, skipped = expand_tasks(requested, set(manager.all_tasks), req.allow_code_execution)
    for task, reason in skipped.items():
        logger.warning("skipping %s: %s", task, reason)

    tokenizer = load_tokenizer_for(req.model_dir, req.tokenizer)
    started = time.time()
    lm = build_lm(req, tokenizer)
    if req.allow_code_execution:
        os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=req.num_fewshot, limit=req.limit,
                                      task_manager=manager, log_samples=False, bootstrap_iters=0,
                                      confirm_run_unsafe_code=req.allow_code_execution)
    metrics = task_metrics(results)
    scored = {t: s for t in tasks if (s := task_score(t, metrics.get(t, {}))) is not None}
    scores = {t: v for t, (_, v) in scored.items()}
    record = {
        "model": str(req.model_dir.resolve()),
        "via": req.via,
        "tasks": tasks,
        "skipped": skipped,
        "limit": req.limit,
        "num_fewshot": req.num_fewshot,
        "metrics": {t: metrics.get(t, {}) for t in tasks},
        "scores": scores,
        "score_metrics": {t: m for t, (m, _) in scored.items()},
        "avg_score": sum(scores.values()) / len(scores) if scores else None,
        "n_samples": results.get("n-samples", {}),
        "versions": results.get("versions", {}),
        "results": results.get("results", {}),
        "groups": results.get("groups", {}),
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "wall_time_s": round(time.time() - started, 3),
    }
    write_json_atomic(out, record)
    record["path"] = str(out)
    return record
