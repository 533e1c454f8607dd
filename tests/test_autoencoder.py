"""The KL autoencoder: shapes, KL closed form, scaling factor, scaled-latent round trip, PSNR, a short overfit."""
import math

import numpy as np
import pytest
import torch

from e2ediff.models.autoencoder import PRESETS, AutoencoderConfig, AutoencoderKL, DiagonalGaussian, psnr


def make_ae(cfg: AutoencoderConfig | None = None, seed: int = 0) -> AutoencoderKL:
    return AutoencoderKL(cfg or PRESETS["tiny"], generator=torch.Generator().manual_seed(seed))


def structured_images(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 1, 32, 32] in [-1, 1]: soft discs of random centre/radius filled with random-frequency stripes."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    cx, cy = torch.rand(n, 1, 1, generator=g) - 0.5, torch.rand(n, 1, 1, generator=g) - 0.5
    r = 0.2 + 0.4 * torch.rand(n, 1, 1, generator=g)
    freq = 2 + 6 * torch.rand(n, 1, 1, generator=g)
    blob = torch.sigmoid(20 * (r - ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()))
    return (2 * blob - 1 + 0.3 * torch.sin(freq * xx) * blob).clamp(-1, 1)[:, None]


def test_shapes_and_parameter_counts():
    ae = make_ae()
    x = structured_images(2)
    posterior = ae.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 8, 8)
    assert ae.decode(posterior.mode()).shape == (2, 1, 32, 32)
    assert ae.encode_latents(x).shape == (2, 4, 8, 8)
    assert ae.decode_latents(ae.encode_latents(x)).shape == (2, 1, 32, 32)
    assert sum(p.numel() for p in ae.parameters()) <= 500_000
    assert sum(p.numel() for p in make_ae(PRESETS["base"]).parameters()) <= 5_000_000
    with pytest.raises(ValueError, match="shape"):
        ae.encode(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="latents"):
        ae.decode(torch.zeros(2, 4, 16, 16))


def test_same_seed_same_weights():
    a, b = make_ae(seed=1), make_ae(seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), make_ae(seed=2).parameters()))


def test_kl_matches_float64_closed_form():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 8, 8, generator=g), 2 * torch.randn(3, 4, 8, 8, generator=g)
    kl = DiagonalGaussian(mean, logvar).kl()
    std = torch.exp(0.5 * logvar.double())
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean.double(), std),
                                            torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    assert kl.shape == (3,)
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-4)
    # N(0, I) has zero KL; logvar is clamped to [-30, 20] as in Stable Diffusion
    assert DiagonalGaussian(torch.zeros(2, 4), torch.zeros(2, 4)).kl().abs().max() == 0
    clamped = DiagonalGaussian(torch.zeros(1, 1), torch.tensor([[50.0]]))
    assert clamped.logvar.item() == 20.0 and math.isclose(clamped.var.item(), math.exp(20.0), rel_tol=1e-6)


def test_sample_uses_generator_and_has_right_moments():
    mean, logvar = torch.full((1, 20000), 1.5), torch.full((1, 20000), math.log(0.25))
    q = DiagonalGaussian(mean, logvar)
    a = q.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, q.sample(torch.Generator().manual_seed(3)))
    assert abs(a.mean().item() - 1.5) < 0.02 and abs(a.std().item() - 0.5) < 0.02
    assert torch.equal(q.mode(), mean)


def test_scaling_factor_is_inverse_std():
    g = torch.Generator().manual_seed(0)
    latents = 3.0 * torch.randn(64, 4, 8, 8, generator=g) + 0.5
    factor = AutoencoderKL.compute_scaling_factor(latents)
    assert math.isclose(factor, 1.0 / np.std(latents.double().numpy(), ddof=1), rel_tol=1e-9)
    ae = make_ae()
    x = structured_images(16)
    with torch.no_grad():
        ae.set_scaling_factor(AutoencoderKL.compute_scaling_factor(ae.encode(x).mode()))
        scaled = ae.encode_latents(x)
    assert abs(scaled.std().item() - 1.0) < 1e-4
    assert "scaling_factor" in ae.state_dict()
    with pytest.raises(ValueError, match="scaling_factor"):
        ae.set_scaling_factor(0.0)
    with pytest.raises(ValueError, match="std"):
        AutoencoderKL.compute_scaling_factor(torch.ones(10))


def test_scaled_latents_round_trip():
    ae = make_ae()
    ae.set_scaling_factor(0.37)
    x = structured_images(3)
    with torch.no_grad():
        posterior = ae.encode(x)
        z_scaled = ae.encode_latents(x)
        torch.testing.assert_close(z_scaled, 0.37 * posterior.mode())
        torch.testing.assert_close(ae.decode_latents(z_scaled), ae.decode(posterior.mode()), atol=1e-5, rtol=1e-5)
        sampled = ae.encode_latents(x, torch.Generator().manual_seed(4), sample=True)
        torch.testing.assert_close(sampled, 0.37 * posterior.sample(torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="Generator"):
        ae.encode_latents(x, sample=True)


def test_loss_is_per_sample_and_matches_definition():
    ae = make_ae()
    x = structured_images(4)
    loss, logs = ae.loss(x, torch.Generator().manual_seed(5))
    x_hat, q = ae(x, torch.Generator().manual_seed(5))
    d = (x_hat - x).double().flatten(1)
    ref = d.abs().mean(1) + d.square().mean(1) + 1e-6 * q.kl().double() / 1024
    assert loss.shape == (4,)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert set(logs) == {"loss", "l1", "l2", "kl"}


def test_psnr_matches_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 32, 32, generator=g) * 2 - 1
    y = (x + 0.1 * torch.randn(3, 1, 32, 32, generator=g)).clamp(-1, 1)
    xn, yn = x.double().numpy(), y.double().numpy()
    ref = [10 * np.log10(4.0 / np.mean((xn[i] - yn[i]) ** 2)) for i in range(3)]
    np.testing.assert_allclose(psnr(x, y).numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(psnr((x + 1) / 2, (y + 1) / 2, data_range=1.0).numpy(), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="shapes"):
        psnr(x, y[:2])


def test_bad_config_raises():
    with pytest.raises(ValueError, match="norm_groups"):
        AutoencoderConfig(channels=(12, 32), norm_groups=8).validate()
    with pytest.raises(ValueError, match="image_size"):
        AutoencoderConfig(image_size=30).validate()
    with pytest.raises(ValueError, match="kl_weight"):
        AutoencoderConfig(kl_weight=-1.0).validate()
    with pytest.raises(ValueError, match="preset"):
        AutoencoderConfig.from_preset("huge")


def test_overfit_lowers_loss():
    """50 Adam steps on 16 structured images: the loss falls steadily (every 10-step window below the previous)."""
    ae = make_ae(AutoencoderConfig(channels=(8, 16, 32), norm_groups=4))
    x = structured_images(16)
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        psnr_before = psnr(ae(x)[0], x).mean()
    losses = []
    for _ in range(50):
        loss, _ = ae.loss(x, gen)
        loss.mean().backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.mean().item())
    windows = np.asarray(losses).reshape(5, 10).mean(1)
    assert np.all(np.diff(windows) < 0), windows
    assert windows[-1] < 0.25 * windows[0], windows
    with torch.no_grad():
        assert psnr(ae(x)[0], x).mean() > psnr_before + 5.0
