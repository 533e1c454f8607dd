"""Scores of Fashion-MNIST scenes: the evaluation classifier on the four 28 × 28 centre crops of each cell.

- A crop is *empty* when fewer than ``EMPTY_INK`` of its pixels exceed ``INK_LEVEL`` (real empty cells are all 0;
  each of the 70,000 real items has at least 0.047 of its pixels above 16); otherwise its class is
  the classifier's argmax. A cell is right when that (class or empty) equals the caption's layout.
- ``alignment``: fraction of cells right (empty cells included); ``all_four``: fraction of scenes with every cell
  right; ``class_alignment`` and ``empty_right``: the same on the non-empty and the empty cells of the layouts.
- FD, KID and relative diversity over the crops of the cells the caption fills, against the real crops of the
  non-empty cells of the real scenes of ``split`` (test: 10,000 scenes), both through the classifier's features.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from e2ediff.data.fashion_mnist import to_model_images
from e2ediff.data.scenes import DEFAULT_SIZES, NUM_CELLS, cell_crops, load_scenes
from e2ediff.metrics.classifier import predict

INK_LEVEL = 16       # uint8 level that counts as ink (> 16 of 255)
EMPTY_INK = 0.02     # a crop with less than this fraction of ink pixels is empty


def empty_crops(crops: np.ndarray) -> np.ndarray:
    """bool [...]: which uint8 crops [..., 28, 28] are empty."""
    return (crops > INK_LEVEL).mean(axis=(-2, -1)) < EMPTY_INK


def cell_labels(classifier, images: np.ndarray) -> np.ndarray:
    """int64 [N, 4]: per cell of uint8 scenes [N, 64, 64], −1 when empty, else the classifier's class."""
    crops = cell_crops(np.asarray(images))
    flat = crops.reshape(-1, *crops.shape[-2:])
    pred = predict(classifier, to_model_images(torch.as_tensor(flat))).numpy().reshape(len(images), NUM_CELLS)
    return np.where(empty_crops(crops), -1, pred).astype(np.int64)


def cell_agreement(pred: np.ndarray, layouts: np.ndarray) -> dict:
    """Alignment numbers of predicted cell labels [N, 4] against the captions' layouts [N, 4]."""
    pred, layouts = np.asarray(pred), np.asarray(layouts)
    if pred.shape != layouts.shape or pred.ndim != 2 or pred.shape[1] != NUM_CELLS:
        raise ValueError(f"need predicted cells and layouts of shape [N, {NUM_CELLS}], got {pred.shape} / "
                         f"{layouts.shape}")
    right = pred == layouts
    filled = layouts >= 0
    return {"alignment": float(right.mean()), "all_four": float(right.all(1).mean()),
            "class_alignment": float(right[filled].mean()) if filled.any() else float("nan"),
            "empty_right": float(right[~filled].mean()) if (~filled).any() else float("nan")}


def reference_crop_features(classifier, key: str, split: str = "test", data_dir=None, val_size: int = 5000,
                            n: int | None = None):
    """Classifier features [M, D] (float64) and labels [M] of the non-empty cells of the first ``n`` (default: all)
    real scenes of ``split``, cached under the classifier's checksum ``key``."""
    from e2ediff.checkpoint import atomic_write_npz
    from e2ediff.data.fashion_mnist import cache_dir
    from e2ediff.metrics.features import ClassifierFeatures

    n = DEFAULT_SIZES[split] if n is None else int(n)
    path = cache_dir() / f"reference-scenes-{key}-{split}-{n}-{val_size}.npz"
    if path.exists():
        with np.load(path) as f:
            return f["features"], f["labels"]
    scenes = load_scenes(split, n, data_dir=data_dir, val_size=val_size)
    filled = scenes.layouts >= 0
    crops = cell_crops(scenes.images)[filled]
    with torch.no_grad():
        feats = ClassifierFeatures(classifier)(to_model_images(torch.as_tensor(crops))).double().cpu().numpy()
    atomic_write_npz(path, features=feats, labels=scenes.layouts[filled])
    return feats, scenes.layouts[filled]


def score_scenes(images: np.ndarray, layouts: np.ndarray, classifier_dir: str | Path, split: str = "test",
                 data_dir=None, device: torch.device | str = "cpu", seed: int = 0, n_reference: int | None = None
                 ) -> dict:
    """Every scenes metric of uint8 scenes [N, 64, 64] made for ``layouts`` [N, 4] (reference: the first
    ``n_reference`` real scenes of ``split``, default all)."""
    from e2ediff.checkpoint import sha256_file
    from e2ediff.metrics.classifier import load_classifier
    from e2ediff.metrics.frechet import feature_stats
    from e2ediff.metrics.report import evaluate_samples

    images, layouts = np.asarray(images), np.asarray(layouts, dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (64, 64):
        raise ValueError(f"scenes must be uint8 [N, 64, 64], got {images.dtype} {images.shape}")
    if layouts.shape != (len(images), NUM_CELLS):
        raise ValueError(f"layouts must be int [{len(images)}, {NUM_CELLS}], got {layouts.shape}")
    classifier_dir = Path(classifier_dir)
    key = sha256_file(classifier_dir / "model.safetensors")[:16]
    classifier = load_classifier(classifier_dir, device)
    result = cell_agreement(cell_labels(classifier, images), layouts)
    filled = layouts >= 0
    real, real_labels = reference_crop_features(classifier, key, split, data_dir, n=n_reference)
    crops = cell_crops(images)[filled]
    if len(crops) >= 2:
        dist = evaluate_samples(crops, layouts[filled], classifier=classifier, reference=feature_stats(real),
                                real_features_for_kid=real, real_labels=real_labels, seed=seed)
        result.update({"fd": dist["fd"], "kid_mean": dist["kid_mean"], "kid_std": dist["kid_std"],
                       "diversity_rel": dist["diversity_rel"]})
    result.update({"n": int(len(images)), "n_crops": int(filled.sum()), "split": split, "dataset": "fashion-scenes",
                   "feature_extractor": f"FashionClassifier {classifier_dir.name} ({key[:12]}) on cell crops",
                   "empty_rule": f"< {EMPTY_INK:g} of pixels > {INK_LEVEL}"})
    return result
