"""The one denoiser contract: D(z_t, t, cond, w) → x0 prediction.

A network predicts ε, v or x0 (its parameterization); `Denoiser` converts that to x0 so samplers and trainers never
see the parameterization. With a = sqrt(ᾱ_t), s = sqrt(1 − ᾱ_t) and z = a·x0 + s·ε:
    x0 = (z − s·ε)/a,   ε = (z − a·x0)/s,   v = a·ε − s·x0,   x0 = a·z − s·v,   ε = s·z + a·v
(v-parameterization: Salimans & Ho 2022, §4). Also here: the LCM boundary terms (c_skip, c_out) and
classifier-free guidance as a wrapper with the same contract.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from e2ediff.conditioning import TextCond
from e2ediff.schedules import VPSchedule

PREDICTIONS = ("eps", "v", "x0")


# Exact conversions. z, eps, x0, v: [B, ...]; a, s broadcastable ([B, 1, ..., 1]).
def eps_to_x0(z: Tensor, eps: Tensor, a: Tensor, s: Tensor) -> Tensor:
    return (z - s * eps) / a


def x0_to_eps(z: Tensor, x0: Tensor, a: Tensor, s: Tensor) -> Tensor:
    return (z - a * x0) / s


def v_to_x0(z: Tensor, v: Tensor, a: Tensor, s: Tensor) -> Tensor:
    return a * z - s * v


def v_to_eps(z: Tensor, v: Tensor, a: Tensor, s: Tensor) -> Tensor:
    return s * z + a * v


def x0_eps_to_v(x0: Tensor, eps: Tensor, a: Tensor, s: Tensor) -> Tensor:
    return a * eps - s * x0


def timestep_batch(t: Tensor | float, z: Tensor) -> Tensor:
    """t as a float tensor [B] on z's device: a number or 0-dim tensor is broadcast to the batch. float32, or
    float64 when z is float64 (never a half type: bf16 cannot hold 999)."""
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    t = torch.as_tensor(t, device=z.device).to(dtype)
    if t.ndim == 0:
        return t.expand(z.shape[0])
    if t.shape != (z.shape[0],):
        raise ValueError(f"timestep t has shape {tuple(t.shape)}, expected [] or [{z.shape[0]}] (the batch of z_t)")
    return t


class Denoiser(nn.Module):
    """net + schedule + parameterization → x0 prediction.

    net: `net(z_t [B, ...], t [B] float, cond: TextCond, w=None [B] | None) -> [B, ...]`, predicting `prediction`
    ("eps", "v" or "x0"). Conversions run in z_t's dtype with ᾱ gathered from the schedule's float64 table.
    """

    def __init__(self, net: nn.Module, schedule: VPSchedule, prediction: str = "eps") -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"Denoiser prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction

    def predict(self, z_t: Tensor, t: Tensor | float, cond: TextCond, w: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """(x0, eps) predictions, each shaped like z_t [B, ...]."""
        t = timestep_batch(t, z_t)
        out = self.net(z_t, t, cond, w=w)
        if out.shape != z_t.shape:
            raise ValueError(f"network output has shape {tuple(out.shape)}, expected z_t's {tuple(z_t.shape)} "
                             "(split learned-sigma channels in the adapter)")
        a, s = self.schedule.alpha_sigma(t, z_t.dtype, z_t.ndim)
        if self.prediction == "eps":
            return eps_to_x0(z_t, out, a, s), out
        if self.prediction == "v":
            return v_to_x0(z_t, out, a, s), v_to_eps(z_t, out, a, s)
        return out, x0_to_eps(z_t, out, a, s)

    def forward(self, z_t: Tensor, t: Tensor | float, cond: TextCond, w: Tensor | None = None) -> Tensor:
        """D(z_t, t, cond, w) = x0 prediction [B, ...]."""
        return self.predict(z_t, t, cond, w)[0]

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network regresses onto for z_t = add_noise(x0, noise, t) (DDPM Eq. 14 for eps): eps → noise,
        v → a·noise − s·x0, x0 → x0."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a, s = self.schedule.alpha_sigma(timestep_batch(t, x0), x0.dtype, x0.ndim)
        return x0_eps_to_v(x0, noise, a, s)


def lcm_boundary(t: Tensor | float, timestep_scaling: float = 10.0, sigma_data: float = 0.5
                 ) -> tuple[Tensor, Tensor]:
    """LCM boundary-condition scalings (diffusers LCMScheduler.get_scalings_for_boundary_condition_discrete), float64,
    shaped like t:  c_skip = σd² / ((t·s)² + σd²),  c_out = t·s / sqrt((t·s)² + σd²),  s = timestep_scaling.
    At t = 0: c_skip = 1, c_out = 0, so f(z, 0) = z (the consistency boundary condition)."""
    ts = torch.as_tensor(t).to(torch.float64) * timestep_scaling
    denom = ts ** 2 + sigma_data ** 2
    return sigma_data ** 2 / denom, ts / denom.sqrt()


def broadcast_like(c: Tensor, like: Tensor) -> Tensor:
    """[B] (or []) float64 → [B, 1, ..., 1] in like's dtype and device."""
    return c.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def consistency_fn(denoiser: nn.Module, z_t: Tensor, t: Tensor | float, cond: TextCond, w: Tensor | None = None,
                   *, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> Tensor:
    """The consistency model's output f_θ(z_t, t) = c_skip(t)·z_t + c_out(t)·D(z_t, t) (LCM Eq. 9). [B, ...]."""
    t = timestep_batch(t, z_t)
    c_skip, c_out = lcm_boundary(t, timestep_scaling, sigma_data)
    return broadcast_like(c_skip, z_t) * z_t + broadcast_like(c_out, z_t) * denoiser(z_t, t, cond, w=w)


class GuidedDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022) with the Denoiser contract:
    eps = eps_u + scale·(eps_c − eps_u), x0 = (z − s·eps)/a. Conditional and unconditional (cond.with_drop(True))
    branches run as one batch of 2B.
    interval = (lo, hi): guidance only at timesteps lo ≤ t ≤ hi, the conditional prediction (scale 1) elsewhere —
    Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves sample and distribution quality":
    guidance at high noise is what narrows the distribution."""

    def __init__(self, denoiser: nn.Module, scale: float | Tensor, interval: tuple[float, float] | None = None
                 ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.scale = scale if isinstance(scale, Tensor) else float(scale)   # a tensor: one scale per sample [B]
        self.interval = check_guidance_interval(interval)

    @property
    def schedule(self) -> VPSchedule:
        return self.denoiser.schedule

    def predict(self, z_t: Tensor, t: Tensor | float, cond: TextCond, w: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        t = timestep_batch(t, z_t)
        both = TextCond.cat([cond, cond.with_drop(True)])
        w2 = None if w is None else torch.cat([w, w])
        _, eps = self.denoiser.predict(torch.cat([z_t, z_t]), torch.cat([t, t]), both, w2)
        eps_c, eps_u = eps.chunk(2)
        scale = broadcast_like(self.scale.to(eps), eps) if isinstance(self.scale, Tensor) else self.scale
        if self.interval is not None:
            lo, hi = self.interval
            inside = broadcast_like(((t >= lo) & (t <= hi)).to(eps.dtype), eps)
            scale = 1 + inside * (scale - 1)
        eps = eps_u + scale * (eps_c - eps_u)
        a, s = self.schedule.alpha_sigma(t, z_t.dtype, z_t.ndim)
        return eps_to_x0(z_t, eps, a, s), eps

    def forward(self, z_t: Tensor, t: Tensor | float, cond: TextCond, w: Tensor | None = None) -> Tensor:
        return self.predict(z_t, t, cond, w)[0]


def check_guidance_interval(interval, name: str = "guidance_interval") -> tuple[float, float] | None:
    """None, or (lo, hi) with 0 ≤ lo ≤ hi: the timesteps at which guidance applies."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two timesteps [lo, hi], got {interval!r}") from None
    if not 0 <= lo <= hi:
        raise ValueError(f"{name} must satisfy 0 <= lo <= hi, got [{lo:g}, {hi:g}]")
    return lo, hi


def guided(denoiser: nn.Module, scale: float | Tensor, interval: tuple[float, float] | None = None) -> nn.Module:
    """Denoiser with classifier-free guidance at `scale` (a float, or one scale per sample [B]), applied only at
    timesteps in `interval` = (lo, hi) when given; a float scale of 1 returns `denoiser` itself (no extra batch)."""
    if not isinstance(scale, Tensor) and float(scale) == 1.0:
        return denoiser
    return GuidedDenoiser(denoiser, scale, interval)
