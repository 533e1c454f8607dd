"""Sample grids per caption for fashion-scenes models: one row per model, `--per-caption` samples of each caption side by
side, the caption over its columns, from the samples.npz files that `e2ediff sample` writes for a scenes model.

    for m in teacher lcm anchored_s0; do e2ediff sample --checkpoint runs/scenes/$m/model.safetensors \\
        --prompt-cache .gpu/scenes-text.safetensors --prompt "a sneaker in the top left and a bag in the bottom right" \\
        --prompt ... --num-samples 18 --seed 0 --output runs/scenes-grids/$m; done
    python scripts/figure_scenes.py --per-caption 3 --output docs/figures/scenes_methods.png \\
        "teacher, DDIM 32=runs/scenes-grids/teacher/samples.npz" "LCM, 4 steps=runs/scenes-grids/lcm/samples.npz" ...

Every file must hold the same captions in the same order (files sampled with one seed share their noise).
"""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def caption_groups(path: Path, per_caption: int) -> tuple[list[str], list[np.ndarray]]:
    """The distinct captions of a scenes samples file in order of first appearance, and the first `per_caption`
    images [n, 64, 64] of each."""
    with np.load(path) as data:
        if "captions" not in data.files or data["images"].ndim != 3:
            raise ValueError(f"{path}: not a scenes samples file (needs images [N, H, W] and captions)")
        images, captions = data["images"], [str(c) for c in data["captions"]]
    order = list(dict.fromkeys(captions))
    groups = []
    for caption in order:
        idx = [i for i, c in enumerate(captions) if c == caption][:per_caption]
        if len(idx) < per_caption:
            raise ValueError(f"{path}: {len(idx)} samples of {caption!r}, need --per-caption {per_caption}")
        groups.append(images[idx])
    return order, groups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="+", help="LABEL=samples.npz, one figure row each")
    p.add_argument("--per-caption", type=int, default=2)
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args()
    rows = []
    for spec in args.rows:
        label, sep, path = spec.partition("=")
        if not sep:
            raise ValueError(f"row {spec!r}: expected LABEL=path/samples.npz")
        rows.append((label, *caption_groups(Path(path), args.per_caption)))
    captions = rows[0][1]
    for label, caps, _ in rows[1:]:
        if caps != captions:
            raise ValueError(f"row {label!r}: its captions differ from row {rows[0][0]!r}'s (sample every model "
                             f"with the same --prompt list)")
    gap = 8   # pixels between caption groups
    size = rows[0][2][0].shape[-1]
    width = len(captions) * (args.per_caption * size + gap) - gap
    fig, axes = plt.subplots(len(rows), 1, figsize=(width / 64 * 0.9, len(rows) * 1.05 + 0.9), squeeze=False)
    for ax, (label, _, groups) in zip(axes[:, 0], rows):
        canvas = np.full((size, width), 255, np.uint8)
        for g, imgs in enumerate(groups):
            x0 = g * (args.per_caption * size + gap)
            for j, img in enumerate(imgs):
                canvas[:, x0 + j * size: x0 + (j + 1) * size] = img
        ax.imshow(canvas, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    for g, caption in enumerate(captions):
        x = g * (args.per_caption * size + gap) + args.per_caption * size / 2
        axes[0, 0].text(x, -6, textwrap.fill(caption, 26), ha="center", va="bottom", fontsize=6.5)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110, bbox_inches="tight")
    print(f"{len(rows)} rows x {len(captions)} captions -> {args.output}")


if __name__ == "__main__":
    main()
