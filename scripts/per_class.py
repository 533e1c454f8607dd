"""Per-class alignment of saved samples: for each class, the fraction of its samples that the evaluation classifier
assigns to that class (the `alignment` of `e2ediff evaluate`, split by the class each prompt asked for).

    e2ediff evaluate --checkpoint FILE --steps K --num-samples 5000 --split val --device cpu --save-samples DIR
    python scripts/per_class.py DIR [DIR ...] [--classifier checkpoints/classifier]   # a markdown table, one column a DIR
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from e2ediff.data.fashion_mnist import CLASS_NOUNS, to_model_images
from e2ediff.metrics.classifier import load_classifier, predict
from e2ediff.metrics.report import load_samples_npz


def per_class(folder: Path, classifier) -> list[float]:
    """The ten per-class rates of DIR/samples.npz, then the overall rate."""
    images, labels, _ = load_samples_npz(folder / "samples.npz")
    if labels is None:
        raise ValueError(f"{folder / 'samples.npz'}: no labels; per-class alignment needs the prompts' classes")
    pred = predict(classifier, to_model_images(torch.as_tensor(images))).numpy()
    return [float((pred[labels == c] == c).mean()) for c in range(len(CLASS_NOUNS))] + [float((pred == labels).mean())]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+", help="--save-samples folders of `e2ediff evaluate`")
    p.add_argument("--classifier", default="checkpoints/classifier")
    args = p.parse_args()
    classifier = load_classifier(args.classifier)
    cols = {str(f): per_class(f, classifier) for f in args.folders}
    print("| class | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for i, name in enumerate([*CLASS_NOUNS, "all"]):
        print(f"| {name} | " + " | ".join(f"{col[i]:.3f}" for col in cols.values()) + " |")


if __name__ == "__main__":
    main()
