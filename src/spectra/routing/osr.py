"""Orthogonal Sinkhorn Routing cost (METHOD.md §2 step 5). Parameter-free.

    C = −s + λ · ( |s| @ (G ⊙ (1 − I))² ) + β · ReLU(|s| − τ)²          [N, E]

s [N, E]: cosine scores in [-1, 1]; G [E, E]: Gram matrix of expert representations.
- −s: a better match costs less (Sinkhorn turns low cost into high probability).
- repulsion: token t pays for expert e in proportion to how strongly t matches the experts that
  resemble e (squared off-diagonal similarity), pushing mass away from redundant experts.
- hinge: penalises over-confident scores beyond τ, keeping the plan from saturating.
"""

from __future__ import annotations

import torch

__all__ = ["osr_cost"]


def osr_cost(
    scores: torch.Tensor,
    gram: torch.Tensor,
    repulsion_weight: float,
    hinge_weight: float,
    hinge_threshold: float,
) -> torch.Tensor:
    """OSR cost matrix, computed in fp32.

    scores: [N, E] s; gram: [E, E] G; repulsion_weight λ, hinge_weight β, hinge_threshold τ.
    Returns C [N, E] = −s + λ·(|s| @ (G ⊙ (1−I))²) + β·ReLU(|s| − τ)².
    """
    s = scores.float()  # [N, E]
    g = gram.float()  # [E, E]
    e = g.shape[0]
    abs_s = s.abs()  # [N, E]
    off = g * (1.0 - torch.eye(e, device=g.device, dtype=g.dtype))  # [E, E] zero diagonal
    cost = -s  # [N, E]
    if repulsion_weight != 0.0:
        cost = cost + repulsion_weight * (abs_s @ off.pow(2))  # [N, E]
    if hinge_weight != 0.0:
        cost = cost + hinge_weight * torch.relu(abs_s - hinge_threshold).pow(2)  # [N, E]
    return cost
