"""How much the autoencoder alone costs the metrics: reconstruction PSNR and the evaluation classifier's accuracy on
reconstructions of real test images (the ceiling any generated row's alignment is measured under).

    python scripts/autoencoder_check.py --autoencoder checkpoints/base/autoencoder.safetensors --num 1000

With --save-samples DIR it also writes DIR/real.npz and DIR/reconstructions.npz (the evaluator's samples format), so
that `e2ediff evaluate --samples DIR/reconstructions.npz --split val` scores the floor like any model row.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from e2ediff.assets import load_autoencoder
from e2ediff.autoencoder_training import reconstruction_psnr
from e2ediff.data.fashion_mnist import default_prompts, from_model_images, load_fashion_mnist, to_model_images
from e2ediff.generate import save_samples_npz
from e2ediff.metrics.classifier import accuracy, load_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--autoencoder", type=Path, required=True, help="autoencoder or pipeline file")
    p.add_argument("--classifier", type=Path, default=Path("checkpoints/classifier"))
    p.add_argument("--num", type=int, default=1000, help="first N test images")
    p.add_argument("--save-samples", type=Path, help="folder for real.npz and reconstructions.npz")
    args = p.parse_args()
    images, labels = load_fashion_mnist("test")
    images, labels = images[:args.num], labels[:args.num]
    ae, classifier = load_autoencoder(args.autoencoder), load_classifier(args.classifier)
    x = to_model_images(torch.as_tensor(images))
    with torch.no_grad():
        recon = from_model_images(ae.decode_latents(ae.encode_latents(x)).clamp(-1, 1))
    print(f"{args.num} test images: PSNR {reconstruction_psnr(ae, x):.2f} dB (28x28); classifier accuracy on the "
          f"originals {accuracy(classifier, images, labels):.3f}, on the reconstructions "
          f"{accuracy(classifier, recon, labels):.3f}")
    if args.save_samples:
        prompts = [default_prompts()[int(c)] for c in labels]
        for name, data in (("real", images), ("reconstructions", recon)):
            save_samples_npz(args.save_samples / f"{name}.npz", data, labels, prompts)   # both uint8 numpy
        print(f"samples -> {args.save_samples}/real.npz, {args.save_samples}/reconstructions.npz")


if __name__ == "__main__":
    main()
