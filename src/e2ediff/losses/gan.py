"""Caption-conditioned discriminators and GAN losses for the L2+LPIPS+GAN row of the E2EDiff ablation (Table 2).

Discriminators use projection conditioning (Miyato & Koyama 2018, "cGANs with Projection Discriminator"):
    logit = ψ(φ(x)) + <embed(c), φ(x)>,
with φ a conv trunk ending in a global sum pool, ψ a linear head and embed a linear map of the pooled caption.
With ``grid = g > 1`` the projection is spatial: the trunk's map is sum-pooled over each cell of a g × g grid and
embed gives one vector per cell, logit = ψ(Σ_cells φ_cell) + Σ_cells <embed(c)_cell, φ_cell>, so the caption term can
tell *where* the image holds what the caption names (a global sum pool cannot: fashion-scenes' 2 × 2 layouts).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _maybe_sn(layer: nn.Module, spectral_norm: bool) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(layer) if spectral_norm else layer


def cell_sums(h: Tensor, grid: int) -> Tensor:
    """Sum pool of a map [B, F, H, W] over each cell of a grid × grid partition -> [B, F, grid, grid]
    (grid 1: the global sum pool). H and W must be multiples of grid."""
    b, f, hh, ww = h.shape
    if hh % grid or ww % grid:
        raise ValueError(f"loss.gan_grid = {grid} does not divide a discriminator feature map of {hh} x {ww}; "
                         f"choose a grid that divides every head's resolution")
    return h.reshape(b, f, grid, hh // grid, grid, ww // grid).sum((3, 5))


def group_spread(h: Tensor, group: int) -> Tensor:
    """Minibatch standard deviation (ProGAN / StyleGAN) per group of ``group`` consecutive rows: the standard
    deviation over a group's members of each feature at each position, averaged over positions, repeated for every
    member. h [B, F, H, W] -> [B, F]. It lets a discriminator see a group's spread, which no per-sample logit can:
    the m samples of one caption against m real images of its class."""
    b, f = h.shape[:2]
    if group < 2 or b % group:
        raise ValueError(f"a batch of {b} is not a whole number of groups of {group} (loss.gan_group_std groups each "
                         f"caption's samples_per_caption samples)")
    var = h.reshape(b // group, group, f, -1).to(torch.promote_types(h.dtype, torch.float32)).var(1, unbiased=False)
    return (var + 1e-8).sqrt().mean(2).to(h.dtype).repeat_interleave(group, 0)


def projection_logits(phi: Tensor, psi: nn.Module, embed: nn.Module, pooled: Tensor) -> Tensor:
    """ψ(Σ_cells φ) + Σ_cells <embed(c)_cell, φ_cell> for cell features phi [B, F, g, g] -> [B]."""
    b, f, g, _ = phi.shape
    proj = embed(pooled).view(b, f, g, g)
    return psi(phi.sum((2, 3))).squeeze(1) + (proj * phi).sum((1, 2, 3))


class ProjectionDiscriminator(nn.Module):
    """Conv trunk that halves the resolution down to 4x4, global sum pool, projection head; with ``group = m > 1``
    a minibatch-std term ψ_g(spread of the trunk's map over each group of m consecutive rows) is added to each logit.

    x: [B, in_channels, size, size], pooled: [B, text_dim] -> logits [B].
    """

    def __init__(self, in_channels: int, size: int, text_dim: int, hidden: int, spectral_norm: bool = False,
                 grid: int = 1, group: int = 1):
        super().__init__()
        if size < 4 or size & (size - 1):
            raise ValueError(f"size = {size}; expected a power of two >= 4")
        if grid not in (1, 2, 4):
            raise ValueError(f"loss.gan_grid = {grid}; the latent / pixel discriminator's 4 x 4 map takes 1, 2 or 4")
        self.in_channels, self.size, self.text_dim, self.grid, self.group = in_channels, size, text_dim, grid, group
        layers: list[nn.Module] = [_maybe_sn(nn.Conv2d(in_channels, hidden, 3, padding=1), spectral_norm),
                                   nn.LeakyReLU(0.2)]
        width = hidden
        for _ in range(int(math.log2(size // 4))):                 # size -> 4, doubling width
            layers += [_maybe_sn(nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), spectral_norm),
                       nn.LeakyReLU(0.2)]
            width *= 2
        layers += [_maybe_sn(nn.Conv2d(width, width, 3, padding=1), spectral_norm), nn.LeakyReLU(0.2)]
        self.trunk = nn.Sequential(*layers)
        self.features = width
        self.psi = _maybe_sn(nn.Linear(width, 1), spectral_norm)
        self.embed = _maybe_sn(nn.Linear(text_dim, width * grid * grid, bias=False), spectral_norm)
        if group > 1:
            self.psi_group = _maybe_sn(nn.Linear(width, 1), spectral_norm)

    def forward(self, x: Tensor, pooled: Tensor) -> Tensor:
        if x.shape[1:] != (self.in_channels, self.size, self.size):
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [B, {self.in_channels}, {self.size}, {self.size}]")
        if pooled.shape != (x.shape[0], self.text_dim):
            raise ValueError(f"pooled has shape {tuple(pooled.shape)}; expected {(x.shape[0], self.text_dim)}")
        h = self.trunk(x)
        logits = projection_logits(cell_sums(h, self.grid), self.psi, self.embed, pooled)  # ψ(Σφ) + Σ <embed(c), φ>
        if self.group > 1:
            logits = logits + self.psi_group(group_spread(h, self.group)).squeeze(1)
        return logits


class LatentDiscriminator(ProjectionDiscriminator):
    """Discriminator on latents [B, latent_channels, size, size] (default [B, 4, 8, 8])."""

    def __init__(self, latent_channels: int = 4, size: int = 8, text_dim: int = 384, hidden: int = 64,
                 spectral_norm: bool = False, grid: int = 1, group: int = 1):
        super().__init__(latent_channels, size, text_dim, hidden, spectral_norm, grid, group)


class PixelDiscriminator(ProjectionDiscriminator):
    """Discriminator on images in [-1, 1], [B, channels, size, size] (default Fashion-MNIST [B, 1, 32, 32])."""

    def __init__(self, channels: int = 1, size: int = 32, text_dim: int = 384, hidden: int = 32,
                 spectral_norm: bool = False, grid: int = 1, group: int = 1):
        super().__init__(channels, size, text_dim, hidden, spectral_norm, grid, group)


class FeatureDiscriminator(nn.Module):
    """Discriminator heads on a frozen multi-scale feature network, as in ADD / DMD2 (heads on frozen features).

    One small trainable head per tap of ``backbone`` (a module with ``.channels`` whose forward returns a list of
    feature maps, e.g. the LPIPS network): 1x1 conv -> LeakyReLU -> 3x3 conv -> LeakyReLU -> global sum pool ->
    projection logit ψ(φ) + <embed(c), φ> (per cell of a grid × grid partition when grid > 1, see the module
    docstring). The logits of all heads are summed. The backbone gets no gradient of its
    own (it is frozen), but gradients reach the input images, so the generator and R1 see through it. With
    ``group = m > 1`` each head adds a minibatch-std term ψ_g(`group_spread` of its map over each group of m rows).

    x: [B, C, H, W] images in [-1, 1], pooled: [B, text_dim] -> logits [B].
    """

    def __init__(self, backbone: nn.Module, text_dim: int, hidden: int = 64, spectral_norm: bool = False,
                 grid: int = 1, group: int = 1):
        super().__init__()
        if grid < 1:
            raise ValueError(f"loss.gan_grid = {grid}; expected >= 1")
        self.grid, self.group = grid, group
        channels = list(getattr(backbone, "channels", []))
        if not channels:
            raise ValueError(f"backbone {type(backbone).__name__} has no non-empty .channels list")
        self.backbone = backbone.eval().requires_grad_(False)
        self.text_dim = text_dim
        self.heads = nn.ModuleList(
            nn.Sequential(_maybe_sn(nn.Conv2d(c, hidden, 1), spectral_norm), nn.LeakyReLU(0.2),
                          _maybe_sn(nn.Conv2d(hidden, hidden, 3, padding=1), spectral_norm), nn.LeakyReLU(0.2))
            for c in channels)
        self.psi = nn.ModuleList(_maybe_sn(nn.Linear(hidden, 1), spectral_norm) for _ in channels)
        self.embed = nn.ModuleList(_maybe_sn(nn.Linear(text_dim, hidden * grid * grid, bias=False), spectral_norm)
                                   for _ in channels)
        if group > 1:
            self.psi_group = nn.ModuleList(_maybe_sn(nn.Linear(hidden, 1), spectral_norm) for _ in channels)

    def train(self, mode: bool = True) -> "FeatureDiscriminator":
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: Tensor, pooled: Tensor) -> Tensor:
        if pooled.shape != (x.shape[0], self.text_dim):
            raise ValueError(f"pooled has shape {tuple(pooled.shape)}; expected {(x.shape[0], self.text_dim)}")
        if x.shape[1] == 1 and getattr(self.backbone, "in_channels", 1) == 3:
            x = x.expand(-1, 3, -1, -1)
        logits = x.new_zeros(x.shape[0])
        for i, (f, head, psi, embed) in enumerate(zip(self.backbone(x), self.heads, self.psi, self.embed)):
            h = head(f)
            logits = logits + projection_logits(cell_sums(h, self.grid), psi, embed, pooled)   # φ_l(x) per cell
            if self.group > 1:
                logits = logits + self.psi_group[i](group_spread(h, self.group)).squeeze(1)
        return logits


def d_hinge(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Hinge discriminator loss: relu(1 − D(x)) + relu(1 + D(G(z))). [B], [B] -> [B]."""
    return F.relu(1.0 - real_logits) + F.relu(1.0 + fake_logits)


def g_hinge(fake_logits: Tensor) -> Tensor:
    """Hinge generator loss: −D(G(z)). [B] -> [B]."""
    return -fake_logits


def d_nonsaturating(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Non-saturating (logistic) discriminator loss: softplus(−D(x)) + softplus(D(G(z))). [B], [B] -> [B]."""
    return F.softplus(-real_logits) + F.softplus(fake_logits)


def g_nonsaturating(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss: softplus(−D(G(z))) = −log σ(D(G(z))). [B] -> [B]."""
    return F.softplus(-fake_logits)


def r1_penalty(d_fn, real_x: Tensor, pooled: Tensor) -> Tensor:
    """R1 gradient penalty ‖∇_x D(x, c)‖² on real data (Mescheder et al. 2018). -> [B].

    d_fn(x, pooled) -> logits [B]. The graph is kept (create_graph=True) so the penalty trains D;
    the call site multiplies by γ/2 and averages.
    """
    x = real_x.detach().requires_grad_(True)
    logits = d_fn(x, pooled)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return grad.square().flatten(1).sum(1)


def adaptive_gan_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer_param: Tensor,
                        max_weight: float = 1e4) -> Tensor:
    """VQGAN's adaptive weight (Esser et al. 2021, Eq. 7): ‖∇_L L_rec‖ / (‖∇_L L_GAN‖ + 1e-4), clamped, detached.

    rec_loss, gan_loss: scalars that depend on last_layer_param (the generator's last layer weight).
    Returns a detached scalar in [0, max_weight]; both graphs are retained for the caller's backward.
    """
    if rec_loss.dim() != 0 or gan_loss.dim() != 0:
        raise ValueError(f"rec_loss has shape {tuple(rec_loss.shape)} and gan_loss {tuple(gan_loss.shape)}; "
                         "expected scalars (average the per-sample losses first)")
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer_param, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer_param, retain_graph=True)
    weight = torch.linalg.vector_norm(rec_grad) / (torch.linalg.vector_norm(gan_grad) + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
