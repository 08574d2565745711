"""`MoETrainer`: the transformers Trainer plus what MoE routing needs.

- the routers' aux losses (already scaled by their coefficients) join the training loss;
- optimizer parameter groups with differential learning rates (router / experts / rest);
- per-layer routing metrics recorded during training and evaluation and merged into the logs
  (plus the RoutingMonitor's held-out-slice metrics at each evaluation).
- atomic checkpoints + exact resume state (train/checkpoint.py) and the non-finite loss /
  gradient guard (train/guards.py), as mixins;
- `trainer.callbacks`: extra TrainerCallbacks named by import path in the config, added after
  the project's callbacks (`preflight` checks that each imports, before anything loads).
Everything else (loop, DeepSpeed, checkpoint contents, schedulers, NEFTune) is the stock Trainer.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from spectra.metrics.recorder import RoutingRecorder
from spectra.moe.block import MoEBlock
from spectra.train.callbacks import user_callbacks
from spectra.train.checkpoint import AtomicCheckpointMixin
from spectra.train.guards import NumericsGuardMixin


def param_groups(model: torch.nn.Module, router_lr: float, expert_lr: float, base_lr: float, weight_decay: float):
    """AdamW groups: router, experts (routed + trainable shared), and everything else.

    Biases and norm weights (1-D parameters) get no weight decay, as in the stock Trainer.
    """
    router_ids, expert_ids = set(), set()
    for block in model.modules():
        if isinstance(block, MoEBlock):
            router_ids |= {id(p) for p in block.router.parameters()}
            expert_ids |= {id(p) for p in block.experts.parameters()}
            if block.shared_expert is not None:
                expert_ids |= {id(p) for p in block.shared_expert.parameters()}
    buckets: dict[tuple[str, bool], list] = {}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "router" if id(p) in router_ids else "experts" if id(p) in expert_ids else "base"
        buckets.setdefault((kind, p.ndim >= 2), []).append(p)
    lrs = {"router": router_lr, "experts": expert_lr, "base": base_lr}
    return [
        {"params": ps, "lr": lrs[kind], "weight_decay": weight_decay if decay else 0.0, "name": f"{kind}{'' if decay else '_no_decay'}"}
        for (kind, decay), ps in sorted(buckets.items(), key=lambda kv: kv[0])
    ]


class MoETrainer(AtomicCheckpointMixin, NumericsGuardMixin, Trainer):
    """Trainer for an upcycled model; `routing_context` is `model.spectra_context` (None when dense)."""

    def __init__(self, *args, spectra_cfg=None, routing_context=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.spectra_cfg = spectra_cfg
        if spectra_cfg is not None:
            for cb in user_callbacks(spectra_cfg.trainer.callbacks):  # after the callbacks passed in
                self.add_callback(cb)
        self.routing_context = routing_context
        self.train_recorder = RoutingRecorder()
        self.eval_recorder = RoutingRecorder()

    def create_optimizer(self, model=None):
        """AdamW over the three parameter groups of `param_groups` (differential LRs)."""
        if self.optimizer is None:
            t = self.spectra_cfg.trainer
            groups = param_groups(self.model if model is None else model, t.router_lr, t.expert_lr, t.base_lr, t.weight_decay)
            self.optimizer = torch.optim.AdamW(
                groups, lr=t.base_lr, betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon
            )
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """CE (stock) + the routers' aux losses while training; eval loss stays pure CE."""
        ctx = self.routing_context
        if ctx is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ctx.recording = True
        try:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        finally:
            ctx.recording = False
        recorder = self.train_recorder if model.training else self.eval_recorder
        recorder.add(ctx.outputs)
        if model.training:
            aux = self.guarded_aux_loss(ctx)  # = ctx.aux_loss(), each term checked for finiteness
            if aux is not None:
                if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                    # CE is already normalised over the accumulated batch; aux is a per-micro-batch
                    # mean, so scale it the way the Trainer would have scaled an unnormalised loss.
                    aux = aux / self.current_gradient_accumulation_steps
                loss = loss + aux
        ctx.outputs = {}  # drop references to this step's tensors
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        """Merge per-layer training routing metrics, and what callbacks with a
        `training_log_metrics(state)` hook add (throughput), into the Trainer's training logs,
        before `super().log` hands the record to every reporting callback."""
        if "loss" in logs:
            logs.update(self.train_recorder.report(prefix="train/"))
            for cb in self.callback_handler.callbacks:
                hook = getattr(cb, "training_log_metrics", None)
                if hook is not None:
                    logs.update(hook(self.state))
        super().log(logs, start_time)

    def evaluation_loop(self, *args, **kwargs):
        """Stock evaluation + per-layer routing metrics of the eval set (`eval/layer{i}/cv`, ...)."""
        self.eval_recorder.reset()
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        output.metrics.update(self.eval_recorder.report(prefix=f"{prefix}/"))
        # Callbacks with an `evaluation_metrics` hook (the RoutingMonitor) add keys to this record
        # here, before `evaluate()` logs it: on_evaluate runs only after the log, too late for
        # metrics.jsonl / wandb / TensorBoard.
        for cb in self.callback_handler.callbacks:
            hook = getattr(cb, "evaluation_metrics", None)
            if hook is not None:
                output.metrics.update(hook(self.model, self.args, self.state))
        return output
