"""The teacher: standard diffusion training (the paper's Eq. 6) of the DiT on autoencoder latents.

    L = E_{z0, c, t, ε} ‖ target(z0, ε, t) − net(sqrt(ᾱ_t)·z0 + sqrt(1 − ᾱ_t)·ε, t, c)‖²

with target ε, v or z0 by the chosen parameterization, and the caption replaced by the null caption with probability
``data.caption_dropout`` (classifier-free guidance).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from e2ediff.config import DataConfig, OptimConfig, TrainConfig, _check
from e2ediff.models.dit import PRESETS as DIT_PRESETS, DiT, DiTConfig
from e2ediff.trainer import BatchStream, Part, Task


@dataclass
class PretrainRun:
    autoencoder: str = ""                               # autoencoder file (model.safetensors of train-autoencoder)
    model: DiTConfig = field(default_factory=lambda: DIT_PRESETS["tiny"])
    schedule: Literal["linear", "scaled_linear", "cosine"] = "linear"   # PixArt uses linear betas 1e-4..0.02
    prediction: Literal["eps", "v", "x0"] = "eps"
    sample_steps: int = 32                              # default DDIM steps written into the exported file
    guidance: float = 1.0                               # default CFG scale written into the exported file
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=0.0, warmup_steps=200))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=6000, batch_size=128, ema_decay=0.999))

    def validate(self) -> None:
        _check(bool(self.autoencoder), "autoencoder", self.autoencoder, "the path of a trained autoencoder file")
        _check(self.sample_steps >= 1, "sample_steps", self.sample_steps, ">= 1")
        _check(self.guidance >= 0, "guidance", self.guidance, ">= 0")


PRESETS = {
    "tiny": PretrainRun(),
    "base": PretrainRun(model=DIT_PRESETS["base"],
                        optim=OptimConfig(lr=2e-4, warmup_steps=500),
                        train=TrainConfig(steps=20000, batch_size=256, ema_decay=0.9995, checkpoint_every=2000)),
    # fashion-scenes: v-prediction and lr 1e-3. A scene's layout is decided at high noise, where eps-prediction's loss
    # weighs an error of the clean latent by SNR(t) ≈ 0 (4e-5 at t = 999) and v-prediction's by 1 + SNR(t). CPU probe
    # (benchmarks/scenes_teacher_probe.py, docs/scenes.md): after 900 steps an eps teacher stays at the caption-blind
    # alignment (0.14), a v teacher at lr 3e-4 reaches 0.30, at lr 1e-3 0.55.
    "scenes": PretrainRun(model=DIT_PRESETS["scenes"], prediction="v", guidance=2.0,
                          data=DataConfig(dataset="fashion-scenes"),
                          optim=OptimConfig(lr=1e-3, warmup_steps=100),
                          train=TrainConfig(steps=20000, batch_size=256, ema_decay=0.999, checkpoint_every=500)),
}


class PretrainTask(Task):
    kind = "pretrain"

    def __init__(self, cfg: PretrainRun, device: torch.device, data=None, autoencoder=None):
        from e2ediff.assets import TrainingData, load_autoencoder
        from e2ediff.denoiser import Denoiser
        from e2ediff.schedules import VPSchedule

        self.cfg = cfg
        self.data = data if data is not None else TrainingData(cfg.data, "train", device)
        self.autoencoder = (autoencoder if autoencoder is not None else load_autoencoder(cfg.autoencoder)).to(device)
        self.schedule = VPSchedule.from_name(cfg.schedule)
        net = DiT(cfg.model)
        self.denoiser = Denoiser(net, self.schedule, cfg.prediction)
        self.parts = [Part("net", net, cfg.optim, cfg.train.ema_decay)]
        self.stream = BatchStream(len(self.data), cfg.train.batch_size, cfg.train.seed)
        self.device = device

    def losses(self, step, generator):
        from e2ediff.denoiser import Denoiser

        images, cond, _, _ = self.data.batch(self.stream.indices(step), generator)
        b = len(images)
        with torch.no_grad():
            z0 = self.autoencoder.encode_latents(images)
        t = torch.randint(0, len(self.schedule.alphas_cumprod), (b,), generator=generator, device=generator.device)
        noise = torch.randn(z0.shape, generator=generator, device=generator.device)
        drop = torch.rand(b, generator=generator, device=generator.device) < self.cfg.data.caption_dropout
        t, noise, drop = t.to(z0.device), noise.to(z0.device), drop.to(z0.device)
        z_t = self.schedule.add_noise(z0, noise, t)                      # Eq. 6: z_t = sqrt(ᾱ)z0 + sqrt(1−ᾱ)ε
        net = self.module("net")
        pred = net(z_t, t.float(), cond.with_drop(drop))
        target = Denoiser(net, self.schedule, self.cfg.prediction).training_target(z0, noise, t)
        loss = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # one value per sample
        return {"net": loss.mean()}, {}

    def export(self, weights):
        from e2ediff.assets import export_pipeline

        return export_pipeline("teacher", weights["net"], self.cfg.model, self.autoencoder, self.cfg.schedule,
                               self.cfg.prediction, {"name": "ddim", "steps": self.cfg.sample_steps,
                                                     "guidance": self.cfg.guidance}, self.data.captions)
