"""Downstream evaluation of saved models with lm-evaluation-harness (the optional `eval` extra).

    python -m spectra.eval outputs/demo/spectra/model                      # local tasks -> outputs/demo/spectra/eval_harness.json
    python -m spectra.eval <model dir> --tasks paper --device cuda         # MMLU, ARC, HellaSwag, GSM8K (+HumanEval)
    python -m spectra.eval <model dir> --via hf                            # lm-eval loads it: pretrained=<dir>,trust_remote_code=True

See harness.py for the loading paths, the task sets and the result file. Importing this package
does not import lm-eval; `evaluate` does.
"""

from spectra.eval.harness import (
    BUNDLED_TASKS,
    PAPER_TASKS,
    RESULTS_FILE,
    TASK_SETS,
    EvalError,
    EvalRequest,
    default_out,
    evaluate,
)

__all__ = ["BUNDLED_TASKS", "PAPER_TASKS", "RESULTS_FILE", "TASK_SETS", "EvalError", "EvalRequest", "default_out",
           "evaluate"]
