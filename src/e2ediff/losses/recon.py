"""Reconstruction distances d(z0, ẑ0) of the E2EDiff paper (arXiv 2412.21044, Sec. 3 and Table 2).

Every function returns one value per sample ([B]); the call site averages and weights.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from torch import Tensor, nn


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but y has shape {tuple(y.shape)}; expected equal shapes [B, ...]")
    if x.dim() < 2:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected a batch [B, ...] with at least 2 dims")


def l1(x: Tensor, y: Tensor) -> Tensor:
    """d_L1 = mean |x - y| over all non-batch dims. x, y: [B, ...] -> [B]."""
    _check_pair(x, y)
    return (x - y).abs().flatten(1).mean(1)


def l2(x: Tensor, y: Tensor) -> Tensor:
    """d_L2 = mean (x - y)^2 over all non-batch dims. x, y: [B, ...] -> [B]."""
    _check_pair(x, y)
    return (x - y).square().flatten(1).mean(1)


@dataclass
class HybridWeights:
    """λ_L1, λ_L2, λ_LPIPS of the hybrid distance; all must be >= 0."""

    l1: float = 0.0
    l2: float = 1.0
    lpips: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 0:
                raise ValueError(f"HybridWeights.{f.name} = {value}; expected a weight >= 0")


def hybrid(x: Tensor, y: Tensor, weights: HybridWeights, lpips: nn.Module | None = None) -> Tensor:
    """d = λ_L1·d_L1 + λ_L2·d_L2 + λ_LPIPS·d_LPIPS (paper, hybrid distance). x, y: [B, ...] -> [B].

    lpips: a module called as lpips(x, y) -> [B] (e.g. losses.perceptual.LPIPS); needed only when weights.lpips > 0.
    The caller passes images for the LPIPS term (the paper decodes latents before LPIPS).
    """
    _check_pair(x, y)
    for f in fields(weights):  # re-check: a dataclass field may have been mutated after construction
        if getattr(weights, f.name) < 0:
            raise ValueError(f"HybridWeights.{f.name} = {getattr(weights, f.name)}; expected a weight >= 0")
    if weights.lpips > 0 and lpips is None:
        raise ValueError(f"HybridWeights.lpips = {weights.lpips} > 0 but no lpips module was given")
    total = x.new_zeros(x.shape[0])
    if weights.l1 > 0:
        total = total + weights.l1 * l1(x, y)
    if weights.l2 > 0:
        total = total + weights.l2 * l2(x, y)
    if weights.lpips > 0:
        total = total + weights.lpips * lpips(x, y)
    return total
