"""GAN losses against direct formulas, R1 against a quadratic discriminator, adaptive weight against manual grads."""
import math

import pytest
import torch

from e2ediff.losses.gan import (LatentDiscriminator, PixelDiscriminator, adaptive_gan_weight, d_hinge,
                                d_nonsaturating, g_hinge, g_nonsaturating, r1_penalty)

LOGITS_REAL = [-2.0, -0.5, 0.0, 0.7, 3.0]
LOGITS_FAKE = [1.5, -1.2, 0.0, -3.0, 0.4]


def test_hinge_and_nonsaturating_formulas():
    real, fake = torch.tensor(LOGITS_REAL), torch.tensor(LOGITS_FAKE)
    want_dh = [max(0.0, 1 - r) + max(0.0, 1 + f) for r, f in zip(LOGITS_REAL, LOGITS_FAKE)]
    want_dns = [math.log1p(math.exp(-r)) + math.log1p(math.exp(f)) for r, f in zip(LOGITS_REAL, LOGITS_FAKE)]
    want_gns = [-math.log(1 / (1 + math.exp(-f))) for f in LOGITS_FAKE]
    assert d_hinge(real, fake).tolist() == pytest.approx(want_dh, rel=1e-6)
    assert g_hinge(fake).tolist() == pytest.approx([-f for f in LOGITS_FAKE], rel=1e-6)
    assert d_nonsaturating(real, fake).tolist() == pytest.approx(want_dns, rel=1e-6)
    assert g_nonsaturating(fake).tolist() == pytest.approx(want_gns, rel=1e-6)


def test_r1_against_quadratic_discriminator():
    g = torch.Generator().manual_seed(0)
    d = 2 * 3 * 3
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = (a + a.T).requires_grad_(True)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    W = torch.randn(5, d, generator=g, dtype=torch.float64)

    def d_fn(x, pooled):  # D(x, c) = ½ xᵀAx + bᵀx + cᵀWx, so ∇_x D = Ax + b + Wᵀc
        v = x.flatten(1)
        return 0.5 * ((v @ A) * v).sum(1) + v @ b + ((pooled @ W) * v).sum(1)

    x = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    c = torch.randn(4, 5, generator=g, dtype=torch.float64)
    pen = r1_penalty(d_fn, x, c)
    want = ((x.flatten(1) @ A.detach() + b + c @ W) ** 2).sum(1)
    torch.testing.assert_close(pen, want, rtol=1e-12, atol=1e-12)
    pen.sum().backward()                            # create_graph=True: the penalty trains D's parameters
    assert A.grad is not None and A.grad.abs().sum() > 0


def test_adaptive_weight_against_manual_grads():
    g = torch.Generator().manual_seed(1)
    last = torch.randn(3, 4, generator=g, requires_grad=True)
    x = torch.randn(6, 4, generator=g)
    out = x @ last.T
    rec = out.square().mean()
    gan = -out.sum(1).mean() * 0.01
    weight = adaptive_gan_weight(rec, gan, last)
    g_rec = 2 * out.detach().T @ x / out.numel()
    g_gan = -0.01 * torch.ones(6, 3).T @ x / 6
    want = g_rec.norm() / (g_gan.norm() + 1e-4)
    torch.testing.assert_close(weight, want, rtol=1e-5, atol=0)
    assert not weight.requires_grad
    assert adaptive_gan_weight(rec, gan, last, max_weight=0.5).item() == 0.5
    (rec + weight * gan).backward()                 # graphs were retained
    with pytest.raises(ValueError, match="scalars"):
        adaptive_gan_weight(out.square().mean(1), gan, last)


@pytest.mark.parametrize("make,shape", [(lambda sn: LatentDiscriminator(hidden=8, spectral_norm=sn), (3, 4, 8, 8)),
                                        (lambda sn: PixelDiscriminator(hidden=4, spectral_norm=sn), (3, 1, 32, 32))])
@pytest.mark.parametrize("spectral_norm", [False, True])
def test_discriminator_shapes_and_caption_conditioning(make, shape, spectral_norm):
    torch.manual_seed(0)
    disc = make(spectral_norm).eval()          # eval: spectral norm stops its power iteration between calls
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=g)
    c1, c2 = torch.randn(3, 384, generator=g), torch.randn(3, 384, generator=g)
    logits = disc(x, c1)
    assert logits.shape == (3,)
    assert (disc(x, c2) - logits).abs().min() > 1e-6          # the caption changes every logit
    # projection structure: logit(c) is affine in c with slope <embed, φ(x)>
    torch.testing.assert_close(disc(x, c1 + c2) - disc(x, c2), disc(x, c1) - disc(x, torch.zeros_like(c1)),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="x has shape"):
        disc(torch.zeros(3, 2, 8, 8), c1)
    with pytest.raises(ValueError, match="pooled"):
        disc(x, c1[:, :10])


def test_discriminator_size_validation():
    with pytest.raises(ValueError, match="size"):
        PixelDiscriminator(size=28)
