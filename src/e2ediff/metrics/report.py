"""The per-row evaluation of `e2ediff evaluate`: FD, KID, prompt alignment and relative diversity of samples."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from e2ediff.data.fashion_mnist import to_model_images
from e2ediff.metrics.classifier import FashionClassifier, predict
from e2ediff.metrics.features import ClassifierFeatures
from e2ediff.metrics.frechet import FeatureStats, feature_stats, frechet_distance, kid


def alignment(classifier: FashionClassifier, images: Tensor, labels: Tensor | np.ndarray) -> float:
    """Fraction of model-format images [N, 1, 32, 32] in [-1, 1] that the classifier assigns to the class their
    prompt asked for (labels [N])."""
    labels = torch.as_tensor(labels).long().cpu()
    pred = predict(classifier, images)
    if labels.shape != pred.shape:
        raise ValueError(f"labels must have shape {tuple(pred.shape)}, got {tuple(labels.shape)}")
    return float((pred == labels).double().mean())


def diversity(features: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> float:
    """Mean within-class pairwise Euclidean distance: average over classes with >= 2 samples of
    mean_{i<j, same class} ‖f_i − f_j‖ (features [N, D], labels [N]); computed in float64."""
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels)).long()
    if f.ndim != 2 or y.shape != (f.shape[0],):
        raise ValueError(f"need features [N, D] and labels [N], got {tuple(f.shape)} and {tuple(y.shape)}")
    per_class = []
    for c in torch.unique(y):
        fc = f[y == c]
        n = fc.shape[0]
        if n < 2:
            continue
        d = torch.cdist(fc, fc, compute_mode="donot_use_mm_for_euclid_dist")  # exact 0 for equal rows
        per_class.append(d.sum() / (n * (n - 1)))  # each unordered pair counted twice, diagonal is 0
    if not per_class:
        raise ValueError("diversity needs at least one class with 2 or more samples")
    return float(torch.stack(per_class).mean())


def relative_diversity(gen_feats, gen_labels, real_feats, real_labels) -> float:
    """diversity(generated) / diversity(real): about 1 for a model that covers each class, 0 for one that collapsed
    onto one image per class. Classes are those present in the generated set with >= 2 samples."""
    gen_labels = np.asarray(gen_labels)
    real_labels = np.asarray(real_labels)
    classes, counts = np.unique(gen_labels, return_counts=True)
    classes = classes[counts >= 2]
    keep = np.isin(real_labels, classes)
    return diversity(gen_feats, gen_labels) / diversity(np.asarray(real_feats)[keep], real_labels[keep])


def evaluate_samples(images_uint8: np.ndarray, labels: np.ndarray | None, *, classifier: FashionClassifier,
                     reference: FeatureStats, real_features_for_kid: Tensor | np.ndarray,
                     real_labels: np.ndarray | None, seed: int = 0, kid_subsets: int = 100,
                     kid_subset_size: int = 1000) -> dict:
    """Evaluate generated samples against the test split with the classifier's features.

    images_uint8 [N, 28, 28] are padded exactly as the data loader pads (to_model_images) before feature extraction.
    reference: FeatureStats of the real test features (same extractor); real_features_for_kid [M, D] and their
    real_labels [M] (for relative diversity). KID subsets draw from torch.Generator seeded with `seed`; the subset size
    is min(kid_subset_size, N, M).
    Returns {fd, kid_mean, kid_std, n} plus {alignment, diversity_rel} when labels are given.
    """
    images = to_model_images(torch.as_tensor(images_uint8))
    extractor = ClassifierFeatures(classifier)
    feats = extractor(images).double().cpu()
    stats = feature_stats(feats, extractor=extractor.name)
    real = torch.as_tensor(np.asarray(real_features_for_kid), dtype=torch.float64)
    if real.ndim != 2 or real.shape[1] != feats.shape[1]:
        raise ValueError(f"real_features_for_kid must be [M, {feats.shape[1]}], got {tuple(real.shape)}")
    generator = torch.Generator().manual_seed(seed)
    kid_mean, kid_std = kid(feats, real, subsets=kid_subsets,
                            subset_size=min(kid_subset_size, feats.shape[0], real.shape[0]), generator=generator)
    result = {"fd": frechet_distance(stats, reference), "kid_mean": kid_mean, "kid_std": kid_std,
              "n": int(feats.shape[0])}
    if labels is not None:
        labels = np.asarray(labels)
        result["alignment"] = alignment(classifier, images, labels)
        if real_labels is None:
            raise ValueError("real_labels are needed for diversity_rel when labels are given")
        result["diversity_rel"] = relative_diversity(feats, labels, real, np.asarray(real_labels))
    return result


def load_samples_npz(path: str | os.PathLike, num_classes: int = 10
                     ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Read what `e2ediff sample` writes: `images` uint8 [N, 28, 28], optional `labels` int [N] in 0..num_classes-1
    (all -1: unknown, returned as None), optional `prompts` str [N]. Returns (images, labels or None, prompts or
    None); errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        if "images" not in data.files:
            raise ValueError(f"{path}: missing field 'images' (uint8 [N, 28, 28]); found {data.files}")
        images = data["images"]
        labels = data["labels"] if "labels" in data.files else None
        try:
            prompts = data["prompts"] if "prompts" in data.files else None
        except ValueError as err:  # object arrays need pickle, which we refuse
            raise ValueError(f"{path}: field 'prompts' must be a numpy str array, not objects ({err})") from err
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{path}: field 'images' must be uint8 [N, 28, 28], got {images.dtype} {images.shape}")
    n = images.shape[0]
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (n,):
            raise ValueError(f"{path}: field 'labels' must be int [{n}], got {labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
        if (labels == -1).all():   # `e2ediff sample --prompt …` writes -1: no class known, score FD/KID only
            labels = None
        else:
            bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
            if len(bad):
                raise ValueError(f"{path}: field 'labels' holds {len(bad)} values outside 0..{num_classes - 1} "
                                 f"(labels[{bad[0]}] = {labels[bad[0]]}); use -1 for every label when the classes "
                                 f"are unknown")
    if prompts is not None and (prompts.dtype.kind != "U" or prompts.shape != (n,)):
        raise ValueError(f"{path}: field 'prompts' must be str [{n}], got {prompts.dtype} {prompts.shape}")
    return images, labels, prompts
