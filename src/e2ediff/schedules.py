"""VP noise schedules and timestep lists.

A variance-preserving (VP) diffusion with T discrete training steps noises clean data x0 as
    z_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε,   ε ~ N(0, I),   t ∈ {0, …, T−1}        (DDPM, Ho et al. Eq. 4)
Everything here is a pure function of the ᾱ table. Timesteps are discrete training indices as diffusers uses them;
the index −1 stands for "clean data" (ᾱ = 1, diffusers' `set_alpha_to_one=True`), the target of a sampler's last step.

Timestep lists are python lists of ints in descending order, one function per scheduler whose list we reproduce.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine")


def _cosine_betas(T: int, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal (2021) Eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008; β_t = min(1 − ᾱ_{t+1}/ᾱ_t, 0.999)."""
    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float64)


@dataclass(frozen=True, eq=False)
class VPSchedule:
    """A discrete VP schedule: `alphas_cumprod` is ᾱ_t for t = 0..T−1, float64 [T], in (0, 1], non-increasing.

    The table is kept in float64; `alpha_bar` gathers from it and callers cast the result to their dtype.
    """

    alphas_cumprod: Tensor
    _by_device: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        table = self.alphas_cumprod
        if not isinstance(table, Tensor) or table.ndim != 1 or table.numel() == 0:
            raise ValueError("VPSchedule.alphas_cumprod must be a non-empty 1-D tensor [T], "
                             f"got {type(table).__name__} {tuple(getattr(table, 'shape', ()))}")
        table = table.detach().to(device="cpu", dtype=torch.float64).contiguous()
        if not bool(((table > 0) & (table <= 1)).all()):
            raise ValueError("VPSchedule.alphas_cumprod must lie in (0, 1], "
                             f"got min {table.min().item():.3g}, max {table.max().item():.3g}")
        if not bool((table[1:] <= table[:-1]).all()):
            raise ValueError("VPSchedule.alphas_cumprod must be non-increasing in t")
        object.__setattr__(self, "alphas_cumprod", table)

    @classmethod
    def from_name(cls, name: str, T: int = 1000) -> "VPSchedule":
        """"linear" (DDPM / PixArt: β linspace 1e-4..0.02), "scaled_linear" (Stable Diffusion / LCM:
        β = linspace(sqrt(0.00085), sqrt(0.012))²), "cosine" (Nichol & Dhariwal, β capped at 0.999).
        Same tables as diffusers' beta_schedule "linear" / "scaled_linear" / "squaredcos_cap_v2", computed in float64."""
        if T < 1:
            raise ValueError(f"VPSchedule.from_name: T must be >= 1, got {T}")
        if name == "linear":
            betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        elif name == "scaled_linear":
            betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
        elif name == "cosine":
            betas = _cosine_betas(T)
        else:
            raise ValueError(f"unknown noise schedule {name!r}; expected one of {', '.join(SCHEDULE_NAMES)}")
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def T(self) -> int:
        """Number of discrete training timesteps."""
        return self.alphas_cumprod.shape[0]

    def _table(self, device: torch.device) -> Tensor:
        """[1 + T] float64 on `device`: ᾱ for t = −1 (clean, 1.0), 0, …, T−1. Cached per device."""
        key = str(device)
        if key not in self._by_device:
            ones = torch.ones(1, dtype=torch.float64)
            self._by_device[key] = torch.cat([ones, self.alphas_cumprod]).to(device)
        return self._by_device[key]

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        """ᾱ_t, float64, same shape and device as t. t holds (float) training indices, rounded to the nearest int;
        t = −1 gives 1.0 (clean data). Raises ValueError for t outside [−1, T−1]."""
        t = torch.as_tensor(t)
        index = t.detach().to(torch.float64).round().long()
        if index.numel() and (int(index.min()) < -1 or int(index.max()) > self.T - 1):
            raise ValueError(f"timesteps must lie in [-1, {self.T - 1}] (-1 = clean data), "
                             f"got range [{int(index.min())}, {int(index.max())}]")
        return self._table(index.device)[index + 1]

    def alpha_sigma(self, t: Tensor | float, dtype: torch.dtype = torch.float32, ndim: int = 4
                    ) -> tuple[Tensor, Tensor]:
        """(sqrt ᾱ_t, sqrt(1 − ᾱ_t)) in `dtype`, shaped [B, 1, …, 1] (ndim dims) to broadcast against [B, …] data.
        Square roots are taken in float64 before the cast."""
        abar = self.alpha_bar(t).reshape(-1, *([1] * (ndim - 1)))
        return abar.sqrt().to(dtype), (1.0 - abar).sqrt().to(dtype)

    def ve_sigma(self, t: Tensor | float) -> Tensor:
        """The VE noise level of step t, σ_t = sqrt((1 − ᾱ_t)/ᾱ_t), float64, same shape as t (σ = 0 at t = −1).
        A VP latent z_t corresponds to the VE latent z_t / sqrt(ᾱ_t) = x0 + σ_t·ε."""
        abar = self.alpha_bar(t)
        return ((1.0 - abar) / abar).sqrt()

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Forward process z_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·noise. x0, noise: [B, …]; t: [B]. Returns x0's dtype."""
        if noise.shape != x0.shape:
            raise ValueError(f"add_noise: noise has shape {tuple(noise.shape)}, expected x0's {tuple(x0.shape)}")
        a, s = self.alpha_sigma(t.to(x0.device), x0.dtype, x0.ndim)
        return a * x0 + s * noise


def _check_steps(n: int, limit: int, what: str) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1 or n > limit:
        raise ValueError(f"{what}: number of steps must be an int in [1, {limit}], got {n!r}")


def ddim_timesteps(n: int, T: int = 1000, spacing: str = "leading") -> list[int]:
    """DDIM inference timesteps, descending, as diffusers' DDIMScheduler.set_timesteps with steps_offset=0.

    "leading":  (arange(n) · (T // n))[::-1]            e.g. n=4 → [750, 500, 250, 0]
    "trailing": round(arange(T, 0, −T/n)) − 1           e.g. n=4 → [999, 749, 499, 249]
    """
    _check_steps(n, T, "ddim_timesteps")
    if spacing == "leading":
        steps = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64)
    elif spacing == "trailing":
        steps = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    else:
        raise ValueError(f"ddim_timesteps: spacing must be 'leading' or 'trailing', got {spacing!r}")
    return [int(s) for s in steps]


def _lcm_origin(original_steps: int, T: int) -> np.ndarray:
    """The consistency-distillation grid [k−1, 2k−1, …, original_steps·k − 1] with skip k = T // original_steps."""
    _check_steps(original_steps, T, "original_steps")
    k = T // original_steps
    return np.arange(1, original_steps + 1) * k - 1


def lcm_timesteps(n: int, original_steps: int = 50, T: int = 1000) -> list[int]:
    """diffusers LCMScheduler.set_timesteps(n): n indices evenly spaced (floor of linspace, no endpoint) over the
    descending distillation grid. 1 → [999]; 2 → [999, 499]; 4 → [999, 759, 499, 259]."""
    _check_steps(n, original_steps, "lcm_timesteps")
    origin = _lcm_origin(original_steps, T)[::-1]
    index = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return [int(s) for s in origin[index]]


def pixart_lcm_timesteps(n: int, original_steps: int = 50, T: int = 1000) -> list[int]:
    """PixArt-δ's own lcm_scheduler (PixArt-alpha repo, diffusion/lcm_scheduler.py): every (original_steps // n)-th
    grid point from the top, first n. 1 → [999]; 2 → [999, 499]; 4 → [999, 759, 519, 279]."""
    _check_steps(n, original_steps, "pixart_lcm_timesteps")
    origin = _lcm_origin(original_steps, T)
    skip = len(origin) // n
    return [int(s) for s in origin[::-skip][:n]]


def lcm_solver_timesteps(original_steps: int = 50, T: int = 1000) -> list[int]:
    """The skip-k grid consistency distillation trains on, descending: 50 → [999, 979, …, 39, 19] (k = 20)."""
    return [int(s) for s in _lcm_origin(original_steps, T)[::-1]]
