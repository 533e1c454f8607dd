"""The paper's Figures 2 and 3 for the miniature: one row per method (or loss), `--per-class` samples of each of the
10 prompts side by side, from the samples.npz files that `e2ediff sample` writes.

    python scripts/figure_grids.py --output docs/figures/base_methods.png \\
        "teacher, DDIM 32=runs/grids/teacher_ddim32/samples.npz" "LCM, 4 steps=runs/grids/lcm_4/samples.npz" ...

Samples are taken in file order within each class, so files sampled with the same seed share their noise.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def class_strip(path: Path, per_class: int) -> np.ndarray:
    data = np.load(path)
    images, labels = data["images"], data["labels"]
    rows = []
    for c in range(10):
        picked = images[labels == c][:per_class]
        if len(picked) < per_class:
            raise SystemExit(f"{path}: only {len(picked)} samples of class {c}, need {per_class}")
        rows.append(np.concatenate(list(picked), axis=1))
    return np.concatenate([np.pad(r, ((0, 0), (0, 4)), constant_values=255) for r in rows], axis=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", nargs="+", metavar="LABEL=samples.npz")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--title", default="")
    args = p.parse_args()
    strips, labels = [], []
    for spec in args.rows:
        label, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"row {spec!r}: expected LABEL=path/to/samples.npz (an existing file)")
        strips.append(class_strip(Path(path), args.per_class))
        labels.append(label)
    h, w = strips[0].shape
    fig, axes = plt.subplots(len(strips), 1, figsize=(w / 40, (h / 40 + 0.15) * len(strips) + 0.5))
    for ax, strip, label in zip(np.atleast_1d(axes), strips, labels):
        ax.imshow(strip, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    step = 28 * args.per_class + 4
    top = np.atleast_1d(axes)[0]
    top.set_xticks([step * c + step / 2 - 2 for c in range(10)])
    top.set_xticklabels(CLASSES, fontsize=7)
    top.xaxis.set_ticks_position("top")
    if args.title:
        fig.suptitle(args.title, fontsize=9)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
