"""Noise schedules and timestep lists against diffusers (the reference implementation of every list we reproduce)."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

from e2ediff.schedules import (VPSchedule, ddim_timesteps, lcm_solver_timesteps, lcm_timesteps,
                               pixart_lcm_timesteps)


@pytest.mark.parametrize("name, diffusers_name, kwargs, rtol", [
    ("linear", "linear", {}, 2e-6),
    ("scaled_linear", "scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}, 2e-6),
    # diffusers rounds the cosine betas to float32; the relative error grows where ᾱ → 0 (ᾱ_999 ≈ 2e-9 ... 1e-5 rel).
    ("cosine", "squaredcos_cap_v2", {}, 5e-5),
])
def test_tables_match_diffusers(name, diffusers_name, kwargs, rtol):
    ours = VPSchedule.from_name(name).alphas_cumprod
    ref = DDPMScheduler(beta_schedule=diffusers_name, **kwargs).alphas_cumprod.double()
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    # diffusers computes in float32: agreement up to float32 rounding, accumulated over the cumulative product.
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=1e-6)


def test_cosine_matches_closed_form():
    """Nichol & Dhariwal: ᾱ_t = f(t+1)/f(0) as long as β < 0.999 (f = cos² of the shifted time)."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    ours = VPSchedule.from_name("cosine", T=1000).alphas_cumprod
    for t in [0, 10, 500, 900]:
        assert ours[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-12)


def test_unknown_schedule_lists_names():
    with pytest.raises(ValueError, match="linear, scaled_linear, cosine"):
        VPSchedule.from_name("sigmoid")


def test_invalid_table_raises():
    with pytest.raises(ValueError, match="non-increasing"):
        VPSchedule(torch.tensor([0.5, 0.9], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        VPSchedule(torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_alpha_bar_gather_rounding_and_final():
    sched = VPSchedule.from_name("linear")
    table = sched.alphas_cumprod
    t = torch.tensor([-1.0, 0.0, 10.4, 10.6, 999.0])
    got = sched.alpha_bar(t)
    assert got.dtype == torch.float64 and got.shape == (5,)
    assert got[0].item() == 1.0                      # t = -1: clean data, diffusers' set_alpha_to_one
    assert got[1:].tolist() == [table[0].item(), table[10].item(), table[11].item(), table[999].item()]
    assert sched.alpha_bar(torch.tensor([3, 7])).tolist() == [table[3].item(), table[7].item()]   # int timesteps
    with pytest.raises(ValueError, match="timesteps must lie in"):
        sched.alpha_bar(torch.tensor([1000.0]))
    with pytest.raises(ValueError, match="timesteps must lie in"):
        sched.alpha_bar(torch.tensor([-2.0]))


def test_alpha_sigma_and_add_noise():
    sched = VPSchedule.from_name("scaled_linear")
    t = torch.tensor([0.0, 499.0, 999.0])
    a, s = sched.alpha_sigma(t, torch.float32)
    assert a.shape == (3, 1, 1, 1) and a.dtype == torch.float32
    abar = sched.alphas_cumprod[[0, 499, 999]]
    assert torch.equal(a.flatten(), abar.sqrt().float()) and torch.equal(s.flatten(), (1 - abar).sqrt().float())
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ref.alphas_cumprod = sched.alphas_cumprod.clone()
    torch.testing.assert_close(sched.add_noise(x0, noise, t), ref.add_noise(x0, noise, t.long()), rtol=0, atol=1e-14)
    a2, _ = sched.alpha_sigma(t, torch.float64, ndim=2)
    assert a2.shape == (3, 1)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_timesteps_match_diffusers(spacing):
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=0)
    for n in list(range(1, 61)) + [97, 100, 250, 333, 999, 1000]:
        ref.set_timesteps(n)
        assert ddim_timesteps(n, spacing=spacing) == ref.timesteps.tolist(), (spacing, n)
    assert ddim_timesteps(4, spacing="leading") == [750, 500, 250, 0]
    assert ddim_timesteps(4, spacing="trailing") == [999, 749, 499, 249]


def test_lcm_timesteps_match_diffusers():
    assert lcm_timesteps(4) == [999, 759, 499, 259]
    ref = LCMScheduler()
    for n in range(1, 51):
        ref.set_timesteps(n)
        assert lcm_timesteps(n) == ref.timesteps.tolist(), n
    for n in [1, 2, 4, 8]:
        ref.set_timesteps(n, original_inference_steps=25)
        assert lcm_timesteps(n, original_steps=25) == ref.timesteps.tolist(), n


def test_pixart_lcm_timesteps():
    # PixArt-alpha diffusion/lcm_scheduler.py: origin = arange(1, 51)·20 − 1; origin[::-(50 // n)][:n].
    assert pixart_lcm_timesteps(4) == [999, 759, 519, 279]
    assert pixart_lcm_timesteps(1) == [999]
    assert pixart_lcm_timesteps(2) == [999, 499]
    assert pixart_lcm_timesteps(8) == [999, 879, 759, 639, 519, 399, 279, 159]


def test_lcm_solver_timesteps():
    got = lcm_solver_timesteps()
    # diffusers' LCM distillation script (DDIMSolver): (arange(1, 51) · 20).round() − 1, ascending.
    ref = ((np.arange(1, 51) * (1000 // 50)).round() - 1)[::-1].tolist()
    assert got == ref and got[0] == 999 and got[-1] == 19 and len(got) == 50


def test_step_count_errors():
    with pytest.raises(ValueError, match="number of steps"):
        ddim_timesteps(0)
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(4, spacing="linspace")
    with pytest.raises(ValueError, match="lcm_timesteps"):
        lcm_timesteps(51)
    with pytest.raises(ValueError, match="original_steps"):
        lcm_solver_timesteps(original_steps=2000)
