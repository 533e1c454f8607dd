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
import os
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


class RowStore:
    """Tensors with one row per item in safetensors shards of `shard_rows` rows (`index.json`, written last, marks a
    complete store); rows are read on demand through memory-mapped files, so a cache larger than memory works."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / "index.json").read_text())
        self._files: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self.index["rows"])

    @staticmethod
    def complete(folder: Path) -> bool:
        return (Path(folder) / "index.json").is_file()

    @staticmethod
    def write(folder: Path, batches, shard_rows: int = 1024) -> "RowStore":
        """Write the rows of `batches` (an iterable of {name: [b, ...] tensors}) in order, shard by shard."""
        import shutil

        from safetensors.torch import save_file

        folder = Path(folder)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")   # per process: several may build it at once
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        pending: dict[str, list[Tensor]] = {}
        count = shard = 0

        def flush(rows: int) -> None:
            nonlocal shard
            merged = {k: torch.cat(v) for k, v in pending.items()}
            save_file({k: v[:rows].cpu().contiguous() for k, v in merged.items()}, str(tmp / f"{shard:06d}.safetensors"))
            for k, v in merged.items():
                pending[k] = [v[rows:]]
            shard += 1

        for batch in batches:
            for k, v in batch.items():
                pending.setdefault(k, []).append(v.detach().cpu())
            count += len(next(iter(batch.values())))
            while sum(len(t) for t in next(iter(pending.values()))) >= shard_rows:
                flush(shard_rows)
        left = sum(len(t) for t in next(iter(pending.values()), []))
        if left:
            flush(left)
        (tmp / "index.json").write_text(json.dumps({"rows": count, "shard_rows": shard_rows}) + "\n")
        if folder.exists() and not RowStore.complete(folder):
            shutil.rmtree(folder, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:                                  # another process finished the same store first
            shutil.rmtree(tmp)
            if not RowStore.complete(folder):
                raise
        return RowStore(folder)

    def _file(self, shard: int):
        from safetensors import safe_open

        if shard not in self._files:
            self._files[shard] = safe_open(str(self.folder / f"{shard:06d}.safetensors"), framework="pt")
        return self._files[shard]

    def shape(self, name: str) -> list[int]:
        return [len(self), *self._file(0).get_slice(name).get_shape()[1:]]

    def rows(self, name: str, idx) -> Tensor:
        per = int(self.index["shard_rows"])
        out = []
        for i in (int(i) for i in idx):
            if not 0 <= i < len(self):
                raise IndexError(f"row {i} outside the {len(self)} rows of {self.folder}")
            out.append(self._file(i // per).get_slice(name)[i % per:i % per + 1])
        return torch.cat(out)


class CaptionFeatures:
    """TextCond rows of a caption cache (float32 on read; stored in the text encoder's dtype)."""

    def __init__(self, store: RowStore):
        self.store = store
        self.dim = store.shape("tokens")[-1]

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, idx) -> TextCond:
        s = self.store
        return TextCond(s.rows("tokens", idx).float(), s.rows("mask", idx).bool(), s.rows("pooled", idx).float())


class LatentRows:
    def __init__(self, store: RowStore):
        self.store = store

    def __getitem__(self, idx) -> Tensor:
        return self.store.rows("latents", idx).float()


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n\0".join(parts).encode()).hexdigest()[:16]


def caption_cache(encode, captions: list[str], encoder_key: str, cache_dir: Path, batch_size: int = 64
                  ) -> CaptionFeatures:
    """Features of `captions` by `encode(list[str]) -> TextCond`, in the store
    cache_dir/captions-<hash(encoder_key, captions)>/ (built once, in batches; read row by row)."""
    folder = Path(cache_dir) / f"captions-{_digest(encoder_key, *captions)}"
    if not RowStore.complete(folder):
        def batches():
            for s in range(0, len(captions), batch_size):
                c = encode(captions[s:s + batch_size])
                yield {"tokens": c.tokens, "mask": c.mask.to(torch.uint8), "pooled": c.pooled}
        RowStore.write(folder, batches())
    return CaptionFeatures(RowStore(folder))


def latent_cache(encode, data: ImageFolderCaptions, vae_key: str, cache_dir: Path, device, batch_size: int = 16
                 ) -> LatentRows:
    """z0 = encode(images) of every image (without flips), in the store cache_dir/latents-<hash>/."""
    if data.random_flip:
        raise ValueError("cache_latents and random_flip exclude each other (a cached latent has no flip)")
    folder = Path(cache_dir) / f"latents-{_digest(vae_key, data.key())}"
    if not RowStore.complete(folder):
        idx = torch.arange(len(data))

        @torch.no_grad()
        def batches():
            for s in range(0, len(data), batch_size):
                yield {"latents": encode(data.images(idx[s:s + batch_size]).to(device)).float()}
        RowStore.write(folder, batches())
    return LatentRows(RowStore(folder))
