"""The command line: training commands end to end on tiny configs, `sample` outputs, and one-line user errors."""
from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from e2ediff.cli import main
from e2ediff.data.fashion_mnist import default_prompts
from helpers import run_error  # noqa: F401
from helpers import (TINY_AE, TINY_DATA, TINY_DIT, TINY_TRAIN, fake_env, fake_env_paths,  # noqa: F401
                     pipeline_files, restore_determinism)


def run_ok(capsys, *argv: str) -> str:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def load_npz(folder):
    with np.load(folder / "samples.npz") as f:
        return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------------------------------------------------
# Training commands through the CLI, then sampling the trained file


def test_train_autoencoder_then_pretrain_then_sample(fake_env, tmp_path, capsys, restore_determinism):
    ae_dir, teacher_dir = tmp_path / "ae", tmp_path / "teacher"
    out = run_ok(capsys, "train-autoencoder", "--run-dir", ae_dir, *TINY_AE, *TINY_DATA, *TINY_TRAIN, "train.steps=2")
    assert "PSNR" in out
    assert json.loads((ae_dir / "eval.json").read_text())["n"] == 32          # the fake test split
    assert yaml.safe_load((ae_dir / "config.yaml").read_text())["command"] == "train-autoencoder"

    run_ok(capsys, "pretrain", "--run-dir", teacher_dir, f"autoencoder={ae_dir / 'model.safetensors'}",
           *TINY_DIT, *TINY_DATA, *TINY_TRAIN, "train.steps=2", "sample_steps=3")
    assert (teacher_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"

    out = run_ok(capsys, "sample", "--checkpoint", teacher_dir, "--output", tmp_path / "s", "--num-samples", 20,
                 "--device", "cpu")
    assert "samples.npz" in out
    s = load_npz(tmp_path / "s")
    assert s["images"].dtype == np.uint8 and s["images"].shape == (20, 28, 28)
    assert s["labels"].dtype == np.int64 and np.array_equal(np.bincount(s["labels"], minlength=10), np.full(10, 2))
    prompts = default_prompts()
    assert s["prompts"].dtype.kind == "U" and list(s["prompts"]) == [prompts[c] for c in s["labels"]]
    with Image.open(tmp_path / "s" / "grid.png") as img:
        img.load()
        # 10 rows (one per class) of 2 images, 28 px + 2 px gutters, scaled ×2
        assert img.size == (2 * (2 * 30 + 2), 2 * (10 * 30 + 2)) and img.mode == "L"


def test_sample_is_reproducible_and_independent_of_batch_size(fake_env, pipeline_files, tmp_path, capsys):
    for name, batch in (("a", 500), ("b", 3)):
        run_ok(capsys, "sample", "--checkpoint", pipeline_files["teacher"], "--output", tmp_path / name,
               "--num-samples", 10, "--batch-size", batch, "--seed", 4, "--device", "cpu")
    assert np.array_equal(load_npz(tmp_path / "a")["images"], load_npz(tmp_path / "b")["images"])
    run_ok(capsys, "sample", "--checkpoint", pipeline_files["teacher"], "--output", tmp_path / "c",
           "--num-samples", 10, "--seed", 5, "--device", "cpu")
    assert not np.array_equal(load_npz(tmp_path / "a")["images"], load_npz(tmp_path / "c")["images"])


@pytest.mark.parametrize("model,args,timesteps", [
    ("teacher", ["--timesteps", "999,500,100"], [999, 500, 100]),
    ("teacher", ["--sampler", "ddim", "--steps", "2"], None),
    ("student", [], None),                                               # the file's own LCM sampler
    ("student", ["--sampler", "lcm", "--timesteps", "999,499"], [999, 499]),
    ("student", ["--sampler", "lcm", "--steps", "3", "--renoise", "ve"], None),
    ("teacher", ["--sampler", "lcm", "--timesteps", "999,259"], [999, 259]),
])
def test_sample_with_explicit_sampler_and_timesteps(fake_env, pipeline_files, tmp_path, capsys, model, args, timesteps):
    out = run_ok(capsys, "sample", "--checkpoint", pipeline_files[model], "--output", tmp_path / "o",
                 "--num-samples", 10, "--device", "cpu", *args)
    if timesteps is not None:
        assert f"timesteps {timesteps}" in out
    s = load_npz(tmp_path / "o")
    assert s["images"].shape == (10, 28, 28) and s["images"].dtype == np.uint8
    assert (tmp_path / "o" / "grid.png").is_file()


def test_different_timesteps_give_different_samples(fake_env, pipeline_files, tmp_path, capsys):
    for name, ts in (("a", "999,500"), ("b", "999,200")):
        run_ok(capsys, "sample", "--checkpoint", pipeline_files["student"], "--output", tmp_path / name,
               "--num-samples", 10, "--device", "cpu", "--timesteps", ts)
    assert not np.array_equal(load_npz(tmp_path / "a")["images"], load_npz(tmp_path / "b")["images"])


@contextlib.contextmanager
def recorded_specs():
    """The sampler specs the CLI builds from its options while the block runs, in order."""
    from e2ediff import cli

    seen, spec = [], cli._sampler_spec

    def record(args, meta):
        seen.append(spec(args, meta))
        return seen[-1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_sampler_spec", record)
        yield seen


def test_guidance_interval_is_parsed_and_bad_values_name_the_option(fake_env, pipeline_files, tmp_path, capsys):
    """The sampling itself is tested against a by-hand float64 loop (test_denoiser, test_e2e_recipe); here the option
    reaches the sampler spec, and a malformed value is one error line naming it."""
    with recorded_specs() as seen:
        run_ok(capsys, "sample", "--checkpoint", pipeline_files["teacher"], "--output", tmp_path / "s",
               "--num-samples", 4, "--device", "cpu", "--guidance", "3", "--guidance-interval", "0,600")
    assert seen[-1].guidance == 3 and seen[-1].guidance_interval == (0.0, 600.0)
    for bad in ("600", "600,0", "a,b", "-1,5"):
        line = run_error(capsys, "sample", "--checkpoint", pipeline_files["teacher"], "--output", tmp_path / "o",
                         "--guidance", "3", f"--guidance-interval={bad}", "--device", "cpu")
        assert "--guidance-interval" in line and bad.split(",")[0] in line


def test_gamma_reaches_the_sampler_and_bad_values_name_the_option(fake_env, pipeline_files, tmp_path, capsys):
    """--gamma reaches the sampler spec (the sampler itself is tested against a float64 loop in test_samplers, the
    exported file's gamma in test_e2e_recipe); out of [0, 1] it is one error line naming the option."""
    with recorded_specs() as seen:
        run_ok(capsys, "sample", "--checkpoint", pipeline_files["student"], "--output", tmp_path / "s",
               "--num-samples", 4, "--device", "cpu", "--gamma", "0")
    assert seen[-1].gamma == 0.0
    assert seen[-1].renoise == "vp"
    for bad in ("1.5", "-0.2"):
        line = run_error(capsys, "sample", "--checkpoint", pipeline_files["student"], "--output", tmp_path / "o",
                         "--gamma", bad, "--device", "cpu")
        assert "--gamma" in line and bad in line


def test_sample_with_custom_prompts(fake_env, pipeline_files, tmp_path, capsys):
    p = default_prompts()
    run_ok(capsys, "sample", "--checkpoint", pipeline_files["teacher"], "--output", tmp_path / "o",
           "--num-samples", 6, "--device", "cpu", "--prompt", p[3], "--prompt", p[7])
    s = load_npz(tmp_path / "o")
    assert list(s["labels"]) == [3, 3, 3, 7, 7, 7] and list(s["prompts"]) == [p[3]] * 3 + [p[7]] * 3


# ----------------------------------------------------------------------------------------------------------------------
# User errors: exit status 2, one line, no traceback


def test_missing_checkpoint(fake_env, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "model.safetensors"
    line = run_error(capsys, "sample", "--checkpoint", missing, "--output", tmp_path / "o", "--device", "cpu")
    assert str(missing) in line
    line = run_error(capsys, "sample", "--checkpoint", tmp_path, "--output", tmp_path / "o", "--device", "cpu")
    assert str(tmp_path / "model.safetensors") in line     # a run folder without a model file


def test_num_samples_zero(fake_env, pipeline_files, tmp_path, capsys):
    line = run_error(capsys, "sample", "--checkpoint", pipeline_files["teacher"], "--output", tmp_path / "o",
                     "--num-samples", 0)
    assert "--num-samples" in line and "0" in line
    assert not (tmp_path / "o").exists()


def test_bad_timesteps(fake_env, pipeline_files, tmp_path, capsys):
    line = run_error(capsys, "sample", "--checkpoint", pipeline_files["teacher"], "--output", tmp_path / "o",
                     "--timesteps", "999,x5", "--device", "cpu")
    assert "999,x5" in line


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_corrupted_model_file(fake_env, pipeline_files, tmp_path, capsys, damage):
    bad = tmp_path / "model.safetensors"
    data = bytearray(pipeline_files["teacher"].read_bytes())
    if damage == "flip":
        data[-100] ^= 0x10
    elif damage == "truncate":
        data = data[: len(data) - 1000]
    else:
        from safetensors.torch import save_file
        save_file({"w": torch.zeros(3)}, str(bad))
        data = bytearray(bad.read_bytes())
    bad.write_bytes(bytes(data))
    line = run_error(capsys, "sample", "--checkpoint", bad, "--output", tmp_path / "o", "--device", "cpu")
    assert str(bad) in line


def test_config_with_unknown_key(fake_env, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  hiden_size: 32\n")
    line = run_error(capsys, "pretrain", "--run-dir", tmp_path / "r", "--config", cfg, "autoencoder=x")
    assert str(cfg) in line and "model.hiden_size" in line
    assert not (tmp_path / "r").exists()                                     # nothing written for a bad config


def test_missing_config_file(fake_env, tmp_path, capsys):
    line = run_error(capsys, "train-autoencoder", "--run-dir", tmp_path / "r", "--config", tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in line


@pytest.mark.parametrize("override,named", [("train.steps=abc", "train.steps"), ("train.steps", "train.steps"),
                                            ("train.batch_size=0", "train.batch_size"),
                                            ("model.hiden_size=3", "model.hiden_size")])
def test_bad_override(fake_env, tmp_path, capsys, override, named):
    line = run_error(capsys, "train-autoencoder", "--run-dir", tmp_path / "r", override)
    assert named in line


def test_training_with_a_missing_autoencoder_file(fake_env, tmp_path, capsys):
    missing = tmp_path / "ae.safetensors"
    line = run_error(capsys, "pretrain", "--run-dir", tmp_path / "r", f"autoencoder={missing}", *TINY_DATA,
                     *TINY_TRAIN)
    assert str(missing) in line


def test_debug_env_gives_the_traceback(fake_env, tmp_path, monkeypatch):
    from e2ediff.config import ConfigError

    monkeypatch.setenv("E2EDIFF_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["train-autoencoder", "--run-dir", str(tmp_path / "r"), "train.steps=abc"])
