"""Stateless, differentiable samplers over an explicit descending timestep list.

Every sampler has the signature `sampler(denoiser, noise, timesteps, cond, *, generator=None, ...) -> sample`, where
`denoiser` keeps the Denoiser contract (`denoiser(z_t, t [B], cond, w=None) -> x0`, plus `.schedule`, and `.predict`
for DDIM). Nothing here disables autograd except the explicit truncation `grad_from_step`: the caller decides whether
gradients flow (wrap in torch.no_grad() for plain sampling; call directly to backpropagate through the chain, as
E2EDiff Algorithm 1 does). All randomness comes from an explicit generator or explicit per-step noises.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from e2ediff.conditioning import TextCond
from e2ediff.denoiser import broadcast_like, consistency_fn, guided, lcm_boundary

# step_fn(z, t, t_prev, noise) -> next z. t, t_prev: float tensors [B] (t_prev = −1 on the last step: clean data);
# noise: the step's fresh noise [B, ...] or None.
StepFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]

# unroll's `checkpoint`: False (store every step's activations), True (recompute every step in backward),
# "except_last" (recompute every step but the last).
CHECKPOINT_POLICIES = (False, True, "except_last")


def check_timesteps(timesteps: Sequence[int], T: int) -> list[int]:
    """The list as python ints; ValueError unless it is non-empty, strictly descending and inside [0, T)."""
    steps = [int(t) for t in timesteps]
    if not steps:
        raise ValueError("timesteps must be a non-empty list of ints")
    if any(b >= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {steps}")
    if steps[0] > T - 1 or steps[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {T - 1}], got {steps}")
    return steps


def draw_noises(like: Tensor, count: int, generator: torch.Generator | None,
                noises: Sequence[Tensor] | None, what: str) -> list[Tensor]:
    """`count` standard-normal tensors shaped like `like`: the given `noises`, or drawn in order from `generator`
    (on the generator's device, then moved, as diffusers' randn_tensor does)."""
    if noises is not None:
        if generator is not None:
            raise ValueError(f"{what}: pass either `noises` or `generator`, not both")
        if len(noises) != count:
            raise ValueError(f"{what}: `noises` must hold {count} tensors (one per re-noised step), got {len(noises)}")
        for i, n in enumerate(noises):
            if n.shape != like.shape:
                raise ValueError(f"{what}: noises[{i}] has shape {tuple(n.shape)}, expected {tuple(like.shape)}")
        return [n.to(device=like.device, dtype=like.dtype) for n in noises]
    if count == 0:
        return []
    if generator is None:
        raise ValueError(f"{what}: {count} fresh noise draws are needed; pass `generator` (torch.Generator) "
                         "or `noises`")
    return [torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)
            for _ in range(count)]


def vp_renoise(schedule, z: Tensor, x0: Tensor, t: Tensor, t_next: Tensor, eps: Tensor, gamma: float = 1.0) -> Tensor:
    """z_{t_next} = sqrt(ᾱ_{t_next})·x0 + sqrt(1 − ᾱ_{t_next})·ε from the state z at t and its prediction x0 (the LCM
    sampler's VP re-noise). gamma < 1 mixes in the noise the prediction implies, ε̂ = (z − sqrt(ᾱ_t)·x0) / sqrt(1 − ᾱ_t):
    ε = gamma·eps + sqrt(1 − gamma²)·ε̂ (gamma = 0: ε̂ alone, eps unused)."""
    if gamma != 1.0:
        a_t, s_t = schedule.alpha_sigma(t, z.dtype, z.ndim)
        implied = (z - a_t * x0) / s_t                       # the noise of z that the prediction implies
        eps = implied if gamma == 0.0 else gamma * eps + math.sqrt(1.0 - gamma * gamma) * implied
    a, s = schedule.alpha_sigma(t_next, z.dtype, z.ndim)
    return a * x0 + s * eps


def unroll(step_fn: StepFn, z: Tensor, timesteps: Sequence[int], *, noises: Sequence[Tensor | None] | None = None,
           checkpoint: bool | str = False, grad_from_step: int = 0) -> Tensor:
    """Run z through step_fn for each t_i of `timesteps` and return the final z.

    Step i gets (z, t_i, t_{i+1}, noises[i]) with t_K = −1. checkpoint=True recomputes each step in backward
    (torch.utils.checkpoint, use_reentrant=False) instead of storing its activations. Everything the step depends on
    that changes across steps (timesteps, noise) is passed as an argument: a step_fn reading the loop variable from an
    enclosing scope would be recomputed with the last step's value and give silently wrong gradients.
    checkpoint="except_last" checkpoints every step but the last: backward starts with the last step, so keeping its
    activations raises the peak by nothing unless the loss after the sampler is itself large (a VAE decode for LPIPS
    holds its activations beside them), and it saves one step's recomputation (K = 4: 15 forward-equivalents of work
    instead of 16). Gradients are the same under every policy.
    grad_from_step=k runs steps 0..k−1 under no_grad and detaches their output (truncated backprop through the
    last K−k steps, DRaFT-K / AlignProp).
    """
    K = len(timesteps)
    if not any(checkpoint is p or (isinstance(p, str) and checkpoint == p) for p in CHECKPOINT_POLICIES):
        raise ValueError(f"unroll: checkpoint must be one of {CHECKPOINT_POLICIES}, got {checkpoint!r}")
    if not 0 <= grad_from_step < K:
        raise ValueError(f"grad_from_step must be in [0, {K - 1}] for {K} steps, got {grad_from_step}")
    noises = [None] * K if noises is None else list(noises)
    if len(noises) != K:
        raise ValueError(f"unroll: noises must hold one entry (tensor or None) per step ({K}), got {len(noises)}")
    t_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    ts = [float(t) for t in timesteps] + [-1.0]
    for i in range(K):
        t = torch.full((z.shape[0],), ts[i], dtype=t_dtype, device=z.device)
        t_prev = torch.full((z.shape[0],), ts[i + 1], dtype=t_dtype, device=z.device)
        if i < grad_from_step:
            with torch.no_grad():
                z = step_fn(z, t, t_prev, noises[i]).detach()
        elif checkpoint is True or (checkpoint == "except_last" and i < K - 1):
            z = torch.utils.checkpoint.checkpoint(step_fn, z, t, t_prev, noises[i], use_reentrant=False)
        else:
            z = step_fn(z, t, t_prev, noises[i])
    return z


def ddim(denoiser: nn.Module, noise: Tensor, timesteps: Sequence[int], cond: TextCond, *,
         guidance: float | Tensor = 1.0, guidance_interval: tuple[float, float] | None = None,
         eta: float = 0.0, generator: torch.Generator | None = None, w: Tensor | None = None) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12) from z_{t_0} = noise [B, ...] along descending `timesteps`; the last step goes
    to ᾱ = 1, so the result is that step's x0 prediction. eta = 0: deterministic; eta = 1: DDPM-like ancestral
    noise σ_t(η) of Eq. 16, drawn from `generator` (K − 1 draws shaped like noise, in step order).
    guidance != 1 applies classifier-free guidance (e2ediff.denoiser.guided); a tensor gives each sample its own scale
    [B]; guidance_interval = (lo, hi) applies it only at timesteps lo ≤ t ≤ hi (Kynkäänniemi et al. 2024).
    Returns [B, ...]."""
    schedule = denoiser.schedule
    steps = check_timesteps(timesteps, schedule.T)
    if eta < 0:
        raise ValueError(f"ddim: eta must be >= 0, got {eta}")
    model = guided(denoiser, guidance, guidance_interval)
    count = len(steps) - 1 if eta > 0 else 0
    noises = draw_noises(noise, count, generator, None, "ddim") + [None] * (len(steps) - count)

    def step(z: Tensor, t: Tensor, t_prev: Tensor, eps_new: Tensor | None) -> Tensor:
        x0, eps = model.predict(z, t, cond, w)
        abar, abar_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
        # Eq. 16: σ_t(η) = η·sqrt((1 − ᾱ_prev)/(1 − ᾱ_t))·sqrt(1 − ᾱ_t/ᾱ_prev)
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).clamp_min(0).sqrt()
        direction = (1 - abar_prev - sigma ** 2).clamp_min(0).sqrt()
        # Eq. 12: z_prev = sqrt(ᾱ_prev)·x0 + sqrt(1 − ᾱ_prev − σ²)·ε_θ + σ·ε
        z = broadcast_like(abar_prev.sqrt(), z) * x0 + broadcast_like(direction, z) * eps
        if eps_new is not None:
            z = z + broadcast_like(sigma, z) * eps_new
        return z

    return unroll(step, noise, steps, noises=noises)


def lcm(denoiser: nn.Module, noise: Tensor, timesteps: Sequence[int], cond: TextCond, *, renoise: str = "vp",
        generator: torch.Generator | None = None, noises: Sequence[Tensor] | None = None, w: Tensor | None = None,
        boundary: bool = True, checkpoint: bool | str = False, grad_from_step: int = 0, timestep_scaling: float = 10.0,
        gamma: float = 1.0) -> Tensor:
    """LCM multistep sampling (E2EDiff Algorithm 1; diffusers LCMScheduler) from noise [B, ...]; returns the last
    step's `denoised` [B, ...].

    For each t_i (boundary=False uses denoised = x0):
        x0       = D(z, t_i)
        denoised = c_skip(t_i)·z + c_out(t_i)·x0           (lcm_boundary; timestep_scaling: the scheduler's, LCM 10)
        if not the last step, re-noise to t_{i+1} with fresh ε_i:
          "vp": z = sqrt(ᾱ_{t_{i+1}})·denoised + sqrt(1 − ᾱ_{t_{i+1}})·ε_i        (diffusers LCMScheduler.step)
                gamma < 1 mixes in the noise the step implies, ε̂ = (z − sqrt(ᾱ_{t_i})·denoised) / sqrt(1 − ᾱ_{t_i}):
                ε_i ← gamma·ε_i + sqrt(1 − gamma²)·ε̂ (DDIM's generalised step with σ = gamma·sqrt(1 − ᾱ_{t_{i+1}});
                gamma = 0 is deterministic, η = 0: the sample is a function of the first noise alone, so the
                teacher's ODE endpoint of it is a target the student can reach, and the draws are not used)
          "ve": the consistency-model form of Algorithm 1, z ← z + sqrt(τ² − σ_min²)·ε with σ_min = 0.
                The state is the VE latent y = z_t / sqrt(ᾱ_t) = x0 + σ_t·ε, σ_t = sqrt((1 − ᾱ_t)/ᾱ_t)
                (schedule.ve_sigma). Start y = noise / sqrt(ᾱ_{t_0}) (the same first model input as "vp");
                each step: x0 = D(sqrt(ᾱ_{t_i})·y, t_i); denoised = c_skip·y + c_out·x0;
                y = denoised + σ_{t_{i+1}}·ε_i.
                With boundary=False it equals "vp" exactly (y·sqrt(ᾱ) is then the VP latent); with the boundary
                the skip term acts on y instead of z; c_skip(t) = 0.25/((10t)² + 0.25) < 1e-5 for t ≥ 16, so the
                two differ visibly only on steps near t = 0.
    noises: the K − 1 fresh noises in step order; else drawn from `generator` in that order (the same stream
    diffusers' LCMScheduler.step draws). checkpoint / grad_from_step: see `unroll`.
    """
    schedule = denoiser.schedule
    steps = check_timesteps(timesteps, schedule.T)
    if renoise not in ("vp", "ve"):
        raise ValueError(f"lcm: renoise must be 'vp' or 've', got {renoise!r}")
    if not 0.0 <= gamma <= 1.0 or (gamma != 1.0 and renoise != "vp"):
        raise ValueError(f"lcm: gamma (the fresh noise's share of the re-noise) must be in [0, 1], and 1 unless "
                         f"renoise='vp'; got gamma={gamma!r} with renoise={renoise!r}")
    step_noises = draw_noises(noise, len(steps) - 1, generator, noises, "lcm") + [None]

    def vp_step(z: Tensor, t: Tensor, t_prev: Tensor, eps: Tensor | None) -> Tensor:
        denoised = (consistency_fn(denoiser, z, t, cond, w, timestep_scaling=timestep_scaling) if boundary
                    else denoiser(z, t, cond, w=w))
        if eps is None:
            return denoised
        return vp_renoise(schedule, z, denoised, t, t_prev, eps, gamma)   # sqrt(ᾱ)·denoised + sqrt(1 − ᾱ)·ε

    def ve_step(y: Tensor, t: Tensor, t_prev: Tensor, eps: Tensor | None) -> Tensor:
        a, _ = schedule.alpha_sigma(t, y.dtype, y.ndim)
        denoised = denoiser(a * y, t, cond, w=w)             # the VP model sees z_t = sqrt(ᾱ_t)·y
        if boundary:
            c_skip, c_out = lcm_boundary(t, timestep_scaling)
            denoised = broadcast_like(c_skip, y) * y + broadcast_like(c_out, y) * denoised
        if eps is None:
            return denoised
        return denoised + broadcast_like(schedule.ve_sigma(t_prev), y) * eps   # y = denoised + σ_prev·ε

    if renoise == "vp":
        return unroll(vp_step, noise, steps, noises=step_noises, checkpoint=checkpoint,
                      grad_from_step=grad_from_step)
    a0, _ = schedule.alpha_sigma(torch.tensor(float(steps[0])), noise.dtype, noise.ndim)
    return unroll(ve_step, noise / a0.to(noise.device), steps, noises=step_noises, checkpoint=checkpoint,
                  grad_from_step=grad_from_step)
