"""Cosine routing scores and batch expert directions from unnormalised vectors (METHOD.md §2).

    s_{t,e} = ⟨r_{t,e}, p_{t,e}⟩ / (‖r_{t,e}‖ ‖p_{t,e}‖)                    [N, E]
    m_e     = normalize( Σ_t valid_t · p_{t,e} / ‖p_{t,e}‖ / N_valid )      [E, D]

with norms floored at 1e-12 as in `F.normalize`. The same numbers as normalising r and p first
(`orthogonality.expert_representations` is that reference), computed without materialising the
normalised [N, E, D] copies: the norms are [N, E], so the division happens on the [N, E] dot
products and the [N, E] mean weights. Forward + backward is ~2.3× faster on CPU at the paper's
sizes (benchmarks/bench_breakdown.py), because F.normalize's backward costs several [N, E, D]
passes per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cosine_scores", "expert_directions"]

_EPS = 1e-12  # F.normalize's floor


def cosine_scores(r: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos(r_e, p_e) per token and expert, plus ‖p‖ for `expert_directions`.

    r, p: [N, E, D] (computed in fp32). Returns s [N, E] in [-1, 1] and p_norm [N, E].
    """
    r, p = r.float(), p.float()
    r_norm = torch.linalg.vector_norm(r, dim=-1).clamp_min(_EPS)  # [N, E]
    p_norm = torch.linalg.vector_norm(p, dim=-1).clamp_min(_EPS)  # [N, E]
    s = (r * p).sum(-1) * (r_norm * p_norm).reciprocal()  # [N, E]
    return s, p_norm


def expert_directions(p: torch.Tensor, p_norm: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """M [E, D]: unit batch-mean of the normalised expression vectors over real tokens.

    p: [N, E, D]; p_norm: [N, E] from `cosine_scores`; valid: [N] bool or None (all real).
    """
    p = p.float()
    if valid is None:
        w = torch.full((p.shape[0], 1), 1.0 / p.shape[0], device=p.device)  # [N, 1]
    else:
        w = valid.reshape(-1, 1).to(torch.float32)  # [N, 1]
        w = w / w.sum().clamp_min(1.0)
    mean = (p * (w / p_norm).unsqueeze(-1)).sum(dim=0)  # [E, D]
    return F.normalize(mean, dim=-1)
