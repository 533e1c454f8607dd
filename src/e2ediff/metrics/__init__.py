"""Evaluation: feature extractors, Fréchet distance, KID, prompt alignment, diversity, CLIP score."""
from e2ediff.metrics.classifier import (ClassifierConfig, FashionClassifier, accuracy, load_classifier, predict,
                                        save_classifier, train_classifier)
from e2ediff.metrics.features import ClassifierFeatures, InceptionFeatures, clip_score, to_uint8_rgb
from e2ediff.metrics.frechet import FeatureStats, feature_stats, frechet_distance, kid, mmd2_unbiased
from e2ediff.metrics.report import alignment, diversity, evaluate_samples, load_samples_npz, relative_diversity

__all__ = [
    "ClassifierConfig", "FashionClassifier", "accuracy", "load_classifier", "predict", "save_classifier",
    "train_classifier", "ClassifierFeatures", "InceptionFeatures", "clip_score", "to_uint8_rgb", "FeatureStats",
    "feature_stats", "frechet_distance", "kid", "mmd2_unbiased", "alignment", "diversity", "evaluate_samples",
    "load_samples_npz", "relative_diversity",
]
