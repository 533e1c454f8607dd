"""Stable Diffusion 1.x/2.x and SDXL (diffusers `UNet2DConditionModel`) behind the network contract.

Contract: `net(z_t, t [B] float, cond: TextCond, w=None) -> prediction` (ε or v, as the scheduler config says).
Quirks that live here:
- LCM UNets (`time_cond_proj_dim` set, e.g. LCM-Dreamshaper / distilled SD) embed the guidance scale: `w` is the
  guidance scale a user passes to the pipeline, embedded as the pipeline does, get_guidance_scale_embedding(w − 1).
  LCM-LoRA UNets have no such input: `w` must then be None.
- SDXL: the second text encoder's pooled embedding (`TextCond.pooled`) and the size/crop micro-conditions
  `time_ids = (H, W, 0, 0, H, W)` in pixels go into `added_cond_kwargs`.
- the null caption is the text encoder's embedding of "" (the pipelines' negative prompt; zeros for SDXL pipelines
  with force_zeros_for_empty_prompt), a frozen buffer.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from e2ediff.adapters.pixart import replace_dropped
from e2ediff.conditioning import TextCond


def guidance_scale_embedding(w: Tensor, dim: int) -> Tensor:
    """diffusers' (LCM's) Fourier embedding of the guidance scale w − 1 → [B, dim] float32."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.get_guidance_scale_embedding(None, (w - 1).float().cpu(), embedding_dim=dim)


class UNetNet(nn.Module):
    def __init__(self, unet: nn.Module, null: TextCond, vae_downsample: int, sdxl: bool = False) -> None:
        super().__init__()
        self.model = unet
        self.register_buffer("null_tokens", null.tokens[0].detach().clone(), persistent=False)
        self.register_buffer("null_mask", null.mask[0].detach().clone(), persistent=False)
        self.register_buffer("null_pooled", null.pooled[0].detach().clone(), persistent=False)
        self.vae_downsample = int(vae_downsample)
        self.sdxl = sdxl
        self.in_channels = int(unet.config.in_channels)
        self.w_dim = unet.config.time_cond_proj_dim

    def forward(self, z: Tensor, t: Tensor, cond: TextCond, w: Tensor | None = None) -> Tensor:
        dtype = self.model.dtype
        tokens, _ = replace_dropped(cond, self.null_tokens, self.null_mask)
        timestep_cond = None
        if self.w_dim is not None:
            if w is None:
                raise ValueError("this UNet embeds the guidance scale (time_cond_proj_dim): pass w (e.g. 8.5)")
            timestep_cond = guidance_scale_embedding(w, self.w_dim).to(device=z.device, dtype=dtype)
        elif w is not None:
            raise ValueError("this UNet embeds no guidance scale (no time_cond_proj_dim): w must be None")
        added = None
        if self.sdxl:
            pooled = cond.pooled
            if cond.drop is not None and bool(cond.drop.any()):
                pooled = torch.where(cond.drop[:, None].to(pooled.device), self.null_pooled.to(pooled)[None], pooled)
            h, w_ = (s * self.vae_downsample for s in z.shape[-2:])
            time_ids = torch.tensor([h, w_, 0, 0, h, w_], dtype=dtype, device=z.device).repeat(z.shape[0], 1)
            added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids}
        out = self.model(z.to(dtype), t, encoder_hidden_states=tokens.to(dtype), timestep_cond=timestep_cond,
                         added_cond_kwargs=added, return_dict=False)[0]
        return out.to(z.dtype)


@torch.no_grad()
def encode_sd_prompts(pipe, prompts: list[str], device, sdxl: bool = False) -> TextCond:
    """Caption features exactly as the pipeline's `encode_prompt` makes them. SD: pooled = the token mean (only a
    discriminator reads it); SDXL: pooled = the second encoder's pooled projection (the UNet reads it)."""
    if sdxl:
        tokens, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    else:
        tokens, _ = pipe.encode_prompt(prompts, device, 1, False)
        pooled = tokens.mean(1)
    mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    return TextCond(tokens, mask, pooled)                 # the text encoder's dtype (a cache stores it as is)
