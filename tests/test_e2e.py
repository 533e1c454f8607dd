"""E2E fine-tuning (E2EDiff Algorithm 1) against independent references: a hand-written float64 unrolled LCM loop,
a per-step decomposition of the gradient, finite differences, direct loss formulas, scipy's Hungarian solver, and
3-step training runs of FinetuneTask with every loss configuration. Tiny seeded models built in code."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from e2ediff import e2e
from e2ediff.assets import Pipeline
from e2ediff.checkpoint import checkpoint_dir, read_model_meta
from e2ediff.conditioning import TextCond
from e2ediff.config import OptimConfig, TrainConfig
from e2ediff.denoiser import Denoiser
from e2ediff.e2e import E2ELoss, E2EObjective, FinetuneRun, FinetuneTask, e2e_step
from e2ediff.losses.energy import energy_distance_by_group, energy_score
from e2ediff.losses.gan import adaptive_gan_weight
from e2ediff.losses.perceptual import LPIPS, FashionFeatureNet
from e2ediff.models.autoencoder import AutoencoderConfig, AutoencoderKL
from e2ediff.models.dit import DiT, DiTConfig
from e2ediff.schedules import VPSchedule, lcm_timesteps
from e2ediff.trainer import train

TEXT_DIM, TEXT_LEN = 16, 4


# ----------------------------------------------------------------------------------------------------------------------
# Tiny models and data


def tiny_dit(seed: int = 0, guidance_embed: bool = False, dtype=torch.float32) -> DiT:
    """DiT hidden 32, depth 1, 2 heads; every weight perturbed so the zero-initialised layers contribute."""
    g = torch.Generator().manual_seed(seed)
    net = DiT(DiTConfig(hidden_size=32, depth=1, num_heads=2, text_dim=TEXT_DIM, max_text_len=TEXT_LEN,
                        guidance_embed=guidance_embed), generator=g)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.to(dtype)


class ResidualEps(nn.Module):
    """ε-net = z_t + DiT(z_t): predicts roughly the noise it sees, as a trained ε-net does, so x0 stays O(1)."""

    def __init__(self, net: DiT):
        super().__init__()
        self.net = net
        self.config = net.config

    def forward(self, x, t, cond, w=None):
        return x + self.net(x, t, cond, w=w)


def tiny_autoencoder(seed: int = 1, dtype=torch.float32) -> AutoencoderKL:
    ae = AutoencoderKL(AutoencoderConfig(channels=(8, 16, 32), norm_groups=4),
                       generator=torch.Generator().manual_seed(seed))
    ae.set_scaling_factor(1.3)
    return ae.to(dtype).eval().requires_grad_(False)


def make_cond(b: int, seed: int = 2, dtype=torch.float32) -> TextCond:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, 3, dtype=torch.bool)
    mask[0, 2] = False
    return TextCond(torch.randn(b, 3, TEXT_DIM, generator=g).to(dtype), mask,
                    torch.randn(b, TEXT_DIM, generator=g).to(dtype))


def make_images(b: int, seed: int = 3, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 1, 32, 32, generator=g) * 2 - 1).to(dtype)


SCHEDULE = VPSchedule.from_name("linear")


class StandInData:
    """The TrainingData interface over random images; caption i ↔ class i; batch() draws nothing from the generator."""

    def __init__(self, n: int = 16, classes: int = 4, seed: int = 4):
        g = torch.Generator().manual_seed(seed)
        self.device = torch.device("cpu")
        self.images = torch.rand(n, 1, 32, 32, generator=g) * 2 - 1
        self.labels = torch.arange(n) % classes
        self.captions = [f"a picture of class {c}" for c in range(classes)]
        self._cond = make_cond(classes, seed=seed + 1)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None):
        labels = self.labels[idx]
        return self.images[idx], self._cond[labels], labels, labels.clone()


def student_pipeline(seed: int = 0) -> Pipeline:
    net = tiny_dit(seed, guidance_embed=True)
    denoiser = Denoiser(net, SCHEDULE, "eps").eval().requires_grad_(False)
    meta = {"kind": "lcm", "schedule": "linear", "prediction": "eps", "text_encoder": "test-encoder",
            "sampler": {"name": "lcm", "steps": 2, "w": 1.5}}
    return Pipeline(denoiser, tiny_autoencoder(), meta)


# ----------------------------------------------------------------------------------------------------------------------
# 1. e2e_step is Algorithm 1


def reference_unroll(net: nn.Module, z_T: torch.Tensor, noises: list[torch.Tensor], timesteps: list[int],
                     cond: TextCond) -> torch.Tensor:
    """Algorithm 1 with LCM boundary terms, written out in float64 from the DDPM linear-β table."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    z = z_T
    for i, t in enumerate(timesteps):
        eps = net(z, torch.full((len(z),), float(t), dtype=torch.float64), cond)
        x0 = (z - math.sqrt(1 - abar[t]) * eps) / math.sqrt(abar[t])           # ε-prediction → x0
        c_skip = 0.25 / ((10 * t) ** 2 + 0.25)                                 # σ_d = 0.5, timestep scaling 10
        c_out = 10 * t / math.sqrt((10 * t) ** 2 + 0.25)
        denoised = c_skip * z + c_out * x0
        if i == len(timesteps) - 1:
            return denoised
        t_next = timesteps[i + 1]                                              # re-noise with fresh noise
        z = math.sqrt(abar[t_next]) * denoised + math.sqrt(1 - abar[t_next]) * noises[i]
    raise AssertionError("unreachable")


@pytest.mark.parametrize("k", [1, 2, 4])
def test_e2e_step_matches_float64_algorithm_1(k):
    b, m, seed = 2, 3, 11
    net = tiny_dit(0, dtype=torch.float64)
    ae = tiny_autoencoder(dtype=torch.float64)
    images, cond = make_images(b, dtype=torch.float64), make_cond(b, dtype=torch.float64)
    ts = lcm_timesteps(k)
    eps_net = ResidualEps(net)
    z0, z0_hat = e2e_step(Denoiser(eps_net, SCHEDULE, "eps"), ae, images, cond, timesteps=ts, m=m,
                          generator=torch.Generator().manual_seed(seed), checkpoint=False)
    g = torch.Generator().manual_seed(seed)           # same draw order: z_T, then one noise per re-noise
    shape = (b * m, 4, 8, 8)
    z_T = torch.randn(shape, generator=g).double()
    noises = [torch.randn(shape, generator=g).double() for _ in range(k - 1)]
    expected = reference_unroll(eps_net, z_T, noises, ts, cond.repeat_interleave(m))
    assert z0_hat.dtype == torch.float64 and z0_hat.shape == shape
    assert torch.allclose(z0, ae.encode_latents(images), atol=0, rtol=0)
    assert (z0_hat - expected).abs().max().item() <= 1e-10
    # m outputs per image in a row: output j of image i used caption i
    expected_row = reference_unroll(eps_net, z_T[m:m + 1], [n[m:m + 1] for n in noises], ts, cond[1:2])
    assert (z0_hat[m:m + 1] - expected_row).abs().max().item() <= 1e-10


def test_e2e_step_starts_from_pure_noise():
    """z_T is the generator's first draw and ẑ0 does not depend on the images (z_T is not a noised z0)."""
    net, ae, cond = tiny_dit(0), tiny_autoencoder(), make_cond(2)
    seen = []

    class Recorder(nn.Module):
        def forward(self, x, t, c, w=None):
            seen.append(x.detach().clone())
            return net(x, t, c, w=w)

    student = Denoiser(Recorder(), SCHEDULE, "eps")
    ts = lcm_timesteps(2)
    _, out_a = e2e_step(student, ae, make_images(2, seed=5), cond, timesteps=ts, m=2,
                        generator=torch.Generator().manual_seed(3), checkpoint=False)
    _, out_b = e2e_step(student, ae, make_images(2, seed=6), cond, timesteps=ts, m=2,
                        generator=torch.Generator().manual_seed(3), checkpoint=False)
    assert torch.equal(out_a, out_b)
    assert torch.equal(seen[0], torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3)))


class LiveAtStep(nn.Module):
    """The net with live parameters only when called at timestep `live_t`; elsewhere the same weights, detached."""

    def __init__(self, net: nn.Module, live_t: float | None):
        super().__init__()
        self.net, self.live_t = net, live_t

    def forward(self, x, t, cond, w=None):
        if self.live_t is not None and float(t[0]) == self.live_t:
            return self.net(x, t, cond, w=w)
        frozen = {k: v.detach() for k, v in self.net.named_parameters()}
        return torch.func.functional_call(self.net, frozen, (x, t, cond), {"w": w})


def e2e_grads(net, live_t, k, *, checkpoint=False, grad_from_step=0):
    ae, images, cond = tiny_autoencoder(dtype=torch.float64), make_images(2, dtype=torch.float64), \
        make_cond(2, dtype=torch.float64)
    net.zero_grad(set_to_none=True)
    z0, z0_hat = e2e_step(Denoiser(LiveAtStep(ResidualEps(net), live_t), SCHEDULE, "eps"), ae, images, cond,
                          timesteps=lcm_timesteps(k), m=2, generator=torch.Generator().manual_seed(7),
                          checkpoint=checkpoint, grad_from_step=grad_from_step)
    loss = (z0_hat - z0.repeat_interleave(2, 0)).square().mean()
    if loss.requires_grad:
        loss.backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in net.parameters()])


def test_gradients_flow_through_every_step_and_truncation_keeps_the_last_steps():
    k = 4
    net = tiny_dit(0, dtype=torch.float64)
    assert e2e_grads(net, None, k).abs().max().item() == 0.0     # every step frozen: no gradient at all
    ts = lcm_timesteps(k)

    per_step = [e2e_grads(net, float(t), k) for t in ts]
    for i, grad in enumerate(per_step):
        assert grad.norm() > 1e-3 * per_step[-1].norm(), f"no gradient from step {i} (t={ts[i]})"
    # the full gradient is the sum of the per-step contributions
    ae, images, cond = tiny_autoencoder(dtype=torch.float64), make_images(2, dtype=torch.float64), \
        make_cond(2, dtype=torch.float64)

    def grads_all(grad_from_step, checkpoint):
        net.zero_grad(set_to_none=True)
        student = Denoiser(ResidualEps(net), SCHEDULE, "eps")
        z0, z0_hat = e2e_step(student, ae, images, cond, timesteps=ts, m=2,
                              generator=torch.Generator().manual_seed(7), checkpoint=checkpoint,
                              grad_from_step=grad_from_step)
        (z0_hat - z0.repeat_interleave(2, 0)).square().mean().backward()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                          for p in net.parameters()])

    total = grads_all(0, False)
    assert torch.allclose(total, sum(per_step), atol=1e-12, rtol=1e-9)
    # DRaFT-K truncation: grad_from_step = c keeps exactly the contributions of steps c..K−1
    for cut in range(1, k):
        truncated = grads_all(cut, True)
        assert torch.allclose(truncated, sum(per_step[cut:]), atol=1e-12, rtol=1e-9), cut


@pytest.mark.parametrize("k", [1, 2, 4])
def test_checkpointing_gives_the_same_gradients(k):
    """Activation checkpointing around each step: same gradients as storing activations (energy + l2 objective)."""
    net, ae = tiny_dit(0, guidance_embed=True), tiny_autoencoder()
    images, cond = make_images(2), make_cond(2)
    objective = E2EObjective(E2ELoss(energy=1.0, l2=0.5), ae, text_dim=TEXT_DIM)
    grads = []
    for checkpoint in (False, True, "except_last"):
        net.zero_grad(set_to_none=True)
        z0, z0_hat = e2e_step(Denoiser(ResidualEps(net), SCHEDULE, "eps"), ae, images, cond,
                              timesteps=lcm_timesteps(k), m=3,
                              generator=torch.Generator().manual_seed(5), w=1.5, checkpoint=checkpoint)
        per_image, _ = objective(z0_hat, z0, images, cond, torch.tensor([0, 1]), 3)
        per_image.mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-6
    assert (grads[0] - grads[2]).abs().max().item() <= 1e-6


def test_random_truncation_draws_from_the_generator(monkeypatch):
    seen = []
    real_step = e2e.e2e_step

    def spy(*args, **kwargs):
        seen.append(kwargs["grad_from_step"])
        return real_step(*args, **kwargs)

    monkeypatch.setattr(e2e, "e2e_step", spy)
    cfg = FinetuneRun(init="memory", sampler_steps=4, random_truncation=True, samples_per_caption=2,
                      train=TrainConfig(batch_size=2, device="cpu"))
    task = FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline())
    expected = []
    for seed in range(10):
        task.losses(0, torch.Generator().manual_seed(seed))
        expected.append(int(torch.randint(0, 4, (1,), generator=torch.Generator().manual_seed(seed))))
    assert seen == expected
    assert len(set(seen)) > 1
    seen.clear()
    task.cfg = FinetuneRun(init="memory", sampler_steps=4, truncate=1, samples_per_caption=2)
    task.losses(0, torch.Generator().manual_seed(0))
    assert seen == [3]                                 # DRaFT-1: only the last step


# ----------------------------------------------------------------------------------------------------------------------
# 2. E2EObjective terms against direct computations


def objective_inputs(b=2, m=3, seed=0):
    ae = tiny_autoencoder()
    images = make_images(b, seed=seed + 10)
    z0 = ae.encode_latents(images)
    g = torch.Generator().manual_seed(seed)
    z0_hat = (z0.repeat_interleave(m, 0) + 0.5 * torch.randn(b * m, 4, 8, 8, generator=g)).requires_grad_(True)
    return ae, images, z0, z0_hat, make_cond(b)


@pytest.mark.parametrize("space", ["latent", "pixel"])
def test_l1_l2_terms(space):
    b, m = 2, 3
    ae, images, z0, z0_hat, cond = objective_inputs(b, m)
    obj = E2EObjective(E2ELoss(energy=0.0, l1=0.3, l2=0.7, space=space), ae, text_dim=TEXT_DIM)
    per_image, logs = obj(z0_hat, z0, images, cond, torch.arange(b), m)
    gen = ae.decode_latents(z0_hat) if space == "pixel" else z0_hat
    real = (images if space == "pixel" else z0).repeat_interleave(m, 0)
    d = (gen - real).flatten(1)
    expected = (0.3 * d.abs().mean(1) + 0.7 * d.square().mean(1)).view(b, m).mean(1)
    assert per_image.shape == (b,)
    assert torch.allclose(per_image, expected, rtol=1e-6, atol=1e-7)
    assert logs["l2"] == pytest.approx(float(d.detach().square().mean()), rel=1e-5)


def test_pixel_loss_gradient_reaches_the_net_through_the_decoder():
    net, ae = tiny_dit(0), tiny_autoencoder()
    images, cond = make_images(2), make_cond(2)
    z0, z0_hat = e2e_step(Denoiser(ResidualEps(net), SCHEDULE, "eps"), ae, images, cond, timesteps=[999], m=2,
                          generator=torch.Generator().manual_seed(1), checkpoint=False)
    obj = E2EObjective(E2ELoss(energy=0.0, l2=1.0, space="pixel"), ae, text_dim=TEXT_DIM)
    grads = []
    for loss in (obj(z0_hat, z0, images, cond, torch.arange(2), 2)[0].mean(),
                 (ae.decode_latents(z0_hat) - images.repeat_interleave(2, 0)).square().mean()):
        net.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for p in ae.parameters())            # the decoder is in the graph, not trained


@pytest.mark.parametrize("space", ["latent", "pixel"])
def test_energy_score_and_distance_forms(space):
    b, m, lam = 3, 4, 0.8
    ae, images, z0, z0_hat, cond = objective_inputs(b, m)
    groups = torch.tensor([5, 7, 5])
    gen = ae.decode_latents(z0_hat) if space == "pixel" else z0_hat
    real = images if space == "pixel" else z0
    score = E2EObjective(E2ELoss(energy=2.0, energy_lambda=lam, space=space), ae, text_dim=TEXT_DIM)
    per_image, _ = score(z0_hat, z0, images, cond, groups, m)
    by_image = torch.stack([energy_score(gen[i * m:(i + 1) * m][None], real[i:i + 1], lam)[0] for i in range(b)])
    assert torch.allclose(per_image, 2.0 * by_image, rtol=1e-6)
    distance = E2EObjective(E2ELoss(energy=1.0, energy_lambda=lam, energy_form="distance", space=space), ae,
                            text_dim=TEXT_DIM)
    per_image, _ = distance(z0_hat, z0, images, cond, groups, m)
    ed = energy_distance_by_group(gen, real, groups.repeat_interleave(m), groups, lam)
    assert torch.allclose(per_image, ed.view(b, m).mean(1), rtol=1e-6)


def test_minibatch_ot_coupling_matches_scipy():
    b, m = 4, 2
    ae, images, z0, _, cond = objective_inputs(b, m, seed=3)
    groups = torch.tensor([0, 1, 0, 1])
    g = torch.Generator().manual_seed(3)       # outputs near the other image of their group: OT must swap them
    z0_hat = (z0[[2, 3, 0, 1]].repeat_interleave(m, 0) + 0.3 * torch.randn(b * m, 4, 8, 8, generator=g)
              ).requires_grad_(True)
    obj = E2EObjective(E2ELoss(energy=0.0, l2=1.0, coupling="minibatch_ot"), ae, text_dim=TEXT_DIM)
    per_image, _ = obj(z0_hat, z0, images, cond, groups, m)
    gen = z0_hat.detach().double().flatten(1).numpy()
    tgt = z0.repeat_interleave(m, 0).double().flatten(1).numpy()
    groups_m = groups.repeat_interleave(m).numpy()
    per_output = np.zeros(b * m)
    for g in (0, 1):
        idx = np.nonzero(groups_m == g)[0]
        cost = ((gen[idx][:, None] - tgt[idx][None]) ** 2).mean(-1)
        rows, cols = linear_sum_assignment(cost)
        per_output[idx[rows]] = cost[rows, cols]
    expected = torch.from_numpy(per_output.reshape(b, m).mean(1)).float()
    assert torch.allclose(per_image, expected, rtol=1e-5)
    independent = E2EObjective(E2ELoss(energy=0.0, l2=1.0), ae, text_dim=TEXT_DIM)(z0_hat, z0, images, cond,
                                                                                    groups, m)[0]
    assert per_image.sum() < independent.sum() - 1e-3          # the targets were reordered (cheaper pairing)


def test_lpips_term(tmp_path):
    b, m = 2, 2
    ae, images, z0, z0_hat, cond = objective_inputs(b, m)
    feature_net = FashionFeatureNet(channels=(4, 8, 8))
    feature_net.save(tmp_path / "features.safetensors")
    obj = E2EObjective(E2ELoss(energy=0.0, lpips=1.0, lpips_weights=str(tmp_path / "features.safetensors")), ae,
                       text_dim=TEXT_DIM)
    decoded = ae.decode_latents(z0_hat.detach())
    same, _ = obj(z0_hat[::m], z0, decoded[::m], cond, torch.arange(b), 1)     # outputs equal their targets
    assert same.abs().max().item() <= 1e-7
    per_image, logs = obj(z0_hat, z0, images, cond, torch.arange(b), m)
    direct = LPIPS(FashionFeatureNet.load(tmp_path / "features.safetensors"))(
        ae.decode_latents(z0_hat), images.repeat_interleave(m, 0)).view(b, m).mean(1)
    assert per_image.min() > 0
    assert torch.allclose(per_image, direct, rtol=1e-5)


@pytest.mark.parametrize("gan_space", ["latent", "pixel"])
@pytest.mark.parametrize("gan_loss", ["hinge", "nonsaturating"])
def test_gan_terms(gan_space, gan_loss):
    b, m = 2, 3
    ae, images, z0, z0_hat, cond = objective_inputs(b, m)
    torch.manual_seed(0)
    obj = E2EObjective(E2ELoss(energy=0.0, gan=0.5, gan_space=gan_space, gan_loss=gan_loss, r1=0.0), ae,
                       text_dim=TEXT_DIM)
    fake = z0_hat if gan_space == "latent" else ae.decode_latents(z0_hat)
    real = z0 if gan_space == "latent" else images
    pooled = cond.pooled
    fake_logits = obj.disc(fake, pooled.repeat_interleave(m, 0))
    real_logits = obj.disc(real, pooled)
    per_image, _ = obj(z0_hat, z0, images, cond, torch.arange(b), m)
    if gan_loss == "hinge":
        g_expected = -fake_logits
        d_expected = torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean()
    else:
        g_expected = torch.log1p(torch.exp(-fake_logits))                   # −log σ(D(G(z)))
        d_expected = torch.log1p(torch.exp(-real_logits)).mean() + torch.log1p(torch.exp(fake_logits)).mean()
    assert torch.allclose(per_image, 0.5 * g_expected.view(b, m).mean(1), rtol=1e-5, atol=1e-6)
    d_loss, logs = obj.discriminator_loss(z0_hat, z0, images, cond, m)
    assert torch.allclose(d_loss, d_expected, rtol=1e-5, atol=1e-6)         # mean over B reals + mean over B·m fakes
    assert "r1" not in logs
    # R1: γ · mean ‖∇_x D(x, c)‖² on the reals
    obj.cfg.r1 = 2.0
    d_r1, logs = obj.discriminator_loss(z0_hat, z0, images, cond, m)
    x = real.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(obj.disc(x, pooled).sum(), x)
    r1 = grad.square().flatten(1).sum(1).mean()
    assert r1 > 0 and logs["r1"] == pytest.approx(float(r1), rel=1e-5)
    assert torch.allclose(d_r1, d_expected + 2.0 * r1, rtol=1e-5)
    d_r1.backward()
    assert all(p.grad is not None for p in obj.disc.parameters())


def test_adaptive_gan_weight_is_finite_and_vqgan_shaped():
    net, ae = tiny_dit(0), tiny_autoencoder()
    images, cond = make_images(2), make_cond(2)
    z0, z0_hat = e2e_step(Denoiser(ResidualEps(net), SCHEDULE, "eps"), ae, images, cond, timesteps=lcm_timesteps(2),
                          m=2,
                          generator=torch.Generator().manual_seed(1), checkpoint=True)
    torch.manual_seed(0)
    obj = E2EObjective(E2ELoss(energy=0.0, l2=1.0, gan=0.1, gan_adaptive=True), ae, text_dim=TEXT_DIM)
    last = net.final_layer.linear.weight
    per_image, logs = obj(z0_hat, z0, images, cond, torch.arange(2), 2, last)
    rec = (z0_hat - z0.repeat_interleave(2, 0)).square().flatten(1).mean(1).view(2, 2).mean(1)
    g = (-obj.disc(z0_hat, cond.pooled.repeat_interleave(2, 0))).view(2, 2).mean(1)
    weight = 0.1 * adaptive_gan_weight(rec.mean(), g.mean(), last)
    assert math.isfinite(logs["gan_weight"]) and logs["gan_weight"] > 0
    assert logs["gan_weight"] == pytest.approx(float(weight), rel=1e-5)
    assert torch.allclose(per_image, rec + weight * g, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------------
# 3. Finite differences through the 2-step unrolled sampler


class TinyDenoiserNet(nn.Module):
    """A smooth float64 ε-net: conv, timestep and caption features, tanh."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(4, 4, 3, padding=1).double()
        self.text = nn.Linear(TEXT_DIM, 4).double()
        self.time = nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
        with torch.no_grad():
            for p in (self.conv.weight, self.conv.bias, self.text.weight, self.text.bias):
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))

    def forward(self, x, t, cond, w=None):
        h = self.conv(x) + self.text(cond.pooled)[:, :, None, None] + \
            (self.time[None] * torch.cos(t / 300.0)[:, None])[:, :, None, None]
        return 0.9 * x + 0.4 * torch.tanh(h)


def test_finite_differences_through_two_step_sampler():
    net, ae = TinyDenoiserNet(), tiny_autoencoder(dtype=torch.float64)
    images, cond = make_images(2, dtype=torch.float64), make_cond(2, dtype=torch.float64)
    obj = E2EObjective(E2ELoss(energy=0.0, l2=1.0), ae, text_dim=TEXT_DIM)

    def loss() -> torch.Tensor:
        z0, z0_hat = e2e_step(Denoiser(net, SCHEDULE, "eps"), ae, images, cond, timesteps=[999, 499], m=2,
                              generator=torch.Generator().manual_seed(4), checkpoint=True)
        return obj(z0_hat, z0, images, cond, torch.arange(2), 2)[0].mean()

    net.zero_grad()
    loss().backward()
    h = 1e-6
    for param, index in [(net.conv.weight, (1, 2, 0, 1)), (net.conv.bias, (3,)), (net.text.weight, (0, 5)),
                         (net.time, (2,))]:
        analytic = float(param.grad[index])
        with torch.no_grad():
            param[index] += h
            up = float(loss())
            param[index] -= 2 * h
            down = float(loss())
            param[index] += h
        numeric = (up - down) / (2 * h)
        assert abs(analytic - numeric) <= 1e-5 * max(abs(numeric), 1e-3), (index, analytic, numeric)


# ----------------------------------------------------------------------------------------------------------------------
# 5. FinetuneTask: short training runs with every loss configuration


LOSS_CONFIGS = {
    "l2": dict(energy=0.0, l2=1.0),
    "l1": dict(energy=0.0, l1=1.0),
    "l2+lpips": dict(energy=0.0, l2=1.0, lpips=0.5),
    "energy-latent": dict(energy=1.0),
    "energy-pixel": dict(energy=1.0, space="pixel"),
    "energy+gan": dict(energy=1.0, gan=0.1, r1=0.1),
    "l2+minibatch_ot": dict(energy=0.0, l2=1.0, coupling="minibatch_ot"),
}


@pytest.mark.parametrize("name", list(LOSS_CONFIGS))
def test_finetune_task_trains_and_exports(name, tmp_path):
    loss = dict(LOSS_CONFIGS[name])
    if loss.get("lpips"):
        FashionFeatureNet(channels=(4, 8, 8)).save(tmp_path / "features.safetensors")
        loss["lpips_weights"] = str(tmp_path / "features.safetensors")
    cfg = FinetuneRun(init="memory", sampler_steps=2, samples_per_caption=2, loss=E2ELoss(**loss),
                      optim=OptimConfig(lr=1e-3),
                      train=TrainConfig(steps=3, batch_size=4, ema_decay=0.9, device="cpu", progress=False,
                                        log_every=1, checkpoint_every=2, keep_last=5))
    task = FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline())
    before = {k: v.clone() for k, v in task.parts[0].module.state_dict().items()}
    last = train(task, cfg.train, tmp_path / "run", cfg, "finetune")
    assert math.isfinite(last["loss/net"])
    if "gan" in loss:
        assert math.isfinite(last["loss/disc"]) and "r1" in last
    after = task.parts[0].module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    names = sorted(p.name for p in checkpoint_dir(tmp_path / "run").iterdir() if p.name.startswith("step_"))
    assert names == ["step_00000002", "step_00000003"]
    meta = read_model_meta(tmp_path / "run" / "model.safetensors")
    assert meta["kind"] == "e2e"
    assert meta["sampler"]["timesteps"] == lcm_timesteps(2) and meta["sampler"]["w"] == 1.5


def test_energy_gradient_pushes_collapsed_samples_apart():
    """All m samples of each caption (almost) identical: one SGD step on the samples spreads them out.
    (Exactly identical samples get the norm's subgradient 0 for the repulsion — see losses/energy.py.)"""
    b, m = 2, 4
    ae, images, z0, _, cond = objective_inputs(b, m)
    g = torch.Generator().manual_seed(9)
    centre = torch.randn(b, 4, 8, 8, generator=g).repeat_interleave(m, 0)
    z0_hat = (centre + 1e-6 * torch.randn(centre.shape, generator=g)).requires_grad_(True)
    obj = E2EObjective(E2ELoss(energy=1.0), ae, text_dim=TEXT_DIM)

    def spread(z):
        return float(z.detach().view(b, m, -1).std(1).mean())

    obj(z0_hat, z0, images, cond, torch.arange(b), m)[0].mean().backward()
    stepped = z0_hat.detach() - 1.0 * z0_hat.grad
    assert spread(stepped) > 100 * spread(z0_hat)
