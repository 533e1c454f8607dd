"""Fréchet distance between Gaussian fits of two feature sets, and the kernel distance (KID).

FD (Heusel et al. 2017, "GANs trained by a two time-scale update rule"): fit N(μ, Σ) to each feature set and take
    FD = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½).
With Inception-v3 pool features it is the FID; with the Fashion-MNIST classifier's features it is our FD.

KID (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD² with the cubic polynomial kernel
    k(x, y) = (xᵀy / D + 1)³,
averaged over random subsets, as torchmetrics' KernelInceptionDistance computes it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def _as_float64_matrix(features: Tensor | np.ndarray, name: str) -> np.ndarray:
    """Features [N, D] (torch or numpy) -> numpy float64 [N, D]."""
    if isinstance(features, Tensor):
        features = features.detach().cpu().double().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name} must be a [N, D] feature matrix, got shape {features.shape}")
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{name} contains non-finite values")
    return features


@dataclass
class FeatureStats:
    """Gaussian fit of a feature set.

    mu: float64 [D] mean; sigma: float64 [D, D] unbiased covariance (divided by n − 1, as np.cov and pytorch-fid);
    n: number of samples; extractor: name of the feature extractor that produced them (checked when comparing).
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor: str = ""

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        d = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if self.mu.ndim != 1 or self.sigma.shape != (d, d):
            raise ValueError(f"FeatureStats needs mu [D] and sigma [D, D], got {self.mu.shape} and {self.sigma.shape}")

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz archive to exactly `path` holding mu, sigma, n and extractor (no pickles)."""
        with open(path, "wb") as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), extractor=np.str_(self.extractor))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """Read stats written by save(); a missing or malformed file raises naming the file and the field."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"feature statistics file not found: {path}")
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("mu", "sigma", "n", "extractor") if k not in data.files]
            if missing:
                raise ValueError(f"{path}: missing field(s) {missing}; expected mu, sigma, n, extractor")
            try:
                return cls(mu=data["mu"], sigma=data["sigma"], n=int(data["n"]), extractor=str(data["extractor"]))
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from err


def feature_stats(features: Tensor | np.ndarray, extractor: str = "") -> FeatureStats:
    """Mean and unbiased covariance (float64) of features [N, D], N >= 2."""
    x = _as_float64_matrix(features, "features")
    if x.shape[0] < 2:
        raise ValueError(f"feature_stats needs at least 2 samples, got {x.shape[0]}")
    mu = x.mean(axis=0)
    centered = x - mu
    sigma = centered.T @ centered / (x.shape[0] - 1)
    return FeatureStats(mu=mu, sigma=sigma, n=x.shape[0], extractor=extractor)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    eigval, eigvec = np.linalg.eigh((sigma + sigma.T) / 2)
    return (eigvec * np.sqrt(np.clip(eigval, 0.0, None))) @ eigvec.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((Σ1 Σ2)^½) for symmetric PSD Σ1, Σ2.

    Σ1 Σ2 is similar to the symmetric PSD matrix M = Σ1^½ Σ2 Σ1^½, so the eigenvalues of (Σ1 Σ2)^½ are the square
    roots of M's (real, non-negative) eigenvalues. This holds for singular Σ (n < D) where sqrtm(Σ1 Σ2) is unstable.
    """
    s1 = _psd_sqrt(sigma1)
    m = s1 @ sigma2 @ s1
    eigval = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(eigval, 0.0, None)).sum())


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """FD = ‖μ1 − μ2‖² + Tr(Σ1) + Tr(Σ2) − 2 Tr((Σ1 Σ2)^½), in float64."""
    if a.dim != b.dim:
        raise ValueError(f"feature dimensions differ: {a.dim} vs {b.dim}")
    if a.extractor and b.extractor and a.extractor != b.extractor:
        raise ValueError(f"feature statistics come from different extractors: {a.extractor!r} vs {b.extractor!r}")
    diff = a.mu - b.mu
    fd = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_sqrt_product(a.sigma, b.sigma)
    return float(max(fd, 0.0))  # exact arithmetic gives FD >= 0; clip round-off of identical sets


def polynomial_kernel(x: Tensor, y: Tensor, degree: int = 3, coef: float = 1.0) -> Tensor:
    """k(x, y) = (xᵀy / D + coef)^degree for rows of x [N, D] and y [M, D] -> [N, M]."""
    return (x @ y.T / x.shape[1] + coef) ** degree


def mmd2_unbiased(x: Tensor, y: Tensor, degree: int = 3, coef: float = 1.0) -> Tensor:
    """Unbiased MMD² of two equal-size samples x, y [m, D] with the polynomial kernel (Bińkowski et al. Eq. 3):
    1/(m(m−1)) Σ_{i≠j} [k(x_i,x_j) + k(y_i,y_j)] − 2/m² Σ_{i,j} k(x_i,y_j)."""
    m = x.shape[0]
    k_xx = polynomial_kernel(x, x, degree, coef)
    k_yy = polynomial_kernel(y, y, degree, coef)
    k_xy = polynomial_kernel(x, y, degree, coef)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2.0 * k_xy.sum() / m**2


def kid(feat_a: Tensor | np.ndarray, feat_b: Tensor | np.ndarray, *, subsets: int = 100, subset_size: int = 1000,
        degree: int = 3, coef: float = 1.0, generator: torch.Generator) -> tuple[float, float]:
    """Kernel distance: mean and (population) std of the unbiased MMD² over `subsets` random subsets.

    feat_a [N_a, D], feat_b [N_b, D]; each subset draws `subset_size` rows of each set without replacement
    (torch.randperm with `generator`: first a's permutation, then b's, per subset, as torchmetrics does).
    Computed in float64. subset_size must not exceed N_a or N_b.
    """
    a = torch.from_numpy(_as_float64_matrix(feat_a, "feat_a"))
    b = torch.from_numpy(_as_float64_matrix(feat_b, "feat_b"))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: feat_a has {a.shape[1]}, feat_b has {b.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if not 2 <= subset_size <= min(a.shape[0], b.shape[0]):
        raise ValueError(f"subset_size must be in [2, min(N_a, N_b) = {min(a.shape[0], b.shape[0])}], "
                         f"got {subset_size}")
    values = []
    for _ in range(subsets):
        ia = torch.randperm(a.shape[0], generator=generator)[:subset_size]
        ib = torch.randperm(b.shape[0], generator=generator)[:subset_size]
        values.append(mmd2_unbiased(a[ia], b[ib], degree, coef))
    values = torch.stack(values)
    return float(values.mean()), float(values.std(correction=0))
