"""The quality levers of the E2E recipe (issue #9), each against an independent reference: the LPIPS forward pass for
the feature space, hand-written energy score / energy distance with scipy's cdist, a hand-written projection
discriminator, per-chain calls for the guidance input, and short FinetuneTask runs on tiny seeded models."""
from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from e2ediff.config import ConfigError, OptimConfig, TrainConfig, validate
from e2ediff.denoiser import Denoiser
from e2ediff.e2e import E2ELoss, E2EObjective, FinetuneRun, FinetuneTask, e2e_step
from e2ediff.losses.gan import FeatureDiscriminator, r1_penalty
from e2ediff.losses.perceptual import LPIPS, FashionFeatureNet
from e2ediff.schedules import lcm_timesteps
from e2ediff.trainer import train
from helpers import record_compile
from test_e2e import (SCHEDULE, TEXT_DIM, StandInData, make_cond, objective_inputs, student_pipeline,
                      tiny_autoencoder, tiny_dit)


def feature_net(tmp_path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    net = FashionFeatureNet(channels=(4, 8, 8))
    path = tmp_path / "features.safetensors"
    net.save(path)
    return str(path)


# ----------------------------------------------------------------------------------------------------------------------
# The frozen feature space: ‖φ(x) − φ(y)‖² = LPIPS(x, y)


def test_lpips_embedding_distance_is_lpips_in_float64(tmp_path):
    torch.manual_seed(1)
    lp = LPIPS(FashionFeatureNet(channels=(4, 8, 8))).double()
    with torch.no_grad():      # non-uniform, partly negative heads (negative weights are clamped to 0 by LPIPS)
        for lin in lp.lins:
            lin.weight.copy_(torch.randn(lin.weight.shape, dtype=torch.float64))
    g = torch.Generator().manual_seed(2)
    x = torch.rand(5, 1, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.rand(5, 1, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    d2 = (lp.embed(x) - lp.embed(y)).square().sum(1)
    assert torch.allclose(d2, lp(x, y), rtol=1e-10, atol=1e-12)
    assert lp.embed(x).shape == (5, 4 * 32 * 32 + 8 * 16 * 16 + 8 * 8 * 8)


def test_energy_score_in_feature_space_matches_hand_computation(tmp_path):
    b, m = 3, 4
    ae, images, z0, z0_hat, cond = objective_inputs(b, m)
    cfg = E2ELoss(energy=1.0, space="features", lpips_weights=feature_net(tmp_path))
    obj = E2EObjective(cfg, ae, text_dim=TEXT_DIM)
    per_image, logs = obj(z0_hat, z0, images, cond, torch.arange(b), m)
    lp = LPIPS(FashionFeatureNet.load(cfg.lpips_weights)).double()
    gen = lp.embed(ae.decode_latents(z0_hat).double()).detach().numpy().reshape(b, m, -1)
    real = lp.embed(images.double()).detach().numpy()
    want = []
    for i in range(b):
        confinement = cdist(gen[i], real[i:i + 1]).mean()
        pair = cdist(gen[i], gen[i])
        want.append(confinement - 0.5 * pair.sum() / (m * (m - 1)))
    assert per_image.detach().double().numpy() == pytest.approx(want, rel=1e-4, abs=1e-6)
    per_image.sum().backward()
    assert z0_hat.grad is not None and z0_hat.grad.abs().sum() > 0       # the decoder and φ are in the graph


@pytest.mark.parametrize("space", ["latent", "features"])
def test_real_bank_energy_distance_matches_scipy(space, tmp_path):
    b, m, n = 4, 3, 5
    ae, images, z0, z0_hat, cond = objective_inputs(b, m)
    groups = torch.tensor([0, 1, 0, 1])
    g = torch.Generator().manual_seed(11)
    bank_images = torch.rand(2 * n, 1, 32, 32, generator=g) * 2 - 1
    bank_groups = torch.arange(2).repeat_interleave(n)
    cfg = E2ELoss(energy=1.0, space=space, real_bank=n, lpips_weights=feature_net(tmp_path) if space != "latent" else "")
    obj = E2EObjective(cfg, ae, text_dim=TEXT_DIM)
    per_image, _ = obj(z0_hat, z0, images, cond, groups, m, bank=(bank_images, bank_groups))
    if space == "latent":
        gen, real = z0_hat.detach().double(), ae.encode_latents(bank_images).double()
    else:
        lp = LPIPS(FashionFeatureNet.load(cfg.lpips_weights)).double()
        gen = lp.embed(ae.decode_latents(z0_hat).double()).detach()
        real = lp.embed(bank_images.double()).detach()
    gen, real = gen.flatten(1).numpy(), real.flatten(1).numpy()
    gm = groups.repeat_interleave(m).numpy()
    c = np.zeros(len(gen))
    for grp in (0, 1):   # c_i = 2·mean_r ‖G_i − R_r‖ − 1/(n_g − 1) Σ_{j≠i} ‖G_i − G_j‖ within the class
        gi = np.nonzero(gm == grp)[0]
        ri = np.nonzero(bank_groups.numpy() == grp)[0]
        c[gi] = 2 * cdist(gen[gi], real[ri]).mean(1) - cdist(gen[gi], gen[gi]).sum(1) / (len(gi) - 1)
    want = c.reshape(b, m).mean(1)
    assert per_image.detach().double().numpy() == pytest.approx(want, rel=1e-4, abs=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Discriminator heads on the frozen feature network (ADD / DMD2)


def test_feature_discriminator_matches_hand_written_projection_heads():
    torch.manual_seed(3)
    backbone = FashionFeatureNet(channels=(4, 8, 8))
    disc = FeatureDiscriminator(backbone, TEXT_DIM, hidden=6)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 1, 32, 32, generator=g) * 2 - 1
    pooled = torch.randn(3, TEXT_DIM, generator=g)
    want = torch.zeros(3)
    for f, head, psi, embed in zip(backbone(x), disc.heads, disc.psi, disc.embed):
        h = torch.nn.functional.leaky_relu(torch.nn.functional.conv2d(f, head[0].weight, head[0].bias), 0.2)
        h = torch.nn.functional.leaky_relu(torch.nn.functional.conv2d(h, head[2].weight, head[2].bias, padding=1), 0.2)
        phi = h.sum((2, 3))
        want += phi @ psi.weight[0] + psi.bias[0] + ((pooled @ embed.weight.T) * phi).sum(1)
    assert torch.allclose(disc(x, pooled), want, rtol=1e-5, atol=1e-5)
    # only the heads train; the backbone stays frozen, yet the input (generator, R1) gets a gradient
    trainable = {n for n, p in disc.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("backbone.") for n in trainable)
    r1 = r1_penalty(disc, x, pooled)
    assert r1.shape == (3,) and bool((r1 > 0).all())
    r1.sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(disc.heads[0][0].weight.grad is not None for _ in [0])


def test_feature_gan_term_trains_in_a_finetune_run(tmp_path):
    loss = E2ELoss(energy=1.0, gan=0.1, gan_space="features", r1=1.0, lpips_weights=feature_net(tmp_path))
    cfg = FinetuneRun(init="memory", sampler_steps=2, samples_per_caption=2, loss=loss, optim=OptimConfig(lr=1e-3),
                      train=TrainConfig(steps=2, batch_size=4, ema_decay=0.9, device="cpu", progress=False,
                                        log_every=1, checkpoint_every=2))
    task = FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline())
    heads_before = {k: v.clone() for k, v in task.parts[1].module.state_dict().items()}
    last = train(task, cfg.train, tmp_path / "run", cfg, "finetune")
    assert math.isfinite(last["loss/disc"]) and last["r1"] > 0
    after = task.parts[1].module.state_dict()
    changed = {k for k in heads_before if not torch.equal(heads_before[k], after[k])}
    assert changed and not any(k.startswith("backbone.") for k in changed)


# ----------------------------------------------------------------------------------------------------------------------
# Guidance input per chain, K drawn per iteration


def test_per_chain_guidance_equals_separate_runs():
    b, m = 2, 2
    pipe = student_pipeline()
    student = Denoiser(tiny_dit(0, guidance_embed=True), SCHEDULE, "eps")
    images = torch.rand(b, 1, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    cond = make_cond(b)
    w = torch.tensor([1.0, 1.5, 2.0, 3.0])
    ts = lcm_timesteps(2)
    _, together = e2e_step(student, pipe.autoencoder, images, cond, timesteps=ts, m=m,
                           generator=torch.Generator().manual_seed(6), w=w, checkpoint=False)
    for i, wi in enumerate(w.tolist()):
        _, alone = e2e_step(student, pipe.autoencoder, images, cond, timesteps=ts, m=m,
                            generator=torch.Generator().manual_seed(6), w=wi, checkpoint=False)
        assert torch.allclose(together[i], alone[i], atol=1e-6)
    with pytest.raises(ValueError, match="one value per chain"):
        e2e_step(student, pipe.autoencoder, images, cond, timesteps=ts, m=m,
                 generator=torch.Generator().manual_seed(6), w=w[:3], checkpoint=False)


def test_steps_mix_and_w_range_in_a_finetune_run(tmp_path, monkeypatch):
    import e2ediff.e2e as e2e_module

    seen = []
    real_step = e2e_module.e2e_step

    def spy(*args, **kwargs):
        seen.append((list(kwargs["timesteps"]), kwargs["w"]))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(e2e_module, "e2e_step", spy)
    cfg = FinetuneRun(init="memory", sampler_steps=4, sampler_steps_mix=(1, 2, 4), w_range=(1.0, 3.0),
                      samples_per_caption=2, optim=OptimConfig(lr=1e-3),
                      train=TrainConfig(steps=12, batch_size=4, ema_decay=0.9, device="cpu", progress=False,
                                        log_every=1, checkpoint_every=12))
    task = FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline())
    train(task, cfg.train, tmp_path / "run", cfg, "finetune")
    steps = {len(ts) for ts, _ in seen}
    assert steps == {1, 2, 4}                                           # every K of the mix was drawn
    assert all(ts == lcm_timesteps(len(ts)) for ts, _ in seen)
    ws = torch.cat([w for _, w in seen])
    assert ws.shape == (12 * 4 * 2,) and 1.0 <= float(ws.min()) and float(ws.max()) <= 3.0
    assert float(ws.std()) > 0.3                                        # drawn, not constant
    from e2ediff.checkpoint import read_model_meta

    meta = read_model_meta(tmp_path / "run" / "model.safetensors")
    assert meta["sampler"]["timesteps"] == lcm_timesteps(4)             # the default sampler stays sampler_steps


def test_real_bank_finetune_draws_real_images_of_each_class(tmp_path):
    cfg = FinetuneRun(init="memory", sampler_steps=1, samples_per_caption=2, loss=E2ELoss(energy=1.0, real_bank=3),
                      optim=OptimConfig(lr=1e-3),
                      train=TrainConfig(steps=2, batch_size=4, ema_decay=0.9, device="cpu", progress=False,
                                        log_every=1, checkpoint_every=2))
    data = StandInData()
    task = FinetuneTask(cfg, torch.device("cpu"), data=data, init=student_pipeline())
    captured = {}
    forward = task.objective.forward

    def spy(*args, **kwargs):
        captured["bank"] = args[7] if len(args) > 7 else kwargs.get("bank")
        return forward(*args, **kwargs)

    task.objective.forward = spy
    last = train(task, cfg.train, tmp_path / "run", cfg, "finetune")
    assert math.isfinite(last["loss/net"])
    bank_images, bank_groups = captured["bank"]
    assert bank_groups.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for img, grp in zip(bank_images, bank_groups):     # every bank image is a real image of its class
        match = [(data.images[i] == img).all() for i in range(len(data.images))]
        assert any(bool(mm) and int(data.labels[i]) == int(grp) for i, mm in enumerate(match))


@pytest.mark.parametrize("override, message", [
    (dict(sampler_steps_mix=()), "sampler_steps_mix"),
    (dict(sampler_steps_mix=(1, 0)), "sampler_steps_mix"),
    (dict(sampler_steps_mix=(1, 2), timesteps=(999, 759, 499, 259)), "sampler_steps_mix"),
    (dict(w_range=(2.0, 1.0)), "w_range"),
    (dict(w_range=(0.0, 1.0)), "w_range"),
    (dict(loss=E2ELoss(energy=1.0, space="features")), "loss.lpips_weights"),
    (dict(loss=E2ELoss(energy=0.0, l2=1.0, real_bank=4)), "loss.real_bank"),
    (dict(loss=E2ELoss(energy=1.0, gan=0.1, gan_space="features")), "loss.lpips_weights"),
])
def test_recipe_options_are_validated(override, message):
    cfg = FinetuneRun(init="x.safetensors", **override)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(cfg)


# ----------------------------------------------------------------------------------------------------------------------
# train.compile: the networks are compiled in place; training and the exported file are unchanged


def test_compiled_training_matches_eager_and_keeps_parameter_names(tmp_path, monkeypatch):
    from e2ediff.checkpoint import load_model_file

    calls = record_compile(monkeypatch, "eager")
    exports = {}
    for compile_mode in ("no", "max-autotune-no-cudagraphs"):
        cfg = FinetuneRun(init="memory", sampler_steps=2, samples_per_caption=2, optim=OptimConfig(lr=1e-3),
                          train=TrainConfig(steps=2, batch_size=4, ema_decay=0.9, device="cpu", progress=False,
                                            log_every=1, checkpoint_every=2, compile=compile_mode))
        task = FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline())
        train(task, cfg.train, tmp_path / compile_mode, cfg, "finetune")
        exports[compile_mode] = load_model_file(tmp_path / compile_mode / "model.safetensors")[0]
    assert [mode for _, mode in calls] == ["max-autotune-no-cudagraphs"]
    assert exports["no"].keys() == exports["max-autotune-no-cudagraphs"].keys()
    for k, v in exports["no"].items():
        torch.testing.assert_close(exports["max-autotune-no-cudagraphs"][k], v, rtol=1e-5, atol=1e-6)


def test_compiled_training_with_gan_and_r1_penalty(tmp_path, monkeypatch):
    """Only the trained network is compiled: R1 differentiates the discriminator twice (create_graph=True), which a
    compiled backward with donated buffers refuses (seen on an H100 with mode=reduce-overhead, 2026-12-06)."""
    from e2ediff.checkpoint import load_model_file

    calls = record_compile(monkeypatch, "aot_eager")
    cfg = FinetuneRun(init="memory", sampler_steps=2, samples_per_caption=2, optim=OptimConfig(lr=1e-3),
                      loss=E2ELoss(energy=1.0, gan=0.1, r1=1.0),
                      train=TrainConfig(steps=2, batch_size=4, ema_decay=0.9, device="cpu", progress=False,
                                        log_every=1, checkpoint_every=2, compile="default"))
    task = FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline())
    train(task, cfg.train, tmp_path / "run", cfg, "finetune")
    assert len(calls) == 1 and calls[0][0].__self__ is task.parts[0].module   # the student, not the disc
    assert load_model_file(tmp_path / "run" / "model.safetensors")[0]


def test_keep_exports_writes_each_checkpoints_model_file(tmp_path):
    cfg = FinetuneRun(init="memory", sampler_steps=1, samples_per_caption=2, optim=OptimConfig(lr=1e-3),
                      train=TrainConfig(steps=4, batch_size=4, ema_decay=0.9, device="cpu", progress=False,
                                        log_every=1, checkpoint_every=2, keep_exports=True))
    task = FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline())
    train(task, cfg.train, tmp_path / "run", cfg, "finetune")
    from e2ediff.checkpoint import read_model_meta

    exports = sorted((tmp_path / "run" / "exports").iterdir())
    assert [e.name for e in exports] == ["model_step_00000002.safetensors", "model_step_00000004.safetensors"]
    assert [read_model_meta(e)["step"] for e in exports] == [2, 4]
    assert exports[-1].read_bytes() == (tmp_path / "run" / "model.safetensors").read_bytes()
    assert exports[0].read_bytes() != exports[-1].read_bytes()


# ----------------------------------------------------------------------------------------------------------------------
# Discriminator warm-up and the anchor to the starting model


def gan_run(tmp_path, steps, **kw):
    loss = E2ELoss(energy=0.0, gan=1.0, gan_space="features", r1=1.0, lpips_weights=feature_net(tmp_path),
                   **kw.pop("loss", {}))
    return FinetuneRun(init="memory", sampler_steps=2, samples_per_caption=2, loss=loss, optim=OptimConfig(lr=1e-3),
                       train=TrainConfig(steps=steps, batch_size=4, ema_decay=0.0, device="cpu", progress=False,
                                         log_every=1, checkpoint_every=steps), **kw)


def test_disc_warmup_trains_the_discriminator_alone_then_both(tmp_path):
    from e2ediff.checkpoint import load_model_file

    def run(steps):
        cfg = gan_run(tmp_path, steps, disc_warmup=2)
        task = FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline())
        disc_before = {k: v.clone() for k, v in task.parts[1].module.state_dict().items()}
        train(task, cfg.train, tmp_path / f"run{steps}", cfg, "finetune")
        disc_after = task.parts[1].module.state_dict()
        tensors = load_model_file(tmp_path / f"run{steps}" / "model.safetensors")[0]
        return {k[len("net/"):]: v for k, v in tensors.items() if k.startswith("net/")}, \
            any(not torch.equal(disc_before[k], disc_after[k]) for k in disc_before)

    init = student_pipeline().net.state_dict()
    net2, disc_moved2 = run(2)
    assert disc_moved2 and all(torch.equal(net2[k], init[k]) for k in init)      # warm-up: the network stays put
    net3, _ = run(3)
    assert any(not torch.equal(net3[k], init[k]) for k in init)                 # step 3 trains it
    rows = [json.loads(line) for line in (tmp_path / "run3" / "metrics.jsonl").read_text().splitlines()]
    assert ["loss/net" in r for r in rows] == [False, False, True]
    with pytest.raises(ConfigError, match="disc_warmup"):
        validate(FinetuneRun(init="x", disc_warmup=10))                         # no GAN term to warm up


def test_anchor_is_the_squared_distance_to_the_starting_models_sample_from_the_same_noises(tmp_path):
    """Two tasks with the roles of the networks swapped, fed the same generator: task A's anchor must equal the mean
    squared difference between A's sample and B's sample, computed here in float64 from the recorded outputs."""
    perturbed = student_pipeline()
    with torch.no_grad():
        for p in perturbed.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    cfg = gan_run(tmp_path, 1, loss=dict(anchor=1.0), w_range=(1.0, 2.0))
    seen = {}

    def sample_of(name, task):
        forward = task.objective.forward

        def record(z0_hat, *a, **k):
            seen[name] = z0_hat.detach().double()
            return forward(z0_hat, *a, **k)
        task.objective.forward = record
        return task

    a = sample_of("a", FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline()))
    a.parts[0].module.load_state_dict(perturbed.net.state_dict())
    b = sample_of("b", FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=perturbed))
    b.parts[0].module.load_state_dict(student_pipeline().net.state_dict())
    _, logs_a = a.losses(0, torch.Generator().manual_seed(7))
    _, logs_b = b.losses(0, torch.Generator().manual_seed(7))
    want = (seen["a"] - seen["b"]).square().mean()
    assert want > 1e-6
    torch.testing.assert_close(logs_a["anchor"].double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(logs_b["anchor"].double(), want, rtol=1e-5, atol=0)
    # at the start (network = starting model) the anchor is 0: the same noises and w reach both samples
    c = FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline())
    _, logs_c = c.losses(0, torch.Generator().manual_seed(7))
    assert float(logs_c["anchor"]) == 0.0


def test_anchor_decay_schedule_and_its_weight_in_the_network_loss(tmp_path):
    """anchor_weight against the written-out schedule, and the network loss of a step = the objective's part +
    the scheduled λ · the logged anchor term (the same generator replays the step)."""
    from e2ediff.e2e import anchor_weight

    loss = E2ELoss(gan=1.0, energy=0.0, anchor=10.0, anchor_decay=100)
    for step, want in [(0, 10.0), (50, 10.0), (51, 10.0 * (1 - 1 / 100)), (100, 5.0), (149, 10.0 * 0.01),
                       (150, 0.0), (400, 0.0)]:
        assert anchor_weight(loss, step, disc_warmup=50) == pytest.approx(want, abs=1e-12), step
    assert anchor_weight(E2ELoss(gan=1.0, energy=0.0, anchor=3.0), 10_000, 50) == 3.0     # no decay: constant
    with pytest.raises(ConfigError, match="loss.anchor_decay"):
        validate(FinetuneRun(init="x", loss=E2ELoss(anchor_decay=10)))                   # nothing to decay

    perturbed = student_pipeline()
    with torch.no_grad():
        for p in perturbed.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    cfg = gan_run(tmp_path, 1, loss=dict(anchor=4.0, anchor_decay=4))
    task = FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline())
    task.parts[0].module.load_state_dict(perturbed.net.state_dict())
    parts = {}
    forward = task.objective.forward

    def record(*a, **k):
        per_image, logs = forward(*a, **k)
        parts["objective"] = per_image.detach().mean()
        return per_image, logs
    task.objective.forward = record
    for step, weight in [(1, 3.0), (3, 1.0), (4, 0.0)]:
        losses, logs = task.losses(step, torch.Generator().manual_seed(7))
        assert float(logs["anchor_weight"]) == weight and float(logs["anchor"]) > 1e-6
        torch.testing.assert_close(losses["net"].detach(), parts["objective"] + weight * logs["anchor"],
                                   rtol=1e-5, atol=1e-6)


def test_spatial_projection_discriminator_against_per_cell_loops():
    """gan_grid = g: ψ(Σ φ) + Σ_cells <embed(c)_cell, φ_cell> with φ_cell a sum over the cell's pixels, checked against
    explicit loops over cells; g = 1 is the global projection; the caption term sees where features are."""
    from e2ediff.losses.gan import LatentDiscriminator

    torch.manual_seed(3)
    backbone = FashionFeatureNet(channels=(4, 8, 8))
    disc = FeatureDiscriminator(backbone, TEXT_DIM, hidden=6, grid=2)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 1, 32, 32, generator=g) * 2 - 1
    pooled = torch.randn(3, TEXT_DIM, generator=g)
    want = torch.zeros(3, dtype=torch.float64)
    for f, head, psi, embed in zip(backbone(x), disc.heads, disc.psi, disc.embed):
        h = head(f).double()
        e = (pooled.double() @ embed.weight.double().T).view(3, 6, 2, 2)
        hh, ww = h.shape[2] // 2, h.shape[3] // 2
        want += h.sum((2, 3)) @ psi.weight[0].double() + psi.bias[0].double()
        for i in range(2):
            for j in range(2):
                cell = h[:, :, i * hh:(i + 1) * hh, j * ww:(j + 1) * ww].sum((2, 3))
                want += (e[:, :, i, j] * cell).sum(1)
    torch.testing.assert_close(disc(x, pooled).double(), want, rtol=1e-5, atol=1e-5)
    # the caption term is position-aware: an embedding that rewards features only in the top-left cell gives a
    # different logit for the image and its left-right mirror, which a global pool (grid 1) cannot tell apart when
    # the heads and features are mirror-symmetric; here: a latent discriminator with a symmetric trunk stand-in
    lat = LatentDiscriminator(latent_channels=1, size=4, text_dim=2, hidden=1, grid=2)
    lat.trunk = torch.nn.Identity()
    with torch.no_grad():
        lat.psi.weight.zero_(), lat.psi.bias.zero_()
        lat.embed.weight.zero_()
        lat.embed.weight[0, 0] = 1.0                                      # cell (0, 0) <- caption feature 0
    img = torch.zeros(1, 1, 4, 4)
    img[..., :2, :2] = 1.0                                                # something in the top left
    c = torch.tensor([[1.0, 0.0]])
    assert float(lat(img, c)) == 4.0 and float(lat(img.flip(-1), c)) == 0.0
    with pytest.raises(ValueError, match="loss.gan_grid"):
        FeatureDiscriminator(backbone, TEXT_DIM, hidden=6, grid=3)(x, pooled)   # 3 divides no map of 32, 16, 8
    with pytest.raises(ConfigError, match="loss.gan_grid"):
        validate(FinetuneRun(init="x", loss=E2ELoss(gan=1.0, gan_grid=0)))


def test_spatial_projection_trains_in_a_finetune_run(tmp_path):
    cfg = gan_run(tmp_path, 2, loss=dict(gan_grid=2, anchor=1.0, anchor_decay=2), disc_warmup=1)
    task = FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline())
    assert task.objective.disc.grid == 2
    last = train(task, cfg.train, tmp_path / "run", cfg, "finetune")
    assert math.isfinite(last["loss/disc"]) and math.isfinite(last["loss/net"])


def test_every_finetune_preset_is_a_valid_run():
    import dataclasses

    from e2ediff.e2e import PRESETS

    for name, preset in PRESETS.items():
        if preset.loss.anchor_to == "teacher":                # the teacher file is the user's to name
            with pytest.raises(ConfigError, match="loss.teacher"):
                validate(dataclasses.replace(preset, init="student.safetensors"))
            preset = dataclasses.replace(preset, loss=dataclasses.replace(preset.loss, teacher="teacher.safetensors"))
        validate(dataclasses.replace(preset, init="student.safetensors"))
    anchored = PRESETS["anchored"]
    assert anchored.loss.anchor > 0 and anchored.disc_warmup > 0 and anchored.loss.gan > 0
    # the two-step model's recipe is `anchored` with K fixed at 2 (round 6 ran it as such overrides), run longer
    two = PRESETS["anchored-2step"]
    assert two == dataclasses.replace(anchored, sampler_steps=2, sampler_steps_mix=None,
                                      train=dataclasses.replace(anchored.train, steps=two.train.steps))
    # round 9's third stage (base/e2e): `anchored` with the anchor on the teacher in the student's sampler
    teacher = PRESETS["teacher-anchored"]
    assert teacher == dataclasses.replace(
        anchored, disc_warmup=250,
        loss=dataclasses.replace(anchored.loss, anchor_to="teacher", teacher_steps=16, teacher_renoise=True,
                                 anchor_samples=1),
        train=dataclasses.replace(anchored.train, steps=900, checkpoint_every=450))
    # round 10's third stage of the two-step model (base/e2e_2step): the same with K fixed at 2, run longer
    assert PRESETS["teacher-anchored-2step"] == dataclasses.replace(
        teacher, sampler_steps=2, sampler_steps_mix=None, train=dataclasses.replace(teacher.train, steps=1300))
    # rounds 15-16's models (base/e2e_2step, base/e2e): one per K, trained at renoise_gamma 0.5 toward the teacher
    # re-noised the same way, guided at low noise only with gain 5, on every chain — what quality_probe.sh ran as
    # overrides (X_h5g5, with K4_STEPS=910 for the four-step rows)
    for name, k, gain, steps in (("gamma-anchored-2step", 2, 5.0, 1530), ("gamma-anchored-4step", 4, 5.0, 910)):
        base = PRESETS["teacher-anchored-2step"] if k == 2 else teacher
        assert PRESETS[name] == dataclasses.replace(
            base, sampler_steps=k, sampler_steps_mix=None, renoise_gamma=0.5,
            loss=dataclasses.replace(base.loss, anchor_samples=4, teacher_guidance_interval=(0.0, 300.0),
                                     teacher_guidance_gain=gain),
            train=dataclasses.replace(base.train, steps=steps))


def test_checkpointing_except_last_is_a_finetune_option_with_the_same_result(tmp_path):
    from e2ediff.checkpoint import load_model_file

    exports = {}
    for policy in (True, "except_last"):
        cfg = FinetuneRun(init="memory", sampler_steps=2, samples_per_caption=2, optim=OptimConfig(lr=1e-3),
                          checkpointing=policy,
                          train=TrainConfig(steps=2, batch_size=4, ema_decay=0.9, device="cpu", progress=False,
                                            log_every=1, checkpoint_every=2))
        validate(cfg)
        task = FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline())
        train(task, cfg.train, tmp_path / str(policy), cfg, "finetune")
        exports[policy] = load_model_file(tmp_path / str(policy) / "model.safetensors")[0]
    for k, v in exports[True].items():
        torch.testing.assert_close(exports["except_last"][k], v, rtol=1e-5, atol=1e-6)
    from e2ediff.config import resolve
    from e2ediff.e2e import PRESETS

    assert resolve(PRESETS["tiny"], overrides=["init=x", "checkpointing=except_last"]).checkpointing == "except_last"
    with pytest.raises(ConfigError, match="checkpointing"):
        resolve(PRESETS["tiny"], overrides=["init=x", "checkpointing=sometimes"])


def test_demo_plot_reads_a_log_whose_first_steps_train_the_discriminator_alone(tmp_path):
    """With disc_warmup the first metrics lines have no network loss (the demo's fine-tune warms up for half its
    steps); the report's plot draws both losses from the steps that have them."""
    from e2ediff.demo import _plot

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [{"step": 2, "loss/disc": 3.0}, {"step": 4, "loss/disc": 2.0},
                                                          {"step": 6, "loss/net": 1.0, "loss/disc": 1.5}]))
    results = [{"name": "student", "nfe": k, "fd": 2.0 / k} for k in (1, 2, 4)]
    _plot(tmp_path, results, metrics)
    assert (tmp_path / "plot.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------------------------------
# loss.gan_group_std: the discriminator sees the spread of each caption's samples (minibatch std, StyleGAN)


def test_group_spread_is_the_per_group_standard_deviation_in_float64():
    from e2ediff.losses.gan import group_spread

    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 5, 3, 2, generator=g, dtype=torch.float64)
    got = group_spread(h, 3).numpy()
    x = h.numpy().reshape(2, 3, 5, 6)
    want = np.sqrt(x.var(axis=1) + 1e-8).mean(axis=2)                      # [groups, F]
    np.testing.assert_allclose(got, np.repeat(want, 3, axis=0), rtol=1e-12)
    with pytest.raises(ValueError, match="groups of 4"):
        group_spread(h, 4)


@pytest.mark.parametrize("space", ["latent", "features"])
def test_group_std_logits_depend_on_the_group_not_the_order_within_it(space, tmp_path):
    from e2ediff.losses.gan import LatentDiscriminator

    torch.manual_seed(0)
    if space == "latent":
        disc, x = LatentDiscriminator(text_dim=TEXT_DIM, group=3), torch.randn(6, 4, 8, 8)
    else:
        backbone = FashionFeatureNet.load(feature_net(tmp_path))
        disc, x = FeatureDiscriminator(backbone, TEXT_DIM, hidden=8, group=3), torch.rand(6, 1, 32, 32) * 2 - 1
    x[3:] = x[3]                                                            # the second group has no spread
    pooled = make_cond(2).pooled.repeat_interleave(3, 0)
    disc.requires_grad_(False)
    for layer in disc.psi_group.modules():                                  # a visible group term (trained heads
        if isinstance(layer, torch.nn.Linear):                              # are far from their random start)
            layer.weight.mul_(100.0)
    base = disc(x, pooled)
    within = torch.tensor([2, 0, 1, 4, 5, 3])                               # members shuffled inside each group
    torch.testing.assert_close(disc(x[within], pooled)[within.argsort()], base)
    across = torch.tensor([3, 1, 2, 0, 4, 5])                               # rows 0 and 3 trade groups
    moved = disc(x[across], pooled)
    assert float((moved[4:] - base[4:]).abs().max()) > 1e-2                 # the untouched members see a new spread
    # without the group term the same swap leaves those members' logits as they were
    plain = LatentDiscriminator(text_dim=TEXT_DIM) if space == "latent" else \
        FeatureDiscriminator(FashionFeatureNet.load(feature_net(tmp_path)), TEXT_DIM, hidden=8)
    assert float((plain(x[across], pooled)[4:] - plain(x, pooled)[4:]).abs().max()) < 1e-3
    assert not any("group" in k for k in plain.state_dict())                # files of group-free runs unchanged


def test_group_std_discriminator_tells_a_collapsed_generator_from_data_that_a_per_sample_one_cannot():
    """Fakes are real draws repeated m times (each sample has exactly the data's distribution, the groups have no
    spread). A per-sample discriminator can do no better than chance; the minibatch-std one separates them."""
    from e2ediff.losses.gan import LatentDiscriminator, d_hinge

    m, b = 4, 16
    pooled = torch.zeros(b * m, TEXT_DIM)

    def accuracy(group):
        torch.manual_seed(0)
        disc = LatentDiscriminator(text_dim=TEXT_DIM, hidden=16, group=group)
        opt = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.0, 0.99))
        g = torch.Generator().manual_seed(1)
        for _ in range(150):
            real = torch.randn(b * m, 4, 8, 8, generator=g)
            fake = torch.randn(b, 4, 8, 8, generator=g).repeat_interleave(m, 0)
            loss = d_hinge(disc(real, pooled), disc(fake, pooled)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            real = torch.randn(b * m, 4, 8, 8, generator=g)
            fake = torch.randn(b, 4, 8, 8, generator=g).repeat_interleave(m, 0)
            return 0.5 * float((disc(real, pooled) > 0).float().mean() + (disc(fake, pooled) < 0).float().mean())

    assert accuracy(m) > 0.95
    assert accuracy(1) < 0.75


def test_group_std_finetune_draws_real_groups_of_the_captions_class(tmp_path):
    cfg = gan_run(tmp_path, 2, loss=dict(gan_group_std=True, anchor=1.0), disc_warmup=1)
    cfg.samples_per_caption = 3
    validate(cfg)
    data = StandInData()
    task = FinetuneTask(cfg, torch.device("cpu"), data=data, init=student_pipeline())
    assert task.objective.disc.group == 3
    seen = []
    d_loss = task.objective.discriminator_loss

    def spy(z0_hat, z0, images, cond, m, real_groups=None):
        seen.append((images.clone(), real_groups.clone()))
        return d_loss(z0_hat, z0, images, cond, m, real_groups)

    task.objective.discriminator_loss = spy
    last = train(task, cfg.train, tmp_path / "run", cfg, "finetune")
    assert math.isfinite(last["loss/net"]) and math.isfinite(last["loss/disc"])
    for images, groups in seen:
        groups = groups.view(len(images), 3, *images.shape[1:])
        assert torch.equal(groups[:, 0], images)                             # the caption's own image first
        for i, img in enumerate(images):                                     # then real images of its class
            cls = int(data.labels[[bool((data.images[j] == img).all()) for j in range(len(data.images))]][0])
            for member in groups[i, 1:]:
                hits = [j for j in range(len(data.images)) if bool((data.images[j] == member).all())]
                assert hits and all(int(data.labels[j]) == cls for j in hits)
    assert any(not torch.equal(groups.view(len(images), 3, -1)[:, 1], groups.view(len(images), 3, -1)[:, 2])
               for images, groups in seen)                                   # drawn, not copies


@pytest.mark.parametrize("override, message", [
    (dict(loss=E2ELoss(energy=1.0, gan_group_std=True)), "loss.gan_group_std"),
    (dict(samples_per_caption=1, loss=E2ELoss(energy=0.0, gan=1.0, gan_group_std=True)), "samples_per_caption"),
])
def test_group_std_options_are_validated(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(FinetuneRun(init="x.safetensors", **override))


def test_anchor_refresh_moves_the_anchor_to_the_networks_ema_every_n_network_steps(tmp_path):
    """loss.anchor_refresh=3 with one warm-up step: the anchor's model is the starting model through network step 2
    and the network's EMA after network step 3 — the EMA the exported file holds when that is the last step."""
    from e2ediff.checkpoint import load_model_file

    def run(steps):
        cfg = gan_run(tmp_path, steps, loss=dict(anchor=1.0, anchor_refresh=3), disc_warmup=1)
        cfg.train.ema_decay = 0.5
        validate(cfg)
        init = student_pipeline()
        start = {k: v.clone() for k, v in init.net.state_dict().items()}
        task = FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=init)
        train(task, cfg.train, tmp_path / f"run{steps}", cfg, "finetune")
        exported = load_model_file(tmp_path / f"run{steps}" / "model.safetensors")[0]
        return start, init.net.state_dict(), {k[len("net/"):]: v for k, v in exported.items() if k.startswith("net/")}

    start, anchor, ema = run(3)                                  # 2 network steps: not refreshed yet
    assert all(torch.equal(anchor[k], start[k]) for k in start)
    start, anchor, ema = run(4)                                  # 3 network steps: refreshed to the EMA
    assert any(not torch.equal(anchor[k], start[k]) for k in start)
    for k in start:
        torch.testing.assert_close(anchor[k], ema[k].to(anchor[k].dtype), rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"loss\.anchor_refresh"):
        validate(FinetuneRun(init="x", loss=E2ELoss(gan=1.0, energy=0.0, anchor_refresh=10)))      # no anchor
    with pytest.raises(ConfigError, match=r"loss\.anchor_refresh"):
        validate(FinetuneRun(init="x", loss=E2ELoss(gan=1.0, energy=0.0, anchor=1.0, anchor_decay=5,
                                                    anchor_refresh=10)))


# ----------------------------------------------------------------------------------------------------------------------
# The anchor to the teacher's guided ODE endpoint (loss.anchor_to=teacher; round 8: the guided teacher is the best
# sampler of the benchmark)


def test_guidance_per_sample_equals_each_sample_guided_alone():
    """GuidedDenoiser and ddim with one scale per sample [B] against B separate runs at float scales, in float64."""
    from e2ediff.denoiser import guided
    from e2ediff.samplers import ddim
    from test_e2e import ResidualEps

    teacher = Denoiser(ResidualEps(tiny_dit(5)).double(), SCHEDULE, "eps")
    cond = make_cond(3, dtype=torch.float64)
    g = torch.Generator().manual_seed(8)
    z = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    scales = torch.tensor([1.0, 1.5, 3.0], dtype=torch.float64)
    t = torch.tensor([700, 300, 900])
    x0, eps = guided(teacher, scales).predict(z, t, cond)
    for i in range(3):
        one = cond[i:i + 1]
        x0_i, eps_i = guided(teacher, float(scales[i])).predict(z[i:i + 1], t[i:i + 1], one)
        torch.testing.assert_close(x0[i:i + 1], x0_i, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(eps[i:i + 1], eps_i, rtol=1e-12, atol=1e-12)
        steps = [999, 666, 333]
        want = ddim(teacher, z[i:i + 1], steps, one, guidance=float(scales[i]))
        got = ddim(teacher, z, steps, cond, guidance=scales)[i:i + 1]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # a scale of 1 in the tensor is the unguided model (eps_u + 1·(eps_c − eps_u) = eps_c)
    torch.testing.assert_close(x0[:1], teacher.predict(z[:1], t[:1], cond[:1])[0])


def teacher_pipeline(seed: int = 5):
    from e2ediff.assets import Pipeline
    from test_e2e import ResidualEps

    denoiser = Denoiser(ResidualEps(tiny_dit(seed)), SCHEDULE, "eps").eval().requires_grad_(False)
    return Pipeline(denoiser, tiny_autoencoder(), {"kind": "teacher", "schedule": "linear", "prediction": "eps"})


def test_teacher_anchor_is_the_distance_to_the_teachers_guided_ddim_sample_from_the_chains_noise(tmp_path,
                                                                                                monkeypatch):
    """The logged anchor = mean (ẑ0 − x_teacher)², x_teacher the teacher's DDIM sample from the noise z_T that started
    the student's chain, guided at that chain's w: recomputed here chain by chain in float64 at float scales."""
    import e2ediff.e2e as e2e_module
    from e2ediff.samplers import ddim
    from e2ediff.schedules import ddim_timesteps

    cfg = gan_run(tmp_path, 1, loss=dict(anchor=1.0, anchor_to="teacher", teacher="teacher.safetensors",
                                         teacher_steps=3), w_range=(1.0, 2.0))
    teacher = teacher_pipeline()
    task = FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline(), teacher=teacher)
    assert task.teacher_timesteps == ddim_timesteps(3, spacing="trailing") == [999, 666, 332]
    seen = {}
    step = e2e_module.e2e_step

    def record_step(*a, **k):
        seen["z_T"], seen["w"], seen["cond"] = k["z_T"].clone(), k["w"].clone(), a[3]
        z0, z0_hat = step(*a, **k)
        seen["z0_hat"] = z0_hat.detach().double()
        return z0, z0_hat
    monkeypatch.setattr(e2e_module, "e2e_step", record_step)
    sample = task.teacher_sample

    def record_target(*a, **k):
        seen["target"] = sample(*a, **k).double()
        return seen["target"]
    monkeypatch.setattr(task, "teacher_sample", record_target)
    _, logs = task.losses(0, torch.Generator().manual_seed(7))
    m = cfg.samples_per_caption
    cond = seen["cond"].repeat_interleave(m)
    ref = Denoiser(copy.deepcopy(teacher.denoiser.net).double(), SCHEDULE, "eps")     # float64, chain by chain
    rows = []
    for i in range(len(seen["z_T"])):
        one = cond[i:i + 1].to(dtype=torch.float64)
        rows.append(ddim(ref, seen["z_T"][i:i + 1].double(), [999, 666, 332], one, guidance=float(seen["w"][i])))
    target = torch.cat(rows)
    torch.testing.assert_close(seen["target"], target, rtol=1e-5, atol=1e-5)
    one_w = ddim(ref, seen["z_T"].double(), [999, 666, 332], cond.to(dtype=torch.float64), guidance=1.5)
    assert (one_w - target).abs().max() > 1e-3                        # each chain's own w matters at this tolerance
    want = (seen["z0_hat"] - target).square().mean()
    assert want > 1e-6                                                # the target is not the student's sample
    torch.testing.assert_close(logs["anchor"].double(), want, rtol=1e-4, atol=0)


def test_teacher_anchor_settings_are_validated_and_the_teacher_must_share_the_latent_space(tmp_path):
    for loss, field in [(dict(anchor=1.0, anchor_to="teacher"), "loss.teacher"),
                        (dict(anchor=0.0, anchor_to="teacher", teacher="t.safetensors"), "loss.anchor"),
                        (dict(anchor=1.0, anchor_to="teacher", teacher="t.safetensors", teacher_steps=0),
                         "loss.teacher_steps"),
                        (dict(anchor=1.0, anchor_to="teacher", teacher="t.safetensors", anchor_refresh=5),
                         "loss.anchor_refresh"),
                        (dict(anchor=1.0, anchor_to="student"), "loss.anchor_to")]:
        with pytest.raises(ConfigError, match=field):
            validate(FinetuneRun(init="x", loss=E2ELoss(gan=1.0, energy=0.0, **loss)))
    # the regression to the teacher may be the whole loss; an anchor to the starting model alone may not
    validate(FinetuneRun(init="x", loss=E2ELoss(energy=0.0, anchor=1.0, anchor_to="teacher", teacher="t")))
    with pytest.raises(ConfigError, match="all weights 0"):
        validate(FinetuneRun(init="x", loss=E2ELoss(energy=0.0, anchor=1.0)))
    cfg = gan_run(tmp_path, 1, loss=dict(anchor=1.0, anchor_to="teacher", teacher="other.safetensors"))
    other = teacher_pipeline()
    other.autoencoder = tiny_autoencoder(seed=9)                      # another autoencoder: other latents
    with pytest.raises(ValueError, match="other.safetensors.*autoencoder differs"):
        FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline(), teacher=other)
    wide = teacher_pipeline()
    wide.denoiser.net.config = dataclasses.replace(wide.denoiser.net.config, in_channels=8)
    with pytest.raises(ValueError, match="in_channels=8"):
        FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline(), teacher=wide)


def test_compiled_training_compiles_the_anchors_network_without_cuda_graphs(tmp_path, monkeypatch):
    """train.compile also compiles the network the anchor runs every step (the teacher, or the starting model) with
    inductor's default mode — CUDA graphs stay with the trained network — and the run exports what an eager run does."""
    from e2ediff.checkpoint import load_model_file

    calls = record_compile(monkeypatch, "eager")
    exports = {}
    for target in ("teacher", "init"):
        for compile_mode in ("no", "reduce-overhead"):
            loss = E2ELoss(energy=1.0, anchor=1.0, anchor_to=target, teacher="teacher.safetensors", teacher_steps=2)
            cfg = FinetuneRun(init="memory", sampler_steps=2, samples_per_caption=2, optim=OptimConfig(lr=1e-3),
                              loss=loss, train=TrainConfig(steps=2, batch_size=4, ema_decay=0.9, device="cpu",
                                                           progress=False, log_every=1, checkpoint_every=2,
                                                           compile=compile_mode))
            task = FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline(),
                                teacher=teacher_pipeline())
            calls.clear()
            train(task, cfg.train, tmp_path / f"{target}-{compile_mode}", cfg, "finetune")
            exports[target, compile_mode] = load_model_file(tmp_path / f"{target}-{compile_mode}" /
                                                            "model.safetensors")[0]
            if compile_mode != "no":
                anchor_net = task.teacher.denoiser.net if target == "teacher" else task.init.net
                assert [(fn.__self__, mode) for fn, mode in calls] == [(task.parts[0].module, "reduce-overhead"),
                                                                        (anchor_net, None)]
        for k, v in exports[target, "no"].items():
            torch.testing.assert_close(exports[target, "reduce-overhead"][k], v, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(exports["teacher", "no"][k], exports["init", "no"][k]) for k in exports["init", "no"])


def ddim_by_hand(den, z, path, cond, scale, interval=None):
    """Guided DDIM (eta 0) to t = 0 written out step by step from the ᾱ table in float64: eps = eps_u + s·(eps_c −
    eps_u), s = scale only at timesteps inside `interval` (1 elsewhere); the last step's x0."""
    abar = SCHEDULE.alphas_cumprod.double()
    for j, t in enumerate(path):
        tt = torch.full((len(z),), float(t), dtype=torch.float64)
        eps_c = den.predict(z, tt, cond)[1]
        eps_u = den.predict(z, tt, cond.with_drop(True))[1]
        s = scale if interval is None or interval[0] <= t <= interval[1] else 1.0
        eps = eps_u + s * (eps_c - eps_u)
        x0 = (z - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        if j + 1 == len(path):
            return x0
        a_prev = abar[path[j + 1]]
        z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


@pytest.mark.parametrize("interval,gain,gains,gamma", [(None, 1.0, None, 1.0), ((0.0, 600.0), 2.0, None, 1.0),
                                                       ((0.0, 600.0), 1.0, (0.0, 2.0), 1.0), (None, 1.0, None, 0.6)])
def test_teacher_renoise_target_runs_the_students_sampler_with_the_teachers_ode_solve(tmp_path, monkeypatch, interval,
                                                                                       gain, gains, gamma):
    """loss.teacher_renoise: the target = the student's K-step VP sampler with the same timesteps and re-noise draws,
    each step's x0 the teacher's guided DDIM solve to 0 — recomputed here chain by chain in float64 from the ᾱ table;
    K = 1 is the plain ODE endpoint. With loss.teacher_guidance_interval = [0, 600] and gain 2 the teacher's scale is
    1 + 2·(w − 1), applied at its grid's timesteps 499 and 249 only (999 and 749 run unguided). With
    loss.teacher_solve_gains = [0, 2] the solve from the student's first timestep runs unguided and the second at
    1 + 2·(w − 1). With renoise_gamma = 0.6 the student and the teacher re-noise with 0.6·ε + 0.8·ε̂, ε̂ the noise
    implied by the teacher's x0."""
    import e2ediff.e2e as e2e_module

    seen = {}
    step = e2e_module.e2e_step

    def record_step(*a, **k):
        seen.update(z_T=k["z_T"].clone(), w=k["w"].clone(), cond=a[3], timesteps=k["timesteps"],
                    noises=[n.clone() for n in k["noises"]])
        return step(*a, **k)
    monkeypatch.setattr(e2e_module, "e2e_step", record_step)
    for k_steps in (2, 1):
        cfg = gan_run(tmp_path, 1, loss=dict(anchor=1.0, anchor_to="teacher", teacher="teacher.safetensors",
                                             teacher_steps=4, teacher_renoise=True, teacher_guidance_interval=interval,
                                             teacher_guidance_gain=gain, teacher_solve_gains=gains),
                      w_range=(1.0, 2.0), renoise_gamma=gamma)
        cfg = dataclasses.replace(cfg, sampler_steps=k_steps)
        teacher = teacher_pipeline()
        task = FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline(), teacher=teacher)
        sample = task.teacher_sample

        def record_target(*a, **k):
            seen["target"] = sample(*a, **k).double()
            return seen["target"]
        monkeypatch.setattr(task, "teacher_sample", record_target)
        task.losses(0, torch.Generator().manual_seed(7))
        ref = Denoiser(copy.deepcopy(teacher.denoiser.net).double(), SCHEDULE, "eps")
        grid, abar = task.teacher_timesteps, SCHEDULE.alphas_cumprod.double()
        cond = seen["cond"].repeat_interleave(cfg.samples_per_caption)
        rows, plain = [], []
        assert grid == [999, 749, 499, 249]
        for i in range(len(seen["z_T"])):
            one = cond[i:i + 1].to(dtype=torch.float64)
            w = [1 + g * (float(seen["w"][i]) - 1) for g in (gains or (gain, gain))]   # solve j's scale
            z = seen["z_T"][i:i + 1].double()
            plain.append(ddim_by_hand(ref, z, grid, one, w[0], interval))
            for j, t in enumerate(seen["timesteps"]):
                x0 = ddim_by_hand(ref, z, [t] + [s for s in grid if s < t], one, w[j], interval)
                if j + 1 < len(seen["timesteps"]):
                    a, a_t = abar[seen["timesteps"][j + 1]], abar[t]
                    implied = (z - a_t.sqrt() * x0) / (1 - a_t).sqrt()
                    eps = gamma * seen["noises"][j][i:i + 1].double() + math.sqrt(1 - gamma ** 2) * implied
                    z = a.sqrt() * x0 + (1 - a).sqrt() * eps
            rows.append(x0)
        torch.testing.assert_close(seen["target"], torch.cat(rows), rtol=1e-5, atol=1e-5)
        if k_steps == 1:
            torch.testing.assert_close(seen["target"], torch.cat(plain), rtol=1e-5, atol=1e-5)
        else:     # the re-noise draws matter: the plain endpoint is another target
            assert seen["timesteps"] == lcm_timesteps(2) and (torch.cat(plain) - seen["target"]).abs().max() > 1e-3
    if interval is not None:   # the interval and gain moved the target: the full-guidance target is another one
        full = torch.cat([ddim_by_hand(ref, seen["z_T"][i:i + 1].double(), grid,
                                       cond[i:i + 1].to(dtype=torch.float64), float(seen["w"][i]))
                          for i in range(len(seen["z_T"]))])
        assert (full - seen["target"]).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="loss.teacher_renoise"):
        validate(FinetuneRun(init="x", loss=E2ELoss(gan=1.0, energy=0.0, teacher_renoise=True)))
    for bad, field in [(dict(teacher_guidance_interval=(600.0, 0.0)), "loss.teacher_guidance_interval"),
                       (dict(teacher_guidance_interval=(-1.0, 600.0)), "loss.teacher_guidance_interval"),
                       (dict(teacher_guidance_gain=-1.0), "loss.teacher_guidance_gain"),
                       (dict(teacher_solve_gains=(1.0, -1.0), teacher_renoise=True), "loss.teacher_solve_gains"),
                       (dict(teacher_solve_gains=(), teacher_renoise=True), "loss.teacher_solve_gains"),
                       (dict(teacher_solve_gains=(1.0,)), "loss.teacher_solve_gains"),
                       (dict(teacher_solve_gains=(1.0,), teacher_renoise=True, teacher_guidance_gain=2.0),
                        "loss.teacher_solve_gains")]:
        with pytest.raises(ConfigError, match=field):
            validate(FinetuneRun(init="x", loss=E2ELoss(anchor=1.0, anchor_to="teacher", teacher="t", **bad)))
    with pytest.raises(ConfigError, match="loss.teacher_guidance_interval"):   # no teacher to guide
        validate(FinetuneRun(init="x", loss=E2ELoss(gan=1.0, teacher_guidance_interval=(0.0, 600.0))))
    with pytest.raises(ConfigError, match="loss.teacher_renoise"):
        validate(FinetuneRun(init="x", renoise="ve", loss=E2ELoss(anchor=1.0, anchor_to="teacher", teacher="t",
                                                                 teacher_renoise=True)))


@pytest.mark.parametrize("anchor_to", ["teacher", "init"])
def test_anchor_samples_takes_each_captions_first_chains_with_the_same_targets(tmp_path, monkeypatch, anchor_to):
    """loss.anchor_samples=2 of m = 3: the target of each kept chain equals the all-chains run's (same generator: the
    same noises, w and samples), and the logged anchor is the float64 mean over the kept chains only."""
    import e2ediff.e2e as e2e_module

    m, a, batch = 3, 2, 4
    extra = dict(anchor_to="teacher", teacher="teacher.safetensors", teacher_steps=3, teacher_renoise=True)
    step = e2e_module.e2e_step

    def run(samples):
        seen = []

        def record_step(*args, **k):    # the student's chain, then (anchor_to=init) the starting model's
            z0, z0_hat = step(*args, **k)
            seen.append(dict(z_T=k["z_T"].clone(), out=z0_hat.detach().double()))
            return z0, z0_hat
        monkeypatch.setattr(e2e_module, "e2e_step", record_step)
        loss = dict(anchor=1.0, anchor_samples=samples, **(extra if anchor_to == "teacher" else {}))
        cfg = dataclasses.replace(gan_run(tmp_path, 1, loss=loss, w_range=(1.0, 2.0)), samples_per_caption=m)
        perturbed = student_pipeline()                  # the starting model differs from the network: anchor > 0
        with torch.no_grad():
            for p in perturbed.net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        task = FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=perturbed,
                            teacher=teacher_pipeline() if anchor_to == "teacher" else None)
        task.parts[0].module.load_state_dict(student_pipeline().net.state_dict())
        if anchor_to == "teacher":
            sample = task.teacher_sample

            def record_target(*args, **k):
                seen.append(dict(z_T=args[0].clone(), out=sample(*args, **k).double()))
                return seen[-1]["out"]
            monkeypatch.setattr(task, "teacher_sample", record_target)
        _, logs = task.losses(0, torch.Generator().manual_seed(7))
        return seen, logs

    full, _ = run(0)
    part, logs = run(a)
    keep = torch.arange(batch * m).view(batch, m)[:, :a].flatten()
    assert len(full) == len(part) == 2 and full[1]["out"].shape[0] == batch * m and part[1]["out"].shape[0] == batch * a
    torch.testing.assert_close(part[0]["out"], full[0]["out"])                     # the student's samples: all chains
    torch.testing.assert_close(part[1]["z_T"], full[1]["z_T"][keep], rtol=0, atol=0)
    torch.testing.assert_close(part[1]["out"], full[1]["out"][keep], rtol=1e-4, atol=1e-4)   # float32, other batch
    want = (part[0]["out"][keep] - full[1]["out"][keep]).square().mean()
    assert want > 1e-6
    torch.testing.assert_close(logs["anchor"].double(), want, rtol=1e-4, atol=0)
    with pytest.raises(ConfigError, match="loss.anchor_samples"):
        validate(FinetuneRun(init="x", samples_per_caption=2, loss=E2ELoss(anchor=1.0, anchor_samples=3)))
    with pytest.raises(ConfigError, match="loss.anchor_samples"):
        validate(FinetuneRun(init="x", loss=E2ELoss(anchor=1.0, anchor_samples=-1)))


# ----------------------------------------------------------------------------------------------------------------------
# renoise_gamma: the student's sampler with the noise each step implies mixed into its re-noise (0: deterministic)


def test_renoise_gamma_zero_trains_the_deterministic_sampler_toward_the_teachers_ode_endpoint(tmp_path, monkeypatch):
    """With renoise_gamma=0 the chain is lcm(..., gamma=0) from z_T alone (its re-noise draws do not matter), the
    teacher's target is its plain guided DDIM solve from that z_T, the exported file names gamma 0 so generate() samples
    it the same way, and a fine-tune of that file inherits it; gamma=1 files name none."""
    import e2ediff.e2e as e2e_module
    from e2ediff.checkpoint import read_model_meta
    from e2ediff.assets import load_pipeline
    from e2ediff.generate import SamplerSpec, sample_latents
    from e2ediff.samplers import ddim, lcm

    cfg = gan_run(tmp_path, 1, renoise_gamma=0.0,
                  loss=dict(anchor=1.0, anchor_to="teacher", teacher="teacher.safetensors", teacher_steps=3))
    init, teacher = student_pipeline(), teacher_pipeline()
    task = FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=init, teacher=teacher)
    seen, step, sample = {}, e2e_module.e2e_step, task.teacher_sample

    def record_step(*a, **k):
        seen["k"] = dict(k)
        z0, z0_hat = step(*a, **k)
        seen["z0_hat"], seen["cond"] = z0_hat.detach(), a[3]
        return z0, z0_hat

    def record_target(*a, **k):
        seen["target"] = sample(*a, **k)
        return seen["target"]
    monkeypatch.setattr(e2e_module, "e2e_step", record_step)
    monkeypatch.setattr(task, "teacher_sample", record_target)
    task.losses(0, torch.Generator().manual_seed(7))
    k, m = seen["k"], cfg.samples_per_caption
    cond = seen["cond"].repeat_interleave(m)
    w = torch.full((len(cond),), 1.5)
    with torch.no_grad():
        other = [torch.randn_like(n) for n in k["noises"]]            # other draws: the same chain
        want = lcm(init.denoiser, k["z_T"], task.timesteps, cond, noises=other, w=w, gamma=0.0)
        fresh = lcm(init.denoiser, k["z_T"], task.timesteps, cond, noises=k["noises"], w=w)
        target = ddim(teacher.denoiser, k["z_T"], [999, 666, 332], cond, guidance=1.5)
    torch.testing.assert_close(seen["z0_hat"], want, rtol=1e-5, atol=1e-5)
    assert (fresh - want).abs().max() > 1e-3                          # ...which the fresh-noise sampler is not
    torch.testing.assert_close(seen["target"], target, rtol=1e-5, atol=1e-5)

    cfg = gan_run(tmp_path, 1, renoise_gamma=0.0)
    train(FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline()), cfg.train,
          tmp_path / "det", cfg, "finetune")
    spec = SamplerSpec.from_meta(read_model_meta(tmp_path / "det" / "model.safetensors"))
    assert spec.gamma == 0.0
    with torch.no_grad():
        noise = k["z_T"][:2]
        a, b = (sample_latents(init, cond[:2], spec, noise, [torch.randn_like(noise)]) for _ in range(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    again = FinetuneTask(gan_run(tmp_path, 1), torch.device("cpu"), data=StandInData(),
                         init=load_pipeline(str(tmp_path / "det" / "model.safetensors"), torch.device("cpu")))
    assert again.gamma == 0.0                                         # renoise_gamma unset: the init file's
    cfg = gan_run(tmp_path, 1)
    train(FinetuneTask(cfg, torch.device("cpu"), data=StandInData(), init=student_pipeline()), cfg.train,
          tmp_path / "vp", cfg, "finetune")
    assert "gamma" not in read_model_meta(tmp_path / "vp" / "model.safetensors")["sampler"]


@pytest.mark.parametrize("override, message", [
    (dict(renoise_gamma=1.5), "renoise_gamma"),
    (dict(renoise_gamma=-0.1), "renoise_gamma"),
    (dict(renoise_gamma=0.5, renoise="ve"), "renoise_gamma"),
])
def test_renoise_gamma_is_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(FinetuneRun(init="x.safetensors", **override))
