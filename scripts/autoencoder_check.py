"""How much the autoencoder alone costs the metrics: reconstruction PSNR and the evaluation classifier's accuracy on
reconstructions of real test images (the ceiling any generated row's alignment is measured under).

    python scripts/autoencoder_check.py --autoencoder checkpoints/base/autoencoder.safetensors --num 1000
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from e2ediff.assets import load_autoencoder
from e2ediff.autoencoder_training import reconstruction_psnr
from e2ediff.data.fashion_mnist import from_model_images, load_fashion_mnist, to_model_images
from e2ediff.metrics.classifier import accuracy, load_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--autoencoder", type=Path, required=True, help="autoencoder or pipeline file")
    p.add_argument("--classifier", type=Path, default=Path("checkpoints/classifier"))
    p.add_argument("--num", type=int, default=1000, help="first N test images")
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


if __name__ == "__main__":
    main()
