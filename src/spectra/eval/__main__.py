"""`python -m spectra.eval <model dir> [--tasks ...] [--limit N] [--out FILE] [--via moe|hf]`"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spectra.eval.harness import RESULTS_FILE, TASK_SETS, VIAS, EvalError, EvalRequest, evaluate


def _limit(text: str) -> int | float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return int(value) if value >= 1 and value.is_integer() else value


class _PrintTasksDir(argparse.Action):
    """--tasks-dir: print the shipped task directory (for lm_eval's own --include_path) and exit."""

    def __call__(self, parser, namespace, values, option_string=None):
        from spectra.eval.tasks import TASKS_DIR

        print(TASKS_DIR)
        parser.exit()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    sets = "; ".join(f"{name}: {','.join(tasks)}" for name, tasks in TASK_SETS.items())
    p = argparse.ArgumentParser(prog="python -m spectra.eval", description="Run lm-evaluation-harness on a saved model; write eval_harness.json.")
    p.add_argument("--tasks-dir", nargs=0, action=_PrintTasksDir,
                   help="print the directory of spectra's lm-eval tasks (lm_eval --include_path) and exit")
    p.add_argument("model_dir", type=Path, help="a saved model: a run's model/ directory")
    p.add_argument("--tasks", default="bundled",
                   help=f"comma-separated lm-eval tasks or task sets ({sets})")
    p.add_argument("--limit", type=_limit, default=None, help="documents per task (N) or a fraction (0<x<1)")
    p.add_argument("--out", type=Path, default=None, help=f"result file (default: <run dir>/{RESULTS_FILE})")
    p.add_argument("--via", choices=VIAS, default="moe",
                   help="moe: load with spectra.moe.load_moe_model; hf: lm-eval loads pretrained=<dir>,trust_remote_code=True")
    p.add_argument("--tokenizer", default=None, help="'bundled', a path or hub id (default: the model directory's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch-size", default="1", help="an integer or 'auto'")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--allow-code-execution", action="store_true", help="include HumanEval (runs model-written code)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    req = EvalRequest(model_dir=args.model_dir, tasks=[t.strip() for t in args.tasks.split(",")], limit=args.limit,
                      out=args.out, via=args.via, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                      batch_size=int(args.batch_size) if args.batch_size.isdigit() else args.batch_size,
                      num_fewshot=args.num_fewshot, allow_code_execution=args.allow_code_execution)
    try:
        record = evaluate(req)
    except ImportError as e:
        print(f"error: {e.name or 'lm_eval'} is not installed: pip install '.[eval]' (make setup installs it)",
              file=sys.stderr)
        return 2
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for task in record["tasks"]:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in record["metrics"][task].items() if "_stderr" not in k)
        print(f"{task}: {shown}")
    for task, reason in record["skipped"].items():
        print(f"{task}: skipped ({reason})")
    if record["avg_score"] is not None:
        print(f"avg score ({', '.join(record['scores'])}): {record['avg_score']:.4f}")
    print(f"wrote {record['path']}")
    print(json.dumps({"avg_score": record["avg_score"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
