"""The routing monitor (METHOD.md §5): every routing metric per MoE layer on a fixed held-out slice.

What it does during training (`RoutingMonitor`, driven by the Trainer through
`train.callbacks.RoutingMonitorCallback`, wired in `train/run.py`):

* **At every evaluation** it runs the model (eval mode, no grad) on the held-out slice — the first
  `monitor.num_sequences` rows of the eval split, so every eval and every run with the same data
  config sees the same tokens — and merges into the eval record (hence metrics.jsonl and
  wandb/TensorBoard, through the Trainer's own `log`; see `MoETrainer.evaluation_loop`):

      monitor/layer{i}/<metric>   per MoE layer i
      monitor/<metric>_mean       mean over MoE layers (nan-aware)
      monitor/forward_ms, monitor/router_ms_total, monitor/experts_ms_total, monitor/num_tokens

  <metric> = everything of `summary.routing_metrics` (balance incl. dropped_token_rate and
  dropped_slot_rate, decision, specialization, sequential overlap), plus domain_purity /
  domain_affinity_peak, projector_orthogonality (routers with an expression projector), router_ms /
  experts_ms / shared_ms / router_share (paper Table 9), and, once two routing snapshots exist, the
  stability so far: consistency_prev, consistency_first, kendall_tau_prev, usage_variance (paper
  Table 12). Every `monitor/` key describes *inference* routing (eval mode: SPECTRA routes each
  token by top-k of −C, no Sinkhorn and no quota unless osr.sinkhorn_inference; Expert Choice
  falls back to token-choice top-k), like the recorder's `eval/` keys; the training routing's
  post-quota and pre-quota loads are the recorder's `train/layer{i}/cv` and `cv_before_quota`.
  The prefix is `monitor/`, not `eval/`: the trainer's RoutingRecorder already writes
  `eval/layer{i}/cv` over the *whole* eval set, and the two must not overwrite each other.

* **At 10/25/50/75/100 % of max_steps** (`snapshot_steps`) it saves the slice's dispatched routing
  to `<run_dir>/routing/step{step:06d}.pt` (temp file + rename, so a file is complete or absent):
  per layer the selected `expert_index` [N, k], the `served` mask [N, k] and the dispatched load
  [E] of the inference routing; top level: step, fingerprint of the slice tokens, shape [B, S],
  valid [N], domain_ids [N], input_ids [N], domain_names. `stability(snapshots)` turns them into Table 12;
  `compare_routing(run_a, run_b)` compares two runs on the same slice.
  For routers with a quota (SPECTRA, quota.enabled) each layer also gets `load_before_quota` [E]
  and `load_after_quota` [E]: the slice routed as in training (Sinkhorn over the slice + quota,
  see `RoutingMonitor.collect_quota`), plain per-token top-k of the plan vs the quota's
  selection. Eval-mode routing applies no quota, so the eval `load` cannot show its effect.

Every number is read from the dispatched assignment: a slot counts only if its token is real and
the slot was not dropped (after selection, capacity and drops). Padding — the pad block at the tail
of a packed eval row (routing_mask 0) or attention-masked positions — is excluded, and it is
excluded from the routing itself too: the slice batch goes to the model with its routing_mask, so
the routers give the pad block no Sinkhorn mass, no quota capacity and no place in the Gram.
The monitor's forward never changes training: eval mode, no grad, RNG state restored afterwards.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from spectra.contracts.snapshots import (
    SNAPSHOT_DIR,
    load_snapshot,
    load_snapshots,
    save_snapshot,
    snapshot_files,
    snapshot_path,
)
from spectra.data.sft import ROUTING_MASK
from spectra.metrics.balance import expert_load, served_mask
from spectra.metrics.domain import domain_affinity, expert_purity
from spectra.metrics.specialization import projector_orthogonality
from spectra.metrics.stability import (
    SnapshotLayer,
    nanmean,
    pair_consistency,
    pair_kendall_tau,
    snapshot_stability,
    snapshots_usage_variance,
)
from spectra.metrics.summary import routing_metrics
from spectra.moe.timing import StageTimer
from spectra.moe.upcycle import moe_blocks

if TYPE_CHECKING:
    from spectra.routing.base import RoutingOutput

PREFIX = "monitor/"


# --------------------------------------------------------------------------------------------
# Snapshot schedule
# --------------------------------------------------------------------------------------------


def snapshot_steps(fractions, max_steps: int) -> list[int]:
    """Optimizer steps at which routing snapshots are taken.

    step = ceil(f · max_steps), clamped to [1, max_steps]; duplicates removed; ascending. The ceil
    has 1e-9 slack so float error (0.28 · 25 = 7.000000000000001) does not push a step up by one.
    E.g. max_steps=8: fractions 0.1, 0.25, 0.5, 0.75, 1.0 -> steps 1, 2, 4, 6, 8;
    max_steps=200 -> 20, 50, 100, 150, 200.
    """
    if max_steps < 1:
        return []
    steps = {min(max(math.ceil(f * max_steps - 1e-9), 1), max_steps) for f in fractions}
    return sorted(steps)


# --------------------------------------------------------------------------------------------
# Pure metric assembly (unit-testable without a model)
# --------------------------------------------------------------------------------------------


def domain_served(valid: torch.Tensor, dropped: torch.Tensor, domain_ids: torch.Tensor) -> torch.Tensor:
    """[N, k] served slots of real tokens that have a domain (id >= 0): what domain metrics count.
    A real token of a document without a domain (id −1) is routed and counted everywhere else."""
    return served_mask(valid, dropped) & (domain_ids >= 0).unsqueeze(-1)


def layer_metrics(
    out: RoutingOutput,
    valid: torch.Tensor,
    doc_start: torch.Tensor | None = None,
    domain_ids: torch.Tensor | None = None,
    num_domains: int | None = None,
) -> dict[str, float]:
    """All metrics of one MoE layer on the slice, from its dispatched assignment.

    out: the layer's RoutingOutput for N = B·S slice positions (CPU); valid: [N] bool real tokens,
    replacing `out.valid` (in a monitor forward both are routing_mask & attention_mask, the mask
    the routers were given); doc_start: [B, S] bool;
    domain_ids: [N] long (−1: padding, or a document without a domain; left out of the domain
    metrics only) with num_domains classes.
    Adds to `routing_metrics`:
        domain_purity          load-weighted share of an expert's assignments from its top domain
        domain_affinity_peak   mean over domains present of max_e P(e | d)
                               (1/E for domain-blind routing, 1/k when a domain always uses k experts)
    """
    out = replace(out, valid=valid)
    m = routing_metrics(out, doc_start=doc_start)
    if domain_ids is not None and num_domains:
        served = domain_served(valid, out.dropped, domain_ids)  # [N, k]
        e = out.num_experts
        m["domain_purity"] = expert_purity(out.expert_index, served, domain_ids, e, num_domains).weighted_mean
        aff = domain_affinity(out.expert_index, served, domain_ids, e, num_domains)  # [D, E], nan rows absent
        present = ~torch.isnan(aff).any(-1)
        m["domain_affinity_peak"] = float(aff[present].max(-1).values.mean()) if present.any() else math.nan
    return m


def timing_metrics(ms: dict[tuple[int, str], float], layer: int) -> dict[str, float]:
    """router_ms, experts_ms (, shared_ms) and router_share = router / (router + experts + shared)."""
    stages = {name: v for (lyr, name), v in ms.items() if lyr == layer}
    if not stages:
        return {}
    m = {f"{name}_ms": v for name, v in stages.items()}
    total = sum(stages.values())
    m["router_share"] = stages.get("router", 0.0) / total if total > 0 else math.nan
    return m


def flatten(per_layer: dict[int, dict[str, float]]) -> dict[str, float]:
    """{layer: {metric: v}} -> {"layer{i}/metric": v, ..., "metric_mean": nanmean over layers}."""
    flat: dict[str, float] = {}
    names: dict[str, list[float]] = {}
    for layer in sorted(per_layer):
        for k, v in per_layer[layer].items():
            flat[f"layer{layer}/{k}"] = float(v)
            names.setdefault(k, []).append(float(v))
    for k, vs in names.items():
        flat[f"{k}_mean"] = nanmean(vs)
    return flat


def snapshot_layer(out: RoutingOutput, valid: torch.Tensor, quota_out: RoutingOutput | None = None) -> dict[str, torch.Tensor]:
    """What a snapshot keeps of one layer: expert_index [N, k] int32, served [N, k] bool, load [E],
    and chosen [N, k] bool when the router marks its choices (RoutingOutput.chosen).

    quota_out: the same layer's output from a forward that applied the quota (None: none did).
    When it carries `load_before_quota`, adds load_before_quota [E] and load_after_quota [E]
    (float64, both counted over the router's real tokens, so their sums are equal).
    """
    served = served_mask(valid, out.dropped)  # real tokens, slot not dropped
    layer = {
        "expert_index": out.expert_index.detach().cpu().to(torch.int32),
        "served": served.cpu(),
        "load": expert_load(out.expert_index, served, out.num_experts).cpu(),  # [E] float64
    }
    if out.chosen is not None:  # slots that are choices (Expert Choice); absent = every slot
        layer["chosen"] = (out.chosen & valid.reshape(-1, 1).to(out.chosen.device)).cpu()
    if quota_out is not None and quota_out.load_before_quota is not None:
        layer["load_before_quota"] = quota_out.load_before_quota.detach().cpu().to(torch.float64)  # [E]
        layer["load_after_quota"] = quota_out.dispatch_counts.detach().cpu().to(torch.float64)  # [E]
    return layer


# --------------------------------------------------------------------------------------------
# Stability across snapshots (paper Table 12)
# --------------------------------------------------------------------------------------------


def _stability_layer(snapshot: dict, layer: int) -> SnapshotLayer:
    """What the stability metrics read of one layer of a monitor snapshot (format 1)."""
    d = snapshot["layers"][layer]
    return SnapshotLayer(valid=snapshot["valid"], expert_index=d["expert_index"], chosen=d.get("chosen"), load=d["load"])


def stability(snapshots: list[dict]) -> dict:
    """Table 12 from a step-ordered list of snapshots of the same slice (`snapshot_stability`,
    metrics/stability.py, which the analysis report shares): {"steps", "layers": {"<layer>": ...},
    "mean": the scalar entries nan-aware averaged over layers}. Fewer than 2 snapshots -> only "steps".
    """
    result: dict = {"steps": [int(s["step"]) for s in snapshots]}
    if len(snapshots) < 2:
        return result
    layers = {i: [_stability_layer(s, i) for s in snapshots] for i in sorted(snapshots[0]["layers"])}
    return {**result, **snapshot_stability(layers)}


def _stability_logs(snapshots: list[dict]) -> dict[str, float]:
    """Stability so far for an eval record: latest pair, latest vs first, variance, τ of latest pair."""
    if len(snapshots) < 2:
        return {}
    per_layer = {}
    a, b, first = snapshots[-2], snapshots[-1], snapshots[0]
    for layer in sorted(b["layers"]):
        la, lb, lf = (_stability_layer(s, layer) for s in (a, b, first))
        per_layer[layer] = {
            "consistency_prev": pair_consistency(la, lb),
            "consistency_first": pair_consistency(lf, lb),
            "kendall_tau_prev": pair_kendall_tau(la, lb),
            "usage_variance": snapshots_usage_variance([_stability_layer(s, layer) for s in snapshots]),
        }
    return flatten(per_layer)


# --------------------------------------------------------------------------------------------
# Snapshot files
# --------------------------------------------------------------------------------------------


def _barrier() -> None:
    """Wait for every rank when torch.distributed is initialised with several ranks."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def compare_routing(run_dir_a, run_dir_b, step: int | None = None) -> dict:
    """Checkpoint consistency between two runs' routing of the same held-out slice.

    step: a snapshot step both runs have; None = the latest common one. Raises ValueError when
    there is none, or when the snapshots are of different tokens (data configs differ).
    Returns {"step", "consistency" (mean over layers), "per_layer": {layer: c},
             "kendall_tau" (nan-aware mean over layers), "per_layer_kendall_tau": {layer: τ}}.
    A run compared with itself gives consistency 1.0.
    """
    def steps(run_dir):
        return {step for step, _ in snapshot_files(run_dir)}

    common = steps(run_dir_a) & steps(run_dir_b)
    if step is None:
        if not common:
            raise ValueError(f"no routing snapshot step common to {run_dir_a} and {run_dir_b}")
        step = max(common)
    elif step not in common:
        raise ValueError(f"step {step} is not a snapshot of both runs (common steps: {sorted(common)})")
    a, b = load_snapshot(snapshot_path(run_dir_a, step)), load_snapshot(snapshot_path(run_dir_b, step))
    if a["fingerprint"] != b["fingerprint"]:
        raise ValueError("the two runs' snapshots are of different held-out tokens (data configs differ)")
    pairs = {int(i): (_stability_layer(a, i), _stability_layer(b, i)) for i in sorted(a["layers"])}
    cons = {i: pair_consistency(la, lb) for i, (la, lb) in pairs.items()}
    taus = {i: pair_kendall_tau(la, lb) for i, (la, lb) in pairs.items()}
    return {"step": step, "consistency": nanmean(cons.values()), "per_layer": cons,
            "kendall_tau": nanmean(taus.values()), "per_layer_kendall_tau": taus}


# --------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------


def real_token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, S] bool real tokens of a collated batch, by the rule the routing context applies:
    attention_mask AND routing_mask, each where present (all True when neither is)."""
    valid = torch.ones(tuple(batch["input_ids"].shape), dtype=torch.bool)
    for key in ("attention_mask", ROUTING_MASK):
        if key in batch:
            valid &= batch[key].bool()
    return valid


@dataclass
class SliceRouting:
    """The routing of the held-out slice at one step (CPU tensors)."""

    step: int
    outputs: dict[int, RoutingOutput]  # MoE layer -> its RoutingOutput over N = B·S positions
    timing_ms: dict[tuple[int, str], float] = field(default_factory=dict)
    forward_ms: float = math.nan


def _cpu_output(out: RoutingOutput) -> RoutingOutput:
    """Detached CPU copy of the fields metrics read (losses, diagnostics and state dropped)."""
    def cpu(t):
        return None if t is None else t.detach().cpu()

    return replace(out, expert_index=cpu(out.expert_index), expert_weight=cpu(out.expert_weight).float(),
                   probs=cpu(out.probs).float(), scores=None if out.scores is None else cpu(out.scores).float(),
                   dropped=cpu(out.dropped), valid=cpu(out.valid),
                   dispatch_counts=cpu(out.dispatch_counts), aux_losses={}, diagnostics={},
                   logits=None if out.logits is None else cpu(out.logits).float(),
                   gram=None if out.gram is None else cpu(out.gram).float(),
                   expert_repr=None if out.expert_repr is None else cpu(out.expert_repr).float(), state=None,
                   load_before_quota=cpu(out.load_before_quota))


class RoutingMonitor:
    """Full routing metrics on a fixed held-out slice at each eval; snapshots for stability.

    model: the upcycled causal LM (has `spectra_context`); eval_dataset: rows of `build_datasets`
    (the slice is its first `cfg.num_sequences` rows); collator: a PackedCollator with
    include_domain_ids=True; num_domains: domain classes of `domain_ids` (None: no domain metrics).
    The Trainer pulls the eval metrics through `evaluation_metrics` (MoETrainer.evaluation_loop);
    every rank runs the slice forward (ZeRO-3 needs all ranks in a forward), rank 0 writes files.
    """

    def __init__(self, model, eval_dataset, run_dir, cfg, collator, num_domains: int | None = None,
                 domain_names: tuple[str, ...] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.context = model.spectra_context
        self.blocks = moe_blocks(model)
        n = min(cfg.num_sequences, len(eval_dataset))
        batch = collator([eval_dataset[i] for i in range(n)])  # [B, S] each
        domain = batch.pop("domain_ids", None)
        batch.pop("labels", None)  # no loss needed: the monitor reads routing only
        self.batch = batch
        self.shape = tuple(batch["input_ids"].shape)  # (B, S)
        self.valid = real_token_mask(batch).reshape(-1)  # [N], what the routers will count
        self.domain_ids = None if domain is None else domain.reshape(-1)  # [N]
        self.num_domains = num_domains if domain is not None else None
        self.domain_names = domain_names
        self.doc_start = batch["position_ids"] == 0 if "position_ids" in batch else None  # [B, S]
        self.fingerprint = hashlib.sha256(batch["input_ids"].to(torch.int64).numpy().tobytes()
                                          + str(self.shape).encode()).hexdigest()
        self.logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.steps: list[int] = []
        self.snapshots: list[dict] = []  # in memory, step order (what stability reads)
        self._cache: SliceRouting | None = None
        self._metrics_cache: tuple[int, dict] | None = None
        self.last: dict = {}
        self.time_s = 0.0  # wall time the monitor spent (forwards, metrics, files)

    # -- the slice forward ----------------------------------------------------------------------

    @torch.no_grad()
    def collect(self, model, step: int, bf16: bool = False) -> SliceRouting:
        """Routing of the slice at `step` (one eval-mode forward, cached per step)."""
        if self._cache is not None and self._cache.step == step:
            return self._cache
        outputs, timing_ms, forward_ms = self._forward(model, bf16, timing=self.cfg.timing)
        self._cache = SliceRouting(step, outputs, timing_ms, forward_ms)
        return self._cache

    def _quota_routers(self) -> list:
        """Routers whose training forward applies a quota that their eval forward skips."""
        return [b.router for b in self.blocks if getattr(b.router, "quota_enabled", False)
                and hasattr(b.router, "sinkhorn_inference") and not b.router.sinkhorn_inference]

    @torch.no_grad()
    def collect_quota(self, model, routing: SliceRouting, bf16: bool = False) -> dict[int, RoutingOutput]:
        """The slice routed with the quota: {layer: RoutingOutput} ({} when no router has one).

        Eval-mode routing of a quota router (SPECTRA) is per-token top-k without the quota, so the
        pre- vs post-quota load is measured by one more eval-mode forward with each such router's
        `sinkhorn_inference` switched on for the call: Sinkhorn over the slice tokens + quota
        top-k, as in training (cost Gram from the running expert directions, no buffer updated,
        no dropout). Layers whose eval routing already applied the quota are read from `routing`.
        """
        if any(out.load_before_quota is not None for out in routing.outputs.values()):
            return routing.outputs  # osr.sinkhorn_inference=true: the eval forward used the quota
        routers = self._quota_routers()
        if not routers:
            return {}
        try:
            for r in routers:
                r.sinkhorn_inference = True
            outputs, _, _ = self._forward(model, bf16, timing=False)
        finally:
            for r in routers:
                r.sinkhorn_inference = False
        return outputs

    def _forward(self, model, bf16: bool, timing: bool) -> tuple[dict[int, RoutingOutput], dict, float]:
        """One eval-mode, no-grad forward of the slice: ({layer: CPU RoutingOutput}, stage ms, forward ms).
        Training mode, RNG state and the context are restored afterwards."""
        device = next(model.parameters()).device
        inputs = {k: v.to(device) for k, v in self.batch.items()}
        if self.logits_to_keep:
            inputs["logits_to_keep"] = 1  # skip the LM head over the slice: only routing is read
        timer = StageTimer(sync_cuda=device.type == "cuda") if timing else None
        was_training = model.training
        ctx = self.context
        model.eval()
        for b in self.blocks:
            b.stage_timer = timer
        ctx.recording = True
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        try:
            # fork_rng: the monitor must not shift the training run's random stream.
            with torch.random.fork_rng(devices=rng_devices), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(**inputs)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                forward_ms = (time.perf_counter() - t0) * 1e3
            outputs = {layer: _cpu_output(out) for layer, out in ctx.outputs.items()}
        finally:
            ctx.recording = False
            ctx.outputs = {}
            for b in self.blocks:
                b.stage_timer = None
            model.train(was_training)
        return outputs, (dict(timer.ms) if timer else {}), forward_ms

    # -- metrics ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _projector_orthogonality(self) -> dict[int, float]:
        out = {}
        for b in self.blocks:
            proj = getattr(b.router, "projector", None)
            if proj is None:
                continue
            w = b.router.projector_weight() if hasattr(b.router, "projector_weight") else proj.weight
            if w.numel() == 0:  # ZeRO-3 partitioned parameter: not gathered here
                continue
            out[b.layer_idx] = projector_orthogonality(w.detach().float().cpu(), b.router.num_experts)
        return out

    def metrics(self, routing: SliceRouting) -> dict[str, float]:
        """Flat `monitor/...` dict for one slice routing."""
        proj = self._projector_orthogonality()
        per_layer = {}
        for layer, out in sorted(routing.outputs.items()):
            m = layer_metrics(out, self.valid, self.doc_start, self.domain_ids, self.num_domains)
            if layer in proj:
                m["projector_orthogonality"] = proj[layer]
            m.update(timing_metrics(routing.timing_ms, layer))
            per_layer[layer] = m
        logs = flatten(per_layer)
        logs.update(_stability_logs(self.snapshots))
        logs["num_tokens"] = float(self.valid.sum())
        if routing.timing_ms:
            logs["forward_ms"] = routing.forward_ms
            logs["router_ms_total"] = sum(v for (_, s), v in routing.timing_ms.items() if s == "router")
            logs["experts_ms_total"] = sum(v for (_, s), v in routing.timing_ms.items() if s == "experts")
        return {PREFIX + k: v for k, v in logs.items()}

    def evaluation_metrics(self, model, args, state) -> dict[str, float]:
        """Called by MoETrainer.evaluation_loop: the monitor keys for this eval record."""
        if not self.blocks:
            return {}
        if self._metrics_cache is not None and self._metrics_cache[0] == state.global_step:
            return dict(self._metrics_cache[1])  # e.g. the run's final evaluate() at the last step
        t0 = time.perf_counter()
        routing = self.collect(model, state.global_step, bf16=bool(getattr(args, "bf16", False)))
        logs = self.metrics(routing)
        self._metrics_cache = (state.global_step, logs)
        self.last = {"step": state.global_step, "metrics": {k[len(PREFIX):]: v for k, v in logs.items()}}
        if self.domain_ids is not None and self.num_domains:
            self.last["domain_names"] = list(self.domain_names or [])
            self.last["domain_affinity"] = {  # [D, E] per layer: P(expert | domain) on the slice
                str(layer): domain_affinity(out.expert_index, domain_served(self.valid, out.dropped, self.domain_ids),
                                            self.domain_ids, out.num_experts, self.num_domains).tolist()
                for layer, out in sorted(routing.outputs.items())
            }
        self.time_s += time.perf_counter() - t0
        return dict(logs)

    # -- snapshots --------------------------------------------------------------------------------

    def _snapshot(self, routing: SliceRouting, max_steps: int, quota: dict[int, RoutingOutput] | None = None) -> dict:
        """The snapshot record of `routing` (quota: `collect_quota`'s outputs, for the pre/post-quota loads)."""
        quota = quota or {}
        layers = {layer: snapshot_layer(out, self.valid, quota.get(layer)) for layer, out in sorted(routing.outputs.items())}
        first = next(iter(routing.outputs.values()))
        return {"format": 1, "step": routing.step, "max_steps": max_steps, "fingerprint": self.fingerprint,
                "num_experts": first.num_experts, "top_k": first.top_k, "shape": list(self.shape),
                "valid": self.valid.clone(), "domain_ids": self.domain_ids,
                "input_ids": self.batch["input_ids"].reshape(-1).to(torch.int32),  # [N], for per-expert keywords
                "domain_names": list(self.domain_names or []), "layers": layers}

    def begin(self, global_step: int, max_steps: int, is_main: bool) -> None:
        """At train begin (fresh or resumed at `global_step`): the snapshot schedule, and the
        snapshots already on disk up to `global_step` (is_main: this rank deletes later ones)."""
        self.steps = snapshot_steps(self.cfg.snapshot_fractions, max_steps)
        # After a resume, earlier snapshots are on disk: reload them so stability spans the run.
        self.snapshots = []
        if is_main and (self.run_dir / SNAPSHOT_DIR).is_dir():
            # Files past the resume point (all of them on a fresh start) are from an earlier
            # attempt in this run dir, possibly on another schedule: they would be stale.
            for step, p in snapshot_files(self.run_dir):
                if step > global_step:
                    p.unlink(missing_ok=True)
        # Other ranks list the directory only once rank 0 has deleted; loading also picks files by
        # the step in their name, so even without the barrier no rank opens a doomed file.
        _barrier()
        if global_step > 0 and (self.run_dir / SNAPSHOT_DIR).is_dir():
            old = load_snapshots(self.run_dir, max_step=global_step)
            if any(s["fingerprint"] != self.fingerprint for s in old):
                warnings.warn("routing snapshots on disk are of a different held-out slice; ignoring them", stacklevel=2)
            else:
                self.snapshots = old

    def step_end(self, model, global_step: int, max_steps: int, bf16: bool, is_main: bool) -> None:
        """After an optimizer step: at a snapshot step, snapshot the slice's routing (is_main:
        this rank writes the file)."""
        if model is None or not self.blocks or global_step not in self.steps:
            return
        t0 = time.perf_counter()
        routing = self.collect(model, global_step, bf16=bf16)
        snap = self._snapshot(routing, max_steps, self.collect_quota(model, routing, bf16=bf16))
        self.snapshots = [s for s in self.snapshots if s["step"] < snap["step"]] + [snap]
        if is_main:
            save_snapshot(snapshot_path(self.run_dir, snap["step"]), snap)
        self.time_s += time.perf_counter() - t0

    # -- summary ----------------------------------------------------------------------------------

    def summary(self) -> dict:
        """For summary.json: {"monitor": final slice metrics, "stability": Table 12 over snapshots}."""
        monitor = {**self.last, "num_sequences": self.shape[0], "time_s": self.time_s, "snapshot_steps": self.steps}
        return {"monitor": monitor, "stability": stability(self.snapshots)}
