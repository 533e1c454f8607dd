"""The few-step student: latent consistency distillation (LCM, Luo et al. 2023) from the teacher.

This makes our PixArt-δ analog. One step (LCM Algorithm 1, as diffusers' train_lcm_distill scripts do it):

    n ~ U{0..N−1}, t = solver[n] (the 50-step skip schedule 19, 39, …, 999), t_prev = t − k (0 for the first)
    z_t = sqrt(ᾱ_t)·z0 + sqrt(1 − ᾱ_t)·ε
    s ~ U[s_min, s_max]                                      guidance scale, fed to the student as w when embedded
    student  = c_skip(t)·z_t + c_out(t)·x0_θ(z_t, t, c, s)   (consistency function with LCM boundary terms)
    teacher  = CFG at scale s: x0/ε from u + s·(c − u);  z_prev = sqrt(ᾱ_prev)·x0 + sqrt(1 − ᾱ_prev)·ε   (DDIM solver)
    target   = c_skip(t_prev)·z_prev + c_out(t_prev)·x0_θ⁻(z_prev, t_prev, c, s)   (target network θ⁻, no grad)
    loss     = Huber_c(student − target) = sqrt((student − target)² + c²) − c   (or L2)
    θ⁻ ← μ·θ⁻ + (1 − μ)·θ  after each step (μ = 0.95)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch

from e2ediff.config import DataConfig, OptimConfig, TrainConfig, _check, to_dict
from e2ediff.trainer import BatchStream, Part, Task


@dataclass
class DistillRun:
    teacher: str = ""                    # teacher pipeline file (model.safetensors of `pretrain`)
    solver_steps: int = 50               # the DDIM skip schedule of the solver (original_inference_steps)
    loss: Literal["huber", "l2"] = "huber"
    huber_c: float = 0.001               # Huber constant c (diffusers' LCM scripts: 0.001)
    target_ema: float = 0.95             # μ of the target network θ⁻ (LCM: 0.95)
    timestep_scaling: float = 10.0       # LCM boundary terms
    guidance_embed: bool = True          # embed the guidance scale w in the student (LCM's w-conditioning)
    guidance_min: float = 1.0            # teacher CFG scale range sampled per example
    guidance_max: float = 3.0
    sample_steps: int = 4                # default sampler written into the exported student
    sample_guidance: float = 1.5         # default w for sampling the student (when guidance_embed)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=100))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3000, batch_size=128, ema_decay=0.999))

    def validate(self) -> None:
        _check(bool(self.teacher), "teacher", self.teacher, "the path of a teacher model file")
        _check(2 <= self.solver_steps <= 1000, "solver_steps", self.solver_steps, "in [2, 1000]")
        _check(self.huber_c > 0, "huber_c", self.huber_c, "> 0")
        _check(self.timestep_scaling > 0, "timestep_scaling", self.timestep_scaling, "> 0")
        _check(0 <= self.target_ema < 1, "target_ema", self.target_ema, "in [0, 1)")
        _check(0 <= self.guidance_min <= self.guidance_max, "guidance_min/guidance_max",
               (self.guidance_min, self.guidance_max), "0 <= min <= max")
        _check(self.sample_steps >= 1, "sample_steps", self.sample_steps, ">= 1")


PRESETS = {
    "tiny": DistillRun(),
    "base": DistillRun(optim=OptimConfig(lr=5e-5, warmup_steps=200),
                       train=TrainConfig(steps=6000, batch_size=256, ema_decay=0.999, checkpoint_every=1000)),
    "scenes": DistillRun(sample_guidance=2.0, data=DataConfig(dataset="fashion-scenes"),
                         optim=OptimConfig(lr=1e-4, warmup_steps=200),
                         train=TrainConfig(steps=10000, batch_size=256, ema_decay=0.999, checkpoint_every=500)),
}


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, c: float) -> torch.Tensor:
    """Per-sample consistency distance [B]: pseudo-Huber sqrt(d² + c²) − c (mean over dims) or mean squared error.
    The pseudo-Huber value is computed as d² / (sqrt(d² + c²) + c), the same number without the float32 cancellation
    of sqrt(d² + c²) − c when |d| ≪ c."""
    d = (pred.float() - target.float())
    if kind == "huber":
        d2 = d.pow(2)
        return (d2 / (torch.sqrt(d2 + c * c) + c)).flatten(1).mean(1)
    return d.pow(2).flatten(1).mean(1)


class DistillTask(Task):
    kind = "distill"

    def __init__(self, cfg: DistillRun, device: torch.device, data=None, teacher=None):
        from e2ediff.assets import TrainingData, build_net, load_pipeline
        from e2ediff.denoiser import Denoiser
        from e2ediff.schedules import lcm_solver_timesteps

        self.cfg = cfg
        self.device = device
        self.teacher = teacher if teacher is not None else load_pipeline(cfg.teacher, device)
        self.teacher.to(device)
        self.data = data if data is not None else TrainingData(cfg.data, "train", device)
        net_cfg = to_dict(self.teacher.net.config)
        net_cfg["guidance_embed"] = cfg.guidance_embed
        student = build_net(net_cfg)
        # Start from the teacher's weights; the guidance embedding is new and zero-initialised (identical outputs).
        missing, unexpected = student.load_state_dict(self.teacher.net.state_dict(), strict=False)
        if unexpected or any(not k.startswith("w_") and "guidance" not in k for k in missing):
            raise ValueError(f"teacher {cfg.teacher} does not fit the student: missing {missing}, unexpected {unexpected}")
        self.schedule = self.teacher.denoiser.schedule
        self.prediction = self.teacher.denoiser.prediction
        self.student = Denoiser(student, self.schedule, self.prediction)
        self.target = Denoiser(copy.deepcopy(student).requires_grad_(False), self.schedule, self.prediction)
        self.target.to(device)
        solver = sorted(lcm_solver_timesteps(cfg.solver_steps, self.schedule.T))   # ascending 19, 39, …, 999
        self.t_start = torch.tensor(solver, device=device)
        self.t_prev = torch.tensor([0] + solver[:-1], device=device)
        self.parts = [Part("net", student, cfg.optim, cfg.train.ema_decay)]
        self.stream = BatchStream(len(self.data), cfg.train.batch_size, cfg.train.seed)

    def losses(self, step, generator):
        from e2ediff.denoiser import Denoiser, broadcast_like, consistency_fn

        cfg = self.cfg
        images, cond, _, _ = self.data.batch(self.stream.indices(step), generator)
        b, gd = len(images), generator.device
        with torch.no_grad():
            z0 = self.teacher.autoencoder.encode_latents(images)
        n = torch.randint(0, len(self.t_start), (b,), generator=generator, device=gd).to(self.device)
        t, t_prev = self.t_start[n].float(), self.t_prev[n].float()
        noise = torch.randn(z0.shape, generator=generator, device=gd).to(self.device)
        scale = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * \
            torch.rand(b, generator=generator, device=gd).to(self.device)
        drop = torch.rand(b, generator=generator, device=gd).to(self.device) < cfg.data.caption_dropout
        cond = cond.with_drop(drop)
        w = scale if cfg.guidance_embed else None
        z_t = self.schedule.add_noise(z0, noise, t.long())

        student = Denoiser(self.module("net"), self.schedule, self.prediction)
        pred = consistency_fn(student, z_t, t, cond, w, timestep_scaling=cfg.timestep_scaling)

        with torch.no_grad():
            # Teacher with classifier-free guidance at the sampled scale: eps = eps_u + s·(eps_c − eps_u).
            both = type(cond).cat([cond, cond.with_drop(True)])
            x0_all, eps_all = self.teacher.denoiser.predict(torch.cat([z_t, z_t]), torch.cat([t, t]), both)
            (x0_c, x0_u), (eps_c, eps_u) = x0_all.chunk(2), eps_all.chunk(2)
            s = broadcast_like(scale, z_t)
            x0_g, eps_g = x0_u + s * (x0_c - x0_u), eps_u + s * (eps_c - eps_u)
            a_prev, s_prev = self.schedule.alpha_sigma(t_prev, z_t.dtype)
            z_prev = a_prev * x0_g + s_prev * eps_g              # DDIM solver step t → t_prev (Eq. 12, η = 0)
            target = consistency_fn(self.target, z_prev, t_prev, cond, w, timestep_scaling=cfg.timestep_scaling)
        loss = consistency_loss(pred, target, cfg.loss, cfg.huber_c)
        return {"net": loss.mean()}, {"t_mean": float(t.mean())}

    @torch.no_grad()
    def after_step(self, step):
        mu = self.cfg.target_ema                                  # θ⁻ ← μ·θ⁻ + (1 − μ)·θ
        for p_t, p in zip(self.target.net.parameters(), self.parts[0].module.parameters()):
            p_t.lerp_(p.detach(), 1.0 - mu)

    def extra_tensors(self):
        from e2ediff.checkpoint import with_prefix

        return with_prefix(self.target.net.state_dict(), "target")

    def load_extra_tensors(self, tensors):
        from e2ediff.checkpoint import load_state_strict, split_prefix

        load_state_strict(self.target.net, split_prefix(tensors, "target"), "checkpoint (LCM target network)")

    def export(self, weights):
        from e2ediff.assets import export_pipeline
        from e2ediff.schedules import lcm_timesteps

        sampler = {"name": "lcm", "steps": self.cfg.sample_steps,
                   "timesteps": lcm_timesteps(self.cfg.sample_steps, self.cfg.solver_steps),
                   "renoise": "vp", "w": self.cfg.sample_guidance if self.cfg.guidance_embed else None,
                   "timestep_scaling": self.cfg.timestep_scaling}   # sampling must use the distilled boundary terms
        return export_pipeline("lcm", weights["net"], self.parts[0].module.config, self.teacher.autoencoder,
                               self.teacher.meta["schedule"], self.prediction, sampler, self.data.captions,
                               self.teacher.meta.get("text_encoder"), teacher=str(self.cfg.teacher))
