"""Per-token routing-decision metrics (METHOD.md §5, "Decision").

Padding (valid = False) is excluded from every mean; no real token -> nan.
"""

from __future__ import annotations

import math

import torch

from spectra.metrics.balance import _tensor


def _real_rows(x: torch.Tensor, valid, name: str) -> torch.Tensor:
    v = _tensor(valid, torch.bool)
    if x.dim() != 2 or v.shape != x.shape[:1]:
        raise ValueError(f"{name} must be [N, ·] and valid [N]; got {tuple(x.shape)} and {tuple(v.shape)}")
    return x[v]


def token_routing_entropy(probs, valid) -> float:
    """Mean per-token entropy (nats) of the routing distribution over real tokens.

        H_t = −Σ_e p̂_{t,e} log p̂_{t,e},   p̂_t = p_t / Σ_e p_{t,e}   (0 · log 0 = 0)

    Rows are renormalised first (a Sinkhorn plan's rows may sum to 1 only approximately), as
    `scipy.stats.entropy` does. The only metric defined on the pre-selection distribution.
    probs: [N, E] non-negative; valid: [N] bool. Range [0, log E].
    """
    p = _real_rows(_tensor(probs), valid, "probs")
    if p.shape[0] == 0:
        return math.nan
    p = p / p.sum(-1, keepdim=True)
    ent = -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(-1)  # [N_real]
    return float(ent.mean())


def routing_confidence(expert_weight, valid) -> float:
    """Mean over real tokens of the largest combine weight: mean_t max_j w_{t,j}.

    Dropped slots carry weight 0, so a token whose slots were all dropped contributes 0.
    expert_weight: [N, k]; valid: [N] bool. Range [1/k, 1] for renormalised top-k weights.
    """
    w = _real_rows(_tensor(expert_weight), valid, "expert_weight")
    if w.shape[0] == 0:
        return math.nan
    return float(w.max(dim=-1).values.mean())
