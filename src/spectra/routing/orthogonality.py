"""Expert representations, their Gram matrix and the orthogonality constraint (METHOD.md §2-3).

    m_e = normalize( mean_{t valid} normalize(p_{t,e}) )      M: [E, D]
    G   = M Mᵀ                                                  [E, E]  (never N×N)
    L_ortho = 0.7 ‖G − I‖²_F + 0.3 ‖G − I‖²_2                   (‖·‖_2 = spectral norm)
    λ_ortho(step) = so_lambda_max · min(1, step / so_warmup_steps)   (SRIP warm-up)

plus the Newton–Schulz iteration that (optionally) re-orthogonalises the expression projector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["expert_representations", "gram_matrix", "ortho_loss", "srip_lambda", "newton_schulz"]


def expert_representations(p: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-mean expert directions.

    p: [N, E, D] per-token expression vectors; valid: [N] bool (padding excluded from the mean).
    Returns M [E, D] with unit rows: m_e = normalize(Σ_t valid_t · p̂_{t,e} / N_valid).
    """
    p_hat = F.normalize(p.float(), dim=-1)  # [N, E, D]
    if valid is None:
        mean = p_hat.mean(dim=0)  # [E, D]
    else:
        w = valid.reshape(-1, 1, 1).to(p_hat.dtype)  # [N, 1, 1]
        mean = (p_hat * w).sum(dim=0) / w.sum().clamp_min(1.0)  # [E, D]
    return F.normalize(mean, dim=-1)  # [E, D]


def gram_matrix(m: torch.Tensor) -> torch.Tensor:
    """G = M Mᵀ for expert representations M [E, D] -> [E, E] (cosines if rows are unit)."""
    return m @ m.transpose(0, 1)  # [E, E]


def ortho_loss(g: torch.Tensor) -> torch.Tensor:
    """L_ortho = 0.7 ‖G − I‖²_F + 0.3 ‖G − I‖²_2 for a Gram matrix G [E, E]; scalar, fp32.

    The spectral norm of the symmetric G − I is its largest |eigenvalue| (eigvalsh: stable
    gradients even with repeated eigenvalues, which a plain SVD backward does not promise).
    """
    g = g.float()
    diff = g - torch.eye(g.shape[0], device=g.device, dtype=g.dtype)  # [E, E]
    diff = 0.5 * (diff + diff.transpose(0, 1))  # exact symmetry for eigvalsh
    fro2 = diff.pow(2).sum()
    spec = torch.linalg.eigvalsh(diff).abs().max()
    return 0.7 * fro2 + 0.3 * spec.pow(2)


def srip_lambda(step: torch.Tensor | int, lambda_max: float, warmup_steps: int, enabled: bool = True) -> torch.Tensor:
    """SRIP warm-up weight of L_ortho after `step` optimizer steps.

    enabled: λ = lambda_max · min(1, step / warmup_steps) (λ = lambda_max when warmup_steps = 0);
    disabled: constant lambda_max. Returns a 0-dim fp32 tensor (no host sync for tensor steps).
    """
    step_t = torch.as_tensor(step).to(torch.float32)
    if not enabled or warmup_steps <= 0:
        return torch.full_like(step_t, float(lambda_max))
    return float(lambda_max) * (step_t / float(warmup_steps)).clamp(0.0, 1.0)


def newton_schulz(w: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximate orthogonal polar factor of w [a, b] by Newton–Schulz, keeping w's scale.

    X₀ = w / ‖w‖_F (all singular values ≤ 1), X ← 1.5 X − 0.5 X Xᵀ X, `steps` times; the
    iteration drives every singular value towards 1 (X → U Vᵀ). The result is rescaled to the RMS
    singular value of w, ‖w‖_F / sqrt(min(a, b)), so only the *shape* of the spectrum changes.
    Differentiable; computed in fp32. steps = 0 returns w unchanged.
    """
    if steps <= 0:
        return w
    a, b = w.shape
    x = w.float()
    norm = x.norm().clamp_min(1e-12)
    x = x / norm
    for _ in range(steps):
        if a >= b:
            x = 1.5 * x - 0.5 * x @ (x.transpose(0, 1) @ x)  # [a, b]; b×b inner Gram (tall)
        else:
            x = 1.5 * x - 0.5 * (x @ x.transpose(0, 1)) @ x  # [a, b]; a×a inner Gram (wide)
    return (x * (norm / min(a, b) ** 0.5)).to(w.dtype)
