"""End-to-end fine-tuning through the unrolled few-step sampler (E2EDiff, arXiv 2412.21044, Algorithm 1).

``e2e_step`` is Algorithm 1 line by line; ``E2EObjective`` is the loss on its final prediction: the paper's L1 / L2 /
LPIPS / hybrid and adversarial terms, and — beyond the paper — the energy score, a strictly proper scoring rule over
m samples per caption (De Bortoli et al., ICML 2025), which keeps the conditional distribution where L1/L2 against
images that share a caption pull every output to the caption's mean image.
"""
from __future__ import annotations

import copy
import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from e2ediff.conditioning import TextCond
from e2ediff.config import DataConfig, OptimConfig, TrainConfig, _check
from e2ediff.denoiser import Denoiser
from e2ediff.trainer import BatchStream, Part, Task


@dataclass
class E2ELoss:
    """L = λ_L1·L1 + λ_L2·L2 + λ_LPIPS·LPIPS + λ_ES·ES + λ_GAN·L_GAN (each term per sample, then averaged)."""

    l1: float = 0.0                      # λ_L1: mean |ẑ0 − z0| (paper)
    l2: float = 0.0                      # λ_L2: mean (ẑ0 − z0)² (paper)
    lpips: float = 0.0                   # λ_LPIPS: LPIPS on decoded images (paper)
    energy: float = 1.0                  # λ_ES: energy score over m samples per caption (ours; needs m >= 2)
    energy_lambda: float = 1.0           # λ inside the energy score (1: strictly proper)
    energy_form: Literal["score", "distance"] = "score"  # per-image score, or per-caption-group batch energy distance
    space: Literal["latent", "pixel", "features"] = "latent"  # where L1 / L2 / energy compare: latents, decoded
                                         # pixels, or the frozen LPIPS network's feature space (‖φ(x)−φ(y)‖² = LPIPS)
    real_bank: int = 0                   # > 0: energy distance per class against this many real images of each class
                                         # drawn every step (a low-variance target), instead of the paired images
    lpips_backbone: Literal["fashion", "vgg16", "alexnet"] = "fashion"
    lpips_weights: str = ""              # fashion: FashionFeatureNet file (`e2ediff train-lpips`); else backbone weights
    lpips_heads: str = ""                # optional learned LPIPS linear heads (lin0..lin4); default uniform 1/C
    gan: float = 0.0                     # λ_GAN
    gan_space: Literal["latent", "pixel", "features"] = "latent"  # features: heads on the frozen LPIPS network (ADD)
    gan_loss: Literal["hinge", "nonsaturating"] = "hinge"
    gan_adaptive: bool = False           # VQGAN's adaptive λ: ‖∇L_rec‖ / ‖∇L_GAN‖ at the last layer, times λ_GAN
    r1: float = 0.0                      # R1 penalty weight on real inputs of the discriminator
    gan_grid: int = 1                    # > 1: spatial projection — the caption term per cell of a g x g grid of the
                                         # discriminator's map (where the caption's objects are), not one global pool
    gan_group_std: bool = False          # minibatch std (StyleGAN): the discriminator also sees the spread of each
                                         # caption's m samples, against m real images of the caption's class
    anchor: float = 0.0                  # λ_anchor: mean (ẑ0 − ẑ0_init)², ẑ0_init the frozen starting model's sample
                                         # from the same noises and w (ADD's distillation term, the init as teacher)
    anchor_decay: int = 0                # > 0: λ_anchor falls linearly to 0 over this many network steps after the
                                         # discriminator warm-up (the anchor steers early, the GAN term decides late)
    anchor_refresh: int = 0              # > 0: every this many network steps after the warm-up, the anchor's model
                                         # becomes the network's EMA (a moving trust region: round 7's second stage
                                         # from the first's file, in place, with the discriminator kept)
    anchor_to: Literal["init", "teacher"] = "init"   # the anchor's target for the same noise z_T: the starting
                                         # model's own sample, or the teacher's probability-flow ODE endpoint
                                         # (DDIM, guidance at each chain's w: DMD2's regression loss, here in latents)
    teacher: str = ""                    # anchor_to=teacher: the teacher pipeline file (same autoencoder as init)
    teacher_steps: int = 32              # DDIM steps of the teacher's sample (64 network calls with guidance)
    teacher_renoise: bool = False        # the teacher runs the student's K-step sampler — its timesteps and the chain's
                                         # K − 1 re-noise draws — with its guided DDIM solve to t = 0 as each step's
                                         # x0; the target is then a function of the same noises as the student's
                                         # sample (the plain ODE endpoint sees only z_T, and an L2 fit to it averages
                                         # over the re-noise draws at K >= 2)
    teacher_guidance_interval: tuple[float, float] | None = None  # [lo, hi]: the teacher's guidance only at timesteps
                                         # lo <= t <= hi (Kynkäänniemi et al. 2024: guidance at high noise is what
                                         # narrows the distribution); None: at every timestep
    teacher_guidance_gain: float = 1.0   # the teacher's scale at a chain's w: 1 + gain·(w − 1) (w = 1 stays unguided;
                                         # > 1 makes up, inside the interval, for the guidance taken off outside it)
    teacher_solve_gains: tuple[float, ...] | None = None  # with teacher_renoise: the gain of each of the teacher's
                                         # solves in the student's sampler (solve i guided at 1 + gains[i]·(w − 1);
                                         # the last entry covers the solves past the list, so one list serves every K
                                         # of a mix), in place of teacher_guidance_gain. Each guided solve narrows
                                         # what the re-noise left: at K = 2 the target guided in both solves is less
                                         # diverse than the teacher's own sample; None: teacher_guidance_gain in all
    anchor_samples: int = 0              # > 0: the anchor on the first this many of each caption's m chains only
                                         # (an unbiased estimate of the same term; the teacher's or the starting
                                         # model's sample costs this many / m of the chains' — the teacher's guided
                                         # ODE solves dominate a step otherwise); 0: all m
    coupling: Literal["independent", "minibatch_ot"] = "independent"  # pairing of outputs with targets (L1/L2/LPIPS)

    def validate(self) -> None:
        for name in ("l1", "l2", "lpips", "energy", "energy_lambda", "gan", "r1", "anchor", "anchor_decay",
                     "anchor_refresh"):
            _check(getattr(self, name) >= 0, f"loss.{name}", getattr(self, name), ">= 0")
        _check(self.gan_grid >= 1, "loss.gan_grid", self.gan_grid, ">= 1")
        _check(self.anchor_decay == 0 or self.anchor > 0, "loss.anchor_decay", self.anchor_decay,
               "0 unless loss.anchor > 0 (there is no anchor to decay)")
        _check(self.anchor_refresh == 0 or (self.anchor > 0 and self.anchor_decay == 0), "loss.anchor_refresh",
               self.anchor_refresh, "0 unless loss.anchor > 0 and loss.anchor_decay = 0 (one schedule for the anchor)")
        _check(self.anchor_samples >= 0, "loss.anchor_samples", self.anchor_samples, ">= 0 (0: all m chains)")
        _check(self.anchor_to in ("init", "teacher"), "loss.anchor_to", self.anchor_to, "init or teacher")
        if self.anchor_to == "teacher":
            _check(self.anchor > 0, "loss.anchor", self.anchor, "> 0 when loss.anchor_to=teacher (its weight)")
            _check(bool(self.teacher), "loss.teacher", self.teacher,
                   "the teacher pipeline file when loss.anchor_to=teacher")
            _check(self.teacher_steps >= 1, "loss.teacher_steps", self.teacher_steps, ">= 1")
            _check(self.anchor_refresh == 0, "loss.anchor_refresh", self.anchor_refresh,
                   "0 when loss.anchor_to=teacher (the teacher does not move)")
        _check(not self.teacher_renoise or self.anchor_to == "teacher", "loss.teacher_renoise", self.teacher_renoise,
               "false unless loss.anchor_to=teacher")
        iv = self.teacher_guidance_interval
        _check(iv is None or 0 <= iv[0] <= iv[1], "loss.teacher_guidance_interval", iv,
               "[lo, hi] timesteps with 0 <= lo <= hi (guidance only there), or null")
        _check(self.teacher_guidance_gain >= 0, "loss.teacher_guidance_gain", self.teacher_guidance_gain, ">= 0")
        gains = self.teacher_solve_gains
        _check(gains is None or (len(gains) > 0 and all(g >= 0 for g in gains)), "loss.teacher_solve_gains", gains,
               "null or a non-empty list of gains >= 0, one per solve of the student's sampler")
        _check(gains is None or (self.teacher_renoise and self.teacher_guidance_gain == 1.0),
               "loss.teacher_solve_gains", gains, "null unless loss.teacher_renoise, and then in place of "
               "loss.teacher_guidance_gain (leave that at 1)")
        _check((self.teacher_guidance_interval is None and self.teacher_guidance_gain == 1.0)
               or self.anchor_to == "teacher", "loss.teacher_guidance_interval / teacher_guidance_gain",
               (self.teacher_guidance_interval, self.teacher_guidance_gain), "their defaults unless loss.anchor_to=teacher")
        _check(not self.gan_group_std or self.gan > 0, "loss.gan_group_std", self.gan_group_std,
               "false unless loss.gan > 0 (there is no discriminator to show the spread to)")
        _check(self.l1 + self.l2 + self.lpips + self.energy + self.gan > 0 or
               (self.anchor > 0 and self.anchor_to == "teacher"), "loss", "all weights 0",
               "at least one positive weight among l1, l2, lpips, energy, gan (or loss.anchor > 0 with "
               "loss.anchor_to=teacher: the regression to the teacher alone)")
        _check(not self.uses_feature_net or bool(self.lpips_weights), "loss.lpips_weights", self.lpips_weights,
               "a weights file when loss.lpips > 0, loss.space=features or loss.gan_space=features")
        _check(self.real_bank >= 0, "loss.real_bank", self.real_bank, ">= 0")
        _check(self.real_bank == 0 or self.energy > 0, "loss.real_bank", self.real_bank,
               "0 unless loss.energy > 0 (the bank is the energy distance's real sample)")

    @property
    def uses_feature_net(self) -> bool:
        return self.lpips > 0 or self.space == "features" or (self.gan > 0 and self.gan_space == "features")


@dataclass
class FinetuneRun:
    init: str = ""                       # the model to fine-tune: an LCM student file (or any pipeline file)
    sampler_steps: int = 4               # K: steps of the unrolled sampler
    timesteps: tuple[int, ...] | None = None   # explicit list; None: the `timestep_schedule` for K steps
    timestep_schedule: Literal["lcm", "pixart"] = "lcm"   # diffusers' LCMScheduler (999/759/499/259 for K = 4)
                                                          # or PixArt-δ's own (999/759/519/279)
    renoise: Literal["vp", "ve"] = "vp"  # re-noise form between steps (VP as PixArt/SD; VE as Algorithm 1 writes it)
    renoise_gamma: float | None = None   # vp: the fresh noise's share of each re-noise, the rest the noise the step
                                         # implies (samplers.lcm); 0: deterministic, a sample is a function of z_T
                                         # alone, so the teacher's plain ODE endpoint (teacher_renoise=false) is a
                                         # target the student can reach. None: the init file's sampler gamma (1 if
                                         # it names none); exported as the file's sampler gamma
    w: float | None = None               # guidance-scale embedding input (default: the init file's sampler w)
    sampler_steps_mix: tuple[int, ...] | None = None  # K drawn per iteration from this list (e.g. [1, 2, 4]), so one
                                         # model serves every K; the exported default sampler keeps sampler_steps
    w_range: tuple[float, float] | None = None  # guidance input w drawn per chain, uniform in [lo, hi] (a user's dial)
    samples_per_caption: int = 4         # m: independent noises per training image (energy score needs >= 2)
    checkpointing: bool | Literal["except_last"] = True   # activation checkpointing around every step's model call;
                                         # except_last: not the last step's (same gradients, one forward fewer)
    truncate: int = 0                    # > 0: gradients only through the last `truncate` steps (DRaFT-K)
    random_truncation: bool = False      # AlignProp: a random cut-off each iteration (steps before it detached)
    loss: E2ELoss = field(default_factory=E2ELoss)
    disc_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, beta1=0.0, beta2=0.99))
    disc_warmup: int = 0                 # the first N steps train the discriminator alone (the network's samples drawn
                                         # without gradient), so the network's first GAN gradients come from a
                                         # calibrated discriminator, not from freshly initialised heads
    data: DataConfig = field(default_factory=lambda: DataConfig(caption_dropout=0.0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, weight_decay=1e-8))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, batch_size=32, ema_decay=0.95,
                                                                   checkpoint_every=100))

    def validate(self) -> None:
        _check(bool(self.init), "init", self.init, "the path of a pipeline file (the LCM student)")
        _check(self.sampler_steps >= 1, "sampler_steps", self.sampler_steps, ">= 1 (K)")
        _check(self.timesteps is None or len(self.timesteps) == self.sampler_steps, "timesteps", self.timesteps,
               f"None or a list of sampler_steps={self.sampler_steps} timesteps")
        _check(self.samples_per_caption >= 1, "samples_per_caption", self.samples_per_caption, ">= 1")
        _check(self.loss.energy == 0 or self.samples_per_caption >= 2, "samples_per_caption",
               self.samples_per_caption, ">= 2 when loss.energy > 0 (the energy score compares samples)")
        _check(0 <= self.truncate <= self.sampler_steps, "truncate", self.truncate, f"in [0, {self.sampler_steps}]")
        mix = self.sampler_steps_mix
        _check(mix is None or (len(mix) > 0 and all(k >= 1 for k in mix)), "sampler_steps_mix", mix,
               "None or a non-empty list of step counts >= 1")
        _check(mix is None or self.timesteps is None, "sampler_steps_mix", mix,
               "None when timesteps is set (the schedule makes each K's timesteps)")
        _check(mix is None or self.truncate == 0, "sampler_steps_mix", mix, "None when truncate > 0")
        _check(not self.loss.gan_group_std or self.samples_per_caption >= 2, "samples_per_caption",
               self.samples_per_caption, ">= 2 when loss.gan_group_std (a group is one caption's samples)")
        _check(self.loss.anchor_samples <= self.samples_per_caption, "loss.anchor_samples", self.loss.anchor_samples,
               f"<= samples_per_caption ({self.samples_per_caption}): the chains of a caption the anchor sees")
        _check(self.disc_warmup >= 0, "disc_warmup", self.disc_warmup, ">= 0")
        _check(self.disc_warmup == 0 or self.loss.gan > 0, "disc_warmup", self.disc_warmup,
               "0 unless loss.gan > 0 (there is no discriminator to warm up)")
        _check(self.w_range is None or (0 < self.w_range[0] <= self.w_range[1]), "w_range", self.w_range,
               "None or [lo, hi] with 0 < lo <= hi")
        _check(not self.loss.teacher_renoise or self.renoise == "vp", "loss.teacher_renoise", self.loss.teacher_renoise,
               "false unless renoise=vp (the teacher re-noises as the VP sampler does)")
        g = self.renoise_gamma
        _check(g is None or (0.0 <= g <= 1.0 and (g == 1.0 or self.renoise == "vp")), "renoise_gamma", g,
               "null (the init file's) or in [0, 1], and 1 unless renoise=vp")


# The miniature's LPIPS / feature network (SimCLR, VGG-like; never the evaluation classifier), shipped in the repo.
SHIPPED_LPIPS = str(Path(__file__).resolve().parents[2] / "checkpoints" / "lpips_fashion.safetensors")

PRESETS = {
    "tiny": FinetuneRun(),
    "base": FinetuneRun(train=TrainConfig(steps=1500, batch_size=64, ema_decay=0.95, checkpoint_every=250)),
    # The one setting measured to beat the `base` student (K = 1 only; docs/results.md): energy score on decoded
    # pixels + 10·LPIPS (the miniature's SimCLR feature network), lr 3e-6, 32 captions × m = 4.
    "one-step": FinetuneRun(sampler_steps=1, loss=E2ELoss(energy=1.0, space="pixel", lpips=10.0,
                                                          lpips_weights=SHIPPED_LPIPS),
                            optim=OptimConfig(lr=3e-6, weight_decay=1e-8),
                            train=TrainConfig(steps=1500, batch_size=32, ema_decay=0.95, checkpoint_every=250)),
    # The issue-#9 levers together: per-class energy distance against a bank of real images in the frozen feature
    # space, K drawn from {1, 2, 4} and w from [1, 2] each iteration, exports kept for validation early stopping.
    # Measured on an H100 (docs/results.md, 2026-12-06): 0.75x the student's FD at K = 1, 1.66x at K = 2, 1.60x at K = 4.
    "distribution": FinetuneRun(sampler_steps=4, sampler_steps_mix=(1, 2, 4), w_range=(1.0, 2.0),
                                loss=E2ELoss(energy=1.0, space="features", real_bank=16,
                                             lpips_weights=SHIPPED_LPIPS),
                                optim=OptimConfig(lr=1e-6, weight_decay=1e-8),
                                train=TrainConfig(steps=3000, batch_size=32, ema_decay=0.95, checkpoint_every=250,
                                                  keep_exports=True)),
    # The best recipe measured at K = 4 on an H100 (docs/results.md, round 2 of 2026-12-06): the adversarial term
    # alone — hinge heads on the frozen feature network, R1 — with K and w drawn per iteration, lr 1e-6. It holds the
    # student at K = 4 (0.99x FD on validation), improves K = 1 (0.87x) and still loses at K = 2 (1.19x).
    "adversarial": FinetuneRun(sampler_steps=4, sampler_steps_mix=(1, 2, 4), w_range=(1.0, 2.0),
                               loss=E2ELoss(energy=0.0, gan=1.0, gan_space="features", r1=1.0,
                                            lpips_weights=SHIPPED_LPIPS),
                               optim=OptimConfig(lr=1e-6, weight_decay=1e-8),
                               train=TrainConfig(steps=800, batch_size=32, ema_decay=0.95, checkpoint_every=100,
                                                 keep_exports=True)),
    # The first recipe measured to beat the `base` student at K = 1, 2 and 4 (docs/results.md, rounds 3-5 of
    # 2026-12-06, 3 seeds, validation and test): `adversarial` plus 500 steps of discriminator warm-up, an anchor to
    # the starting model's own sample from the same noises (λ 10), lr 1e-5 and a slow EMA (0.999). Test FD after
    # ~3,000 steps, mean of 3 seeds: 0.92x / 0.85x / 0.71x the student's at K = 1 / 2 / 4, alignment equal or higher
    # at K = 2 and 4. A second stage from that file (`init=` it, so the anchor moves to it; round 7, 3 seeds,
    # 2,700-3,560 more steps): 0.88x / 0.82x / 0.64x, alignment equal at K = 4 — base/e2e until round 9 (its third
    # stage: `teacher-anchored`).
    "anchored": FinetuneRun(sampler_steps=4, sampler_steps_mix=(1, 2, 4), w_range=(1.0, 2.0), disc_warmup=500,
                            loss=E2ELoss(energy=0.0, gan=1.0, gan_space="features", r1=1.0, anchor=10.0,
                                         lpips_weights=SHIPPED_LPIPS),
                            optim=OptimConfig(lr=1e-5, weight_decay=1e-8),
                            train=TrainConfig(steps=3000, batch_size=32, ema_decay=0.999, checkpoint_every=150)),
    "scenes": FinetuneRun(data=DataConfig(dataset="fashion-scenes", caption_dropout=0.0),
                          train=TrainConfig(steps=600, batch_size=32, ema_decay=0.95, checkpoint_every=100)),
    # The paper's literal setting (large models): AdamW lr 1e-6, weight decay 1e-8, EMA 0.95, L2 + LPIPS.
    "paper": FinetuneRun(samples_per_caption=1, loss=E2ELoss(energy=0.0, l2=1.0),
                         optim=OptimConfig(lr=1e-6, weight_decay=1e-8),
                         train=TrainConfig(steps=24000, batch_size=8, ema_decay=0.95, checkpoint_every=1000)),
}
# `anchored` with K fixed at 2 (the paper trains one model per K): every update goes to the two-step sampler.
# Round 6 (docs/results.md, 2026-12-06, 3 seeds, ~4,370 steps): test FD 0.75x the student's at K = 2 (the K-mix
# `anchored` model: 0.84x), alignment 0.916 vs 0.918, diversity 0.85; K = 1 and 4 are left to the other models.
# A second stage from that file (round 7, 3 seeds, ~4,120 more steps): 0.70x, alignment 0.911 (base/e2e_2step until
# round 10, whose third stage is `teacher-anchored-2step`).
PRESETS["anchored-2step"] = replace(PRESETS["anchored"], sampler_steps=2, sampler_steps_mix=None,
                                    train=replace(PRESETS["anchored"].train, steps=4500))
# `anchored` with the anchor's target moved to the guided teacher run inside the student's own K-step sampler (its
# timesteps and re-noise draws, the teacher's DDIM-16 solve to 0 as each step's x0), on 1 of each caption's 4 chains;
# 250 discriminator-only steps. Set loss.teacher= the teacher file (it must share the init's autoencoder). Round 9
# (docs/results.md, 2026-12-06, 3 seeds, 900 steps from base/e2e of round 7, test): K = 2 FD 0.75-0.76x the student's
# with alignment 0.921-0.928 (>= the student's 0.918, which no K-mix model had reached), K = 4 0.65-0.71x with
# alignment 0.935-0.940, K = 1 0.94-0.97x — base/e2e until round 15 (seed 1, best on val; the start of its fourth stage).
PRESETS["teacher-anchored"] = replace(
    PRESETS["anchored"], disc_warmup=250,
    loss=replace(PRESETS["anchored"].loss, anchor_to="teacher", teacher_steps=16, teacher_renoise=True,
                 anchor_samples=1),
    train=replace(PRESETS["anchored"].train, steps=900, checkpoint_every=450))
# `teacher-anchored` with K fixed at 2: the third stage of the two-step model. Round 10 (docs/results.md, 2026-12-06,
# 3 seeds, ~1,310 steps from base/e2e_2step of round 7, test): K = 2 FD 0.59-0.61x the student's with alignment
# 0.932-0.935 (the student's 0.918) — base/e2e_2step until round 15 (seed 2). K = 1 and 4 are left to the
# other files (K = 4 0.89-0.90x; K = 1's alignment falls to 0.54-0.56).
PRESETS["teacher-anchored-2step"] = replace(PRESETS["teacher-anchored"], sampler_steps=2, sampler_steps_mix=None,
                                            train=replace(PRESETS["teacher-anchored"].train, steps=1300))
# Round 15 (docs/results.md, 2026-12-07): one model per K trained in the student's sampler at renoise_gamma 0.5 (half
# of each re-noise fresh noise, half the noise the step implies), toward the teacher re-noised the same way and guided
# at 1 + gain·(w − 1) at t <= 300 only, on all 4 chains of a caption. From base/e2e_2step of round 10 (~1,090 steps,
# 3 seeds, test at w 2): K = 2 FD 0.48-0.54x the student's, alignment 0.914-0.919 (the student's 0.918), diversity
# 0.892-0.901 — the shipped base/e2e_2step (seed 1, best on val). From base/e2e of round 9 (~910 steps, gain 5, 3
# seeds, test at the val-chosen w): K = 4 FD 0.39-0.43x, alignment 0.922-0.925 (the student's 0.926), diversity
# 0.922-0.929; sampled at gamma 0.7 (chosen on val) seed 1 has 0.42x / 0.934 / 0.905 — the shipped base/e2e.
# Round 16 (2026-12-07): the same with gain 5 at K = 2 too, run to ~1,530 steps (one seed, test at w 1.75, gamma 0.4
# chosen on val: 0.46x / 0.923 / 0.906, the shipped base/e2e_2step); K = 4 stopped at 910 steps, 3 seeds at w 2,
# gamma 0.7 on test: 0.39-0.44x, alignment 0.931-0.934, diversity 0.902-0.907.
PRESETS["gamma-anchored-2step"] = replace(
    PRESETS["teacher-anchored-2step"], renoise_gamma=0.5,
    loss=replace(PRESETS["teacher-anchored-2step"].loss, anchor_samples=4, teacher_guidance_interval=(0.0, 300.0),
                 teacher_guidance_gain=5.0),
    train=replace(PRESETS["teacher-anchored-2step"].train, steps=1530))
PRESETS["gamma-anchored-4step"] = replace(
    PRESETS["teacher-anchored"], sampler_steps=4, sampler_steps_mix=None, renoise_gamma=0.5,
    loss=replace(PRESETS["teacher-anchored"].loss, anchor_samples=4, teacher_guidance_interval=(0.0, 300.0),
                 teacher_guidance_gain=5.0),
    train=replace(PRESETS["teacher-anchored"].train, steps=910))


@torch.no_grad()
def teacher_target(teacher: nn.Module, z_T: Tensor, cond: TextCond, w: float | Tensor | None, timesteps: list[int],
                   noises: list[Tensor], grid: list[int], gains: tuple[float, ...] = (1.0,),
                   interval: tuple[float, float] | None = None, schedule=None, gamma: float = 1.0) -> Tensor:
    """The teacher in the student's place in its K-step VP sampler (loss.teacher_renoise): at each of the student's
    timesteps t_i its x0 is the teacher's DDIM solve from z_{t_i} to 0 on `grid` (descending, the teacher's own
    timesteps) below t_i, then z_{t_{i+1}} = sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·noises[i]; returns the last x0.
    Solve i is classifier-free guided at 1 + gains[i]·(w − 1) for each chain's w (the last gain covers the solves past
    the list; w None or a gain of 0: unguided), only at timesteps inside `interval` when given.
    timesteps = [T − 1] with no noises is the plain probability-flow ODE endpoint of z_T. schedule: the student's, for
    the re-noise (default the teacher's). gamma < 1 mixes the noise the teacher's x0 implies into each re-noise, as
    the student's sampler does with its own (samplers.vp_renoise)."""
    from e2ediff.samplers import ddim, vp_renoise

    schedule = schedule or teacher.schedule
    z = z_T
    for i, t in enumerate(timesteps):
        path = [t] + [s for s in grid if s < t]
        gain = gains[min(i, len(gains) - 1)]
        scale = 1.0 if w is None or gain == 0 else 1 + gain * (w - 1)
        x0 = ddim(teacher, z, path, cond, guidance=scale, guidance_interval=interval)
        if i + 1 < len(timesteps):
            t_now, t_next = (torch.tensor(float(s), device=z.device) for s in (t, timesteps[i + 1]))
            z = vp_renoise(schedule, z, x0, t_now, t_next, noises[i], gamma)
    return x0.to(z_T.dtype)


def check_same_latent_space(teacher, init, teacher_name: str, init_name: str) -> None:
    """The teacher's samples are latents of its autoencoder: it must be the init's (equal weights), and the two
    networks must see the same latent shape and caption features. ValueError naming both files otherwise."""
    t, s = teacher.denoiser.net.config, init.denoiser.net.config
    for field in ("in_channels", "input_size", "text_dim"):
        if getattr(t, field) != getattr(s, field):
            raise ValueError(f"loss.teacher={teacher_name}: its network has {field}={getattr(t, field)}, the init "
                             f"{init_name} has {getattr(s, field)}; the teacher must share the init's latent space")
    ta, sa = teacher.autoencoder.state_dict(), init.autoencoder.state_dict()
    if ta.keys() != sa.keys() or any(not torch.equal(ta[k].float().cpu(), sa[k].float().cpu()) for k in ta):
        raise ValueError(f"loss.teacher={teacher_name}: its autoencoder differs from the init {init_name}'s; the "
                         "anchor compares latents, so both must use one autoencoder")
    ts, ss = teacher.denoiser.schedule.alphas_cumprod, init.denoiser.schedule.alphas_cumprod
    if ts.shape != ss.shape or not torch.equal(ts, ss):
        raise ValueError(f"loss.teacher={teacher_name}: its noise schedule (ᾱ table) differs from the init "
                         f"{init_name}'s; the teacher's ODE and the student's sampler must share one schedule")


def e2e_step(student: nn.Module, autoencoder: nn.Module, images: Tensor, cond: TextCond, *, timesteps: list[int],
             m: int, generator: torch.Generator | None, renoise: str = "vp", w: float | Tensor | None = None,
             checkpoint: bool = True, grad_from_step: int = 0, timestep_scaling: float = 10.0,
             z0: Tensor | None = None, z_T: Tensor | None = None, noises: list[Tensor] | None = None,
             gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """E2EDiff Algorithm 1, one iteration's forward pass. Returns (z0 [B,...], ẑ0 [B·m,...], m outputs per image in a row).

    The loss on ẑ0 and the backward pass through every step are the caller's (``E2EObjective``, the training loop).
    z0: the images' latents when already known (a latent cache); timestep_scaling: the LCM boundary's;
    z_T, noises: the initial and the K − 1 re-noise draws when the caller draws them (else from `generator`);
    gamma: the fresh draws' share of each re-noise (samplers.lcm).
    """
    from e2ediff.samplers import lcm

    if z0 is None:
        with torch.no_grad():
            z0 = autoencoder.encode_latents(images)                 # z0 = E(x0)
    cond_m = cond.repeat_interleave(m)                               # e_c = T(caption): cached MiniLM features
    shape = (len(images) * m, *z0.shape[1:])
    if z_T is None:
        z_T, noises = draw_noises(shape, len(timesteps), generator, z0)
    if isinstance(w, Tensor):                                         # one guidance input per chain
        if w.shape != (shape[0],):
            raise ValueError(f"w has shape {tuple(w.shape)}; expected one value per chain ({shape[0]},)")
        w_in = w.to(z0)
    else:
        w_in = None if w is None else torch.full((shape[0],), float(w), device=z0.device)
    # for t = T..1: ẑ0 = G_θ(z_t, e_c, t) with LCM boundary terms; z_{t−1} = re-noise(ẑ0) — gradients through all
    z0_hat = lcm(student, z_T, timesteps, cond_m, renoise=renoise, noises=noises, w=w_in,
                 checkpoint=checkpoint, grad_from_step=grad_from_step, timestep_scaling=timestep_scaling, gamma=gamma)
    return z0, z0_hat


def anchor_weight(loss: E2ELoss, step: int, disc_warmup: int = 0) -> float:
    """λ_anchor at training step ``step`` (0-based): constant, or with ``loss.anchor_decay = N`` falling linearly from
    λ at the first network step (``disc_warmup``) to 0 at ``disc_warmup + N`` and 0 after."""
    if loss.anchor_decay <= 0:
        return loss.anchor
    return loss.anchor * min(1.0, max(0.0, 1.0 - (step - disc_warmup) / loss.anchor_decay))


def draw_noises(shape: tuple[int, ...], k: int, generator: torch.Generator, like: Tensor
                ) -> tuple[Tensor, list[Tensor]]:
    """z_T ~ N(0, I) (pure noise, not a noised z0) and fresh noise for each of the K − 1 re-noises, in this order
    from ``generator``, cast to ``like``'s dtype and device."""
    gd = generator.device
    z_T = torch.randn(shape, generator=generator, device=gd).to(like)
    return z_T, [torch.randn(shape, generator=generator, device=gd).to(like) for _ in range(k - 1)]


class E2EObjective(nn.Module):
    """The loss on the sampler's final prediction, one value per training image. Holds the (frozen) LPIPS network and
    the discriminator; `discriminator_loss` is its own objective."""

    def __init__(self, cfg: E2ELoss, autoencoder: nn.Module, text_dim: int = 384, latent_channels: int = 4,
                 latent_size: int = 8, image_channels: int = 1, image_size: int = 32, group: int = 1):
        """group: samples per caption m when ``loss.gan_group_std`` (the discriminator's minibatch-std groups)."""
        super().__init__()
        self.cfg = cfg
        self.autoencoder = autoencoder
        self.lpips = load_lpips(cfg) if cfg.uses_feature_net else None   # frozen: the LPIPS / feature network
        self.disc = None
        if cfg.gan > 0:
            from e2ediff.losses.gan import FeatureDiscriminator, LatentDiscriminator, PixelDiscriminator

            group = group if cfg.gan_group_std else 1
            if cfg.gan_group_std and group < 2:
                raise ValueError(f"loss.gan_group_std needs groups of 2 or more samples per caption; got {group}")
            if cfg.gan_space == "latent":
                self.disc = LatentDiscriminator(latent_channels, latent_size, text_dim, grid=cfg.gan_grid, group=group)
            elif cfg.gan_space == "pixel":
                self.disc = PixelDiscriminator(image_channels, image_size, text_dim, grid=cfg.gan_grid, group=group)
            else:
                self.disc = FeatureDiscriminator(self.lpips.backbone, text_dim, grid=cfg.gan_grid, group=group)

    def _decode(self, z: Tensor) -> Tensor:
        return self.autoencoder.decode_latents(z)

    def represent(self, z: Tensor | None, x: Tensor | None) -> Tensor:
        """Where L1 / L2 / the energy terms compare: the latent z, the image x, or x's LPIPS feature vector."""
        if self.cfg.space == "latent":
            return z
        return x if self.cfg.space == "pixel" else self.lpips.embed(x)

    def forward(self, z0_hat: Tensor, z0: Tensor, images: Tensor, cond: TextCond, groups: Tensor, m: int,
                last_layer: Tensor | None = None, bank: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-image loss [B] and detached log values. ``bank``: (real images [N, C, H, W], their groups [N]) for
        ``loss.real_bank``; their latents are encoded here when the loss compares latents."""
        from e2ediff.losses.coupling import minibatch_ot_pairing
        from e2ediff.losses.energy import energy_distance_by_group, energy_score
        from e2ediff.losses.recon import l1, l2

        cfg = self.cfg
        b = len(z0)
        pixel = cfg.space != "latent" or cfg.lpips > 0 or (cfg.gan > 0 and cfg.gan_space != "latent")
        x_hat = self._decode(z0_hat) if pixel else None                           # decoder in the graph
        gen = self.represent(z0_hat, x_hat)                                       # [B·m, ...]
        with torch.no_grad():
            real = self.represent(z0, images)                                     # [B, ...]
        groups_m = groups.repeat_interleave(m)
        target_idx = torch.arange(b, device=z0.device).repeat_interleave(m)       # output i ↔ image i // m
        if cfg.coupling == "minibatch_ot":                                        # Hungarian pairing within a caption
            perm = minibatch_ot_pairing(gen.detach(), real[target_idx].detach(), groups_m)
            target_idx = target_idx[perm.to(target_idx.device)]
        total = z0.new_zeros(b * m)
        logs: dict[str, Tensor] = {}
        if cfg.l1 > 0:
            term = l1(gen, real[target_idx])
            total, logs["l1"] = total + cfg.l1 * term, term.detach().mean()
        if cfg.l2 > 0:
            term = l2(gen, real[target_idx])
            total, logs["l2"] = total + cfg.l2 * term, term.detach().mean()
        if cfg.lpips > 0:
            term = self.lpips(x_hat, images[target_idx])
            total, logs["lpips"] = total + cfg.lpips * term, term.detach().mean()
        per_image = total.view(b, m).mean(1)                                      # [B]
        if cfg.energy > 0:
            if bank is not None:                        # per-class energy distance against a bank of real images
                bank_images, bank_groups = bank
                with torch.no_grad():
                    bank_z = self.autoencoder.encode_latents(bank_images) if cfg.space == "latent" else None
                    bank_real = self.represent(bank_z, bank_images)
                term = energy_distance_by_group(gen, bank_real, groups_m, bank_groups,
                                                cfg.energy_lambda).view(b, m).mean(1)
            elif cfg.energy_form == "score":
                term = energy_score(gen.view(b, m, *gen.shape[1:]), real, cfg.energy_lambda)           # [B]
            else:
                term = energy_distance_by_group(gen, real, groups_m, groups, cfg.energy_lambda).view(b, m).mean(1)
            per_image, logs["energy"] = per_image + cfg.energy * term, term.detach().mean()
        if cfg.gan > 0:
            fake = z0_hat if cfg.gan_space == "latent" else x_hat
            pooled = cond.pooled.repeat_interleave(m, 0)
            logits = self.disc(fake, pooled)
            from e2ediff.losses.gan import g_hinge, g_nonsaturating

            g = (g_hinge if cfg.gan_loss == "hinge" else g_nonsaturating)(logits).view(b, m).mean(1)
            weight = cfg.gan
            if cfg.gan_adaptive and last_layer is not None and per_image.requires_grad:
                from e2ediff.losses.gan import adaptive_gan_weight

                weight = cfg.gan * adaptive_gan_weight(per_image.mean(), g.mean(), last_layer)
                logs["gan_weight"] = weight
            per_image, logs["gan_g"] = per_image + weight * g, g.detach().mean()
        return per_image, logs

    def discriminator_loss(self, z0_hat: Tensor, z0: Tensor, images: Tensor, cond: TextCond, m: int,
                           real_groups: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """real_groups: with ``loss.gan_group_std``, m real images per caption [B·m, ...] (caption i's group at rows
        i·m … i·m + m − 1), the real side of the minibatch-std discriminator."""
        from e2ediff.losses.gan import d_hinge, d_nonsaturating, r1_penalty

        cfg = self.cfg
        pooled = cond.pooled
        grouped = getattr(self.disc, "group", 1) > 1
        if grouped:
            if real_groups is None or len(real_groups) != len(images) * m:
                raise ValueError(f"loss.gan_group_std: the discriminator needs {m} real images per caption "
                                 f"({len(images) * m}); got {None if real_groups is None else len(real_groups)}")
            images, pooled = real_groups, pooled.repeat_interleave(m, 0)
        if cfg.gan_space == "latent":
            fake = z0_hat.detach()
            if grouped:
                with torch.no_grad():
                    real = self.autoencoder.encode_latents(images)
            else:
                real = z0
        else:
            with torch.no_grad():
                fake = self._decode(z0_hat.detach())
            real = images
        fake_logits = self.disc(fake, cond.pooled.repeat_interleave(m, 0))
        real_logits = self.disc(real, pooled)
        d_fn = d_hinge if cfg.gan_loss == "hinge" else d_nonsaturating
        # B reals vs B·m fakes: each real logit is repeated m times so that the per-pair loss averages to
        # mean over reals + mean over fakes (grouped: B·m reals, one per fake).
        loss = d_fn(real_logits if grouped else real_logits.repeat_interleave(m, 0), fake_logits)
        logs = {"d_loss": loss.detach().mean(), "d_real": real_logits.detach().mean(),
                "d_fake": fake_logits.detach().mean()}
        if cfg.r1 > 0:
            r1 = r1_penalty(self.disc, real.detach(), pooled)
            loss = loss + cfg.r1 * r1.mean()
            logs["r1"] = r1.detach().mean()
        return loss.mean(), logs


def load_lpips(cfg: E2ELoss) -> nn.Module:
    """The LPIPS loss network: never the evaluation classifier (different architecture, seed and objective)."""
    from e2ediff.losses.perceptual import LPIPS, FashionFeatureNet

    if cfg.lpips_backbone == "fashion":
        lp = LPIPS(FashionFeatureNet.load(cfg.lpips_weights))
        if cfg.lpips_heads:
            lp.load_linear_heads(cfg.lpips_heads)
    else:
        lp = LPIPS.from_local(cfg.lpips_backbone, cfg.lpips_weights, cfg.lpips_heads or None)
    return lp.eval().requires_grad_(False)


class FinetuneTask(Task):
    kind = "finetune"

    def __init__(self, cfg: FinetuneRun, device: torch.device, data=None, init=None, teacher=None):
        from e2ediff.assets import TrainingData, class_index_table, load_pipeline
        from e2ediff.schedules import ddim_timesteps, lcm_timesteps, pixart_lcm_timesteps

        self.cfg = cfg
        self.device = device
        self.init = init if init is not None else load_pipeline(cfg.init, device)
        self.init.to(device)
        self.data = data if data is not None else TrainingData(cfg.data, "train", device)
        net = copy.deepcopy(self.init.net).requires_grad_(True).train()
        self.schedule, self.prediction = self.init.denoiser.schedule, self.init.denoiser.prediction
        schedule = lcm_timesteps if cfg.timestep_schedule == "lcm" else pixart_lcm_timesteps
        self.timesteps = list(cfg.timesteps) if cfg.timesteps is not None else schedule(cfg.sampler_steps)
        self.mix = [schedule(k) for k in cfg.sampler_steps_mix] if cfg.sampler_steps_mix else None
        sampler = self.init.meta.get("sampler", {})
        self.w = cfg.w if cfg.w is not None else (sampler.get("w") if net.config.guidance_embed else None)
        self.timestep_scaling = float(sampler.get("timestep_scaling", 10.0))   # the student's boundary terms
        self.gamma = float(cfg.renoise_gamma if cfg.renoise_gamma is not None else sampler.get("gamma", 1.0))
        if self.gamma != 1.0 and cfg.renoise != "vp":
            raise ValueError(f"renoise_gamma: {cfg.init} samples with gamma={self.gamma}; set renoise_gamma=1 for "
                             "renoise=ve (it re-noises with the fresh draws only)")
        if net.config.guidance_embed and self.w is None:
            raise ValueError(f"{cfg.init} embeds the guidance scale; set w=<scale>")
        if cfg.w_range is not None and not net.config.guidance_embed:
            raise ValueError(f"w_range={list(cfg.w_range)}: {cfg.init} has no guidance-scale embedding to feed")
        self.teacher = None
        if cfg.loss.anchor > 0 and cfg.loss.anchor_to == "teacher":   # the anchor's target: the teacher's ODE endpoint
            self.teacher = teacher if teacher is not None else load_pipeline(cfg.loss.teacher, device)
            self.teacher.to(device)
            check_same_latent_space(self.teacher, self.init, cfg.loss.teacher or "teacher", cfg.init or "init")
            # trailing spacing, as the evaluator's DDIM: the first step starts at t = T − 1 from pure noise
            self.teacher_timesteps = ddim_timesteps(cfg.loss.teacher_steps, self.schedule.T, spacing="trailing")
        self.bank_items = None
        if cfg.loss.real_bank > 0 or cfg.loss.gan_group_std:   # train items of each class: the per-class real
            labels = self.data.labels                            # bank, the discriminator's real groups
            if bool((labels < 0).any()):
                what = "loss.real_bank" if cfg.loss.real_bank > 0 else "loss.gan_group_std"
                raise ValueError(f"{what} needs class labels (the Fashion-MNIST dataset); this dataset has "
                                 "images without a class")
            self.bank_items, self.bank_counts = class_index_table(labels)
        ae = self.init.autoencoder
        self.objective = E2EObjective(cfg.loss, ae, text_dim=net.config.text_dim,
                                      latent_channels=net.config.in_channels, latent_size=net.config.input_size,
                                      image_channels=ae.config.in_channels, image_size=ae.config.image_size,
                                      group=cfg.samples_per_caption).to(device)
        self.parts = [Part("net", net, cfg.optim, cfg.train.ema_decay)]
        if self.objective.disc is not None:
            self.parts.append(Part("disc", self.objective.disc, cfg.disc_optim, 0.0, compile=False))
        self.stream = BatchStream(len(self.data), cfg.train.batch_size, cfg.train.seed)

    def losses(self, step, generator):
        from e2ediff.assets import draw_from_classes

        cfg = self.cfg
        images, cond, labels, caps = self.data.batch(self.stream.indices(step), generator)
        groups = torch.where(labels >= 0, labels, caps)               # a caption's class when known, else the caption
        m = cfg.samples_per_caption
        timesteps = self.timesteps
        if self.mix is not None:                                      # K drawn for this iteration
            pick = torch.randint(0, len(self.mix), (1,), generator=generator, device=generator.device)
            timesteps = self.mix[int(pick)]
        k = len(timesteps)
        cut = k - cfg.truncate if cfg.truncate > 0 else 0
        if cfg.random_truncation:
            cut = int(torch.randint(0, k, (1,), generator=generator, device=generator.device))
        w = self.w
        if cfg.w_range is not None:                                   # one guidance input per chain
            lo, hi = cfg.w_range
            u = torch.rand(len(images) * m, generator=generator, device=generator.device)
            w = (lo + (hi - lo) * u).to(images.device)
        bank = None
        if cfg.loss.real_bank > 0:                                    # real_bank images of every class
            n, classes = cfg.loss.real_bank, torch.arange(len(self.bank_counts))
            idx = draw_from_classes(self.bank_items, self.bank_counts, classes, n, generator)   # [classes, n]
            bank = (self.data.images[idx.flatten()], classes.to(idx.device).repeat_interleave(n))
        student = Denoiser(self.module("net"), self.schedule, self.prediction)
        z0 = z_T = noises = None
        if cfg.loss.anchor > 0:     # the anchor's sample must see the same noises: drawn here, as e2e_step would
            with torch.no_grad():
                z0 = self.init.autoencoder.encode_latents(images)
            z_T, noises = draw_noises((len(images) * m, *z0.shape[1:]), k, generator, z0)
        warmup = step < cfg.disc_warmup      # the discriminator trains alone: no graph through the sampler
        with torch.no_grad() if warmup else contextlib.nullcontext():
            z0, z0_hat = e2e_step(student, self.init.autoencoder, images, cond, timesteps=timesteps,
                                  m=m, generator=generator, renoise=cfg.renoise, w=w,
                                  checkpoint=cfg.checkpointing and not warmup, grad_from_step=cut,
                                  timestep_scaling=self.timestep_scaling, z0=z0, z_T=z_T, noises=noises,
                                  gamma=self.gamma)
        losses, logs = {}, {}
        if not warmup:
            last = self.parts[0].module.final_layer.linear.weight if cfg.loss.gan_adaptive else None
            per_image, logs = self.objective(z0_hat, z0, images, cond, groups, m, last, bank)
            if cfg.loss.anchor > 0:         # the target for the same noises and w: the frozen starting model's
                a = cfg.loss.anchor_samples or m     # sample, or the teacher's guided ODE solve, on a chains a caption

                def first(x):               # each caption's first a of its m chains (a float w is everyone's)
                    if a == m or not isinstance(x, Tensor):
                        return x
                    return x.unflatten(0, (len(images), m))[:, :a].flatten(0, 1)
                z_T_a, noises_a, w_a = first(z_T), [first(n) for n in noises], first(w)
                with torch.no_grad():
                    if self.teacher is not None:
                        anchor = self.teacher_sample(z_T_a, cond.repeat_interleave(a), w_a,
                                                     (timesteps, noises_a) if cfg.loss.teacher_renoise else None)
                    else:
                        _, anchor = e2e_step(self.init.denoiser, self.init.autoencoder, images, cond,
                                             timesteps=timesteps, m=a, generator=None, renoise=cfg.renoise, w=w_a,
                                             checkpoint=False, timestep_scaling=self.timestep_scaling, z0=z0,
                                             z_T=z_T_a, noises=noises_a, gamma=self.gamma)
                term = (first(z0_hat) - anchor).float().square().flatten(1).mean(1).view(len(images), a).mean(1)
                weight = anchor_weight(cfg.loss, step, cfg.disc_warmup)
                per_image, logs["anchor"] = per_image + weight * term, term.detach().mean()
                logs["anchor_weight"] = torch.tensor(weight)
            losses["net"] = per_image.mean()
        logs["sampler_steps"] = torch.tensor(float(k))
        if self.objective.disc is not None:
            real_groups = None
            if cfg.loss.gan_group_std:   # each caption's image and m − 1 more real images of its class
                idx = draw_from_classes(self.bank_items, self.bank_counts, labels, m - 1, generator)   # [B, m − 1]
                real_groups = torch.cat([images[:, None], self.data.images[idx]], 1).flatten(0, 1)
            losses["disc"], d_logs = self.objective.discriminator_loss(z0_hat, z0, images, cond,
                                                                       cfg.samples_per_caption, real_groups)
            logs.update(d_logs)
        with torch.no_grad():   # within-batch spread of the outputs: falls toward 0 when samples collapse
            logs["output_std"] = z0_hat.float().std(0).mean()
        return losses, logs

    def frozen_networks(self) -> list[nn.Module]:
        """The anchor's network, run every step without gradients: the teacher's, or the starting model's."""
        if self.cfg.loss.anchor <= 0:
            return []
        return [self.teacher.denoiser.net if self.teacher is not None else self.init.net]

    def teacher_sample(self, z_T: Tensor, cond: TextCond, w: float | Tensor | None,
                       renoise: tuple[list[int], list[Tensor]] | None = None) -> Tensor:
        """The anchor's target from z_T [B·m, ...] (cond per chain): `teacher_target` with the loss's guidance
        settings. renoise = (the student's timesteps, its K − 1 re-noise draws); None: the plain DDIM solve from z_T."""
        timesteps, noises = renoise if renoise is not None else (self.teacher_timesteps[:1], [])
        return teacher_target(self.teacher.denoiser, z_T, cond, w, timesteps, noises, self.teacher_timesteps,
                              gains=self.cfg.loss.teacher_solve_gains or (self.cfg.loss.teacher_guidance_gain,),
                              interval=self.cfg.loss.teacher_guidance_interval, schedule=self.schedule,
                              gamma=self.gamma)

    @torch.no_grad()
    def after_step(self, step):
        n = self.cfg.loss.anchor_refresh
        done = step + 1 - self.cfg.disc_warmup                         # network steps so far
        if n > 0 and done > 0 and done % n == 0:   # the anchor's model becomes the network's EMA (its weights without)
            from e2ediff.checkpoint import load_state_strict

            weights = self.ema_weights("net")
            if weights is None:
                weights = self.parts[0].module.state_dict()
            load_state_strict(self.init.net, weights, "the network's EMA (loss.anchor_refresh)")

    def extra_tensors(self):
        from e2ediff.checkpoint import with_prefix

        if self.cfg.loss.anchor_refresh <= 0:
            return {}
        return with_prefix(self.init.net.state_dict(), "anchor")    # the anchor's model has moved: keep it

    def load_extra_tensors(self, tensors):
        from e2ediff.checkpoint import load_state_strict, split_prefix

        if self.cfg.loss.anchor_refresh > 0:
            load_state_strict(self.init.net, split_prefix(tensors, "anchor"), "checkpoint (the anchor's model)")

    def export(self, weights):
        from e2ediff.assets import export_pipeline

        sampler = {"name": "lcm", "steps": len(self.timesteps), "timesteps": self.timesteps,
                   "renoise": self.cfg.renoise, "w": self.w, "timestep_scaling": self.timestep_scaling}
        if self.gamma != 1.0:                                      # files sampled the LCMScheduler way name none
            sampler["gamma"] = self.gamma
        return export_pipeline("e2e", weights["net"], self.parts[0].module.config, self.init.autoencoder,
                               self.init.meta["schedule"], self.prediction, sampler, self.data.captions,
                               self.init.meta.get("text_encoder"), init=str(self.cfg.init))
