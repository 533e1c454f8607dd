"""Evaluation of a model file or a ``samples.npz`` on the embedded benchmark.

Metrics (all on the features of the project's Fashion-MNIST classifier, a supervised ResNet — never the network a
loss used): Fréchet distance (FD) and KID to the real images of a split, alignment (the classifier's accuracy on the
class each prompt asked for), and within-class diversity relative to the real images (catches collapse).
Samples are drawn with fixed seeds, balanced over the 10 class prompts.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from e2ediff.adapters.speed import float8_linear
from e2ediff.checkpoint import sha256_file


def reference_features(classifier, key: str, split: str = "test", data_dir: str | None = None,
                       val_size: int = 5000):
    """Classifier features [M, D] (float64) and labels [M] of a real split, cached under the classifier's
    checksum ``key``."""
    from e2ediff.checkpoint import atomic_write_npz
    from e2ediff.data.fashion_mnist import cache_dir, load_fashion_mnist, to_model_images, train_val_split
    from e2ediff.metrics.features import ClassifierFeatures

    path = cache_dir() / f"reference-{key}-{split}{'' if split == 'test' else f'-{val_size}'}.npz"
    if path.exists():
        with np.load(path) as f:
            return f["features"], f["labels"]
    if split == "test":
        images, labels = load_fashion_mnist("test", data_dir)
    elif split == "val":
        images, labels = load_fashion_mnist("train", data_dir)
        _, val_idx = train_val_split(len(images), val_size, seed=0)
        images, labels = images[val_idx.numpy()], labels[val_idx.numpy()]
    else:
        raise ValueError(f"--split must be test or val, got {split!r}")
    with torch.no_grad():
        feats = ClassifierFeatures(classifier)(to_model_images(torch.as_tensor(images))).double().cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_npz(path, features=feats, labels=np.asarray(labels))
    return feats, np.asarray(labels)


def score_images(images_uint8: np.ndarray, labels: np.ndarray | None, classifier_dir: str | Path,
                 split: str = "test", data_dir: str | None = None, device: torch.device | str = "cpu",
                 seed: int = 0) -> dict:
    """FD, KID, alignment and relative diversity of uint8 images [N, 28, 28] against the real ``split``."""
    from e2ediff.metrics.classifier import load_classifier
    from e2ediff.metrics.frechet import feature_stats
    from e2ediff.metrics.report import evaluate_samples

    classifier_dir = Path(classifier_dir)
    key = sha256_file(classifier_dir / "model.safetensors")[:16]
    classifier = load_classifier(classifier_dir, device)
    real, real_labels = reference_features(classifier, key, split, data_dir)
    result = evaluate_samples(images_uint8, labels, classifier=classifier, reference=feature_stats(real),
                              real_features_for_kid=real, real_labels=real_labels, seed=seed)
    result.update({"split": split, "feature_extractor": f"FashionClassifier {classifier_dir.name} ({key[:12]})"})
    return result


def evaluate_model(model_path: str | Path, spec, classifier_dir: str | Path, num_samples: int = 10000,
                   seed: int = 0, split: str = "test", device: torch.device | str = "cpu", batch_size: int = 1000,
                   prompt_cache: str | Path | None = None,
                   fp8: bool = False) -> tuple[dict, np.ndarray, np.ndarray]:
    """Generate ``num_samples`` images balanced over the class prompts with ``spec`` and score them; ``fp8``: with the
    network's block linears in FP8 (e2ediff.adapters.speed.float8_linear), to measure what quantization costs."""
    from e2ediff.assets import load_pipeline
    from e2ediff.data.fashion_mnist import default_prompts, from_model_images
    from e2ediff.generate import balanced_labels, generate, text_features

    pipe = load_pipeline(model_path, device)
    n_params = sum(p.numel() for p in pipe.net.parameters())       # before FP8 turns block weights into buffers
    fp8_layers = float8_linear(pipe.net) if fp8 else []
    labels = balanced_labels(num_samples)
    prompts = [default_prompts()[c] for c in labels]
    cond = text_features(prompts, pipe.meta.get("captions"), prompt_cache)
    t0 = time.perf_counter()
    images = from_model_images(generate(pipe, cond, spec, seed=seed, batch_size=batch_size, device=device))
    seconds = time.perf_counter() - t0
    result = score_images(images, labels, classifier_dir, split, device=device, seed=seed)
    result.update({"model": str(model_path), "kind": pipe.meta.get("kind"), "sampler": spec.name,
                   "timesteps": spec.resolved_timesteps(), "nfe": spec.nfe, "guidance": spec.guidance,
                   "guidance_interval": spec.guidance_interval, "w": spec.w,
                   **({"renoise": spec.renoise, "gamma": spec.gamma} if spec.name == "lcm" else {}),
                   "params": n_params, "seed": seed, "sample_seconds": seconds, "model_step": pipe.meta.get("step"),
                   "fp8_layers": len(fp8_layers)})
    return result, images, labels


def write_json(path: Path, result: dict) -> None:
    from e2ediff.checkpoint import atomic_write_text

    atomic_write_text(Path(path), json.dumps(result, indent=1) + "\n")
