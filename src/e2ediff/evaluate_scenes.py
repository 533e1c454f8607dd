"""Sampling and scoring a scenes model: prompts from real scenes' layouts, ``samples.npz`` with layouts, the scores.

The prompts of an evaluation are the layouts of the first N real scenes of the split (so they follow the data's
layout distribution), written with caption variant i mod 3. ``samples.npz`` of scenes holds ``images`` uint8
[N, 64, 64], ``layouts`` int64 [N, 4] (−1 empty) and ``captions`` str [N]; any tool that writes that can be scored.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from e2ediff.adapters.speed import float8_linear
from e2ediff.data.scenes import DEFAULT_SIZES, NUM_CELLS, NUM_VARIANTS, load_scene_text_cache, load_scenes, parse_caption, \
    scene_caption


def scene_prompts(n: int, split: str = "test", data_dir=None) -> tuple[np.ndarray, list[str]]:
    """(layouts [n, 4], captions [n]) of the first n real scenes of ``split`` (cycled), caption variant i mod 3."""
    scenes = load_scenes(split, min(n, DEFAULT_SIZES[split]), data_dir=data_dir)
    layouts = scenes.layouts[np.arange(n) % len(scenes)]
    return layouts, [scene_caption(lay, i % NUM_VARIANTS) for i, lay in enumerate(layouts)]


def scene_cond(captions: list[str], prompt_cache=None):
    """TextCond of scene captions from the clause cache (no text model needed)."""
    cache = load_scene_text_cache(prompt_cache)
    return cache.cond(cache.ids_of(captions))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Model images [N, 1, 64, 64] in [-1, 1] -> uint8 [N, 64, 64]."""
    return ((images[:, 0].float().cpu() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8).numpy()


def sample_scenes(pipe, captions: list[str], spec, seed: int = 0, batch_size: int = 500, device="cpu",
                  prompt_cache=None) -> np.ndarray:
    from e2ediff.generate import generate

    return to_uint8(generate(pipe, scene_cond(captions, prompt_cache), spec, seed=seed, batch_size=batch_size,
                             device=device))


def save_scene_samples(path: Path, images: np.ndarray, layouts: np.ndarray, captions: list[str]) -> None:
    from e2ediff.checkpoint import atomic_write_npz

    atomic_write_npz(Path(path), compressed=True, images=np.asarray(images, dtype=np.uint8),
                     layouts=np.asarray(layouts, dtype=np.int64), captions=np.array(captions, dtype=str))


def load_scene_samples(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(images uint8 [N, 64, 64], layouts [N, 4], captions or None). Layouts come from the file, else are parsed
    from its captions."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as data:
        images = data["images"]
        captions = data["captions"] if "captions" in data.files else None
        layouts = data["layouts"] if "layouts" in data.files else None
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (64, 64):
        raise ValueError(f"{path}: field 'images' must be uint8 [N, 64, 64], got {images.dtype} {images.shape}")
    if layouts is None:
        if captions is None:
            raise ValueError(f"{path}: a scenes samples file needs 'layouts' [N, 4] or 'captions' [N]")
        layouts = np.array([parse_caption(str(c)) for c in captions], dtype=np.int64)
    if layouts.shape != (len(images), NUM_CELLS) or not np.issubdtype(layouts.dtype, np.integer):
        raise ValueError(f"{path}: field 'layouts' must be int [{len(images)}, {NUM_CELLS}], got {layouts.dtype} "
                         f"{layouts.shape}")
    return images, layouts.astype(np.int64), captions


def is_scene_samples(path: Path) -> bool:
    """Whether a samples file holds scenes (False for anything unreadable: the caller's own loader reports it)."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            return "layouts" in data.files or ("images" in data.files and data["images"].shape[1:] == (64, 64))
    except Exception:
        return False


def evaluate_scene_model(model_path, spec, classifier_dir, num_samples: int = 10000, seed: int = 0,
                         split: str = "test", device="cpu", batch_size: int = 500, prompt_cache=None,
                         fp8: bool = False):
    """Sample ``num_samples`` scenes for the split's layouts with ``spec`` and score them (``fp8``: as
    evaluate.evaluate_model). Returns (result, images, layouts, captions)."""
    from e2ediff.assets import load_pipeline
    from e2ediff.metrics.scenes import score_scenes

    pipe = load_pipeline(model_path, device)
    n_params = sum(p.numel() for p in pipe.net.parameters())       # before FP8 turns block weights into buffers
    fp8_layers = float8_linear(pipe.net) if fp8 else []
    layouts, captions = scene_prompts(num_samples, split)
    t0 = time.perf_counter()
    images = sample_scenes(pipe, captions, spec, seed, batch_size, device, prompt_cache)
    seconds = time.perf_counter() - t0
    result = score_scenes(images, layouts, classifier_dir, split, device=device, seed=seed)
    result.update({"model": str(model_path), "kind": pipe.meta.get("kind"), "sampler": spec.name,
                   "timesteps": spec.resolved_timesteps(), "nfe": spec.nfe, "guidance": spec.guidance, "w": spec.w,
                   "params": n_params, "seed": seed,
                   "sample_seconds": seconds, "model_step": pipe.meta.get("step"), "fp8_layers": len(fp8_layers)})
    return result, images, layouts, captions
