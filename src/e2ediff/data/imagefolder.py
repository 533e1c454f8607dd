"""diffusers' imagefolder convention for users' text-to-image data, plus the caption and latent caches.

Layout (as `datasets`' imagefolder and diffusers' training scripts read it):
    root/metadata.jsonl     one JSON object per line: {"file_name": "relative/path.png", "text": "a red boot"}
    root/relative/path.png  any image PIL reads
Images are read from disk per batch (a folder larger than memory streams), converted to RGB, resized so the shorter
side is `resolution` (bilinear, as diffusers' `transforms.Resize`), centre-cropped to resolution², scaled to [-1, 1].

Caches (safetensors, in `cache_dir`): caption features keyed by the text encoder (its config) and the caption list,
VAE latents keyed by the VAE config, the image list and the resolution. A changed model or folder gets a new key,
never a stale cache.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from e2ediff.conditioning import TextCond


def read_metadata(root: Path, caption_column: str = "text") -> list[tuple[str, str]]:
    """(file_name, caption) pairs of root/metadata.jsonl; ValueError naming the line for a bad record."""
    path = Path(root) / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an imagefolder needs metadata.jsonl with file_name and "
                                f"{caption_column} fields")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str) \
                or not isinstance(record.get(caption_column), str):
            raise ValueError(f"{path}:{number}: expected string fields 'file_name' and {caption_column!r}")
        if not (Path(root) / record["file_name"]).is_file():
            raise FileNotFoundError(f"{path}:{number}: image {record['file_name']!r} not found")
        pairs.append((record["file_name"], record[caption_column]))
    if not pairs:
        raise ValueError(f"{path} lists no images")
    return pairs


def load_image(path: Path, resolution: int, center_crop: bool = True) -> Tensor:
    """[3, R, R] float in [-1, 1]: shorter side → R (bilinear), then the centre (or top-left) R×R crop."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = ((nw - resolution) // 2, (nh - resolution) // 2) if center_crop else (0, 0)
        img = img.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


class ImageFolderCaptions:
    """Images with one caption each. `captions` are the distinct captions; `caption_index[i]` is image i's."""

    def __init__(self, root: str | Path, resolution: int, center_crop: bool = True, random_flip: bool = False,
                 caption_column: str = "text"):
        self.root = Path(root)
        self.resolution, self.center_crop, self.random_flip = int(resolution), center_crop, random_flip
        self.files_and_captions = read_metadata(self.root, caption_column)
        self.captions = list(dict.fromkeys(c for _, c in self.files_and_captions))
        index = {c: i for i, c in enumerate(self.captions)}
        self.caption_index = torch.tensor([index[c] for _, c in self.files_and_captions])

    def __len__(self) -> int:
        return len(self.files_and_captions)

    def images(self, idx: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[B, 3, R, R] for dataset indices idx; random_flip draws one coin per image from `generator`."""
        out = torch.stack([load_image(self.root / self.files_and_captions[int(i)][0], self.resolution,
                                      self.center_crop) for i in idx])
        if self.random_flip and generator is not None:
            flip = torch.rand(len(idx), generator=generator, device=generator.device).cpu() < 0.5
            out[flip] = out[flip].flip(-1)
        return out

    def key(self) -> str:
        stats = [(f, c, (self.root / f).stat().st_size) for f, c in self.files_and_captions]
        return json.dumps([str(self.root.resolve()), self.resolution, self.center_crop, stats])


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n\0".join(parts).encode()).hexdigest()[:16]


def caption_cache(encode, captions: list[str], encoder_key: str, cache_dir: Path, batch_size: int = 64) -> TextCond:
    """Features of `captions` by `encode(list[str]) -> TextCond`, read from / written to
    cache_dir/captions-<hash(encoder_key, captions)>.safetensors."""
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir) / f"captions-{_digest(encoder_key, *captions)}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return TextCond(t["tokens"], t["mask"].bool(), t["pooled"])
    parts = [encode(captions[s:s + batch_size]) for s in range(0, len(captions), batch_size)]
    cond = TextCond.cat(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"tokens": cond.tokens.cpu().contiguous(), "mask": cond.mask.cpu().to(torch.uint8).contiguous(),
               "pooled": cond.pooled.cpu().contiguous()}, str(tmp))
    tmp.replace(path)
    return TextCond(cond.tokens.cpu(), cond.mask.cpu(), cond.pooled.cpu())


@torch.no_grad()
def latent_cache(encode, data: ImageFolderCaptions, vae_key: str, cache_dir: Path, device, batch_size: int = 16
                 ) -> Tensor:
    """z0 = encode(images) of every image (without flips), from / to cache_dir/latents-<hash>.safetensors."""
    from safetensors.torch import load_file, save_file

    if data.random_flip:
        raise ValueError("cache_latents and random_flip exclude each other (a cached latent has no flip)")
    path = Path(cache_dir) / f"latents-{_digest(vae_key, data.key())}.safetensors"
    if path.is_file():
        return load_file(str(path))["latents"]
    idx = torch.arange(len(data))
    z = torch.cat([encode(data.images(idx[s:s + batch_size]).to(device)).float().cpu()
                   for s in range(0, len(data), batch_size)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"latents": z.contiguous()}, str(tmp))
    tmp.replace(path)
    return z
