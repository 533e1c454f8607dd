"""LCM consistency distillation against direct formulas: the pseudo-Huber / L2 consistency distance, the target
network's EMA, the teacher-initialised student, one training step, and the teacher's DDIM solver step against
`samplers.ddim` with the same classifier-free guidance scale. Tiny seeded models built in code."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import e2ediff.denoiser as denoiser_module
from e2ediff.assets import Pipeline
from e2ediff.conditioning import TextCond
from e2ediff.config import DataConfig, OptimConfig, TrainConfig
from e2ediff.denoiser import Denoiser
from e2ediff.distill import DistillRun, DistillTask, consistency_loss
from e2ediff.models.autoencoder import AutoencoderConfig, AutoencoderKL
from e2ediff.models.dit import DiT, DiTConfig
from e2ediff.samplers import ddim
from e2ediff.schedules import VPSchedule
from e2ediff.trainer import train

TEXT_DIM = 16
CPU = torch.device("cpu")


def tiny_teacher(seed: int = 0) -> Pipeline:
    """A teacher pipeline in memory: DiT hidden 32 / depth 1 / 2 heads (weights perturbed so that no layer is zero)
    and an autoencoder with channels (8, 16, 32)."""
    g = torch.Generator().manual_seed(seed)
    net = DiT(DiTConfig(hidden_size=32, depth=1, num_heads=2, text_dim=TEXT_DIM, max_text_len=4), generator=g)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ae = AutoencoderKL(AutoencoderConfig(channels=(8, 16, 32), norm_groups=4), generator=g)
    meta = {"kind": "teacher", "schedule": "linear", "prediction": "eps", "text_encoder": "test-encoder"}
    return Pipeline(Denoiser(net, VPSchedule.from_name("linear"), "eps").eval().requires_grad_(False),
                    ae.eval().requires_grad_(False), meta)


class StandInData:
    """The TrainingData interface over random images; caption i ↔ class i; batch() draws nothing from the generator."""

    def __init__(self, n: int = 12, classes: int = 3, seed: int = 4):
        g = torch.Generator().manual_seed(seed)
        self.device = CPU
        self.images = torch.rand(n, 1, 32, 32, generator=g) * 2 - 1
        self.labels = torch.arange(n) % classes
        self.captions = [f"a picture of class {c}" for c in range(classes)]
        self._cond = TextCond(torch.randn(classes, 3, TEXT_DIM, generator=g), torch.ones(classes, 3, dtype=torch.bool),
                              torch.randn(classes, TEXT_DIM, generator=g))

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None):
        labels = self.labels[idx]
        return self.images[idx], self._cond[labels], labels, labels.clone()


def make_task(**overrides) -> DistillTask:
    cfg = DistillRun(teacher="memory", solver_steps=10, data=DataConfig(caption_dropout=0.25),
                     optim=OptimConfig(lr=1e-3),
                     train=TrainConfig(steps=1, batch_size=6, ema_decay=0.9, device="cpu", progress=False,
                                       log_every=1))
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return DistillTask(cfg, CPU, data=StandInData(), teacher=tiny_teacher())


# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["huber", "l2"])
def test_consistency_loss_formulas(kind):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    c = 0.05
    got = consistency_loss(pred, target, kind, c)
    d = (pred.double() - target.double()).numpy().reshape(3, -1)
    expected = (np.sqrt(d ** 2 + c ** 2) - c).mean(1) if kind == "huber" else (d ** 2).mean(1)
    assert got.shape == (3,)
    assert np.allclose(got.numpy(), expected, rtol=1e-6, atol=1e-9)
    if kind == "huber":   # pseudo-Huber: ≈ d²/(2c) for |d| ≪ c, ≈ |d| − c for |d| ≫ c
        small = consistency_loss(torch.full((1, 1), 0.01), torch.zeros(1, 1), kind, 1.0)
        assert float(small) == pytest.approx(0.5e-4, rel=1e-3)
        big = consistency_loss(torch.full((1, 1), 100.0), torch.zeros(1, 1), kind, 1e-3)
        assert float(big) == pytest.approx(100.0 - 1e-3, rel=1e-6)


def test_student_starts_as_the_teacher():
    task = make_task()
    student, teacher = task.parts[0].module, task.teacher.net
    assert student.config.guidance_embed and not teacher.config.guidance_embed
    g = torch.Generator().manual_seed(1)
    z, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([999.0, 500.0, 19.0])
    _, cond, _, _ = task.data.batch(torch.tensor([0, 1, 2]), None)
    for w in (1.0, 2.7):
        assert torch.equal(student(z, t, cond, w=torch.full((3,), w)), teacher(z, t, cond))
    # the target network θ⁻ starts as the student
    for p_t, p in zip(task.target.net.parameters(), student.parameters()):
        assert torch.equal(p_t, p)


def test_target_network_update_is_exact_ema():
    task = make_task(target_ema=0.9)
    student = task.parts[0].module
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    before = [p.detach().clone().double() for p in task.target.net.parameters()]
    task.after_step(0)
    for p_t, old, p in zip(task.target.net.parameters(), before, student.parameters()):
        expected = 0.9 * old + 0.1 * p.detach().double()          # θ⁻ ← μ·θ⁻ + (1 − μ)·θ
        assert torch.allclose(p_t.double(), expected, rtol=0, atol=1e-6)
    assert any(not torch.equal(p_t.double(), old) for p_t, old in zip(task.target.net.parameters(), before))


def test_one_distillation_step_runs(tmp_path):
    task = make_task()
    before = {k: v.clone() for k, v in task.parts[0].module.state_dict().items()}
    last = train(task, task.cfg.train, tmp_path / "run", task.cfg, "distill")
    assert math.isfinite(last["loss/net"]) and last["loss/net"] > 0
    after = task.parts[0].module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "run" / "model.safetensors").is_file()


class ZeroEpsAt(nn.Module):
    """The teacher's ε-net, except ε = 0 at timestep t_stop: a DDIM step *from* t_stop then returns z/sqrt(ᾱ)."""

    def __init__(self, net: nn.Module, t_stop: float):
        super().__init__()
        self.net, self.t_stop = net, t_stop

    def forward(self, x, t, cond, w=None):
        eps = self.net(x, t, cond, w=w)
        return torch.where((t == self.t_stop)[:, None, None, None], torch.zeros_like(eps), eps)


def test_solver_step_is_one_guided_ddim_step(monkeypatch):
    """The teacher's z_prev inside the distillation step equals samplers.ddim from t to t_prev at the same CFG
    scale: ddim([t, t_prev]) with ε = 0 at t_prev returns z_prev / sqrt(ᾱ_{t_prev})."""
    calls = []
    real_fn = denoiser_module.consistency_fn

    def record(denoiser, z_t, t, cond, w=None, **kwargs):
        calls.append((z_t.detach().clone(), t.detach().clone(), cond, None if w is None else w.detach().clone()))
        return real_fn(denoiser, z_t, t, cond, w, **kwargs)

    monkeypatch.setattr(denoiser_module, "consistency_fn", record)
    task = make_task()
    task.losses(0, torch.Generator().manual_seed(3))
    (z_t, t, cond, scale), (z_prev, t_prev, _, w_target) = calls
    assert torch.equal(scale, w_target)
    assert cond.drop is not None
    schedule = task.teacher.denoiser.schedule
    for i in range(len(z_t)):
        assert t_prev[i] == (0 if t[i] == 99 else t[i] - 100)                   # skip k = 1000 / 10
        wrapped = Denoiser(ZeroEpsAt(task.teacher.net, float(t_prev[i])), schedule, "eps")
        out = ddim(wrapped, z_t[i:i + 1], [int(t[i]), int(t_prev[i])], cond[i:i + 1], guidance=float(scale[i]))
        expected = out * schedule.alpha_bar(t_prev[i]).sqrt().float()
        assert torch.allclose(z_prev[i:i + 1], expected, rtol=1e-4, atol=1e-5), i
