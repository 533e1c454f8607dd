"""Outside models (diffusers pipelines) behind the project's contracts; every quirk of theirs lives in this package.

pixart.py (PixArtTransformer2DModel), sd_unet.py (UNet2DConditionModel: SD, SDXL, LCM UNets), autoencoder.py
(AutoencoderKL), lora.py (peft adapters), pipeline.py (a pipeline folder → Denoiser + autoencoder + captions),
speed.py (fused QKV projections, regional torch.compile, the attention kernel order).
"""
