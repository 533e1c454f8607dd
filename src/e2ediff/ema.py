"""Exponential moving average of a model's weights (the paper keeps one; sampling uses it)."""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    """shadow ← decay·shadow + (1 − decay)·θ after every optimizer step; buffers are copied.

    ``decay`` is per step: 0.95 (the paper) averages about the last 1/(1 − 0.95) = 20 steps, 0.999 about 1000.
    With ``warmup`` (default) the decay at optimizer step s is min(decay, (1 + s) / (10 + s)), so a short run's EMA
    does not stay near the initial weights (without it, 0.999 keeps 37 % of the initialisation after 1000 steps).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True, trainable_only: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.trainable_only = trainable_only   # shadow only the parameters that train (LoRA: not the frozen base)
        self.shadow = {k: v.detach().clone() for k, v in self._tensors(model)}
        self._params = {name for name, _ in model.named_parameters()}

    def decay_at(self, step: int | None) -> float:
        if step is None or not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """One EMA step after optimizer step ``step`` (0-based; None: the plain decay)."""
        decay = self.decay_at(step)
        averaged, shadows, copied = [], [], []
        for k, v in self._tensors(model):
            s = self.shadow[k]
            if k in self._params and v.is_floating_point() and v.dtype == s.dtype:
                averaged.append(v)
                shadows.append(s)
            elif k in self._params and v.is_floating_point():
                s.lerp_(v.to(s.dtype), 1.0 - decay)
            else:
                copied.append((s, v))
        if shadows:   # one multi-tensor kernel per update instead of one launch per tensor
            torch._foreach_lerp_(shadows, averaged, 1.0 - decay)
        for s, v in copied:
            s.copy_(v)

    def _tensors(self, model: nn.Module):
        if self.trainable_only:
            return [(k, p.detach()) for k, p in model.named_parameters() if p.requires_grad]
        return list(model.state_dict().items())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:4]}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow, strict=not self.trainable_only)
