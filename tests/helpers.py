"""Shared tiny fixtures for the config / checkpoint / trainer / CLI tests.

* a fake Fashion-MNIST (64 train + 32 test images of class-dependent stripes) written as IDX .gz files;
* a PromptCache with random features for exactly ``class_captions()`` at the path the commands look for, so no test
  needs MiniLM;
* ``E2EDIFF_DATA_DIR`` / ``E2EDIFF_CACHE`` pointed at them for every test that uses the ``fake_env`` fixture;
* tiny configs (DiT hidden 32, depth 1, 2 heads; autoencoder channels (8, 16, 32), 4 groups; batch 8) as dotted
  overrides, usable both with ``e2ediff.config.resolve`` and on the command line;
* pipeline files (autoencoder, teacher, LCM student) written by the real ``Task.export`` code from random weights.
* ``record_compile``: torch.compile traced by a backend without C++ codegen, recording how it was called.

Import the fixtures into a test module with ``from helpers import fake_env, pipeline_files  # noqa: F401``.
"""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

N_TRAIN, N_TEST, VAL_SIZE = 64, 32, 8

TINY_AE = ["model.channels=[8,16,32]", "model.norm_groups=4", "scale_samples=16"]
TINY_DIT = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2"]
TINY_DATA = [f"data.val_size={VAL_SIZE}"]
TINY_TRAIN = ["train.batch_size=8", "train.device=cpu", "train.progress=false", "train.deterministic=true",
              "train.log_every=1", "train.checkpoint_every=2", "train.keep_last=5"]
TINY_FINETUNE = ["samples_per_caption=2", "train.ema_decay=0.9", "optim.lr=1e-3"]


# ----------------------------------------------------------------------------------------------------------------------
# Fake data


def fake_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, 28, 28] images and int64 labels 0..9 (balanced): a bright horizontal band whose row depends on the
    class, plus a little noise, so classes are distinguishable."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    images = rng.integers(0, 30, size=(n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        top = 2 + 2 * int(c)
        images[i, top:top + 4, 4:24] = 200 + rng.integers(0, 50, dtype=np.uint8)
    return images, labels


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (magic 0x0803 for 3 dims, 0x0801 for 1), gzipped."""
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_fashion_mnist(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, (n, seed) in {"train": (N_TRAIN, 0), "t10k": (N_TEST, 1)}.items():
        images, labels = fake_images(n, seed)
        write_idx_gz(directory / f"{split}-images-idx3-ubyte.gz", images)
        write_idx_gz(directory / f"{split}-labels-idx1-ubyte.gz", labels)
    return directory


def write_fake_prompt_cache(seed: int = 0) -> Path:
    """Random caption features for exactly ``class_captions()`` at ``default_prompt_cache_path`` (reads
    ``E2EDIFF_CACHE``, so call it with the environment already set)."""
    from e2ediff.assets import default_prompt_cache_path
    from e2ediff.data.fashion_mnist import class_captions
    from e2ediff.models.text import EMBED_DIM, ENCODER_NAME, PromptCache

    captions, _ = class_captions()
    g = torch.Generator().manual_seed(seed)
    n, length = len(captions), 16
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    tokens = torch.randn(n, length, EMBED_DIM, generator=g) * mask[..., None]
    pooled = torch.nn.functional.normalize(torch.randn(n, EMBED_DIM, generator=g), dim=-1)
    path = default_prompt_cache_path(captions)
    PromptCache(captions, ENCODER_NAME, length, tokens, mask, pooled).save(path)
    return path


@pytest.fixture(scope="session")
def fake_env_paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2ediff_env")
    data, cache = root / "fashion-mnist", root / "cache"
    write_fake_fashion_mnist(data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("E2EDIFF_CACHE", str(cache))
        prompts = write_fake_prompt_cache()
    return {"data": data, "cache": cache, "prompts": prompts}


@pytest.fixture
def fake_env(fake_env_paths, monkeypatch) -> dict[str, Path]:
    """E2EDIFF_DATA_DIR -> the fake Fashion-MNIST, E2EDIFF_CACHE -> a folder holding the fake prompt cache."""
    monkeypatch.setenv("E2EDIFF_DATA_DIR", str(fake_env_paths["data"]))
    monkeypatch.setenv("E2EDIFF_CACHE", str(fake_env_paths["cache"]))
    monkeypatch.delenv("E2EDIFF_DEBUG", raising=False)
    return fake_env_paths


@pytest.fixture
def restore_determinism():
    """train.deterministic=true switches torch.use_deterministic_algorithms on globally: switch it back after."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


# ----------------------------------------------------------------------------------------------------------------------
# Tiny configs and pipeline files


def resolve_run(command: str, *overrides: str):
    """The tiny resolved config of a training command (preset ``tiny`` + tiny overrides + ``overrides``)."""
    from e2ediff.config import resolve

    if command == "train-autoencoder":
        from e2ediff.autoencoder_training import PRESETS
        base = TINY_AE + TINY_DATA + TINY_TRAIN
    elif command == "pretrain":
        from e2ediff.pretrain import PRESETS
        base = TINY_DIT + TINY_DATA + TINY_TRAIN
    elif command == "distill":
        from e2ediff.distill import PRESETS
        base = TINY_DATA + TINY_TRAIN
    elif command == "finetune":
        from e2ediff.e2e import PRESETS
        base = TINY_DATA + TINY_TRAIN + TINY_FINETUNE
    else:
        raise ValueError(command)
    return resolve(PRESETS["tiny"], overrides=base + list(overrides))


def training_data(cfg):
    from e2ediff.assets import TrainingData

    return TrainingData(cfg.data, "train", "cpu")


def _save_export(task, path: Path) -> Path:
    from e2ediff.checkpoint import save_model_file

    weights = {p.name: p.module.state_dict() for p in task.parts}
    tensors, meta = task.export(weights)
    save_model_file(path, tensors, {**meta, "step": 0})
    return path


def write_pipeline_files(directory: Path, seed: int = 0) -> dict[str, Path]:
    """autoencoder.safetensors, teacher.safetensors (DDIM, eps) and student.safetensors (LCM, guidance-embedded),
    each written by its task's ``export`` from freshly (seeded) initialised weights."""
    from e2ediff.assets import load_autoencoder, load_pipeline
    from e2ediff.autoencoder_training import AutoencoderTask
    from e2ediff.distill import DistillTask
    from e2ediff.pretrain import PretrainTask

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cpu = torch.device("cpu")
    cfg = resolve_run("train-autoencoder")
    data = training_data(cfg)
    ae_path = _save_export(AutoencoderTask(cfg, cpu, data=data), directory / "autoencoder.safetensors")
    cfg = resolve_run("pretrain", f"autoencoder={ae_path}", "sample_steps=3")
    teacher_path = _save_export(PretrainTask(cfg, cpu, data=data, autoencoder=load_autoencoder(ae_path)),
                                directory / "teacher.safetensors")
    cfg = resolve_run("distill", f"teacher={teacher_path}", "solver_steps=10", "sample_steps=2")
    student_path = _save_export(DistillTask(cfg, cpu, data=data, teacher=load_pipeline(teacher_path)),
                                directory / "student.safetensors")
    return {"autoencoder": ae_path, "teacher": teacher_path, "student": student_path}


@pytest.fixture(scope="session")
def pipeline_files(fake_env_paths, tmp_path_factory) -> dict[str, Path]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("E2EDIFF_DATA_DIR", str(fake_env_paths["data"]))
        mp.setenv("E2EDIFF_CACHE", str(fake_env_paths["cache"]))
        return write_pipeline_files(tmp_path_factory.mktemp("pipelines"))


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


__all__ = ["fake_env", "fake_env_paths", "pipeline_files", "restore_determinism", "resolve_run", "training_data",
           "write_pipeline_files", "write_fake_fashion_mnist", "write_fake_prompt_cache", "all_tensors",
           "snapshot", "run_error"]


# ----------------------------------------------------------------------------------------------------------------------
# Command-line errors


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (a missing root gives nothing): 'nothing was overwritten' checks."""
    files = {}
    for root in roots:
        if root.is_file():
            files[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
        elif root.is_dir():
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    files[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def run_error(capsys, *argv, untouched: tuple[Path, ...] = ()) -> str:
    """Run a command that must fail on user input; return its one stderr line (without the 'error: ' prefix)."""
    from e2ediff.cli import main

    before = snapshot(*untouched)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert snapshot(*untouched) == before
    return lines[0][len("error: "):]


def record_compile(monkeypatch, backend: str) -> list[tuple]:
    """torch.compile traced for real but without C++ codegen (``backend``: eager, or aot_eager for AOTAutograd with
    its donated buffers); returns the list of (function, mode) it is called with."""
    calls = []
    real_compile = torch.compile

    def compile_(fn=None, **kwargs):
        calls.append((fn, kwargs.pop("mode", None)))
        return real_compile(fn, backend=backend, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_)
    return calls
