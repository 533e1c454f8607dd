"""Exponential moving average of a model's weights (the paper keeps one; sampling uses it)."""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    """shadow ← decay·shadow + (1 − decay)·θ after every optimizer step; buffers are copied.

    ``decay`` is per step: 0.95 (the paper) averages about the last 1/(1 − 0.95) = 20 steps, 0.999 about 1000.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._params = {name for name, _ in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if k in self._params and v.is_floating_point():
                s.lerp_(v.to(s.dtype), 1.0 - self.decay)
            else:
                s.copy_(v)

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
        model.load_state_dict(self.shadow)
