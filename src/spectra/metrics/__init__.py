"""Routing metrics: pure functions on the tensors of a `RoutingOutput` (METHOD.md §5).

    balance.py          load vector, CV, MaxVio, Gini, unused / collapse / dropped-token / dropped-slot
                        rates, usage entropy
    specialization.py   Gram orthogonality, expert similarity, Jaccard overlap, alignment, projector
    decision.py         per-token routing entropy, confidence
    stability.py        sequential / checkpoint overlap, usage variance, Kendall τ of expert ranks
                        (and `snapshot_stability`: Table 12 over a run's routing snapshots)
    domain.py           P(expert | domain), purity, TF-IDF keywords per expert
    summary.py          `routing_metrics(out)`: everything computable from one RoutingOutput

Everything is computed on the *dispatched* assignment (real tokens, slots not dropped), in
float64; only the per-token routing entropy reads the pre-selection distribution `probs`.
Metrics never import a router.
"""

from spectra.metrics.balance import (
    COLLAPSE_THRESHOLD,
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
from spectra.metrics.domain import (
    ExpertPurity,
    domain_affinity,
    domain_expert_counts,
    expert_purity,
    expert_top_keywords,
)
from spectra.metrics.specialization import (
    expert_overlap_jaccard,
    expert_similarity_mean,
    gram_diagonal_quality,
    gram_orthogonality,
    off_diagonal_sparsity,
    projector_orthogonality,
    routing_expression_alignment,
)
from spectra.metrics.stability import (
    checkpoint_consistency,
    expert_rank_kendall_tau,
    sequential_topk_overlap,
    usage_variance,
)
from spectra.metrics.summary import routing_metrics

__all__ = [
    "COLLAPSE_THRESHOLD",
    "ExpertPurity",
    "checkpoint_consistency",
    "coefficient_of_variation",
    "collapse_rate",
    "domain_affinity",
    "domain_expert_counts",
    "dropped_slot_rate",
    "dropped_token_rate",
    "expert_load",
    "expert_overlap_jaccard",
    "expert_purity",
    "expert_rank_kendall_tau",
    "expert_similarity_mean",
    "expert_top_keywords",
    "gini",
    "gram_diagonal_quality",
    "gram_orthogonality",
    "max_violation",
    "off_diagonal_sparsity",
    "projector_orthogonality",
    "routing_confidence",
    "routing_expression_alignment",
    "routing_metrics",
    "sequential_topk_overlap",
    "served_mask",
    "token_routing_entropy",
    "unused_expert_rate",
    "usage_entropy",
    "usage_variance",
]
