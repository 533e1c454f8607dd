"""Energy score and energy distance: distributional losses for end-to-end training.

Anchor: De Bortoli, Galashov, Guntupalli, Zhou, Murphy, Gretton, Doucet, "Distributional Diffusion Models with
Scoring Rules" (ICML 2025, arXiv 2502.02483). A regression loss (L1/L2) against targets that share a caption is
minimised by the conditional mean (blurred, collapsed samples); the energy score with the plain Euclidean norm is
strictly proper for λ = 1, so it is minimised in expectation by the true conditional distribution.

Zero distances. ‖·‖ has no gradient at 0 (two identical samples, e.g. a collapsed generator). We use
torch.linalg.vector_norm, whose backward masks that point: it returns the subgradient 0 where the norm is exactly 0
and ∇‖v‖ = v/‖v‖ elsewhere. Values are exact (no ε bias). tests/test_energy.py checks this behaviour.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _norm(v: Tensor, start_dim: int) -> Tensor:
    """Euclidean norm over dims start_dim.. (gradient 0 where the norm is exactly 0, see module docstring)."""
    return torch.linalg.vector_norm(v.flatten(start_dim), dim=-1)


def energy_score(samples: Tensor, target: Tensor, lam: float = 1.0) -> Tensor:
    """Energy score of m samples per observation. samples: [B, m, ...], target: [B, ...] -> [B].

    ES = (1/m) Σ_j ‖ĝ_j − x‖ − λ/(2 m (m−1)) Σ_{j≠k} ‖ĝ_j − ĝ_k‖  (De Bortoli et al. 2025, generalized energy score),
    with the plain (not squared) Euclidean norm over all non-batch dims. Needs m >= 2.
    """
    if samples.dim() < 2 or samples.shape[0] != target.shape[0] or samples.shape[2:] != target.shape[1:]:
        raise ValueError(f"samples has shape {tuple(samples.shape)} and target {tuple(target.shape)}; "
                         "expected samples [B, m, ...] and target [B, ...] with matching B and trailing dims")
    m = samples.shape[1]
    if m < 2:
        raise ValueError(f"samples has m = {m} samples per observation (dim 1); the energy score needs m >= 2")
    flat = samples.flatten(2)                                              # [B, m, D]
    confinement = _norm(flat - target.flatten(1)[:, None], 2).mean(1)      # (1/m) Σ_j ‖ĝ_j − x‖
    pairwise = _norm(flat[:, :, None] - flat[:, None, :], 3)               # [B, m, m], zero diagonal
    interaction = pairwise.sum((1, 2)) / (m * (m - 1))                     # (1/(m(m−1))) Σ_{j≠k} ‖ĝ_j − ĝ_k‖
    return confinement - 0.5 * lam * interaction


def energy_distance_by_group(gen: Tensor, real: Tensor, gen_groups: Tensor, real_groups: Tensor,
                             lam: float = 1.0, include_real_term: bool = False) -> Tensor:
    """Per-group energy distance between generated and real samples that share a caption (group).

    gen: [N, ...], real: [M, ...], gen_groups: [N] int, real_groups: [M] int -> [N].

    For each group g with n_g generated samples G and r_g real samples R the energy distance is
        ED_g = 2 E‖G − R‖ − λ E‖G − G'‖ [− E‖R − R'‖]
    with E‖G − G'‖ the unbiased U-statistic over pairs j ≠ k (and E‖R − R'‖ likewise; it does not depend on the
    generator, so it is left out unless include_real_term=True).

    The returned value for generated sample i of group g is
        c_i = (2/r_g) Σ_r ‖G_i − R_r‖ − λ/(n_g − 1) Σ_{j≠i} ‖G_i − G_j‖ [− E‖R − R'‖],
    so that mean_{i∈g} c_i = ED_g exactly, and c.mean() = Σ_g (n_g / N) ED_g: the mean over groups weighted by the
    number of generated samples in each group.

    Every group of gen must have at least 2 generated samples and at least 1 real sample (2 when
    include_real_term=True); real samples of groups absent from gen are ignored.
    """
    if gen.shape[1:] != real.shape[1:]:
        raise ValueError(f"gen has shape {tuple(gen.shape)} and real {tuple(real.shape)}; expected equal trailing dims")
    if gen_groups.shape != (gen.shape[0],):
        raise ValueError(f"gen_groups has shape {tuple(gen_groups.shape)}, expected {(gen.shape[0],)}")
    if real_groups.shape != (real.shape[0],):
        raise ValueError(f"real_groups has shape {tuple(real_groups.shape)}, expected {(real.shape[0],)}")
    gen_flat, real_flat = gen.flatten(1), real.flatten(1)
    gen_groups, real_groups = gen_groups.to(gen.device), real_groups.to(gen.device)
    out = gen_flat.new_zeros(gen.shape[0])
    for g in torch.unique(gen_groups).tolist():
        gi = (gen_groups == g).nonzero().squeeze(1)
        ri = (real_groups == g).nonzero().squeeze(1)
        n_g, r_g = gi.numel(), ri.numel()
        if n_g < 2:
            raise ValueError(f"gen_groups: group {g} has {n_g} generated sample; the U-statistic E‖G − G'‖ needs >= 2")
        if r_g < (2 if include_real_term else 1):
            raise ValueError(f"real_groups: group {g} has {r_g} real samples; expected >= "
                             f"{2 if include_real_term else 1}")
        G, R = gen_flat[gi], real_flat[ri]
        cross = _norm(G[:, None] - R[None], 2).mean(1)                        # (1/r_g) Σ_r ‖G_i − R_r‖
        within = _norm(G[:, None] - G[None], 2).sum(1) / (n_g - 1)            # (1/(n_g−1)) Σ_{j≠i} ‖G_i − G_j‖
        c = 2.0 * cross - lam * within
        if include_real_term:
            c = c - _norm(R[:, None] - R[None], 2).sum() / (r_g * (r_g - 1))  # E‖R − R'‖, U-statistic
        out = out.index_put((gi,), c)
    return out
