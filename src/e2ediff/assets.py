"""What the commands share: the training data with its caption features, and the model files they read.

A *pipeline file* (``model.safetensors`` of a teacher, student or E2E run) is self-contained for sampling: the
denoiser's EMA weights under ``net/``, the autoencoder under ``autoencoder/``, and in its metadata the network and
autoencoder configs, the noise schedule, the parameterization, the default sampler and the text encoder's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from e2ediff.checkpoint import (CheckpointError, load_model_file, load_state_strict, read_data_checksum,
                                read_model_meta, split_prefix, with_prefix)
from e2ediff.conditioning import TextCond
from e2ediff.config import DataConfig, from_dict
from e2ediff.data.fashion_mnist import cache_dir


# ----------------------------------------------------------------------------------------------------------------------
# Training data


def class_index_table(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of each class's items as a table [C, W] (rows padded by cycling) and the count per class [C], so that
    ``table[c, (u * counts[c]).long()]`` draws an item of class c uniformly for u in [0, 1)."""
    per_class = [torch.nonzero(labels == c).flatten() for c in range(int(labels.max()) + 1)]
    width = max(len(p) for p in per_class)
    table = torch.stack([p[torch.arange(width, device=p.device) % len(p)] for p in per_class])
    return table, torch.tensor([len(p) for p in per_class], device=labels.device)


def draw_from_classes(table: torch.Tensor, counts: torch.Tensor, classes: torch.Tensor, n: int,
                      generator: torch.Generator) -> torch.Tensor:
    """n items of each class in ``classes`` [C'] drawn uniformly from a ``class_index_table`` -> indices [C', n]."""
    u = torch.rand(len(classes), n, generator=generator, device=generator.device).to(counts.device)
    classes = classes.to(counts.device)
    return table[classes].gather(1, (u * counts[classes, None]).long())


class TrainingData:
    """Images (kept as uint8 / model-format tensors on the device) + captions + their cached MiniLM features.

    Fashion-MNIST: the train split minus a fixed validation hold-out (``data.val_size``, seed 0) — or exactly that
    hold-out with ``split="val"``, or the test split. Each draw picks one of the image's class captions at random
    (from the step's generator). Folder datasets: each image has its own caption.
    """

    def __new__(cls, cfg: DataConfig, *args, **kwargs):
        if cfg.dataset == "fashion-scenes":   # its own loader (data/scenes.py), with the same interface
            from e2ediff.data.scenes import SceneTrainingData

            return SceneTrainingData(cfg, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, cfg: DataConfig, split: str = "train", device: torch.device | str = "cpu",
                 prompt_cache: str | Path | None = None):
        from e2ediff.data.fashion_mnist import class_captions, load_fashion_mnist, to_model_images, train_val_split

        self.device = torch.device(device)
        if cfg.dataset == "fashion-mnist":
            images, labels = load_fashion_mnist("test" if split == "test" else "train", cfg.data_dir)
            if split in ("train", "val"):
                train_idx, val_idx = train_val_split(len(images), cfg.val_size, seed=0)
                keep = train_idx if split == "train" else val_idx
                images, labels = images[keep], labels[keep]
            elif split != "test":
                raise ValueError(f"split must be train, val or test, got {split!r}")
            self.captions, caption_class = class_captions()
            self.images = to_model_images(torch.as_tensor(images)).to(self.device)
            self.labels = torch.as_tensor(labels, dtype=torch.long).to(self.device)
            classes = torch.as_tensor(caption_class)
            self._class_caps, self._class_ncaps = (t.to(self.device) for t in class_index_table(classes))
            self._fixed_caption = None
        elif cfg.dataset == "folder":
            from e2ediff.data.folder import ImageFolderText

            if cfg.data_dir is None:
                raise ValueError("data.data_dir must name the image folder when data.dataset=folder")
            ds = ImageFolderText(cfg.data_dir, size=32, channels=cfg.image_channels, skip_bad_files=cfg.skip_bad_files,
                                 captions_file=cfg.captions_file or "captions.jsonl")
            items = [ds[i] for i in range(len(ds))]
            self.captions = list(ds.captions)
            self.images = torch.stack([it["image"] for it in items]).to(self.device)
            self.labels = torch.full((len(items),), -1, dtype=torch.long, device=self.device)
            self._fixed_caption = torch.tensor([int(it["caption_index"]) for it in items], device=self.device)
        else:
            raise ValueError(f"data.dataset={cfg.dataset!r} is not fashion-mnist or folder")
        self.prompts = load_prompt_cache(self.captions, cfg.prompt_cache if prompt_cache is None else prompt_cache)
        self._tokens = self.prompts.tokens.to(self.device)
        self._mask = self.prompts.mask.to(self.device)
        self._pooled = self.prompts.pooled.to(self.device)

    def __len__(self) -> int:
        return len(self.images)

    def caption_indices(self, idx: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self._fixed_caption is not None:
            return self._fixed_caption[idx]
        labels = self.labels[idx]
        if generator is None:  # the first template of each class
            return self._class_caps[labels, 0]
        u = torch.rand(len(idx), generator=generator, device=generator.device).to(self.device)
        pick = (u * self._class_ncaps[labels]).long()
        return self._class_caps[labels, pick]

    def cond(self, caption_idx: torch.Tensor) -> TextCond:
        caption_idx = caption_idx.to(self.device)
        return TextCond(self._tokens[caption_idx], self._mask[caption_idx], self._pooled[caption_idx])

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None):
        """(images [B,C,32,32] in [-1,1], TextCond, labels [B], caption indices [B]) for dataset indices ``idx``."""
        idx = idx.to(self.device)
        caps = self.caption_indices(idx, generator)
        return self.images[idx], self.cond(caps), self.labels[idx], caps


def default_prompt_cache_path(captions: list[str], max_length: int = 16) -> Path:
    """Where the commands keep the MiniLM features of a caption list (named by the cache key)."""
    from e2ediff.models.text import ENCODER_NAME, cache_key

    return cache_dir() / f"prompts-{cache_key(ENCODER_NAME, list(captions), max_length)[:16]}.safetensors"


def load_prompt_cache(captions: list[str], path: str | Path | None):
    """The caption-feature cache for exactly ``captions``: read if present (validated), else built with MiniLM."""
    from e2ediff.models.text import ENCODER_NAME, PromptCache

    path = Path(path) if path is not None else default_prompt_cache_path(captions)
    if path.exists():
        return PromptCache.load(path, expect_captions=list(captions), expect_encoder=ENCODER_NAME)
    return PromptCache.get_or_build(path, list(captions))


# ----------------------------------------------------------------------------------------------------------------------
# Model files


@dataclass
class Pipeline:
    """A denoiser + autoencoder read from a pipeline file, with the file's metadata."""

    denoiser: nn.Module
    autoencoder: nn.Module
    meta: dict
    path: Path | None = None

    @property
    def net(self) -> nn.Module:
        return self.denoiser.net

    def to(self, device) -> "Pipeline":
        self.denoiser.to(device)
        self.autoencoder.to(device)
        return self


def build_autoencoder(config: dict):
    from e2ediff.models.autoencoder import AutoencoderConfig, AutoencoderKL

    return AutoencoderKL(from_dict(AutoencoderConfig, config))


def build_net(config: dict):
    from e2ediff.models.dit import DiT, DiTConfig

    return DiT(from_dict(DiTConfig, config))


def autoencoder_meta(ae) -> dict:
    from e2ediff.config import to_dict

    return {"autoencoder": to_dict(ae.config), "scaling_factor": float(ae.scaling_factor)}


def with_autoencoder(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """A pipeline file's tensors with its autoencoder: its own ``autoencoder/`` tensors, or — for a file written by
    ``e2ediff convert --share-autoencoder`` — those of the autoencoder file beside it that its metadata names, checked
    against the checksum and configuration recorded there (so a swapped or retrained autoencoder is refused)."""
    ref = meta.get("autoencoder_file")
    if ref is None or any(k.startswith("autoencoder/") for k in tensors):
        return tensors
    if not isinstance(ref, dict) or not isinstance(ref.get("file"), str) or not isinstance(ref.get("sha256"), str):
        raise CheckpointError(f"{path}: metadata key 'autoencoder_file' must be {{file, sha256}}, got {ref!r}")
    name = ref["file"]
    if Path(name).name != name or name in ("", ".", ".."):
        raise CheckpointError(f"{path}: metadata key 'autoencoder_file.file' must be a file name beside it, "
                              f"got {name!r}")
    shared = path.parent / name
    if not shared.is_file():
        raise CheckpointError(f"{path} shares its autoencoder with {shared}, which does not exist; keep the two "
                              f"files in one folder (or write a self-contained copy with `e2ediff convert`)")
    ae_meta = read_model_meta(shared) if read_data_checksum(shared) == ref["sha256"] else None   # header only
    if ae_meta is None or ae_meta.get("autoencoder") != meta.get("autoencoder"):
        raise CheckpointError(f"{path} was written against another autoencoder than {shared} (sha256 or "
                              f"configuration differ); it cannot be loaded with this one")
    ae_tensors, _ = load_model_file(shared)   # verifies the data against that checksum
    return {**tensors, **{k: v for k, v in ae_tensors.items() if k.startswith("autoencoder/")}}


def load_autoencoder(path: str | Path):
    """An autoencoder from an autoencoder export or from any pipeline file (its ``autoencoder/`` tensors)."""
    tensors, meta = load_model_file(Path(path))
    tensors = with_autoencoder(Path(path), tensors, meta)
    if "autoencoder" not in meta:
        raise CheckpointError(f"{path} holds no autoencoder (kind {meta.get('kind')!r})")
    ae = build_autoencoder(meta["autoencoder"])
    load_state_strict(ae, split_prefix(tensors, "autoencoder"), f"{path} (autoencoder)")
    return ae.eval().requires_grad_(False)


def pipeline_tensors(net_weights: dict[str, torch.Tensor], autoencoder) -> dict[str, torch.Tensor]:
    return {**with_prefix(net_weights, "net"), **with_prefix(autoencoder.state_dict(), "autoencoder")}


def export_pipeline(kind: str, net_weights: dict[str, torch.Tensor], net_config, autoencoder, schedule: str,
                    prediction: str, sampler: dict, captions: list[str], text_encoder: str | None = None,
                    **extra) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a pipeline file: the net's sampling weights + the autoencoder, and what sampling needs."""
    from e2ediff.config import to_dict
    from e2ediff.models.text import ENCODER_NAME

    meta = {"kind": kind, "net": to_dict(net_config), **autoencoder_meta(autoencoder), "schedule": schedule,
            "prediction": prediction, "sampler": sampler, "text_encoder": text_encoder or ENCODER_NAME,
            "captions": list(captions), **extra}
    return pipeline_tensors(net_weights, autoencoder), meta


def load_pipeline(path: str | Path, device: torch.device | str = "cpu") -> Pipeline:
    from e2ediff.denoiser import Denoiser
    from e2ediff.schedules import VPSchedule

    path = Path(path)
    if path.is_dir():  # a run folder
        path = path / "model.safetensors"
    tensors, meta = load_model_file(path)
    tensors = with_autoencoder(path, tensors, meta)
    if "net" not in meta:
        raise CheckpointError(f"{path} is not a denoiser pipeline file (kind {meta.get('kind')!r})")
    net = build_net(meta["net"])
    load_state_strict(net, split_prefix(tensors, "net"), f"{path} (net)")
    ae = build_autoencoder(meta["autoencoder"])
    load_state_strict(ae, split_prefix(tensors, "autoencoder"), f"{path} (autoencoder)")
    denoiser = Denoiser(net, VPSchedule.from_name(meta["schedule"]), meta["prediction"])
    pipe = Pipeline(denoiser.eval().requires_grad_(False), ae.eval().requires_grad_(False), meta, path)
    return pipe.to(device)
