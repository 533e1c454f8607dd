"""The denoiser contract: exact conversions, parameterizations, LCM boundary terms, classifier-free guidance."""
import pytest
import torch
from diffusers import DDPMScheduler, LCMScheduler
from torch import nn

from e2ediff.conditioning import TextCond
from e2ediff.denoiser import (Denoiser, consistency_fn, eps_to_x0, guided, lcm_boundary, timestep_batch,
                              v_to_eps, v_to_x0, x0_eps_to_v, x0_to_eps)
from e2ediff.schedules import VPSchedule


def make_cond(b: int, dim: int = 6, seed: int = 0, dtype=torch.float32) -> TextCond:
    g = torch.Generator().manual_seed(seed)
    return TextCond(torch.randn(b, 3, dim, generator=g, dtype=dtype), torch.ones(b, 3, dtype=torch.bool),
                    torch.randn(b, dim, generator=g, dtype=dtype))


class CondNet(nn.Module):
    """Tiny net whose output depends on x, t, the caption (pooled or a learned null when dropped) and w.
    Records the batch size of every call."""

    def __init__(self, channels: int = 2, dim: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.text = nn.Linear(dim, channels)
        self.null = nn.Parameter(torch.randn(dim))
        self.batches: list[int] = []

    def forward(self, x, t, cond, w=None):
        self.batches.append(x.shape[0])
        pooled = torch.where(cond.drop_mask()[:, None], self.null.to(x.dtype), cond.pooled)
        h = self.conv(x) + self.text(pooled)[:, :, None, None] + torch.sin(t / 200.0).to(x.dtype)[:, None, None, None]
        if w is not None:
            h = h + 0.3 * w.to(x.dtype)[:, None, None, None]
        return torch.tanh(h)


def test_conversions_round_trip_float64():
    sched = VPSchedule.from_name("scaled_linear")
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0.0, 1.0, 250.0, 500.0, 999.0])
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    a, s = sched.alpha_sigma(t, torch.float64)
    z = a * x0 + s * eps
    v = x0_eps_to_v(x0, eps, a, s)
    torch.testing.assert_close(v, a * eps - s * x0, rtol=0, atol=0)
    for got, want in [(eps_to_x0(z, eps, a, s), x0), (x0_to_eps(z, x0, a, s), eps),
                      (v_to_x0(z, v, a, s), x0), (v_to_eps(z, v, a, s), eps)]:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_v_target_matches_diffusers_velocity():
    sched = VPSchedule.from_name("scaled_linear")
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ref.alphas_cumprod = sched.alphas_cumprod.clone()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 400, 990])
    den = Denoiser(CondNet(), sched, "v")
    torch.testing.assert_close(den.training_target(x0, noise, t.double()), ref.get_velocity(x0, noise, t),
                               rtol=0, atol=1e-14)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_predict_recovers_x0_and_eps_from_an_oracle(prediction):
    """A net that outputs the exact training target for known (x0, eps) must make predict() return (x0, eps)."""
    sched = VPSchedule.from_name("linear")
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 100.0, 600.0, 999.0], dtype=torch.float64)
    z = sched.add_noise(x0, eps, t)

    class Oracle(nn.Module):
        def forward(self, x, t_, cond, w=None):
            return den.training_target(x0, eps, t_)

    den = Denoiser(Oracle(), sched, prediction)
    got_x0, got_eps = den.predict(z, t, make_cond(4, dtype=torch.float64))
    torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-10)
    torch.testing.assert_close(den(z, t, make_cond(4, dtype=torch.float64)), got_x0, rtol=0, atol=0)


def test_dtype_and_shape_contract():
    sched = VPSchedule.from_name("linear")
    den = Denoiser(CondNet(), sched, "eps")
    z = torch.randn(2, 2, 4, 4)
    x0 = den(z, 500, make_cond(2))                        # a number is broadcast to the batch
    assert x0.dtype == torch.float32 and x0.shape == z.shape
    with torch.no_grad():
        eps = den.net(z, torch.full((2,), 500.0), make_cond(2))
    abar = sched.alphas_cumprod[500]                       # ᾱ from the float64 table, sqrt before the cast
    torch.testing.assert_close(x0, (z - (1 - abar).sqrt().float() * eps) / abar.sqrt().float(), rtol=0, atol=0)
    assert timestep_batch(torch.tensor(7.0), torch.zeros(3, 1, dtype=torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match="timestep t has shape"):
        den(z, torch.zeros(3), make_cond(2))
    with pytest.raises(ValueError, match="prediction must be one of"):
        Denoiser(CondNet(), sched, "score")

    class Wide(nn.Module):
        def forward(self, x, t, cond, w=None):
            return torch.cat([x, x], 1)

    with pytest.raises(ValueError, match="network output has shape"):
        Denoiser(Wide(), sched)(z, 500, make_cond(2))


def test_lcm_boundary_matches_diffusers():
    ref = LCMScheduler()
    t = torch.tensor([0, 1, 19, 259, 499, 999])
    c_skip, c_out = lcm_boundary(t)
    for i, ti in enumerate(t):
        r_skip, r_out = ref.get_scalings_for_boundary_condition_discrete(ti)
        assert c_skip[i].item() == pytest.approx(float(r_skip), rel=1e-6, abs=1e-12)
        assert c_out[i].item() == pytest.approx(float(r_out), rel=1e-6, abs=1e-12)
    assert (c_skip[0].item(), c_out[0].item()) == (1.0, 0.0)    # boundary condition f(z, 0) = z
    assert c_skip[-1].item() == pytest.approx(0.25 / (9990.0 ** 2 + 0.25), rel=1e-15)


def test_consistency_fn_is_skip_plus_out():
    sched = VPSchedule.from_name("scaled_linear")
    den = Denoiser(CondNet(), sched, "eps").double()
    z = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.0, 19.0, 759.0], dtype=torch.float64)
    cond, w = make_cond(3, dtype=torch.float64), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    got = consistency_fn(den, z, t, cond, w)
    for i, ti in enumerate(t.tolist()):
        c_skip = 0.25 / ((10 * ti) ** 2 + 0.25)
        c_out = 10 * ti / ((10 * ti) ** 2 + 0.25) ** 0.5
        want = c_skip * z[i] + c_out * den(z[i:i + 1], t[i:i + 1], cond[i:i + 1], w[i:i + 1])[0]
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[0], z[0], rtol=0, atol=0)   # t = 0 returns the input


def test_guided_scale_one_is_unguided_single_batch():
    net = CondNet()
    den = Denoiser(net, VPSchedule.from_name("linear"), "v")
    assert guided(den, 1.0) is den
    z = torch.randn(3, 2, 4, 4)
    net.batches.clear()
    guided(den, 1.0)(z, 300, make_cond(3))
    assert net.batches == [3]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_guided_equals_manual_eps_combination(prediction):
    net = CondNet().double()
    sched = VPSchedule.from_name("linear")
    den = Denoiser(net, sched, prediction)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([999.0, 500.0, 20.0], dtype=torch.float64)
    cond, w = make_cond(3, dtype=torch.float64), torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    scale = 4.5
    net.batches.clear()
    x0, eps = guided(den, scale).predict(z, t, cond, w)
    assert net.batches == [6]                                   # one batch of 2B
    _, eps_c = den.predict(z, t, cond, w)
    _, eps_u = den.predict(z, t, cond.with_drop(True), w)
    eps_ref = eps_u + scale * (eps_c - eps_u)
    abar = sched.alphas_cumprod[[999, 500, 20]].view(3, 1, 1, 1)
    torch.testing.assert_close(eps, eps_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x0, (z - (1 - abar).sqrt() * eps_ref) / abar.sqrt(), rtol=0, atol=1e-10)
    assert (eps_c - eps_u).abs().max() > 1e-2                   # the caption matters, so the test can fail
    torch.testing.assert_close(guided(den, scale)(z, t, cond, w), x0, rtol=0, atol=0)


def test_guided_interval_guides_inside_and_is_the_conditional_prediction_outside():
    """guided(den, s, (lo, hi)): samples whose t lies in [lo, hi] get the guided prediction, the others the plain
    conditional one (Kynkäänniemi et al. 2024), in one batch of 2B."""
    net = CondNet().double()
    den = Denoiser(net, VPSchedule.from_name("linear"), "eps")
    z = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor([999.0, 600.0, 200.0, 100.0], dtype=torch.float64)
    cond = make_cond(4, dtype=torch.float64)
    got, eps = guided(den, 2.5, (150, 600)).predict(z, t, cond)
    full = guided(den, 2.5).predict(z, t, cond)[0]
    plain = den.predict(z, t, cond)[0]
    for i, inside in enumerate([False, True, True, False]):
        torch.testing.assert_close(got[i], (full if inside else plain)[i], rtol=0, atol=1e-10)
    assert (full - plain).abs().amax(dim=(1, 2, 3)).min() > 1e-3      # guidance moves every sample: the test can fail
    for bad in [(600, 150), (-1, 5), (1,), "ab"]:
        with pytest.raises(ValueError, match="guidance_interval"):
            guided(den, 2.5, bad)
