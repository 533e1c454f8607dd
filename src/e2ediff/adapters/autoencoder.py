"""diffusers `AutoencoderKL` behind the project's autoencoder contract.

Contract (as `e2ediff.models.autoencoder.AutoencoderKL`): `encode_latents(images [B,3,H,W] in [-1,1]) -> z0` and
`decode_latents(z0) -> images in [-1,1]`, with the scaling the diffusion model was trained on applied inside:
    z0 = (mode(E(x)) − shift)·scaling_factor,   x = D(z0 / scaling_factor + shift)
(the pipelines' own `vae.decode(latents / vae.config.scaling_factor)`; shift_factor is None for SD and PixArt).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class DiffusersAutoencoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        # pixels per latent cell: 2^(number of down blocks − 1), as the pipelines' vae_scale_factor
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)

    def encode_latents(self, images: Tensor) -> Tensor:
        """The posterior mode (deterministic: the target of the reconstruction loss), scaled."""
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return (dist.mode().float() - self.shift_factor) * self.scaling_factor      # float32 whatever the VAE's dtype

    def decode_latents(self, z: Tensor) -> Tensor:
        return self.vae.decode((z / self.scaling_factor + self.shift_factor).to(self.vae.dtype)).sample.float()
