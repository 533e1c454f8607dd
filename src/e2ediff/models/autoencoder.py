"""A small KL autoencoder between images [B, 1, 32, 32] in [-1, 1] and latents [B, 4, 8, 8].

Stable Diffusion's AutoencoderKL (Rombach et al. 2022, arXiv 2112.10752, Sec. 3 and App. G), scaled down: GroupNorm +
SiLU residual blocks, strided-conv downsampling, nearest + conv upsampling, a diagonal Gaussian posterior with a tiny
KL penalty toward N(0, I). The diffusion model works on latents multiplied by ``scaling_factor`` = 1 / std(latents),
computed once on training data as SD's 0.18215 was. No attention block and no quant convs: at 8×8 they buy little.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AutoencoderConfig:
    in_channels: int = 1                       # image channels
    image_size: int = 32                       # image height = width
    latent_channels: int = 4
    channels: tuple[int, ...] = (32, 64, 128)  # per resolution level; len(channels) - 1 downsamplings by 2
    num_res_blocks: int = 1                    # residual blocks per level (encoder and decoder)
    norm_groups: int = 8                       # GroupNorm groups; must divide every entry of channels
    kl_weight: float = 1e-6                    # weight of KL / pixels in the loss (SD: 1e-6)

    def validate(self) -> None:
        """Raise ValueError naming the first impossible field."""
        for name in ("in_channels", "image_size", "latent_channels", "num_res_blocks", "norm_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AutoencoderConfig.{name} = {value!r}, expected a positive integer")
        if len(self.channels) < 1 or any(not isinstance(c, int) or c < 1 for c in self.channels):
            raise ValueError(f"AutoencoderConfig.channels = {self.channels!r}, expected a non-empty tuple of "
                             "positive integers")
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"AutoencoderConfig.channels = {tuple(self.channels)} has entries {bad} not divisible "
                             f"by norm_groups = {self.norm_groups}")
        if self.image_size % self.downsample_factor:
            raise ValueError(f"AutoencoderConfig.image_size = {self.image_size} is not divisible by the "
                             f"downsampling factor {self.downsample_factor} (2 ** (len(channels) - 1))")
        if not (self.kl_weight >= 0 and math.isfinite(self.kl_weight)):
            raise ValueError(f"AutoencoderConfig.kl_weight = {self.kl_weight}, expected a finite value >= 0")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample_factor

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "AutoencoderConfig":
        """A copy of ``PRESETS[name]`` with fields replaced by ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"unknown autoencoder preset {name!r}, expected one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, AutoencoderConfig] = {
    "tiny": AutoencoderConfig(channels=(16, 32, 64), num_res_blocks=1),   # 0.40M parameters: CPU
    "base": AutoencoderConfig(channels=(32, 64, 128), num_res_blocks=2),  # 2.37M parameters: one GPU
    # fashion-scenes: 64 × 64 × 1 -> 16 × 16 × 4
    "scenes": AutoencoderConfig(image_size=64, channels=(32, 64, 128), num_res_blocks=1),
}


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, diag(exp(logvar))); mean, logvar [B, C, H, W]; logvar clamped to [-30, 20] (SD)."""

    def __init__(self, mean: Tensor, logvar: Tensor):
        if mean.shape != logvar.shape:
            raise ValueError(f"DiagonalGaussian mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} differ")
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None) -> Tensor:
        """z = mean + std·ε, ε ~ N(0, I) drawn from ``generator`` (reparameterised: differentiable)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²) over all non-batch dims -> [B]."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Layers


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1 when the width changes) skip."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level_blocks(in_ch: int, out_ch: int, n: int, groups: int) -> list[nn.Module]:
    return [ResBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n)]


class Encoder(nn.Module):
    """[B, in, S, S] -> [B, 2·latent, S/f, S/f] (mean and logvar)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, groups = cfg.channels, cfg.norm_groups
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)]
        prev = ch[0]
        for level, width in enumerate(ch):
            layers += _level_blocks(prev, width, cfg.num_res_blocks, groups)
            prev = width
            if level < len(ch) - 1:
                layers.append(Downsample(width))
        layers += [ResBlock(prev, prev, groups), nn.GroupNorm(groups, prev, eps=1e-6), nn.SiLU(),
                   nn.Conv2d(prev, 2 * cfg.latent_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    """[B, latent, S/f, S/f] -> [B, in, S, S]."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, groups = cfg.channels, cfg.norm_groups
        prev = ch[-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, prev, 3, padding=1), ResBlock(prev, prev, groups)]
        for level in reversed(range(len(ch))):
            layers += _level_blocks(prev, ch[level], cfg.num_res_blocks, groups)
            prev = ch[level]
            if level > 0:
                layers.append(Upsample(prev))
        layers += [nn.GroupNorm(groups, prev, eps=1e-6), nn.SiLU(), nn.Conv2d(prev, cfg.in_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(z)


# ----------------------------------------------------------------------------------------------------------------------
# The autoencoder


class AutoencoderKL(nn.Module):
    """KL autoencoder. ``encode``/``decode`` work on unscaled latents; ``encode_latents``/``decode_latents`` on
    latents multiplied by the ``scaling_factor`` buffer (what the diffusion model sees).

    ``generator`` seeds every initial weight, so two autoencoders built with equally seeded generators are identical.
    """

    def __init__(self, config: AutoencoderConfig, generator: torch.Generator | None = None):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.register_buffer("scaling_factor", torch.tensor(1.0))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PyTorch's default conv init (kaiming-uniform, a=√5), drawn from ``generator``; zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _check_shape(x: Tensor, expected: tuple[int, int, int], what: str) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"autoencoder {what} have shape {tuple(x.shape)}, expected [B, "
                             f"{', '.join(map(str, expected))}]")

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Images [B, in, S, S] in [-1, 1] -> posterior over unscaled latents [B, latent, S/f, S/f]."""
        cfg = self.config
        self._check_shape(x, (cfg.in_channels, cfg.image_size, cfg.image_size), "images")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents [B, latent, S/f, S/f] -> images [B, in, S, S]."""
        cfg = self.config
        self._check_shape(z, (cfg.latent_channels, cfg.latent_size, cfg.latent_size), "latents")
        return self.decoder(z)

    def encode_latents(self, x: Tensor, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """Images -> scaled latents scaling_factor·z, z = posterior mode (or a sample from ``generator``)."""
        posterior = self.encode(x)
        if sample and generator is None:
            raise ValueError("encode_latents(sample=True) needs an explicit torch.Generator")
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scaling_factor

    def decode_latents(self, z_scaled: Tensor) -> Tensor:
        """Scaled latents (what the diffusion model produces) -> images."""
        return self.decode(z_scaled / self.scaling_factor)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction and posterior; z is sampled from ``generator`` when given, else the posterior mode."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if generator is not None else posterior.mode()
        return self.decode(z), posterior

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """Per-sample loss [B] = mean|x̂ − x| + mean(x̂ − x)² + kl_weight · KL / pixels; logs are batch means."""
        x_hat, posterior = self(x, generator)
        err = (x_hat - x).flatten(1)
        l1 = err.abs().mean(dim=1)
        l2 = err.pow(2).mean(dim=1)
        kl = posterior.kl() / err.shape[1]  # KL per pixel, on the scale of the mean reconstruction terms
        total = l1 + l2 + self.config.kl_weight * kl
        logs = {"loss": total.mean().item(), "l1": l1.mean().item(), "l2": l2.mean().item(),
                "kl": posterior.kl().mean().item()}
        return total, logs

    @staticmethod
    def compute_scaling_factor(latents: Tensor) -> float:
        """1 / std of unscaled latents (how Stable Diffusion's 0.18215 was computed)."""
        if latents.numel() < 2:
            raise ValueError(f"compute_scaling_factor needs at least 2 latent values, got {latents.numel()}")
        std = latents.detach().double().std().item()
        if not (std > 0 and math.isfinite(std)):
            raise ValueError(f"latents have std {std}; cannot compute a scaling factor")
        return 1.0 / std

    def set_scaling_factor(self, value: float) -> None:
        value = float(value)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"scaling_factor = {value}, expected a finite value > 0")
        self.scaling_factor.fill_(value)


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio per image: 10·log10(range² / mean((x − y)²)) -> [B]; range 2 for [-1, 1]."""
    if x.shape != y.shape:
        raise ValueError(f"psnr inputs have shapes {tuple(x.shape)} and {tuple(y.shape)}, expected equal shapes")
    mse = (x - y).flatten(1).pow(2).mean(dim=1)
    return 10.0 * torch.log10(data_range ** 2 / mse)
