"""DeepSpeed: build the ZeRO config dict the Trainer takes, and mark MoE blocks as ZeRO-3 leaves.

"auto" values are filled by transformers from TrainingArguments (batch sizes, clipping, bf16),
so there is one source of truth. No "optimizer" section: the Trainer then hands DeepSpeed our
own AdamW with its differential-LR parameter groups (see trainer.param_groups).
"""

from __future__ import annotations

from spectra.config import DeepSpeedConfig
from spectra.moe.block import MoEBlock


def deepspeed_dict(ds: DeepSpeedConfig, bf16: bool) -> dict | None:
    """The DeepSpeed config for `deepspeed.stage` (None when stage is 0: plain DDP/single process)."""
    if ds.stage == 0:
        return None
    zero: dict = {"stage": ds.stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if ds.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "gradient_clipping": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "zero_allow_untested_optimizer": True,
    }


def mark_moe_blocks_as_zero3_leaves(model) -> bool:
    """ZeRO-3 hooks fire only for experts that got tokens, so ranks would issue mismatched
    all-gathers and hang (DeepSpeed #4808); treating the whole MoE block as one leaf fixes it.

    A model without MoE blocks (router=dense) has nothing to mark: DeepSpeed's
    `set_z3_leaf_modules` raises when no module matches, so it is not called. Returns whether
    any block was marked."""
    if not any(isinstance(m, MoEBlock) for m in model.modules()):
        return False
    from deepspeed.utils import set_z3_leaf_modules  # optional at run time: only ZeRO-3 runs get here

    set_z3_leaf_modules(model, [MoEBlock])
    return True
