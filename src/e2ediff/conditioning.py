"""The caption conditioning that every denoiser in e2ediff receives.

PixArt conditions on T5 token features through cross-attention and replaces dropped captions by a learned null
embedding (classifier-free guidance); we keep exactly that contract with MiniLM features.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class TextCond:
    """Caption features for a batch.

    tokens: [B, L, D] token embeddings (cross-attention keys/values), padded to L.
    mask:   [B, L] bool, True where a real token is.
    pooled: [B, D] pooled sentence embedding.
    drop:   [B] bool or None; True means "use the model's learned null caption" (caption dropout in training,
            the unconditional branch of classifier-free guidance in sampling).
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor
    drop: Tensor | None = None

    def __post_init__(self) -> None:
        b, length = self.tokens.shape[:2]
        if self.mask.shape != (b, length):
            raise ValueError(f"TextCond.mask has shape {tuple(self.mask.shape)}, expected {(b, length)}")
        if self.pooled.shape[0] != b:
            raise ValueError(f"TextCond.pooled has batch {self.pooled.shape[0]}, expected {b}")
        if self.drop is not None and self.drop.shape != (b,):
            raise ValueError(f"TextCond.drop has shape {tuple(self.drop.shape)}, expected {(b,)}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index) -> "TextCond":
        return TextCond(self.tokens[index], self.mask[index], self.pooled[index],
                        None if self.drop is None else self.drop[index])

    def to(self, device=None, dtype=None) -> "TextCond":
        return TextCond(self.tokens.to(device=device, dtype=dtype), self.mask.to(device=device),
                        self.pooled.to(device=device, dtype=dtype),
                        None if self.drop is None else self.drop.to(device=device))

    def repeat_interleave(self, n: int) -> "TextCond":
        """Each caption n times in a row: [c0, c0, c1, c1, ...] (m samples per caption)."""
        return TextCond(self.tokens.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0),
                        self.pooled.repeat_interleave(n, 0),
                        None if self.drop is None else self.drop.repeat_interleave(n, 0))

    def with_drop(self, drop: Tensor | bool) -> "TextCond":
        if isinstance(drop, bool):
            drop = torch.full((len(self),), drop, dtype=torch.bool, device=self.tokens.device)
        return replace(self, drop=drop.to(device=self.tokens.device, dtype=torch.bool))

    def drop_mask(self) -> Tensor:
        if self.drop is None:
            return torch.zeros(len(self), dtype=torch.bool, device=self.tokens.device)
        return self.drop

    @staticmethod
    def cat(conds: list["TextCond"]) -> "TextCond":
        return TextCond(torch.cat([c.tokens for c in conds]), torch.cat([c.mask for c in conds]),
                        torch.cat([c.pooled for c in conds]), torch.cat([c.drop_mask() for c in conds]))
