"""Samplers against independent references: an analytic Gaussian-mixture posterior (DDIM), diffusers' DDIMScheduler
and LCMScheduler step chains, a float64 transcription of Algorithm 1, finite differences and gradcheck."""
import math

import numpy as np
import pytest
import torch
import torch.utils.checkpoint
from diffusers import DDIMScheduler, LCMScheduler
from scipy import stats
from torch import nn

from e2ediff.conditioning import TextCond
from e2ediff.denoiser import Denoiser, consistency_fn, guided
from e2ediff.samplers import ddim, lcm, unroll
from e2ediff.schedules import VPSchedule, ddim_timesteps, lcm_timesteps


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: intra-op threads only add synchronisation, which made the mixture tests ~30× slower on a
    loaded 2-core machine. Restored after each test."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_cond(b: int, dim: int = 6, seed: int = 0, dtype=torch.float32) -> TextCond:
    g = torch.Generator().manual_seed(seed)
    return TextCond(torch.randn(b, 3, dim, generator=g, dtype=dtype), torch.ones(b, 3, dtype=torch.bool),
                    torch.randn(b, dim, generator=g, dtype=dtype))


class TinyEpsNet(nn.Module):
    """ε-prediction net [B, C, H, W] whose output depends nonlinearly on x, on t (so a wrong timestep shows in
    gradients) and on the caption (a learned null replaces dropped captions)."""

    def __init__(self, channels: int = 2, dim: int = 6, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.time = nn.Linear(2, channels)
        self.text = nn.Linear(dim, channels)
        self.null = nn.Parameter(torch.randn(dim))

    def forward(self, x, t, cond, w=None):
        tf = torch.stack([torch.sin(t / 150.0), torch.cos(t / 370.0)], -1).to(x.dtype)
        pooled = torch.where(cond.drop_mask()[:, None], self.null.to(x.dtype), cond.pooled)
        h = self.conv(x) + self.time(tf)[:, :, None, None] + self.text(pooled)[:, :, None, None]
        if w is not None:
            h = h + 0.2 * w.to(x.dtype)[:, None, None, None]
        return 0.8 * x + 0.5 * torch.tanh(h)      # roughly the noise it sees, as a trained ε-net would


def lcm_default_schedule() -> VPSchedule:
    """The schedule of diffusers' LCMScheduler defaults: scaled_linear 0.00085..0.012, 1000 steps."""
    return VPSchedule.from_name("scaled_linear")


def reference_lcm(net, abar, noise, steps, cond, noises, *, renoise="vp", boundary=True, detach_before=None,
                  gamma=1.0):
    """E2EDiff Algorithm 1 / LCMScheduler.step written out with python-float coefficients from the float64 list
    `abar`, for an ε-net. detach_before=k detaches the latent entering step k (truncated backprop); gamma < 1 (vp)
    mixes the noise the step implies into the re-noise."""
    b = noise.shape[0]
    z = noise if renoise == "vp" else noise / math.sqrt(abar[steps[0]])
    for i, t in enumerate(steps):
        if i == detach_before:
            z = z.detach()
        a, s = math.sqrt(abar[t]), math.sqrt(1 - abar[t])
        z_in = z if renoise == "vp" else a * z
        x0 = (z_in - s * net(z_in, torch.full((b,), float(t), dtype=noise.dtype), cond)) / a
        c_skip = 0.25 / ((10 * t) ** 2 + 0.25)
        c_out = 10 * t / math.sqrt((10 * t) ** 2 + 0.25)
        denoised = c_skip * z + c_out * x0 if boundary else x0
        if i == len(steps) - 1:
            return denoised
        ap = abar[steps[i + 1]]
        if renoise == "vp":       # ε̂ = (z − a·denoised) / s: the noise the step implies
            eps = gamma * noises[i] + math.sqrt(1 - gamma ** 2) * (z - a * denoised) / s
            z = math.sqrt(ap) * denoised + math.sqrt(1 - ap) * eps
        else:
            z = denoised + math.sqrt((1 - ap) / ap) * noises[i]


def fixed_noises(like: torch.Tensor, count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(like.shape, generator=g, dtype=like.dtype) for _ in range(count)]


# ---------------------------------------------------------------------------------------------------------------------
# b) DDIM on an analytic denoiser: a 1-D two-component Gaussian mixture with a closed-form posterior mean.

WEIGHTS, MEANS, STD = np.array([0.3, 0.7]), np.array([-2.0, 2.0]), 0.3


class MixturePosteriorMean(nn.Module):
    """Exact E[x0 | z_t] for x0 ~ Σ π_k N(μ_k, τ²), z_t = a·x0 + s·ε (float64). With p_k(z) = N(z; a μ_k, a²τ² + s²):
    E[x0 | z] = Σ_k r_k(z) (μ_k + a τ² (z − a μ_k) / (a²τ² + s²)),  r_k ∝ π_k p_k(z).
    ᾱ comes from its own numpy linear-β table, independent of VPSchedule."""

    def __init__(self):
        super().__init__()
        self.abar = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))

    def forward(self, x, t, cond, w=None):
        abar = self.abar[t.round().long()][:, None]               # [N, 1]
        a, s2 = abar.sqrt(), 1 - abar
        mu, pi = torch.from_numpy(MEANS)[None], torch.from_numpy(WEIGHTS)[None]
        var = a ** 2 * STD ** 2 + s2                              # [N, 2]
        logp = pi.log() - 0.5 * var.log() - (x - a * mu) ** 2 / (2 * var)
        r = logp.softmax(-1)
        return (r * (mu + a * STD ** 2 * (x - a * mu) / var)).sum(-1, keepdim=True)


def mixture_ok(x: torch.Tensor) -> bool:
    """Mixture weight within 0.03 (≈4 standard errors at N = 4000), component means within 0.05, stds within 0.03,
    and Kolmogorov–Smirnov distance to the exact mixture CDF below 0.03."""
    x = x.flatten().numpy()
    right = x > 0
    if right.all() or not right.any():
        return False
    cdf = lambda u: sum(p * stats.norm.cdf(u, m, STD) for p, m in zip(WEIGHTS, MEANS))
    return (abs(right.mean() - WEIGHTS[1]) < 0.03
            and abs(x[right].mean() - MEANS[1]) < 0.05 and abs(x[~right].mean() - MEANS[0]) < 0.05
            and abs(x[right].std() - STD) < 0.03 and abs(x[~right].std() - STD) < 0.03
            and stats.kstest(x, cdf).statistic < 0.03)


def mixture_setup(n: int = 4000):
    den = Denoiser(MixturePosteriorMean(), VPSchedule.from_name("linear"), "x0")
    noise = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond = TextCond(torch.zeros(n, 1, 1, dtype=torch.float64), torch.ones(n, 1, dtype=torch.bool),
                    torch.zeros(n, 1, dtype=torch.float64))
    return den, noise, cond, ddim_timesteps(250, spacing="trailing")


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_samples_gaussian_mixture(eta):
    den, noise, cond, steps = mixture_setup()
    x = ddim(den, noise, steps, cond, eta=eta, generator=torch.Generator().manual_seed(1))
    assert mixture_ok(x)


def test_mixture_check_rejects_wrong_samplers():
    """The check fails for plausible sampler bugs:
    - dropping the 'direction pointing to z_t' term of Eq. 12 (z_prev = sqrt(ᾱ_prev)·x0): every step shrinks the
      latent towards the posterior mean, the samples collapse onto points and the component stds go to ~0;
    - eta = 1 without adding the σ·ε noise: a variance-losing chain, stds far too small;
    - an off-by-one schedule lookup (ᾱ_prev taken one grid step too far, t_prev − 4): a subtle bug, yet it shrinks
      the stds to ≈ 0.1 and shifts the means;
    - a single step: the output is E[x0 | z_T] ≈ the mixture mean 0.8 for every sample."""
    den, noise, cond, steps = mixture_setup()
    schedule = den.schedule

    def step_without_direction(z, t, t_prev, _):
        return schedule.alpha_sigma(t_prev, z.dtype, z.ndim)[0] * den(z, t, cond)

    def eta1_without_noise(z, t, t_prev, _):
        x0, eps = den.predict(z, t, cond)
        ab, ab_prev = schedule.alpha_bar(t)[:, None], schedule.alpha_bar(t_prev)[:, None]
        sigma2 = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        return ab_prev.sqrt() * x0 + (1 - ab_prev - sigma2).clamp_min(0).sqrt() * eps

    def off_by_one_step(z, t, t_prev, _):
        x0, eps = den.predict(z, t, cond)
        ab_prev = schedule.alpha_bar((t_prev - 4).clamp_min(-1))[:, None]
        return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps

    assert not mixture_ok(unroll(step_without_direction, noise, steps))
    assert not mixture_ok(unroll(off_by_one_step, noise, steps))
    assert not mixture_ok(unroll(eta1_without_noise, noise, steps))
    assert not mixture_ok(ddim(den, noise, [999], cond))


# ---------------------------------------------------------------------------------------------------------------------
# DDIM and LCM against diffusers' stateful step chains fed the same model outputs and noises.

@pytest.mark.parametrize("eta, spacing", [(0.0, "leading"), (1.0, "leading"), (0.0, "trailing")])
def test_ddim_matches_diffusers(eta, spacing):
    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                        set_alpha_to_one=True, steps_offset=0, timestep_spacing=spacing)
    ref.set_timesteps(4)    # n = 4 divides T: diffusers' prev step t − T//n is then the next list entry
    net = TinyEpsNet()
    cond = make_cond(2)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z, g = noise, torch.Generator().manual_seed(9)
        for t in ref.timesteps:
            z = ref.step(net(z, t.float().expand(2), cond), t, z, eta=eta, generator=g).prev_sample
        ours = ddim(Denoiser(net, VPSchedule(ref.alphas_cumprod.double()), "eps"), noise,
                    ddim_timesteps(4, spacing=spacing), cond, eta=eta, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(ours, z, rtol=1e-5, atol=1e-5)


def diffusers_lcm_chain(net, noise, k, cond, generator):
    ref = LCMScheduler()    # defaults: scaled_linear, set_alpha_to_one, 50 original steps, timestep_scaling 10
    ref.set_timesteps(k)
    assert ref.timesteps.tolist() == lcm_timesteps(k)
    z = noise
    for t in ref.timesteps:
        z, denoised = ref.step(net(z, t.float().expand(len(z)), cond), t, z, generator=generator, return_dict=False)
    return denoised


@pytest.mark.parametrize("k", [1, 2, 4])
def test_lcm_matches_diffusers_lcm_scheduler(k):
    net = TinyEpsNet()
    cond = make_cond(2)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    den = Denoiser(net, lcm_default_schedule(), "eps")
    with torch.no_grad():
        ref = diffusers_lcm_chain(net, noise, k, cond, torch.Generator().manual_seed(11))
        # diffusers draws one randn per non-final step from the generator: the same stream as `noises` below.
        explicit = lcm(den, noise, lcm_timesteps(k), cond, noises=fixed_noises(noise, k - 1, seed=11))
        drawn = lcm(den, noise, lcm_timesteps(k), cond, generator=torch.Generator().manual_seed(11))
        # The same algorithm on diffusers' own float32-rounded ᾱ table: only float32 arithmetic differs.
        same_table = Denoiser(net, VPSchedule(LCMScheduler().alphas_cumprod.double()), "eps")
        exact_table = lcm(same_table, noise, lcm_timesteps(k), cond, noises=fixed_noises(noise, k - 1, seed=11))
    assert (exact_table - ref).abs().max() <= 1e-5
    # Our float64 table differs from diffusers' float32 one by ~1e-6 relative; x0 = (z − s·ε)/a amplifies it by 1/a
    # (≈ 15 at t = 999), hence a relative bound on the default schedule.
    assert (explicit - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert torch.equal(explicit, drawn)
    if k > 1:   # the noises matter: another seed gives another sample
        other = lcm(den, noise, lcm_timesteps(k), cond, noises=fixed_noises(noise, k - 1, seed=12))
        assert (other - ref).abs().max() > 1e-2


def test_lcm_vp_and_ve_against_float64_reference():
    net = TinyEpsNet().double()
    sched = lcm_default_schedule()
    abar = sched.alphas_cumprod.tolist()
    cond = make_cond(2, dtype=torch.float64)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    steps = [999, 759, 499, 259, 19]          # 19: c_skip ≈ 7e-6, so the VE/VP boundary difference is visible
    noises = fixed_noises(noise, len(steps) - 1, seed=6)
    den = Denoiser(net, sched, "eps")
    with torch.no_grad():
        for renoise, gamma in [("vp", 1.0), ("ve", 1.0), ("vp", 0.0), ("vp", 0.6)]:
            for boundary in [True, False]:
                got = lcm(den, noise, steps, cond, renoise=renoise, noises=noises, boundary=boundary, gamma=gamma)
                want = reference_lcm(net, abar, noise, steps, cond, noises, renoise=renoise, boundary=boundary,
                                     gamma=gamma)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        # Without the boundary terms the VE chain is the VP chain in other coordinates (y = z / sqrt(ᾱ)).
        vp = lcm(den, noise, steps, cond, noises=noises, boundary=False)
        ve = lcm(den, noise, steps, cond, renoise="ve", noises=noises, boundary=False)
        torch.testing.assert_close(ve, vp, rtol=0, atol=1e-10)
        vp_b = lcm(den, noise, steps, cond, noises=noises)
        ve_b = lcm(den, noise, steps, cond, renoise="ve", noises=noises)
        assert (ve_b - vp_b).abs().max() > 1e-8        # ...with them, the skip term acts on y instead of z


def test_lcm_gamma_zero_is_deterministic_ddim():
    """gamma = 0 re-noises with the noise each step implies, not the draws: without the boundary terms it is DDIM (η = 0)
    on the same timesteps (our ddim(), itself checked against diffusers' DDIMScheduler and a closed-form posterior
    above); with them the sample is a function of the first noise alone. gamma = 1 is the fresh-noise sampler."""
    net = TinyEpsNet().double()
    sched = lcm_default_schedule()
    den = Denoiser(net, sched, "eps")
    cond = make_cond(2, dtype=torch.float64)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    steps = lcm_timesteps(4)
    with torch.no_grad():
        got = lcm(den, noise, steps, cond, gamma=0.0, noises=fixed_noises(noise, 3, seed=6), boundary=False)
        torch.testing.assert_close(got, ddim(den, noise, steps, cond), rtol=0, atol=1e-10)
        det = [lcm(den, noise, steps, cond, gamma=0.0, noises=fixed_noises(noise, 3, seed=s)) for s in (6, 7)]
        assert torch.equal(det[0], det[1])
        vp = lcm(den, noise, steps, cond, noises=fixed_noises(noise, 3, seed=6))
        assert torch.equal(vp, lcm(den, noise, steps, cond, noises=fixed_noises(noise, 3, seed=6), gamma=1.0))
        assert (vp - det[0]).abs().max() > 1e-2      # the draws matter to the stochastic sampler
    for bad, renoise in [(-0.1, "vp"), (1.5, "vp"), (0.5, "ve")]:
        with pytest.raises(ValueError, match="gamma"):
            lcm(den, noise, steps, cond, renoise=renoise, gamma=bad)


# ---------------------------------------------------------------------------------------------------------------------
# d) checkpointing: equal gradients; the closure trap gives different ones.

def param_grads(net, loss):
    net.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def trapped_lcm(den, noise, steps, cond, noises):
    """WRONG on purpose: the checkpointed function reads the timestep `t` from the enclosing loop. Backward recomputes
    it after the loop has finished, with the last timestep, so the gradients are silently wrong (the forward pass is
    right)."""
    z = noise
    for i, step in enumerate(steps):
        t = torch.full((len(noise),), float(step))

        def step_fn(z_in):
            return consistency_fn(den, z_in, t, cond)       # BUG: `t` is looked up at recomputation time

        denoised = torch.utils.checkpoint.checkpoint(step_fn, z, use_reentrant=False)
        if i == len(steps) - 1:
            return denoised
        a, s = den.schedule.alpha_sigma(torch.tensor(float(steps[i + 1])), z.dtype, z.ndim)
        z = a * denoised + s * noises[i]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_checkpoint_gradients_equal(k):
    net = TinyEpsNet()
    den = Denoiser(net, lcm_default_schedule(), "eps")
    cond = make_cond(2)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    target = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    noises = fixed_noises(noise, k - 1, seed=9)
    steps = lcm_timesteps(k)
    grads = {}
    for ckpt in [False, True, "except_last"]:
        out = lcm(den, noise, steps, cond, noises=noises, checkpoint=ckpt)
        grads[ckpt] = param_grads(net, ((out - target) ** 2).sum())
    assert grads[False].abs().max() > 1e-3
    assert (grads[True] - grads[False]).abs().max() <= 1e-6
    assert (grads["except_last"] - grads[False]).abs().max() <= 1e-6
    out = trapped_lcm(den, noise, steps, cond, noises)
    torch.testing.assert_close(out, lcm(den, noise, steps, cond, noises=noises))   # forward values agree
    trapped = param_grads(net, ((out - target) ** 2).sum())
    if k == 1:
        assert (trapped - grads[False]).abs().max() <= 1e-6      # one step: nothing to get wrong
    else:
        assert (trapped - grads[False]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# e) finite differences and gradcheck through the unrolled sampler (float64).

def test_finite_differences_through_two_step_lcm():
    net = TinyEpsNet().double()
    den = Denoiser(net, lcm_default_schedule(), "eps")
    cond = make_cond(2, dtype=torch.float64)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    target = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    noises = fixed_noises(noise, 1, seed=12)
    steps = [999, 499]

    def loss_fn():
        return ((lcm(den, noise, steps, cond, noises=noises) - target) ** 2).sum()

    grad = param_grads(net, loss_fn())
    h, fd = 1e-6, []
    with torch.no_grad():
        for p in net.parameters():
            flat = p.view(-1)
            for j in range(flat.numel()):
                old = flat[j].item()
                flat[j] = old + h
                up = loss_fn()
                flat[j] = old - h
                down = loss_fn()
                flat[j] = old
                fd.append((up - down) / (2 * h))
    fd = torch.stack(fd)
    assert (grad - fd).norm() / grad.norm() < 1e-6


def test_gradcheck_lcm_and_ddim():
    net = TinyEpsNet(channels=1).double()
    den = Denoiser(net, lcm_default_schedule(), "eps")
    cond = make_cond(1, dtype=torch.float64)
    noise = torch.randn(1, 1, 3, 3, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    noises = fixed_noises(noise, 1, seed=14)
    assert torch.autograd.gradcheck(
        lambda z, n: lcm(den, z, [999, 499], cond, noises=[n], checkpoint=True), (noise.requires_grad_(),
                                                                                  noises[0].requires_grad_()))
    assert torch.autograd.gradcheck(lambda z: ddim(den, z, [999, 499, 0], cond), (noise,))


# ---------------------------------------------------------------------------------------------------------------------
# f) truncated backprop.

@pytest.mark.parametrize("ckpt", [False, True])
def test_grad_from_step_matches_detached_reference(ckpt):
    net = TinyEpsNet().double()
    den = Denoiser(net, lcm_default_schedule(), "eps")
    abar = den.schedule.alphas_cumprod.tolist()
    cond = make_cond(2, dtype=torch.float64)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    target = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    steps = lcm_timesteps(4)
    noises = fixed_noises(noise, 3, seed=17)
    full = param_grads(net, ((lcm(den, noise, steps, cond, noises=noises) - target) ** 2).sum())
    for k in [1, 2, 3]:
        out = lcm(den, noise, steps, cond, noises=noises, grad_from_step=k, checkpoint=ckpt)
        got = param_grads(net, ((out - target) ** 2).sum())
        ref = reference_lcm(net, abar, noise, steps, cond, noises, detach_before=k)
        want = param_grads(net, ((ref - target) ** 2).sum())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        assert (got - full).abs().max() > 1e-4          # truncation changes the gradient
    noise.requires_grad_()
    lcm(den, noise, steps, cond, noises=noises, grad_from_step=1).sum().backward()
    assert noise.grad is None                            # nothing flows back through the detached first step


# ---------------------------------------------------------------------------------------------------------------------
# g) guidance inside the sampler; contract and errors.

def test_ddim_guidance_equals_guided_denoiser():
    net = TinyEpsNet().double()
    den = Denoiser(net, lcm_default_schedule(), "eps")
    cond = make_cond(2, dtype=torch.float64)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    steps = ddim_timesteps(4)
    got = ddim(den, noise, steps, cond, guidance=3.0)
    torch.testing.assert_close(got, ddim(guided(den, 3.0), noise, steps, cond), rtol=0, atol=0)
    assert (got - ddim(den, noise, steps, cond)).abs().max() > 1e-3
    assert got.requires_grad                             # samplers never switch autograd off themselves


def test_sampler_errors():
    den = Denoiser(TinyEpsNet(), lcm_default_schedule(), "eps")
    cond, noise = make_cond(2), torch.randn(2, 2, 4, 4)
    lcm(den, noise, [999], cond)                          # one step needs no noise
    with pytest.raises(ValueError, match="generator"):
        lcm(den, noise, [999, 499], cond)
    with pytest.raises(ValueError, match="1 tensors"):
        lcm(den, noise, [999, 499], cond, noises=[noise, noise])
    with pytest.raises(ValueError, match="not both"):
        lcm(den, noise, [999, 499], cond, noises=[noise], generator=torch.Generator())
    with pytest.raises(ValueError, match="noises\\[0\\] has shape"):
        lcm(den, noise, [999, 499], cond, noises=[noise[:1]])
    with pytest.raises(ValueError, match="strictly descending"):
        lcm(den, noise, [499, 999], cond, generator=torch.Generator())
    with pytest.raises(ValueError, match="lie in"):
        ddim(den, noise, [1000, 500], cond)
    with pytest.raises(ValueError, match="grad_from_step"):
        lcm(den, noise, [999, 499], cond, generator=torch.Generator(), grad_from_step=2)
    with pytest.raises(ValueError, match="renoise"):
        lcm(den, noise, [999], cond, renoise="edm")
    with pytest.raises(ValueError, match="checkpoint must be one of"):
        lcm(den, noise, [999], cond, checkpoint="except_first")
    with pytest.raises(ValueError, match="generator"):
        ddim(den, noise, [999, 499], cond, eta=1.0)
