"""PixArt-α / PixArt-δ (diffusers `PixArtTransformer2DModel`) behind the network contract.

Contract: `net(z_t [B,C,h,w], t [B] float, cond: TextCond, w=None) -> prediction [B,C,h,w]` (ε for PixArt). The
quirks that live here and nowhere else:
- learned sigma: the transformer outputs 2C channels (ε, variance); the sampler keeps the first C, as
  `PixArtAlphaPipeline` does (`noise_pred.chunk(2, dim=1)[0]`).
- T5 caption features with their attention mask (`encoder_attention_mask`), 120 tokens for PixArt-α/δ.
- micro-conditions: a transformer with sample_size 128 (the 1024-px models) embeds the image resolution and aspect
  ratio (`added_cond_kwargs`), in pixels: latent size × the VAE's downsampling.
- the null caption (classifier-free guidance, caption dropout) is the text encoder's embedding of "", as the pipeline's
  negative prompt; it is a frozen buffer, so no parameter goes without a gradient (DDP).
- PixArt-δ embeds no guidance scale: `w` must be None.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from e2ediff.conditioning import TextCond


def replace_dropped(cond: TextCond, null_tokens: Tensor, null_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(tokens, mask) with the captions marked `drop` replaced by the null caption's."""
    tokens, mask = cond.tokens, cond.mask
    if cond.drop is None or not bool(cond.drop.any()):
        return tokens, mask
    drop = cond.drop.to(tokens.device)
    tokens = torch.where(drop[:, None, None], null_tokens.to(tokens)[None].expand_as(tokens), tokens)
    mask = torch.where(drop[:, None], null_mask.to(mask)[None].expand_as(mask), mask)
    return tokens, mask


class PixArtNet(nn.Module):
    def __init__(self, transformer: nn.Module, null_tokens: Tensor, null_mask: Tensor, vae_downsample: int) -> None:
        super().__init__()
        self.model = transformer
        self.register_buffer("null_tokens", null_tokens.detach().clone(), persistent=False)
        self.register_buffer("null_mask", null_mask.detach().clone(), persistent=False)
        self.vae_downsample = int(vae_downsample)
        self.in_channels = int(transformer.config.in_channels)

    def repeated_blocks(self) -> nn.ModuleList:
        """The identical transformer blocks (28 in PixArt-XL-2): what regional compilation compiles
        (e2ediff.adapters.speed)."""
        return self.model.transformer_blocks

    def forward(self, z: Tensor, t: Tensor, cond: TextCond, w: Tensor | None = None) -> Tensor:
        if w is not None:
            raise ValueError("PixArt transformers embed no guidance scale: w must be None")
        tokens, mask = replace_dropped(cond, self.null_tokens, self.null_mask)
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(self.model, "use_additional_conditions", False):
            b, (h, w_) = z.shape[0], z.shape[-2:]
            size = torch.tensor([h * self.vae_downsample, w_ * self.vae_downsample], dtype=tokens.dtype,
                                device=z.device)
            added = {"resolution": size.repeat(b, 1), "aspect_ratio": (size[0] / size[1]).repeat(b, 1)}
        dtype = self.model.dtype
        out = self.model(z.to(dtype), encoder_hidden_states=tokens.to(dtype), encoder_attention_mask=mask.long(),
                         timestep=t, added_cond_kwargs=added, return_dict=False)[0]
        if out.shape[1] == 2 * self.in_channels:       # learned sigma: keep ε
            out = out[:, :self.in_channels]
        return out.to(z.dtype)


@torch.no_grad()
def encode_pixart_prompts(pipe, prompts: list[str], device, max_sequence_length: int = 120) -> TextCond:
    """T5 features exactly as `PixArtAlphaPipeline.encode_prompt` makes them (no caption cleaning); pooled is the
    mask-weighted mean of the token features (only a discriminator reads it)."""
    tokens, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, num_images_per_prompt=1,
                                            device=device, clean_caption=False,
                                            max_sequence_length=max_sequence_length)
    m = mask.to(tokens.dtype)[..., None]
    pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1)
    return TextCond(tokens, mask.bool(), pooled)          # the text encoder's dtype (a cache stores it as is)
