"""Feature extractors for distribution metrics, and the CLIP score.

Every extractor is an nn.Module with `.name`, `.num_features` and `forward(images) -> [B, num_features]` (float32),
where images are float [B, C, H, W] in [-1, 1] (the model format). `num_features` also lets torchmetrics'
FrechetInceptionDistance(feature=extractor) use it offline.

- ClassifierFeatures: the Fashion-MNIST classifier's 128-d embedding (the miniature's FD / KID).
- InceptionFeatures: Inception-v3 2048-d pool features, the FID standard (torch-fidelity's TF-ported network:
  uint8 RGB in, TF1-compatible bilinear resize to 299×299 inside, (x − 128)/128).
- clip_score: torchmetrics' CLIPScore on a local CLIP directory.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from e2ediff.metrics.classifier import FashionClassifier


def to_uint8_rgb(images: Tensor) -> Tensor:
    """float [B, C, H, W] in [-1, 1] (C = 1 or 3) -> uint8 [B, 3, H, W], rounded to the nearest level."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, 1 or 3, H, W], got {tuple(images.shape)}")
    x = ((images.detach().float() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class ClassifierFeatures(nn.Module):
    """Penultimate embedding of a FashionClassifier: images [B, 1, 32, 32] in [-1, 1] -> [B, 128] float32."""

    name = "fashion_classifier"

    def __init__(self, classifier: FashionClassifier, batch_size: int = 512) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.batch_size = batch_size

    @property
    def num_features(self) -> int:
        return self.classifier.num_features

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        return super().train(False)  # BatchNorm statistics stay frozen

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        device = next(self.classifier.parameters()).device
        return torch.cat([self.classifier.features(images[i:i + self.batch_size].to(device).float()).float()
                          for i in range(0, images.shape[0], self.batch_size)])


INCEPTION_HINT = ("the FID Inception-v3 weights of torch-fidelity, 'weights-inception-2015-12-05-6726825d.pth' "
                  "(https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/), downloaded on a machine "
                  "with internet access")


class InceptionFeatures(nn.Module):
    """Inception-v3 2048-d pool features (the FID standard).

    images float [B, C, H, W] in [-1, 1] -> rounded to uint8 RGB (grayscale repeated) -> the network resizes to
    299×299 with TF1-compatible bilinear interpolation and normalises (x − 128)/128 -> [B, 2048] float32.
    `network` maps uint8 [B, 3, H, W] to [B, 2048] or a 1-tuple of it (torch-fidelity's FeatureExtractorInceptionV3).
    """

    name = "inception_v3_pool2048"
    num_features = 2048

    def __init__(self, network: nn.Module, batch_size: int = 64) -> None:
        super().__init__()
        self.network = network.eval()
        self.batch_size = batch_size

    @classmethod
    def from_local(cls, path: str | os.PathLike, batch_size: int = 64) -> "InceptionFeatures":
        """Build torch-fidelity's FeatureExtractorInceptionV3 from a local weights file (no download)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception-v3 weights not found at {path}; expected {INCEPTION_HINT}")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as err:
            raise ModuleNotFoundError(
                f"InceptionFeatures.from_local({path}) needs the torch-fidelity package, which imports torchvision "
                f"({err}). Install both with a torchvision build that matches your torch (pip would otherwise "
                f"replace torch); the classifier features need neither.") from err
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
        return cls(network, batch_size)

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        device = next(self.network.parameters()).device
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            feats = self.network(to_uint8_rgb(images[i:i + self.batch_size]).to(device))
            out.append((feats[0] if isinstance(feats, (tuple, list)) else feats).float())
        return torch.cat(out)


class _CLIPFeatures(nn.Module):
    """A transformers CLIPModel whose get_image_features / get_text_features return the projected embedding tensor.

    transformers >= 5 returns BaseModelOutputWithPooling (projection in pooler_output), which torchmetrics 1.9's
    CLIPScore cannot read (torchmetrics issue #3407, fixed after 1.9.0); transformers 4 returns the tensor.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    @property
    def config(self):
        return self.model.config

    @staticmethod
    def _tensor(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def load_clip(model_path: str | os.PathLike):
    """(CLIPModel, CLIPProcessor) from a local directory written by save_pretrained (model + processor files)."""
    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP model at {model_path}: expected a directory with config.json, weights and "
                                f"processor files (CLIPModel/CLIPProcessor.save_pretrained)")
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(model_path), local_files_only=True)
    processor = CLIPProcessor.from_pretrained(str(model_path), local_files_only=True)
    return model, processor


@torch.no_grad()
def clip_score(images: Tensor, prompts: list[str], model_path: str | os.PathLike, batch_size: int = 64) -> float:
    """torchmetrics CLIPScore: max(100 · mean_i cos(E_I(image_i), E_C(prompt_i)), 0).

    images float [N, C, H, W] in [-1, 1] (sent to the CLIP processor as uint8 RGB; it resizes and normalises);
    prompts: N strings. The scale is 100·cosine (torchmetrics, Hessel et al. 2021 use 2.5·max(cos, 0) instead);
    the value depends on the CLIP backbone at model_path, so report both.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
    model, processor = load_clip(model_path)
    metric = CLIPScore(model_name_or_path=lambda: (_CLIPFeatures(model), processor))
    for i in range(0, images.shape[0], batch_size):
        metric.update(to_uint8_rgb(images[i:i + batch_size]), list(prompts[i:i + batch_size]))
    return float(metric.compute())
