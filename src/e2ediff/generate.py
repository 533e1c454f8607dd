"""Sampling many images from a pipeline file: prompts, noise, the sampler, decoding, grids and ``samples.npz``.

All noise (the initial latents and, for LCM, the re-noise of every step) is drawn up front from one generator seeded
by ``seed`` on the CPU, so a sample depends only on (seed, its index), not on the batch size or the device.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from e2ediff.conditioning import TextCond


@dataclass
class SamplerSpec:
    name: str = "ddim"                       # ddim | lcm
    steps: int = 32                          # DDIM steps, or LCM steps when timesteps is None
    guidance: float = 1.0                    # classifier-free guidance scale (DDIM); LCM students embed w instead
    guidance_interval: tuple[float, float] | None = None   # DDIM: guidance only at timesteps lo <= t <= hi
    timesteps: tuple[int, ...] | None = None # explicit list (LCM default: diffusers' schedule for `steps`)
    renoise: str = "vp"                      # LCM re-noise form: vp | ve
    gamma: float = 1.0                       # LCM, vp: the fresh noise's share of each re-noise (0: deterministic)
    w: float | None = None                   # guidance-scale embedding input of an LCM student
    timestep_scaling: float = 10.0           # LCM boundary terms c_skip, c_out: the value the student was distilled with

    @staticmethod
    def from_meta(meta: dict) -> "SamplerSpec":
        s = dict(meta.get("sampler", {}))
        if "timesteps" in s and s["timesteps"] is not None:
            s["timesteps"] = tuple(s["timesteps"])
        if s.get("guidance_interval") is not None:
            s["guidance_interval"] = tuple(s["guidance_interval"])
        return SamplerSpec(**s)

    def with_steps(self, steps: int) -> "SamplerSpec":
        """The same sampler at another step count, with the schedule's timesteps for it."""
        return replace(self, steps=steps, timesteps=None)

    def resolved_timesteps(self) -> list[int]:
        from e2ediff.schedules import ddim_timesteps, lcm_timesteps

        if self.timesteps is not None:
            return list(self.timesteps)
        # DDIM: trailing spacing, so the first step starts at t = T − 1 from pure noise (Lin et al. 2024)
        return ddim_timesteps(self.steps, spacing="trailing") if self.name == "ddim" else lcm_timesteps(self.steps)

    @property
    def nfe(self) -> int:
        n = len(self.resolved_timesteps())
        return 2 * n if self.name == "ddim" and self.guidance != 1.0 else n


def balanced_labels(n: int, num_classes: int = 10) -> np.ndarray:
    """0, 0, …, 1, 1, … : n labels balanced over the classes (class-major, so grids read a row per class)."""
    return np.sort(np.arange(n) % num_classes)


def text_features(prompts: list[str], known_captions: list[str] | None = None,
                  prompt_cache: str | Path | None = None) -> TextCond:
    """Caption features of ``prompts``: looked up in the cache of ``known_captions`` (no text model needed, as on the
    GPU machine) when every prompt is in it, else encoded with MiniLM."""
    from e2ediff.assets import load_prompt_cache
    from e2ediff.models.text import PromptCache

    unique = list(dict.fromkeys(prompts))
    if prompt_cache is not None and Path(prompt_cache).exists():
        cache = PromptCache.load(Path(prompt_cache))
        if all(p in cache.captions for p in unique):
            return cache.cond(torch.tensor([cache.index_of(p) for p in prompts]))
    if known_captions is not None and all(p in known_captions for p in unique):
        cache = load_prompt_cache(known_captions, prompt_cache)
        return cache.cond(torch.tensor([cache.index_of(p) for p in prompts]))
    cache = PromptCache.build(unique)
    return cache.cond(torch.tensor([unique.index(p) for p in prompts]))


def sample_latents(pipe, cond: TextCond, spec: SamplerSpec, noise: torch.Tensor,
                   step_noises: list[torch.Tensor] | None = None) -> torch.Tensor:
    """One batch: run the sampler from ``noise`` (gradients follow the caller's grad mode)."""
    from e2ediff.samplers import ddim, lcm

    timesteps = spec.resolved_timesteps()
    if spec.name == "ddim":
        return ddim(pipe.denoiser, noise, timesteps, cond, guidance=spec.guidance,
                    guidance_interval=spec.guidance_interval)
    if spec.name == "lcm":
        w = None
        if spec.w is not None:
            w = torch.full((len(noise),), float(spec.w), device=noise.device)
        return lcm(pipe.denoiser, noise, timesteps, cond, renoise=spec.renoise, noises=step_noises, w=w,
                   timestep_scaling=spec.timestep_scaling, gamma=spec.gamma)
    raise ValueError(f"sampler {spec.name!r} is not ddim or lcm")


def sample_noises(pipe, n: int, renoise_draws: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The noises `generate` draws for n samples at `seed`: z_T [n, C, H, W], then `renoise_draws` re-noise draws of
    the same shape (an LCM sampler's K − 1), in that order from one CPU generator."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, pipe.net.config.in_channels, pipe.net.config.input_size, pipe.net.config.input_size)
    noise = torch.randn(shape, generator=g)
    return noise, [torch.randn(shape, generator=g) for _ in range(renoise_draws)]


@torch.no_grad()
def generate(pipe, cond: TextCond, spec: SamplerSpec, seed: int = 0, batch_size: int = 500,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Images [N, C, 32, 32] in [-1, 1] for the N captions of ``cond``."""
    n = len(cond)
    k = len(spec.resolved_timesteps())
    noise, step_noises = sample_noises(pipe, n, k - 1 if spec.name == "lcm" else 0, seed)
    step_noises = step_noises if spec.name == "lcm" else None
    out = []
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        c = cond[sl].to(device)
        z = sample_latents(pipe, c, spec, noise[sl].to(device),
                           None if step_noises is None else [e[sl].to(device) for e in step_noises])
        out.append(pipe.autoencoder.decode_latents(z).clamp(-1, 1).cpu())
    return torch.cat(out)


def save_grid(images_uint8: np.ndarray, rows: int, path: Path, scale: int = 2) -> None:
    """A PNG grid: ``rows`` rows of equal length (images in row-major order), black 2-px gutters."""
    from PIL import Image

    n, h, w = images_uint8.shape
    cols = -(-n // rows)
    pad = 2
    canvas = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images_uint8[i]
    img = Image.fromarray(canvas, mode="L")
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def save_samples_npz(path: Path, images_uint8: np.ndarray, labels: np.ndarray | None, prompts: list[str]) -> None:
    """The interchange format: images uint8 [N, 28, 28], labels int64 [N] (-1 when unknown), prompts str [N]."""
    from e2ediff.checkpoint import atomic_write_npz

    labels = np.full(len(images_uint8), -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    atomic_write_npz(Path(path), compressed=True, images=images_uint8.astype(np.uint8), labels=labels,
                     prompts=np.array(prompts, dtype=str))
