"""fashion-scenes: the grammar and its parser, deterministic scenes, split hygiene, the clause cache, the metrics, the
commands on scenes and train.max_seconds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fake_env, fake_env_paths, restore_determinism  # noqa: F401

from e2ediff.data import scenes as S

CLASSIFIER = Path(__file__).resolve().parents[1] / "checkpoints" / "classifier"
REAL = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------------------------------ grammar


def test_every_caption_of_every_layout_parses_back():
    for code in range(S.NUM_LAYOUTS):
        layout = S.layout_from_code(code)
        assert S.layout_code(layout) == code
        for v in range(S.NUM_VARIANTS):
            assert S.parse_caption(S.scene_caption(layout, v)) == layout


@pytest.mark.parametrize("caption, layout", [
    ("a sneaker in the top left and a bag in the bottom right", (7, -1, -1, 8)),
    ("two pairs of trousers on the top row", (1, 1, -1, -1)),
    ("an ankle boot alone in the bottom right corner", (-1, -1, -1, 9)),
    ("a t-shirt at the lower left, a shirt at the upper right and two boots down the left side", None),
    ("a tee in the top left corner, a blouse at the lower right and a jacket in the bottom left", (0, -1, 4, 6)),
    ("two handbags in the right column", (-1, 8, -1, 8)),
    ("nothing at all", (-1, -1, -1, -1)),
])
def test_hand_written_captions(caption, layout):
    if layout is None:   # the bottom left cell is named twice
        with pytest.raises(ValueError, match="twice"):
            S.parse_caption(caption)
    else:
        assert S.parse_caption(caption) == layout


def test_captions_read_as_written_and_bad_ones_are_refused():
    assert S.scene_caption((7, -1, -1, 8), 0) == "a sneaker in the top left and a bag in the bottom right"
    assert S.scene_caption((1, 1, -1, -1), 1) == "two pairs of trousers on the top row"
    assert S.scene_caption((1, 1, -1, -1), 2) == "two pairs of pants along the top"
    assert S.scene_caption((-1, -1, -1, 9), 2) == "an ankle boot alone in the bottom right corner"
    assert len({S.scene_caption((3, 3, 5, -1), v) for v in range(3)}) == 3
    for bad in ("a sneaker", "two sneakers", "a sneaker in the top", "a sneaker and a bag in the top left"):
        with pytest.raises(ValueError):
            S.parse_caption(bad)
    with pytest.raises(ValueError):
        S.caption_clauses((10, -1, -1, -1), 0)
    table = S.caption_clause_table()   # every caption's clauses are in the vocabulary, at most 4
    vocab = S.clause_vocabulary()
    for idx in (0, 1, 2, 12345, 43922):
        ids = [int(i) for i in table[idx] if i >= 0]
        code, v = divmod(idx, S.NUM_VARIANTS)
        assert S.join_clauses([vocab[i] for i in ids]) == S.scene_caption(S.layout_from_code(code), v)


# ------------------------------------------------------------------------------------------------------------- scenes


def _check_composition(sc: S.Scenes, item_images: np.ndarray) -> None:
    """Independent of ``compose``: each cell is 0 except the item at its shifted place."""
    for i in range(len(sc)):
        for c in range(4):
            r0, c0 = (c // 2) * S.CELL, (c % 2) * S.CELL
            cell = sc.images[i, r0:r0 + S.CELL, c0:c0 + S.CELL]
            expect = np.zeros((S.CELL, S.CELL), np.uint8)
            if sc.layouts[i, c] >= 0:
                dy, dx = sc.shifts[i, c]
                expect[S.PAD + dy:S.PAD + dy + 28, S.PAD + dx:S.PAD + dx + 28] = item_images[sc.items[i, c]]
            else:
                assert sc.items[i, c] == -1
            np.testing.assert_array_equal(cell, expect)


def test_scenes_are_deterministic_prefix_stable_and_composed_right(fake_env):
    from e2ediff.data.fashion_mnist import load_fashion_mnist

    a = S.load_scenes("train", 1500, val_size=8)
    b = S.load_scenes("train", 1000, val_size=8)
    np.testing.assert_array_equal(a.images[:1000], b.images)
    np.testing.assert_array_equal(a.layouts[:1000], b.layouts)
    assert not np.array_equal(a.layouts[:500], S.load_scenes("train", 500, seed=1, val_size=8).layouts)
    images, labels = load_fashion_mnist("train")
    filled = a.layouts >= 0
    np.testing.assert_array_equal(labels[a.items[filled]], a.layouts[filled])   # each item has its cell's class
    assert 0.25 < 1 - filled.mean() < 0.35 and np.abs(a.shifts).max() == S.JITTER
    _check_composition(S.Scenes("train", a.images[:40], a.layouts[:40], a.items[:40], a.shifts[:40]), images)
    crops = S.cell_crops(a.images[:5])
    np.testing.assert_array_equal(crops[:, 3], a.images[:5, 34:62, 34:62])
    np.testing.assert_array_equal(S.cell_crops(torch.as_tensor(a.images[:5])).numpy(), crops)


@pytest.mark.skipif(not REAL.is_dir(), reason="needs the real Fashion-MNIST files")
def test_train_scenes_hold_no_val_or_test_item_pixel_for_pixel(monkeypatch):
    from e2ediff.data.fashion_mnist import load_fashion_mnist, train_val_split

    monkeypatch.setenv("E2EDIFF_DATA_DIR", str(REAL))
    train_images, _ = load_fashion_mnist("train")
    test_images, _ = load_fashion_mnist("test")
    _, val_idx = train_val_split(60000, 5000, seed=0)
    held_out = {x.tobytes() for x in np.concatenate([train_images[val_idx.numpy()], test_images])}
    sc = S.load_scenes("train", 20000)
    dy, dx = sc.shifts[..., 0], sc.shifts[..., 1]
    seen = 0
    for c in range(4):
        r0, c0 = (c // 2) * S.CELL + S.PAD, (c % 2) * S.CELL + S.PAD
        for i in np.flatnonzero(sc.layouts[:, c] >= 0):
            y, x = r0 + dy[i, c], c0 + dx[i, c]
            assert sc.images[i, y:y + 28, x:x + 28].tobytes() not in held_out
            seen += 1
    assert seen > 50000
    assert not set(sc.items[sc.items >= 0].tolist()) & set(val_idx.tolist())
    val = S.load_scenes("val", 500)
    assert set(val.items[val.items >= 0].tolist()) <= set(val_idx.tolist())


# -------------------------------------------------------------------------------------------------------------- text


def _random_cache(seed: int = 0) -> S.SceneTextCache:
    g = torch.Generator().manual_seed(seed)
    clauses = list(S.clause_vocabulary())
    n, length = len(clauses), S.CLAUSE_TOKENS
    mask = torch.arange(length)[None] < torch.randint(4, length + 1, (n,), generator=g)[:, None]
    tokens = torch.randn(n, length, 384, generator=g) * mask[..., None]
    q, scale = S.quantize_int8(tokens)
    pooled = torch.nn.functional.normalize(torch.randn(n, 384, generator=g), dim=-1)
    return S.SceneTextCache(clauses, "sentence-transformers/all-MiniLM-L6-v2", q, scale, mask, pooled)


def test_int8_cache_round_trip_and_caption_features(tmp_path):
    x = torch.randn(5, 7, 384) * torch.rand(5, 7, 1) * 3
    q, scale = S.quantize_int8(x)
    assert q.dtype == torch.int8 and ((q.float() * scale[..., None] - x).abs() <= scale[..., None] / 2 + 1e-6).all()

    cache = _random_cache()
    path = cache.save(tmp_path / "c.safetensors")
    loaded = S.load_scene_text_cache(path)
    torch.testing.assert_close(loaded.tokens(), cache.tokens())
    torch.testing.assert_close(loaded.pooled, cache.pooled, atol=1e-3, rtol=0)   # stored as float16

    caption = "two sneakers on the top row and a bag at the lower right"
    cond = loaded.cond(loaded.ids_of([caption, "a blank scene"]))
    first, second = loaded.clauses.index("two sneakers on the top row"), loaded.clauses.index("a bag at the lower right")
    L = S.CLAUSE_TOKENS
    assert cond.tokens.shape == (2, 4 * L, 384) and cond.mask.shape == (2, 4 * L)
    torch.testing.assert_close(cond.tokens[0, :L], loaded.tokens()[first])
    torch.testing.assert_close(cond.tokens[0, L:2 * L], loaded.tokens()[second])
    assert not cond.mask[0, 2 * L:].any() and not cond.tokens[0, 2 * L:].any()
    mean = loaded.pooled[first] + loaded.pooled[second]
    torch.testing.assert_close(cond.pooled[0], mean / mean.norm())
    with pytest.raises(KeyError):
        loaded.ids_of(["a sneaker on the moon"])
    edited = S.SceneTextCache(cache.clauses[:-1], cache.encoder, cache.tokens_q[:-1], cache.scale[:-1],
                              cache.mask[:-1], cache.pooled[:-1])
    with pytest.raises(ValueError, match="another caption grammar"):
        S.load_scene_text_cache(edited.save(tmp_path / "old.safetensors"))


def test_training_data_draws_the_three_captions_of_each_layout(fake_env, tmp_path):
    from e2ediff.assets import TrainingData
    from e2ediff.config import DataConfig

    path = _random_cache().save(tmp_path / "c.safetensors")
    data = TrainingData(DataConfig(dataset="fashion-scenes", num_scenes=64, val_size=8, prompt_cache=str(path)))
    assert isinstance(data, S.SceneTrainingData) and data.images.shape == (64, 1, 64, 64)
    assert float(data.images.min()) == -1.0 and float(data.images.max()) <= 1.0
    idx = torch.arange(64)
    images, cond, labels, caps = data.batch(idx, torch.Generator().manual_seed(0))
    assert cond.tokens.shape == (64, 64, 384)
    codes = torch.as_tensor(data.scenes.codes())
    assert torch.equal(labels, codes) and torch.equal(caps // 3, codes) and len(set((caps % 3).tolist())) == 3
    cache = S.load_scene_text_cache(path)
    for i in (0, 5, 63):
        text = S.scene_caption(data.scenes.layouts[i], int(caps[i] % 3))
        torch.testing.assert_close(cond.tokens[i], cache.cond(cache.ids_of([text])).tokens[0])


# ----------------------------------------------------------------------------------------------------------- metrics


def test_cell_agreement_counts():
    from e2ediff.metrics.scenes import cell_agreement, empty_crops

    layouts = np.array([[0, -1, 3, 4], [1, 1, -1, -1]])
    pred = np.array([[0, -1, 3, 4], [1, 2, 5, -1]])
    r = cell_agreement(pred, layouts)
    assert r["alignment"] == 6 / 8 and r["all_four"] == 0.5
    assert r["class_alignment"] == 4 / 5 and r["empty_right"] == 2 / 3
    crops = np.zeros((3, 28, 28), np.uint8)
    crops[1, :3, :5] = 200     # 15 ink pixels < 2 % of 784
    crops[2, :4, :5] = 200     # 20 ink pixels
    assert empty_crops(crops).tolist() == [True, True, False]


@pytest.mark.skipif(not REAL.is_dir(), reason="needs the real Fashion-MNIST files")
def test_real_scenes_score_as_real(monkeypatch, tmp_path):
    """Real test scenes scored against themselves: FD ~ 0, every empty cell found, classes as the classifier's
    test accuracy (0.93)."""
    from e2ediff.metrics.scenes import score_scenes

    monkeypatch.setenv("E2EDIFF_DATA_DIR", str(REAL))
    monkeypatch.setenv("E2EDIFF_CACHE", str(tmp_path))
    sc = S.load_scenes("test", 100)
    r = score_scenes(sc.images, sc.layouts, CLASSIFIER, "test", n_reference=100)
    assert r["empty_right"] == 1.0 and r["class_alignment"] > 0.85 and r["all_four"] > 0.6
    assert abs(r["fd"]) < 1e-6 and r["n_crops"] == int((sc.layouts >= 0).sum())
    noise = np.random.default_rng(0).integers(0, 255, sc.images.shape, dtype=np.uint8)
    bad = score_scenes(noise, sc.layouts, CLASSIFIER, "test", n_reference=100)
    assert bad["empty_right"] == 0.0 and bad["fd"] > 10


# ---------------------------------------------------------------------------------------------------- commands, time


def test_scenes_commands_sample_and_evaluate(fake_env, tmp_path, capsys, monkeypatch):
    from e2ediff.cli import main

    monkeypatch.setitem(S.DEFAULT_SIZES, "test", 40)   # evaluation prompts and reference: 40 test scenes
    cache = _random_cache().save(tmp_path / "c.safetensors")
    common = ["data.num_scenes=32", "data.val_size=8", f"data.prompt_cache={cache}", "train.batch_size=4",
              "train.device=cpu", "train.progress=false", "train.steps=1"]
    assert main(["train-autoencoder", "--preset", "scenes", "--run-dir", str(tmp_path / "ae"), *common,
                 "model.channels=[8,16,32]", "model.norm_groups=4", "scale_samples=8"]) == 0
    assert main(["pretrain", "--preset", "scenes", "--run-dir", str(tmp_path / "t"), *common,
                 f"autoencoder={tmp_path / 'ae' / 'model.safetensors'}", "model.hidden_size=32", "model.depth=1",
                 "model.num_heads=2"]) == 0
    prompt = "a sneaker in the top left and two bags in the right column"
    assert main(["sample", "--checkpoint", str(tmp_path / "t"), "--output", str(tmp_path / "s"), "--num-samples", "3",
                 "--steps", "2", "--prompt", prompt, "--prompt-cache", str(cache), "--device", "cpu"]) == 0
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (3, 64, 64)
        assert f["layouts"].tolist() == [[7, 8, -1, 8]] * 3 and list(f["captions"]) == [prompt] * 3
    # a samples file of real scenes, scored by `evaluate --samples` (reference: the fake test split's scenes)
    from e2ediff.evaluate_scenes import save_scene_samples

    sc = S.load_scenes("test", 12)
    save_scene_samples(tmp_path / "real.npz", sc.images, sc.layouts, sc.captions(1))
    capsys.readouterr()
    assert main(["evaluate", "--samples", str(tmp_path / "real.npz"), "--output", str(tmp_path / "e.json"),
                 "--device", "cpu"]) == 0
    import json
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["dataset"] == "fashion-scenes" and result["n"] == 12 and result["empty_right"] == 1.0


def test_max_seconds_stops_with_a_checkpoint_and_a_rerun_continues(fake_env, tmp_path, restore_determinism):
    from helpers import resolve_run

    from e2ediff.autoencoder_training import AutoencoderTask
    from e2ediff.checkpoint import latest_checkpoint
    from e2ediff.trainer import train

    cfg = resolve_run("train-autoencoder", "train.steps=4", "train.max_seconds=1e-9", "train.checkpoint_every=10")
    train(AutoencoderTask(cfg, torch.device("cpu")), cfg.train, tmp_path, cfg, "train-autoencoder")
    assert int(latest_checkpoint(tmp_path)[2]["step"]) == 1
    cfg = resolve_run("train-autoencoder", "train.steps=4", "train.checkpoint_every=10")
    train(AutoencoderTask(cfg, torch.device("cpu")), cfg.train, tmp_path, cfg, "train-autoencoder")
    assert int(latest_checkpoint(tmp_path)[2]["step"]) == 4


def test_scenes_teacher_student_and_e2e_train_compiled(fake_env, tmp_path, monkeypatch):
    """train.compile=reduce-overhead (CUDA graphs on a GPU), as scripts/gpu/scenes_pipeline.sh trains, on the scenes
    teacher, its LCM student and the headline E2E recipe (`anchored`: feature-space GAN + R1 after a discriminator
    warm-up, the anchor to the student's samples, K drawn from {1, 2, 4}, checkpointing=false, as CUDA graphs need): traced for real here (aot_eager: AOTAutograd with donated buffers), only
    the trained network is compiled (not the teacher, the LCM target network nor the discriminator), and the exported
    weights equal an eager run's."""
    from test_e2e_recipe import record_compile

    from e2ediff.assets import load_pipeline
    from e2ediff.checkpoint import load_model_file
    from e2ediff.config import resolve
    from e2ediff.distill import PRESETS as DISTILL, DistillTask
    from e2ediff.e2e import PRESETS as FINETUNE, FinetuneTask
    from e2ediff.models.autoencoder import AutoencoderConfig, AutoencoderKL
    from e2ediff.pretrain import PRESETS as PRETRAIN, PretrainTask
    from e2ediff.trainer import train

    calls = record_compile(monkeypatch, "aot_eager")
    cache = _random_cache().save(tmp_path / "c.safetensors")
    common = ["data.num_scenes=16", "data.val_size=8", f"data.prompt_cache={cache}", "train.batch_size=4",
              "train.steps=2", "train.device=cpu", "train.progress=false", "train.checkpoint_every=2"]
    ae = AutoencoderKL(AutoencoderConfig.from_preset("scenes", channels=(8, 16, 32), norm_groups=4),
                       torch.Generator().manual_seed(0)).eval().requires_grad_(False)

    def run(preset, make_task, name, *overrides):
        exports = {}
        for mode in ("no", "reduce-overhead"):
            cfg = resolve(preset, overrides=[*common, *overrides, f"train.compile='{mode}'"])   # YAML reads a bare no as false
            torch.manual_seed(0)
            task = make_task(cfg)
            train(task, cfg.train, tmp_path / f"{name}-{mode}", cfg, name)
            exports[mode] = load_model_file(tmp_path / f"{name}-{mode}" / "model.safetensors")[0]
        compiled = [(fn.__self__, mode) for fn, mode in calls]
        assert (task.parts[0].module, "reduce-overhead") in compiled     # the trained network; an anchor's
        assert all(mode is None for net, mode in compiled                # network with the default mode
                   if any(net is frozen for frozen in task.frozen_networks()))
        assert exports["no"].keys() == exports["reduce-overhead"].keys()
        for k, v in exports["no"].items():
            torch.testing.assert_close(exports["reduce-overhead"][k], v, rtol=1e-5, atol=1e-6)

    run(PRETRAIN["scenes"], lambda cfg: PretrainTask(cfg, torch.device("cpu"), autoencoder=ae), "pretrain",
        "autoencoder=memory", "model.hidden_size=32", "model.depth=1", "model.num_heads=2")
    teacher = tmp_path / "pretrain-no" / "model.safetensors"
    run(DISTILL["scenes"], lambda cfg: DistillTask(cfg, torch.device("cpu"), teacher=load_pipeline(teacher)),
        "distill", f"teacher={teacher}", "solver_steps=10")
    student = tmp_path / "distill-no" / "model.safetensors"
    run(FINETUNE["anchored"], lambda cfg: FinetuneTask(cfg, torch.device("cpu"), init=load_pipeline(student)),
        "finetune", f"init={student}", "data.dataset=fashion-scenes", "data.caption_dropout=0", "checkpointing=false",
        "disc_warmup=1", "train.steps=3", "train.checkpoint_every=3", "optim.lr=1e-3")
    assert len(calls) == 4      # the three trained networks, and the anchored fine-tune's anchor network


@pytest.mark.parametrize("t", [999, 900, 700])
def test_scenes_teacher_loss_weighs_the_high_noise_steps(t):
    """A scene's layout is decided at high noise, where z_t holds almost nothing of the image and only the caption can
    say what goes where. There the teacher's loss must still weigh an error of the predicted clean latent:
    eps-prediction weighs it by SNR(t) = ᾱ/(1 − ᾱ) (4e-5 at t = 999 with linear betas; the first GPU run's eps teacher
    stayed at the caption-blind alignment), v-prediction by 1 + SNR(t) >= 1."""
    from e2ediff.denoiser import Denoiser, x0_eps_to_v, x0_to_eps
    from e2ediff.pretrain import PRESETS
    from e2ediff.schedules import VPSchedule

    cfg = PRESETS["scenes"]
    schedule = VPSchedule.from_name(cfg.schedule)
    g = torch.Generator().manual_seed(0)
    x0, noise, err = (torch.randn(8, 4, 16, 16, generator=g, dtype=torch.float64) for _ in range(3))
    tt = torch.full((8,), t)
    a, s = schedule.alpha_sigma(tt, torch.float64)
    z_t = a * x0 + s * noise
    x0_hat = x0 + 0.1 * err                                       # a network whose clean-latent prediction is off
    eps_hat = x0_to_eps(z_t, x0_hat, a, s)
    pred = {"eps": eps_hat, "v": x0_eps_to_v(x0_hat, eps_hat, a, s), "x0": x0_hat}[cfg.prediction]
    target = Denoiser(torch.nn.Identity(), schedule, cfg.prediction).training_target(x0, noise, tt)
    weight = (pred - target).pow(2).mean() / (x0_hat - x0).pow(2).mean()
    assert weight >= 1.0 - 1e-9
