"""Small built-in networks for the Fashion-MNIST miniature.

dit.py          PixArt-α-style DiT denoiser on [B, 4, 8, 8] latents (adaLN-single, cross-attention to captions).
autoencoder.py  KL autoencoder (Stable Diffusion's AutoencoderKL, scaled down) between images and latents.
Each file has a typed config dataclass and a ``PRESETS`` dict with ``tiny`` (CPU) and ``base`` (one GPU).
"""
