"""The evaluation network of the Fashion-MNIST miniature: a small ResNet classifier.

Its 128-d penultimate embedding plays the role Inception-v3's pool features play for FID (LeNet features served the
same purpose for MNIST in the MMD-GAN scoring code); its predictions measure prompt alignment. It is deliberately a
different network (residual, BatchNorm, trained with labels) from the perceptual-loss backbone (a VGG-like stack
trained contrastively), so a model trained on the loss cannot game the evaluation through shared features.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from e2ediff.data.fashion_mnist import to_model_images

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class ClassifierConfig:
    """channels: width of each stage (stage k > 0 halves the resolution); the last is num_features.
    blocks: residual blocks per stage. Input [B, in_channels, 32, 32] in [-1, 1]."""

    in_channels: int = 1
    num_classes: int = 10
    channels: tuple[int, ...] = (32, 64, 128)
    blocks: int = 1

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if not self.channels or self.blocks < 1 or self.num_classes < 2:
            raise ValueError(f"invalid ClassifierConfig: {self}")


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a (projected) shortcut, then ReLU (He et al. 2016, basic block)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class FashionClassifier(nn.Module):
    """ResNet-style classifier: stem, stages of residual blocks, global average pool -> features, linear head."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        c = self.config.channels
        self.stem = nn.Sequential(nn.Conv2d(self.config.in_channels, c[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(c[0]), nn.ReLU())
        blocks, c_prev = [], c[0]
        for k, width in enumerate(c):
            for j in range(self.config.blocks):
                blocks.append(ResidualBlock(c_prev, width, stride=2 if (k > 0 and j == 0) else 1))
                c_prev = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c[-1], self.config.num_classes)

    @property
    def num_features(self) -> int:
        return self.config.channels[-1]

    def features(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] in [-1, 1] -> penultimate embedding [B, num_features] (global average pool)."""
        return self.blocks(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] in [-1, 1] -> logits [B, num_classes]."""
        return self.head(self.features(x))


def init_weights(model: nn.Module, generator: torch.Generator) -> None:
    """Kaiming-normal convolutions, small-normal head, BatchNorm at (1, 0); every draw from `generator`."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01, generator=generator)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def random_shift_flip(x: Tensor, generator: torch.Generator, max_shift: int = 2, flip: bool = True) -> Tensor:
    """Per-sample random translation by up to ±max_shift px (filled with the background -1) and horizontal flip.

    x [B, C, H, W] -> same shape. `generator` is a CPU generator; the draws are moved to x's device.
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [B, W]
    if flip:
        flipped = torch.rand(b, generator=generator).to(x.device) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # advanced indices first: [B, H, W, C]
    # clone, not .contiguous(): with C = 1 the permuted view already counts as contiguous and keeps strides
    # (HW, 1, W, 1), on which oneDNN's convolution backward crashed (torch 2.13 CPU, an AVX2-only AMD EPYC)
    return out.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)


def train_classifier(images_uint8: np.ndarray | Tensor, labels: np.ndarray | Tensor, *, steps: int = 3000,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0, device: str | torch.device = "cpu",
                     augment: bool = True, config: ClassifierConfig | None = None) -> FashionClassifier:
    """Train a FashionClassifier from scratch; returns it in eval mode on `device`.

    images_uint8 [N, 28, 28] (padded to [N, 1, 32, 32] in [-1, 1] exactly as the data loader does), labels [N] int.
    AdamW with weight decay 5e-4, cosine learning-rate decay to 0 over `steps`, cross-entropy.
    Batches, augmentation and initialisation all draw from one generator seeded with `seed`.
    """
    x_all = to_model_images(torch.as_tensor(images_uint8))
    y_all = torch.as_tensor(labels).long()
    if y_all.shape != (x_all.shape[0],):
        raise ValueError(f"labels must have shape [{x_all.shape[0]}], got {tuple(y_all.shape)}")
    config = config or ClassifierConfig()
    if y_all.min() < 0 or y_all.max() >= config.num_classes:
        raise ValueError(f"labels must lie in [0, {config.num_classes}), got [{int(y_all.min())}, {int(y_all.max())}]")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    x_all, y_all = x_all.to(device), y_all.to(device)
    generator = torch.Generator().manual_seed(seed)
    model = FashionClassifier(config)
    init_weights(model, generator)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(steps):
        idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=generator).to(device)
        x, y = x_all[idx], y_all[idx]
        if augment:
            x = random_shift_flip(x, generator)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def predict(model: FashionClassifier, images: Tensor, batch_size: int = 512) -> Tensor:
    """Model-format images [N, C, 32, 32] in [-1, 1] -> predicted labels [N] (long, on the CPU)."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(images[i:i + batch_size].to(device)).argmax(1).cpu()
                      for i in range(0, images.shape[0], batch_size)])


def accuracy(model: FashionClassifier, images_uint8: np.ndarray | Tensor, labels: np.ndarray | Tensor,
             batch_size: int = 512) -> float:
    """Fraction of images_uint8 [N, 28, 28] that the classifier assigns to labels [N]."""
    y = torch.as_tensor(labels).long().cpu()
    pred = predict(model, to_model_images(torch.as_tensor(images_uint8)), batch_size)
    if y.shape != pred.shape:
        raise ValueError(f"labels must have shape {tuple(pred.shape)}, got {tuple(y.shape)}")
    return float((pred == y).double().mean())


def save_classifier(model: FashionClassifier, path: str | os.PathLike) -> None:
    """Write path/model.safetensors (weights and BatchNorm statistics) and path/config.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt", "model": "FashionClassifier"})
    (path / CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2) + "\n")


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> FashionClassifier:
    """Read a classifier written by save_classifier; returns it in eval mode. Mismatched files raise ValueError."""
    path = Path(path)
    weights, config_file = path / WEIGHTS_FILE, path / CONFIG_FILE
    for f in (weights, config_file):
        if not f.is_file():
            raise FileNotFoundError(f"classifier file not found: {f} (write it with save_classifier)")
    try:
        config = ClassifierConfig(**json.loads(config_file.read_text()))
        model = FashionClassifier(config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_file}: not a ClassifierConfig ({str(err)[:200]})") from err
    try:
        state = load_file(str(weights))
    except Exception as err:   # safetensors raises its own error type for garbage files
        raise ValueError(f"{weights}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{weights}: tensor {bad[0]!r} holds non-finite values (NaN/inf)")
    expected = model.state_dict()
    problems = sorted(set(expected) ^ set(state))
    problems += [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        raise ValueError(f"{weights} does not match the classifier described by {config_file}: {problems[:5]}")
    model.load_state_dict(state)
    return model.to(device).eval()
