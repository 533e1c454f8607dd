"""A diffusers pipeline folder (or hub id) as the project's parts: Denoiser, autoencoder, caption encoder, schedule.

Everything sampling and E2E training need is read from the pipeline itself, never from a constant:
- the ᾱ table, the prediction type and the LCM `timestep_scaling` / `original_inference_steps` from the scheduler
  config (through `LCMScheduler.from_config`, so an SD pipeline with a DDIM/PNDM scheduler gets the LCM steps of the
  same ᾱ table, as `pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)` does for LCM-LoRA);
- the timestep list from `LCMScheduler.set_timesteps(n)`, computed once outside autograd;
- caption features from the pipeline's own tokenizer + text encoder (`encode_prompt`).
The network quirks live in adapters/pixart.py and adapters/sd_unet.py, the VAE's in adapters/autoencoder.py.

A fine-tuned output folder is one of: a complete pipeline folder (`model_index.json`), or a LoRA folder with
`e2ediff.json` naming its base pipeline. Both may carry `e2ediff.json` with the sampler the run trained
(timesteps, w, renoise), which `load_pretrained` returns as `meta`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from e2ediff.adapters.autoencoder import DiffusersAutoencoder
from e2ediff.conditioning import TextCond
from e2ediff.denoiser import Denoiser
from e2ediff.schedules import VPSchedule

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
META_FILE = "e2ediff.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PretrainedPipeline:
    pipe: Any                      # the diffusers pipeline (its components are the ones trained and saved)
    family: str                    # pixart | sd | sdxl
    net: nn.Module                 # adapter: net(z_t, t, cond, w) -> prediction
    autoencoder: DiffusersAutoencoder
    schedule: VPSchedule
    prediction: str                # eps | v | x0
    timestep_scaling: float        # LCM boundary c_skip / c_out scaling
    source: str                    # what was loaded (path or hub id)
    meta: dict = field(default_factory=dict)   # e2ediff.json of a fine-tuned folder, else {}
    max_sequence_length: int = 120

    @property
    def denoiser(self) -> Denoiser:
        return Denoiser(self.net, self.schedule, self.prediction)

    @property
    def trained(self) -> nn.Module:
        """The diffusers model E2E fine-tunes: the transformer (PixArt) or the UNet (SD, SDXL)."""
        return self.net.model

    @property
    def trained_name(self) -> str:
        return "transformer" if self.family == "pixart" else "unet"

    def lcm_scheduler(self):
        from diffusers import LCMScheduler

        return LCMScheduler.from_config(self.pipe.scheduler.config)

    def timesteps(self, n: int) -> list[int]:
        """The pipeline's LCM timesteps for n steps (LCMScheduler.set_timesteps), descending python ints."""
        scheduler = self.lcm_scheduler()
        scheduler.set_timesteps(n)
        return [int(t) for t in scheduler.timesteps]

    def default_w(self) -> float | None:
        """The guidance-scale input of a w-embedding (LCM) UNet: the run's, else LCM pipelines' 8.5; None otherwise."""
        if getattr(self.net, "w_dim", None) is None:
            return None
        w = self.meta.get("sampler", {}).get("w")
        return 8.5 if w is None else float(w)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a square `resolution`-pixel image (default: the model's sample size)."""
        config = self.trained.config
        size = config.sample_size if resolution is None else resolution // self.autoencoder.downsample
        return (int(config.in_channels), int(size), int(size))

    def encode_prompts(self, prompts: list[str]) -> TextCond:
        from e2ediff.adapters.pixart import encode_pixart_prompts
        from e2ediff.adapters.sd_unet import encode_sd_prompts

        device = self.net.null_tokens.device
        if self.family == "pixart":
            return encode_pixart_prompts(self.pipe, list(prompts), device, self.max_sequence_length)
        return encode_sd_prompts(self.pipe, list(prompts), device, sdxl=self.family == "sdxl")

    def text_encoder_key(self) -> str:
        """What caption features depend on: the text encoder(s) and tokenizer(s) configs and the sequence length."""
        parts = [self.family, str(self.max_sequence_length)]
        for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                config = getattr(module, "config", None)
                parts.append(config.to_json_string() if hasattr(config, "to_json_string") else
                             str(getattr(module, "name_or_path", type(module).__name__)) + str(len(module)))
        return "\n".join(parts)

    def to(self, device) -> "PretrainedPipeline":
        self.pipe.to(device)
        self.net.to(device)
        return self


def family_of(pipe) -> str:
    if getattr(pipe, "transformer", None) is not None and type(pipe.transformer).__name__ == "PixArtTransformer2DModel":
        return "pixart"
    if getattr(pipe, "unet", None) is not None and type(pipe.unet).__name__ == "UNet2DConditionModel":
        return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"
    raise ValueError(f"{type(pipe).__name__}: only PixArt (PixArtTransformer2DModel) and Stable Diffusion / SDXL "
                     "(UNet2DConditionModel) pipelines are supported")


def wrap_pipeline(pipe, source: str = "", meta: dict | None = None, max_sequence_length: int = 120
                  ) -> PretrainedPipeline:
    """The adapters around an already loaded diffusers pipeline."""
    from diffusers import LCMScheduler

    from e2ediff.adapters.pixart import PixArtNet, encode_pixart_prompts
    from e2ediff.adapters.sd_unet import UNetNet, encode_sd_prompts

    family = family_of(pipe)
    for name in ("vae", "text_encoder", "text_encoder_2", "transformer", "unet"):   # frozen until a task says
        if isinstance(getattr(pipe, name, None), nn.Module):
            getattr(pipe, name).requires_grad_(False)
    config = pipe.scheduler.config
    if config.get("thresholding") or config.get("clip_sample"):
        raise ValueError(f"{source}: the scheduler clips or thresholds x0 (clip_sample / thresholding); the "
                         "differentiable sampler does not implement that: set them to false in scheduler_config.json")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise ValueError(f"{source}: prediction_type {prediction!r} is not one of {list(PREDICTIONS)}")
    lcm = LCMScheduler.from_config(config)
    schedule = VPSchedule(lcm.alphas_cumprod.to(torch.float64))       # the scheduler's own table
    ae = DiffusersAutoencoder(pipe.vae)
    device = pipe.vae.device
    if family == "pixart":
        null = encode_pixart_prompts(pipe, [""], device, max_sequence_length)
        net = PixArtNet(pipe.transformer, null.tokens[0], null.mask[0], ae.downsample)
    else:
        null = encode_sd_prompts(pipe, [""], device, sdxl=family == "sdxl")
        if family == "sdxl" and pipe.config.get("force_zeros_for_empty_prompt", False):
            # SDXL's unconditional branch is all zeros, not the embedding of "" (force_zeros_for_empty_prompt)
            null = TextCond(torch.zeros_like(null.tokens), null.mask, torch.zeros_like(null.pooled))
        net = UNetNet(pipe.unet, null, ae.downsample, sdxl=family == "sdxl")
    return PretrainedPipeline(pipe, family, net, ae, schedule, PREDICTIONS[prediction],
                              float(lcm.config.timestep_scaling), source, dict(meta or {}), max_sequence_length)


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_pretrained(source: str | Path, device: torch.device | str = "cpu", dtype: str = "float32",
                    max_sequence_length: int = 120) -> PretrainedPipeline:
    """A pipeline folder, a hub id (with internet), or a LoRA folder written by `e2ediff finetune --pretrained`
    (its e2ediff.json names the base; the adapters are loaded onto it)."""
    from diffusers import DiffusionPipeline

    source = str(source)
    meta = read_meta(source) if Path(source).is_dir() else {}
    lora = meta.get("lora")
    base = meta["base"] if lora else source
    if Path(source).is_dir() and not lora and not (Path(source) / "model_index.json").is_file():
        raise FileNotFoundError(f"{source} holds neither a diffusers pipeline (model_index.json) nor an e2ediff "
                                f"LoRA export ({META_FILE})")
    pipe = DiffusionPipeline.from_pretrained(base, torch_dtype=DTYPES[dtype])
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    pp = wrap_pipeline(pipe, source, meta, max_sequence_length)
    if lora:
        from e2ediff.adapters.lora import load_lora

        if pp.family == "pixart":
            load_lora(pp.trained, Path(source))
        else:
            pipe.load_lora_weights(source)
        pp.trained.to(device)
    return pp


@torch.no_grad()
def sample_pretrained(pp: PretrainedPipeline, cond: TextCond, timesteps: list[int], *, seed: int = 0,
                      w: float | None = None, renoise: str = "vp", resolution: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Latents [B, C, h, w] (float32) by the project's LCM sampler, drawing the initial latents and then one noise per
    re-noised step from `generator` (default `torch.Generator().manual_seed(seed)`) — the same stream as
    `pipe(..., generator=that)`; the draws are made on the generator's device (a CUDA generator draws on the GPU)."""
    from e2ediff.samplers import lcm

    device = pp.net.null_tokens.device
    g = torch.Generator().manual_seed(seed) if generator is None else generator
    shape = (len(cond), *pp.latent_shape(resolution))
    noise = torch.randn(shape, generator=g, device=g.device).to(device)
    w_in = None if w is None else torch.full((len(cond),), float(w), device=device)
    return lcm(pp.denoiser, noise, timesteps, cond.to(device), renoise=renoise, generator=g, w=w_in,
               timestep_scaling=pp.timestep_scaling)
