"""`MoETrainer`: the transformers Trainer plus what MoE routing needs.

- the routers' aux losses (already scaled by their coefficients) join the training loss;
- optimizer parameter groups with differential learning rates (router / experts / rest);
- per-layer routing metrics recorded during training and evaluation and merged into the logs
  (plus the RoutingMonitor's held-out-slice metrics at each evaluation).
- per-domain eval loss (`eval_loss_<domain>`) when the eval batches carry `domain_ids`: taken
  from the logits the eval forward already produced, and popped before any forward sees them;
- atomic checkpoints + exact resume state (train/checkpoint.py) and the non-finite loss /
  gradient guard (train/guards.py), as mixins;
- `trainer.callbacks`: extra TrainerCallbacks named by import path in the config, added after
  the project's callbacks (`preflight` checks that each imports, before anything loads).
Everything else (loop, DeepSpeed, checkpoint contents, schedulers, NEFTune) is the stock Trainer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer

from spectra.data.sft import IGNORE_INDEX  # -100: transformers' causal-LM loss skips these labels
from spectra.metrics.recorder import RoutingRecorder
from spectra.moe.block import MoEBlock
from spectra.routing.step_stats import all_reduce_sum
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


DOMAIN_IDS = "domain_ids"  # per-token domain index of packed rows ([B, S] long, -1 = none)


def domain_loss_sums(logits: torch.Tensor, labels: torch.Tensor, domain_ids: torch.Tensor,
                     num_domains: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-domain (CE sum, token count), both float64 [num_domains], of one causal-LM batch.

    Shifted as transformers' causal-LM loss is: logits[:, t] is scored against labels[:, t + 1],
    and that token's loss goes to the domain of the target token, domain_ids[:, t + 1]. Only
    positions whose shifted label is not IGNORE_INDEX and whose domain is >= 0 count.
    logits [B, S, V], labels [B, S], domain_ids [B, S].
    """
    labels, domains = labels[:, 1:], domain_ids[:, 1:].to(labels.device)  # [B, S-1]: the targets
    keep = (labels != IGNORE_INDEX) & (domains >= 0)  # [B, S-1]
    # Select the counted rows before the float32 upcast: only [N, V] is copied, not [B, S, V].
    ce = F.cross_entropy(logits[:, :-1][keep].float(), labels[keep], reduction="none")  # [N]
    dom = domains[keep]  # [N]
    sums = torch.zeros(num_domains, dtype=torch.float64, device=ce.device).index_add_(0, dom, ce.double())
    counts = torch.bincount(dom, minlength=num_domains).to(torch.float64)  # [num_domains]
    return sums, counts


class DomainLossMeter:
    """Token-weighted per-domain CE over one evaluation loop: sums and counts across batches
    (not a mean of batch means), summed over the data-parallel ranks at `report`."""

    def __init__(self, domain_names: tuple[str, ...]):
        self.names = tuple(domain_names)
        self.sums: torch.Tensor | None = None  # [D] float64, on the logits' device
        self.counts: torch.Tensor | None = None  # [D] float64

    def add(self, logits: torch.Tensor, labels: torch.Tensor, domain_ids: torch.Tensor) -> None:
        """Accumulate one batch (shapes as in `domain_loss_sums`)."""
        sums, counts = domain_loss_sums(logits.detach(), labels, domain_ids, len(self.names))
        self.sums = sums if self.sums is None else self.sums + sums.to(self.sums.device)
        self.counts = counts if self.counts is None else self.counts + counts.to(self.counts.device)

    def report(self, prefix: str, device) -> dict[str, float]:
        """`{prefix}_loss_<domain>` for every domain with counted tokens on any rank.

        A collective when torch.distributed is initialised: every rank calls it once per loop,
        with zeros when it saw no batch, so the shapes agree.
        """
        zeros = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        sums = all_reduce_sum(zeros if self.sums is None else self.sums)
        counts = all_reduce_sum(zeros if self.counts is None else self.counts)
        return {f"{prefix}_loss_{name}": s / c
                for name, s, c in zip(self.names, sums.tolist(), counts.tolist()) if c > 0}


class MoETrainer(AtomicCheckpointMixin, NumericsGuardMixin, Trainer):
    """Trainer for an upcycled model; `routing_context` is `model.spectra_context` (None when dense).

    `domain_names` (the eval set's, in `domain_ids` index order) turns on the per-domain eval
    losses; the collator must then send `domain_ids`, which the trainer pops before every forward.
    """

    def __init__(self, *args, spectra_cfg=None, routing_context=None, domain_names=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.domain_names = tuple(domain_names) if domain_names else None
        self._domain_meter: DomainLossMeter | None = None  # set only while evaluation_loop runs
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
        """CE (stock) + the routers' aux losses while training; eval loss stays pure CE.

        `domain_ids` leave the batch here, before the forward (training batches carry them too);
        during an evaluation loop they attribute the forward's per-token CE to domains.
        """
        domain_ids = inputs.pop(DOMAIN_IDS, None)  # [B, S]; the model's forward must never see it
        meter = self._domain_meter if not model.training and domain_ids is not None else None
        labels = inputs.get("labels")  # [B, S]; read now: the stock loss path may pop it
        if meter is None or labels is None:
            return self._loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = self._loss(model, inputs, True, num_items_in_batch)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]  # [B, S, V]: all positions in eval
        meter.add(logits, labels, domain_ids)
        return (loss, outputs) if return_outputs else loss

    def _loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The stock loss, plus the routers' aux losses and routing records for an MoE model."""
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

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Stock step; a batch without labels, which the stock step feeds to the model directly
        (not through compute_loss), loses its `domain_ids` here."""
        if DOMAIN_IDS in inputs and not all(inputs.get(k) is not None for k in self.label_names):
            inputs = {k: v for k, v in inputs.items() if k != DOMAIN_IDS}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def evaluation_loop(self, *args, **kwargs):
        """Stock evaluation + per-layer routing metrics of the eval set (`eval/layer{i}/cv`, ...)
        + the per-domain losses (`eval_loss_<domain>`) when domain names are known."""
        self.eval_recorder.reset()
        self._domain_meter = DomainLossMeter(self.domain_names) if self.domain_names else None
        try:
            output = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            if self._domain_meter is not None:  # every rank gets here: report() is a collective
                output.metrics.update(self._domain_meter.report(prefix, self.args.device))
        finally:
            self._domain_meter = None
        output.metrics.update(self.eval_recorder.report(prefix=f"{prefix}/"))
        # Callbacks with an `evaluation_metrics` hook (the RoutingMonitor) add keys to this record
        # here, before `evaluate()` logs it: on_evaluate runs only after the log, too late for
        # metrics.jsonl / wandb / TensorBoard.
        for cb in self.callback_handler.callbacks:
            hook = getattr(cb, "evaluation_metrics", None)
            if hook is not None:
                output.metrics.update(hook(self.model, self.args, self.state))
        return output
