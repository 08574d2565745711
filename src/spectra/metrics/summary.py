"""Every metric computable from one `RoutingOutput`, as a flat dict of floats (one MoE layer).

The load is recounted from the dispatched assignment (`expert_index` where `valid` and not
`dropped`), which is what `dispatch_counts` holds by contract; dropped slots and padding never
count. Metrics whose inputs a router does not provide (gram, expert_repr, ...) are left out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spectra.metrics.balance import (
    coefficient_of_variation,
    collapse_rate,
    dropped_slot_rate,
    dropped_token_rate,
    expert_load,
    gini,
    max_violation,
    served_mask,
    unused_expert_rate,
    usage_entropy,
)
from spectra.metrics.decision import routing_confidence, token_routing_entropy
from spectra.metrics.specialization import (
    expert_overlap_jaccard,
    expert_similarity_mean,
    gram_diagonal_quality,
    gram_orthogonality,
    off_diagonal_sparsity,
    routing_expression_alignment,
)
from spectra.metrics.stability import sequential_topk_overlap

if TYPE_CHECKING:  # metrics read the contract; they never import (and so register) a router
    import torch

    from spectra.routing.base import RoutingOutput


def routing_metrics(
    out: RoutingOutput,
    *,
    batch_shape: tuple[int, int] | None = None,
    doc_start: torch.Tensor | None = None,
) -> dict[str, float]:
    """Per-layer metrics of one forward pass. E < 2 raises ValueError (balance is undefined).

    Always:  cv, maxvio, gini, unused_rate, usage_entropy, collapse_rate (threshold 10 % of
             uniform load), dropped_token_rate (real tokens with every slot dropped / real
             tokens), dropped_slot_rate (dropped slots / real slots), routing_entropy (on
             `probs`), confidence, expert_overlap (mean pairwise Jaccard of served token sets).
    gram:    gram_orthogonality, gram_diagonal_quality, off_diagonal_sparsity.
    expert_repr: expert_similarity_mean.
    scores (SPECTRA family: s = cos(r, p), not the cost −C in `logits`):
             routing_expression_alignment.
    batch_shape = (B, S) or doc_start [B, S]: sequential_overlap (adjacent real positions of
             a row, not crossing a document start when doc_start is given).
    All-zero dispatched load gives nan for the ratio metrics (see balance.py).
    """
    num_experts = out.num_experts
    served = served_mask(out.valid, out.dropped)  # [N, k]
    load = expert_load(out.expert_index, served, num_experts)  # [E]
    metrics = {
        "cv": coefficient_of_variation(load),
        "maxvio": max_violation(load),
        "gini": gini(load),
        "unused_rate": unused_expert_rate(load),
        "usage_entropy": usage_entropy(load),
        "dropped_token_rate": dropped_token_rate(out.dropped, out.valid),
        "dropped_slot_rate": dropped_slot_rate(out.dropped, out.valid),
        "collapse_rate": collapse_rate(load),
        "routing_entropy": token_routing_entropy(out.probs, out.valid),
        "confidence": routing_confidence(out.expert_weight, out.valid),
        "expert_overlap": expert_overlap_jaccard(out.expert_index, served, num_experts),
    }
    if out.gram is not None:
        metrics["gram_orthogonality"] = gram_orthogonality(out.gram)
        metrics["gram_diagonal_quality"] = gram_diagonal_quality(out.gram)
        metrics["off_diagonal_sparsity"] = off_diagonal_sparsity(out.gram)
    if out.scores is not None:
        metrics["routing_expression_alignment"] = routing_expression_alignment(
            out.scores, out.expert_index, served, out.valid
        )
    if out.expert_repr is not None:
        metrics["expert_similarity_mean"] = expert_similarity_mean(out.expert_repr)
    if doc_start is not None and batch_shape is None:
        batch_shape = tuple(doc_start.shape)
    if batch_shape is not None:
        batch, seq = batch_shape
        metrics["sequential_overlap"] = sequential_topk_overlap(
            out.expert_index, out.valid, batch, seq, doc_start=doc_start
        )
    return metrics
