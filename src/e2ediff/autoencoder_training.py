"""Training the latent autoencoder (the paper works in a VAE's latent space; ours maps 32×32×1 to 8×8×4).

After training, the latent scale factor is computed as Stable Diffusion's was: 1 / std of the (unscaled) latents
of training images, so that scaled latents have unit variance for the diffusion model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from e2ediff.config import DataConfig, OptimConfig, TrainConfig
from e2ediff.models.autoencoder import PRESETS as AE_PRESETS, AutoencoderConfig, AutoencoderKL, psnr
from e2ediff.trainer import BatchStream, Part, Task


@dataclass
class AutoencoderRun:
    model: AutoencoderConfig = field(default_factory=lambda: AE_PRESETS["tiny"])
    scale_samples: int = 5000            # training images used to compute the latent scale factor
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=100))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3000, batch_size=128, ema_decay=0.999))


PRESETS = {
    "tiny": AutoencoderRun(),
    "base": AutoencoderRun(model=AE_PRESETS["base"], optim=OptimConfig(lr=5e-4, warmup_steps=200),
                           train=TrainConfig(steps=8000, batch_size=256, ema_decay=0.999, checkpoint_every=2000)),
    "scenes": AutoencoderRun(model=AE_PRESETS["scenes"], data=DataConfig(dataset="fashion-scenes"),
                             optim=OptimConfig(lr=1e-3, warmup_steps=100),
                             train=TrainConfig(steps=6000, batch_size=128, ema_decay=0.999, checkpoint_every=500)),
}


class AutoencoderTask(Task):
    kind = "autoencoder"

    def __init__(self, cfg: AutoencoderRun, device: torch.device, data=None):
        from e2ediff.assets import TrainingData

        self.cfg = cfg
        self.data = data if data is not None else TrainingData(cfg.data, "train", device)
        self.parts = [Part("autoencoder", AutoencoderKL(cfg.model), cfg.optim, cfg.train.ema_decay)]
        self.stream = BatchStream(len(self.data), cfg.train.batch_size, cfg.train.seed)

    def losses(self, step, generator):
        images = self.data.images[self.stream.indices(step).to(self.data.device)]
        loss, logs = self.module("autoencoder").loss(images, generator)
        return {"autoencoder": loss.mean()}, {k: float(v) for k, v in logs.items()}

    @torch.no_grad()
    def export(self, weights):
        ae = AutoencoderKL(self.cfg.model).to(self.data.device)
        ae.load_state_dict(weights["autoencoder"])
        ae.eval()
        n = min(self.cfg.scale_samples, len(self.data))
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(self.data), generator=g)[:n].to(self.data.device)
        latents = torch.cat([ae.encode(self.data.images[i]).mode() for i in idx.split(512)])
        ae.set_scaling_factor(ae.compute_scaling_factor(latents))
        from e2ediff.assets import autoencoder_meta
        from e2ediff.checkpoint import with_prefix

        return with_prefix(ae.state_dict(), "autoencoder"), {"kind": "autoencoder", **autoencoder_meta(ae)}


@torch.no_grad()
def reconstruction_psnr(ae: AutoencoderKL, images: torch.Tensor, batch_size: int = 500, crop: int = 2) -> float:
    """Mean PSNR (dB, images in [-1, 1]) of decode(encode(x)) over ``images`` [N, C, 32, 32], measured on the
    image without its ``crop``-pixel padding (the 28×28 Fashion-MNIST image)."""
    values = []
    inner = slice(crop, -crop) if crop > 0 else slice(None)
    for x in images.split(batch_size):
        x_hat = ae.decode_latents(ae.encode_latents(x)).clamp(-1, 1)
        values.append(psnr(x_hat[..., inner, inner], x[..., inner, inner]))
    return float(torch.cat(values).mean())
