"""Expert-specialization metrics (METHOD.md §5, "Specialization").

The Gram matrix here is always the E × E matrix of expert representations, `G = M Mᵀ` with
`M` [E, D] the normalised mean expression vector per expert — never a token × token matrix (the
reference code's defect, METHOD.md §7). Metrics that compare *pairs* of experts need E >= 2 and
raise ValueError otherwise. Scalars come back as Python floats, computed in float64.
"""

from __future__ import annotations

import math

import torch

from spectra.metrics.balance import _tensor

_EPS = 1e-12  # norm floor: a zero vector normalises to zero (cosine 0 with everything)


def _square_gram(gram) -> torch.Tensor:
    g = _tensor(gram)
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"gram must be a square [E, E] matrix, got shape {tuple(g.shape)}")
    return g


def _off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The E·(E−1) off-diagonal entries of a square matrix, flattened; E < 2 raises."""
    e = matrix.shape[0]
    if e < 2:
        raise ValueError(f"off-diagonal metrics need E >= 2 experts, got E={e}")
    return matrix[~torch.eye(e, dtype=torch.bool, device=matrix.device)]


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def gram_orthogonality(gram) -> float:
    """1 − mean_{i≠j} |G_ij|. 1 = mutually orthogonal experts, 0 = all collinear.

    gram: [E, E], E >= 2.
    """
    return float(1.0 - _off_diagonal(_square_gram(gram)).abs().mean())


def gram_diagonal_quality(gram) -> float:
    """1 − mean_i |G_ii − 1|: how close the experts' self-similarities are to 1 (unit-norm reps).

    1 = every diagonal entry is exactly 1. gram: [E, E] (E = 1 allowed).
    """
    return float(1.0 - (_square_gram(gram).diagonal() - 1.0).abs().mean())


def off_diagonal_sparsity(gram, tol: float = 0.1) -> float:
    """Share of off-diagonal entries with |G_ij| < tol (default 0.1). 1 = every pair near-orthogonal.

    Higher is better here (the paper summary's "closer to 0 is better" refers to the magnitudes
    themselves; this is the share of them that are small). gram: [E, E], E >= 2.
    """
    return float((_off_diagonal(_square_gram(gram)).abs() < tol).to(torch.float64).mean())


def expert_similarity_mean(expert_repr) -> float:
    """Mean signed cosine similarity over ordered expert pairs i ≠ j of the representations.

        mean_{i≠j} <r_i, r_j> / (|r_i| |r_j|)       (a zero row counts as cosine 0)

    Lower = more specialized. expert_repr: [E, D], E >= 2.
    """
    r = _tensor(expert_repr)
    if r.dim() != 2:
        raise ValueError(f"expert_repr must be [E, D], got shape {tuple(r.shape)}")
    u = _unit_rows(r)
    return float(_off_diagonal(u @ u.T).mean())


def _served_one_hot(expert_index, served, num_experts: int) -> torch.Tensor:
    """A[t, e] = 1 if token t was served by expert e (any slot), else 0. Returns [N, E] float64."""
    idx = _tensor(expert_index, torch.long)
    s = _tensor(served, torch.bool)
    if idx.dim() != 2 or s.shape != idx.shape:
        raise ValueError(f"expert_index and served must both be [N, k]; got {tuple(idx.shape)}, {tuple(s.shape)}")
    if s.any() and (idx[s].min() < 0 or idx[s].max() >= num_experts):
        raise ValueError(f"expert_index out of range [0, {num_experts})")
    a = torch.zeros(idx.shape[0], num_experts, dtype=torch.float64, device=idx.device)
    a.scatter_add_(1, idx.clamp(0, num_experts - 1), s.to(torch.float64))  # [N, E]
    return (a > 0).to(torch.float64)  # a repeated expert in one token's slots counts once


def expert_overlap_jaccard(expert_index, served, num_experts: int) -> float:
    """Mean pairwise Jaccard overlap of the experts' served token sets.

        T_e = {t : some served slot of token t goes to e}
        overlap = mean_{i<j, T_i ∪ T_j ≠ ∅} |T_i ∩ T_j| / |T_i ∪ T_j|

    Vectorised with the one-hot A [N, E]: |T_i ∩ T_j| = (AᵀA)_ij, |T_i ∪ T_j| = |T_i| + |T_j| −
    |T_i ∩ T_j|.

    0/0: a pair of two experts that both served nothing has an empty union, and its Jaccard
    index is undefined. Such a pair is left out of the mean -- neither 0 nor 1 -- so it neither
    lowers nor raises the overlap: the mean runs over the pairs with at least one used expert,
    and one used expert against an unused one counts 0. If *every* pair is left out (no served
    slot at all) the result is nan. Example, E = 4, experts 0 and 1 serving the same tokens, 2
    and 3 unused: pairs (0,1) = 1, (0,2) = (0,3) = (1,2) = (1,3) = 0, (2,3) left out -> 1/5.
    expert_index: [N, k]; served: [N, k] bool; E >= 2.
    """
    if num_experts < 2:
        raise ValueError(f"expert overlap needs E >= 2 experts, got E={num_experts}")
    a = _served_one_hot(expert_index, served, num_experts)  # [N, E]
    inter = a.T @ a  # [E, E]
    size = inter.diagonal()
    union = size[:, None] + size[None, :] - inter
    i, j = torch.triu_indices(num_experts, num_experts, offset=1, device=inter.device)
    inter, union = inter[i, j], union[i, j]
    keep = union > 0
    if not keep.any():
        return math.nan
    return float((inter[keep] / union[keep]).mean())


def routing_expression_alignment(scores, expert_index, served, valid) -> float:
    """Agreement between the dispatched assignment and the router's expression scores.

        a_t = Σ_{j : served[t, j]} onehot(expert_index[t, j])   ∈ {0, 1}^E
        alignment = mean_t cos(a_t, s_t) = mean_t Σ_{e ∈ S_t} s_{t,e} / (√|S_t| · ‖s_t‖)

    over real tokens with at least one served slot and a non-zero score row. The scores are the
    router's own similarity scores (`RoutingOutput.scores`), never its cost or logits: for SPECTRA
    s_{t,e} = cos(r_{t,e}, p_{t,e}) (routing vector vs expression vector), so this is
    1 when the experts a token was sent to hold all of its expression similarity and ≤ 0 when
    they score no better than the rest; under a uniform score row it is √(|S_t| / E).
    scores: [N, E]; expert_index: [N, k]; served: [N, k] bool; valid: [N] bool.
    No eligible token -> nan.
    """
    s = _tensor(scores)
    if s.dim() != 2:
        raise ValueError(f"scores must be [N, E], got shape {tuple(s.shape)}")
    v = _tensor(valid, torch.bool)
    a = _served_one_hot(expert_index, _tensor(served, torch.bool) & v.unsqueeze(-1), s.shape[1])  # [N, E]
    a_norm, s_norm = a.norm(dim=-1), s.norm(dim=-1)
    keep = v & (a_norm > 0) & (s_norm > 0)
    if not keep.any():
        return math.nan
    cos = (a * s).sum(-1)[keep] / (a_norm[keep] * s_norm[keep])
    return float(cos.mean())


def projector_orthogonality(weight, num_experts: int) -> float:
    """Distance of the expression projector's expert blocks from mutual orthogonality.

    The projector P: R^H -> R^{E·D} is an nn.Linear with weight [E·D, H]; its output is chunked
    into E expression vectors, so expert e owns rows e·D .. (e+1)·D − 1. Each block is flattened
    to a vector b_e ∈ R^{D·H} and L2-normalised (scale-free, so the 0.1 init gain does not matter):

        B̂ = [b̂_1; ...; b̂_E]   [E, D·H]
        projector_orthogonality = ‖B̂ B̂ᵀ − I_E‖_F / E

    0 = the experts' blocks are mutually orthogonal (Frobenius inner product); the maximum
    √(E·(E−1))/E < 1 is reached when all blocks are collinear. weight: [E·D, H], E >= 2.
    """
    w = _tensor(weight)
    if w.dim() != 2 or w.shape[0] % num_experts != 0:
        raise ValueError(f"weight must be [E·D, H] with E={num_experts} dividing its rows, got {tuple(w.shape)}")
    if num_experts < 2:
        raise ValueError(f"projector orthogonality needs E >= 2 experts, got E={num_experts}")
    blocks = _unit_rows(w.reshape(num_experts, -1))  # [E, D·H], row-major chunks of D rows
    gram = blocks @ blocks.T  # [E, E]
    eye = torch.eye(num_experts, dtype=torch.float64, device=gram.device)
    return float(torch.linalg.matrix_norm(gram - eye) / num_experts)
