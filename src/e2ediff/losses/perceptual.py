"""LPIPS (Zhang, Isola, Efros, Shechtman, Wang 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric") over a pluggable backbone, in plain torch (no torchvision, no lpips package, no downloads).

    d(x, y) = Σ_l (1 / H_l W_l) Σ_{h,w} ‖ w_l ⊙ (ŷ^l_{hw} − x̂^l_{hw}) ‖²,   x̂^l = f^l / (‖f^l‖_channels + 1e-10)

Backbones:
- VGG16Features / AlexNetFeatures: the torchvision layer layouts with the lpips taps; weights load from local files
  with torchvision key names (features.0.weight, ...). Linear heads load from the lpips release files
  (lin0.model.1.weight, ...).
- FashionFeatureNet: the project's own small perceptual backbone for the Fashion-MNIST miniature, trained with a
  SimCLR contrastive objective (train_feature_net). It is deliberately NOT the evaluation network: the evaluation
  classifier is a supervised classifier of another architecture; using one network for both the loss and the metric
  inflates the metric (iCT paper: "LPIPS causes undesirable bias in evaluation").
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LPIPS_EPS = 1e-10  # lpips.normalize_tensor: x / (sqrt(Σ_c x²) + eps)


# ---------------------------------------------------------------------------------------------------------------
# weight files
# ---------------------------------------------------------------------------------------------------------------

def load_tensor_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from a .safetensors file or a .pth/.pt file (torch.load(weights_only=True), no code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"weight file {path} does not hold a flat state dict of tensors")
    return state


def _load_strict(module: nn.Module, state: dict[str, Tensor], path: Path | str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"weight file {path}: key mismatch for {type(module).__name__}; "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(f"weight file {path}: {key} has shape {tuple(value.shape)}, "
                             f"expected {tuple(own[key].shape)}")
    module.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------
# torchvision-layout backbones
# ---------------------------------------------------------------------------------------------------------------

class ImageNetScaling(nn.Module):
    """lpips ScalingLayer: [-1, 1] inputs -> (x − shift) / scale with the lpips ImageNet constants."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


class _TappedFeatures(nn.Module):
    """A torchvision-style `features` Sequential whose outputs after the layers in `taps` are returned."""

    in_channels = 3

    def __init__(self, layers: list[nn.Module], taps: Sequence[int], channels: Sequence[int]):
        super().__init__()
        self.scaling = ImageNetScaling()
        self.features = nn.Sequential(*layers)
        self.taps = tuple(taps)
        self.channels = list(channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: [B, 3, H, W] in [-1, 1] -> one feature map per tap."""
        h = self.scaling(x)
        out = []
        for i, layer in enumerate(self.features[: self.taps[-1] + 1]):
            h = layer(h)
            if i in self.taps:
                out.append(h)
        return out

    def load_state_dict_from_file(self, path: str | Path) -> None:
        """Load torchvision weights (features.0.weight, ...; classifier.* keys of a full checkpoint are ignored)."""
        state = load_tensor_file(path)
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        _load_strict(self, state, path)


class VGG16Features(_TappedFeatures):
    """torchvision vgg16().features[:30]; taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (lpips 'vgg')."""

    def __init__(self):
        layers: list[nn.Module] = []
        c_in = 3
        for stage, (width, n_conv) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]):
            if stage > 0:
                layers.append(nn.MaxPool2d(2, 2))
            for _ in range(n_conv):
                layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU()]
                c_in = width
        super().__init__(layers, taps=(3, 8, 15, 22, 29), channels=(64, 128, 256, 512, 512))


class AlexNetFeatures(_TappedFeatures):
    """torchvision alexnet().features[:12]; taps relu1..relu5 (lpips 'alex')."""

    def __init__(self):
        layers = [nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                  nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                  nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
                  nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
                  nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()]
        super().__init__(layers, taps=(1, 4, 7, 9, 11), channels=(64, 192, 384, 256, 256))


# ---------------------------------------------------------------------------------------------------------------
# the project's own backbone for the Fashion-MNIST miniature
# ---------------------------------------------------------------------------------------------------------------

class FashionFeatureNet(nn.Module):
    """VGG-like conv+ReLU stack: 3 stages of two 3x3 convs, 2x2 max-pool between stages; taps after each stage.

    x: [B, 1, H, W] in [-1, 1] (Fashion-MNIST: 32x32) -> [B, c0, H, W], [B, c1, H/2, W/2], [B, c2, H/4, W/4].
    Trained without labels by a SimCLR contrastive objective (train_feature_net); the evaluation classifier is a
    supervised network of a different architecture, so the loss network and the metric network stay separate.
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 128), in_channels: int = 1):
        super().__init__()
        self.channels = [int(c) for c in channels]
        self.in_channels = int(in_channels)
        stages = []
        c_in = self.in_channels
        for c in self.channels:
            stages.append(nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(c, c, 3, padding=1), nn.ReLU()))
            c_in = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        h = x
        for i, stage in enumerate(self.stages):
            if i > 0:
                h = F.max_pool2d(h, 2)
            h = stage(h)
            out.append(h)
        return out

    def save(self, path: str | Path) -> None:
        """Weights as safetensors; the architecture (channels, in_channels) in the file's metadata."""
        from safetensors.torch import save_file
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"channels": json.dumps(self.channels),
                                              "in_channels": str(self.in_channels)})

    @classmethod
    def load(cls, path: str | Path) -> "FashionFeatureNet":
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FashionFeatureNet weight file {path} does not exist")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "channels" not in meta or "in_channels" not in meta:
            raise ValueError(f"weight file {path} lacks the FashionFeatureNet metadata 'channels'/'in_channels'")
        net = cls(json.loads(meta["channels"]), int(meta["in_channels"]))
        _load_strict(net, load_tensor_file(path), path)
        return net.eval()


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """SimCLR-style view of images in [-1, 1], [B, 1, H, W]: random zoom 0.8–1.1, shift ±15 %, horizontal flip,
    contrast 0.6–1.0 toward the background, Gaussian noise σ ≤ 0.15. Background stays −1."""
    b, dev = x.shape[0], x.device

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator, device=dev)

    scale = uniform(0.8, 1.1)
    flip = torch.where(torch.rand(b, generator=generator, device=dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, 0, 2], theta[:, 1, 2] = uniform(-0.15, 0.15), uniform(-0.15, 0.15)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    view = F.grid_sample(x + 1, grid, padding_mode="zeros", align_corners=False)   # zero padding of x + 1 = −1
    view = view * uniform(0.6, 1.0).view(b, 1, 1, 1) - 1
    noise = torch.randn(x.shape, generator=generator, device=dev) * uniform(0.0, 0.15).view(b, 1, 1, 1)
    return (view + noise).clamp(-1, 1)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR NT-Xent loss (Chen et al. 2020, Eq. 1) for positive pairs (z1[i], z2[i]). [B, d], [B, d] -> [2B]."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))  # k ≠ i
    n = z1.shape[0]
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, positives, reduction="none")


def train_feature_net(images_uint8: Tensor, steps: int, batch_size: int, lr: float, seed: int,
                      device: str | torch.device = "cpu", *, channels: Sequence[int] = (32, 64, 128),
                      temperature: float = 0.2, weight_decay: float = 1e-4,
                      on_step: Callable[[int, float], None] | None = None) -> FashionFeatureNet:
    """Train a FashionFeatureNet with SimCLR on unlabeled images; returns the backbone (projection head dropped).

    images_uint8: [N, H, W] uint8 (Fashion-MNIST train split: [60000, 28, 28]); padded by 2 px with background −1
    (the project's 32x32 convention) and scaled to [-1, 1]. Two augmented views per image, projection head
    GAP -> BN -> Linear -> BN -> ReLU -> Linear(64) (SimCLR's BN head; BN stays in the head), NT-Xent at `temperature`, AdamW. Deterministic given `seed`.
    on_step(step, loss) is called after every step (logging).
    """
    images = torch.as_tensor(images_uint8)
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images_uint8 has shape {tuple(images.shape)} and dtype {images.dtype}; "
                         "expected [N, H, W] uint8")
    if images.shape[0] < 2 or batch_size < 2:
        raise ValueError(f"batch_size = {batch_size} with {images.shape[0]} images; contrastive training needs >= 2")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):      # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        net = FashionFeatureNet(channels).to(device)
        width = net.channels[-1]
        head = nn.Sequential(nn.BatchNorm1d(width), nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(),
                             nn.Linear(width, 64)).to(device)
    index_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    opt = torch.optim.AdamW([*net.parameters(), *head.parameters()], lr=lr, weight_decay=weight_decay)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=index_gen)
        x = images[idx].to(device).float().div(127.5).sub(1).unsqueeze(1)
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)
        views = torch.cat([augment(x, aug_gen), augment(x, aug_gen)])
        z = head(net(views)[-1].mean((2, 3)))
        loss = nt_xent(z[:batch_size], z[batch_size:], temperature).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step, loss.item())
    return net.eval()


# ---------------------------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------------------------

class LPIPS(nn.Module):
    """LPIPS distance over a backbone with `.channels` and forward(x) -> list of feature maps.

    heads: one non-negative per-channel weight vector per tap ([C] or lpips' [1, C, 1, 1]); None initialises every
    weight to 1/C (the uncalibrated variant: mean over channels). lpips calibrates the heads on BAPPS; load those
    with load_linear_heads. Backbone and heads are frozen; gradients flow to the inputs only.
    """

    def __init__(self, backbone: nn.Module, heads: Sequence[Tensor] | None = None):
        super().__init__()
        channels = list(getattr(backbone, "channels", []))
        if not channels:
            raise ValueError(f"backbone {type(backbone).__name__} has no non-empty .channels list")
        self.backbone = backbone.eval().requires_grad_(False)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        for lin, c in zip(self.lins, channels):
            nn.init.constant_(lin.weight, 1.0 / c)
        if heads is not None:
            self.set_heads(heads)
        self.lins.requires_grad_(False)

    @property
    def in_channels(self) -> int:
        return int(getattr(self.backbone, "in_channels", 3))

    def train(self, mode: bool = True) -> "LPIPS":
        super().train(mode)
        self.backbone.eval()         # a loss network: never batch statistics / dropout
        return self

    def set_heads(self, heads: Sequence[Tensor], source: str = "heads") -> None:
        if len(heads) != len(self.lins):
            raise ValueError(f"{source}: {len(heads)} linear heads given, expected {len(self.lins)}")
        for i, (lin, w) in enumerate(zip(self.lins, heads)):
            c = lin.weight.shape[1]
            if w.numel() != c:
                raise ValueError(f"{source}: head {i} has shape {tuple(w.shape)}, expected {c} weights")
            with torch.no_grad():
                lin.weight.copy_(w.reshape(1, c, 1, 1))

    def load_linear_heads(self, path: str | Path) -> None:
        """Load lpips release heads (keys lin0.model.1.weight, lin1.model.1.weight, ...) from .pth or .safetensors."""
        state = load_tensor_file(path)
        keys = [f"lin{i}.model.1.weight" for i in range(len(self.lins))]
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"weight file {path}: missing LPIPS head keys {missing}; found {sorted(state)[:8]}")
        self.set_heads([state[k] for k in keys], source=f"weight file {path}")

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y: [B, C, H, W] in [-1, 1] -> [B]. 1-channel inputs are repeated to 3 for an RGB backbone."""
        if x.shape != y.shape or x.dim() != 4:
            raise ValueError(f"x has shape {tuple(x.shape)} and y {tuple(y.shape)}; expected equal [B, C, H, W]")
        if x.shape[1] == 1 and self.in_channels == 3:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        elif x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels; the backbone expects {self.in_channels} (or 1)")
        feats = self.backbone(torch.cat([x, y]))
        total = x.new_zeros(x.shape[0])
        for f, lin in zip(feats, self.lins):
            f = f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + LPIPS_EPS)   # unit-normalise channels
            fx, fy = f.chunk(2)
            diff = (fx - fy).square()
            w = lin.weight.clamp(min=0)                                              # heads are non-negative
            total = total + F.conv2d(diff, w).mean((1, 2, 3))                        # Σ_c w_c d_c, spatial mean
        return total

    def embed(self, x: Tensor) -> Tensor:
        """The LPIPS feature space as a vector: [B, C, H, W] -> [B, D] with ‖embed(x) − embed(y)‖² = LPIPS(x, y).

        Per tap l: channel-normalised features times sqrt(w_c / (H_l W_l)), flattened and concatenated. Distances in
        this space (energy score, energy distance) are therefore perceptual distances of a frozen multi-scale network.
        """
        if x.dim() != 4:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [B, C, H, W]")
        if x.shape[1] == 1 and self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels; the backbone expects {self.in_channels} (or 1)")
        parts = []
        for f, lin in zip(self.backbone(x), self.lins):
            f = f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + LPIPS_EPS)
            scale = (lin.weight.clamp(min=0).reshape(1, -1, 1, 1) / (f.shape[2] * f.shape[3])).sqrt()
            parts.append((f * scale).flatten(1))
        return torch.cat(parts, 1)

    @classmethod
    def from_local(cls, net: str, backbone_path: str | Path, heads_path: str | Path | None = None) -> "LPIPS":
        """LPIPS from local files. net: 'vgg' | 'alex' (torchvision state dict; also named 'vgg16' | 'alexnet', as the
        config's loss.lpips_backbone does) | 'fashion' (FashionFeatureNet.save).
        heads_path: lpips release heads (e.g. lpips/weights/v0.1/vgg.pth); None keeps the 1/C heads."""
        net = {"vgg16": "vgg", "alexnet": "alex"}.get(net, net)
        if net == "vgg":
            backbone: nn.Module = VGG16Features()
            backbone.load_state_dict_from_file(backbone_path)
        elif net == "alex":
            backbone = AlexNetFeatures()
            backbone.load_state_dict_from_file(backbone_path)
        elif net == "fashion":
            backbone = FashionFeatureNet.load(backbone_path)
        else:
            raise ValueError(f"net = {net!r}; expected 'vgg' (vgg16), 'alex' (alexnet) or 'fashion'")
        lp = cls(backbone)
        if heads_path is not None:
            lp.load_linear_heads(heads_path)
        return lp
