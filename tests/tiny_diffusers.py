"""Tiny random diffusers pipelines built in code (no hub), as diffusers' own tests build them.

PixArt-α/δ: PixArtTransformer2DModel (2 layers, learned sigma) + AutoencoderKL (2 levels: 16 px → 8×8 latents) +
T5EncoderModel + a WordLevel tokenizer from the `tokenizers` library + LCMScheduler (linear betas, as PixArt-LCM).
SD: UNet2DConditionModel (optionally with time_cond_proj_dim, an LCM UNet) + CLIPTextModel + the same kind of
tokenizer + LCMScheduler (scaled_linear betas).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

WORDS = ("a an the red blue green black white boot shoe shirt dress bag coat sneaker sandal trouser pullover photo "
         "of on in small large striped plain").split()
IMAGE_SIZE = 16


def tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=8, sample_size=IMAGE_SIZE, scaling_factor=0.5)


def pixart_pipeline(seed: int = 0, heads: int = 2):
    from diffusers import LCMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=heads, caption_channels=32,
        in_channels=4, cross_attention_dim=8 * heads, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(WORDS) + 3, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                           num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                           eos_token_id=1, decoder_start_token_id=0))
    scheduler = LCMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    return PixArtAlphaPipeline(tokenizer=tokenizer(12), text_encoder=text_encoder.eval(), vae=vae().eval(),
                               transformer=transformer.eval(), scheduler=scheduler)


def sd_pipeline(seed: int = 0, time_cond_proj_dim: int | None = None):
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=4, time_cond_proj_dim=time_cond_proj_dim)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, hidden_size=32, intermediate_size=37,
                                                layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
                                                pad_token_id=0, vocab_size=len(WORDS) + 3, max_position_embeddings=16))
    scheduler = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    return StableDiffusionPipeline(vae=vae().eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer(12),
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def sdxl_pipeline(seed: int = 0):
    """diffusers' own tiny SDXL test configuration: two CLIP encoders (32 + 32 → cross-attention 64), text_time
    micro-conditions (pooled 32 + 6 × 8 time ids = 80)."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=4)
    config = dict(bos_token_id=0, eos_token_id=1, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
                  num_attention_heads=4, num_hidden_layers=2, pad_token_id=0, vocab_size=len(WORDS) + 3,
                  max_position_embeddings=16, hidden_act="gelu", projection_dim=32)
    scheduler = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    return StableDiffusionXLPipeline(vae=vae().eval(), text_encoder=CLIPTextModel(CLIPTextConfig(**config)).eval(),
                                     text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval(),
                                     tokenizer=tokenizer(12), tokenizer_2=tokenizer(12), unet=unet.eval(),
                                     scheduler=scheduler)


CAPTIONS = ["a red boot", "a blue shirt", "a black bag", "a white sneaker", "a striped dress", "a green coat"]


def write_imagefolder(root: Path, n: int = 6, size: int = 20, seed: int = 0) -> Path:
    """n RGB images (size × size, so --resolution 16 resizes and crops) + metadata.jsonl in diffusers' convention."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        base = rng.integers(0, 255, size=(1, 1, 3))
        img = np.clip(base + rng.integers(-40, 40, size=(size, size + 4 * (i % 2), 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"img_{i}.png")
        lines.append(json.dumps({"file_name": f"img_{i}.png", "text": CAPTIONS[i % len(CAPTIONS)]}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root
