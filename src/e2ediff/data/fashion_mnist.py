"""Fashion-MNIST with class captions: the offline text-to-image miniature.

The images come from the Debian package `dataset-fashion-mnist` (install: `bash scripts/get_fashion_mnist.sh`), as IDX
files. Each class gets several caption templates, so a caption names a class in a few different phrasings, the way a
real caption set names one concept many ways.

Model images are float32 [N, 1, 32, 32] in [-1, 1]: the 28×28 images padded by 2 px on each side with
the background value -1 (so a 2×2-patch or 8×-downsampling network sees a power-of-two size).
"""
from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

# Label order of the data set (label i is CLASS_NAMES[i]).
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# The nouns used in captions, same order.
CLASS_NOUNS = ("t-shirt", "pair of trousers", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle boot")
# Caption templates. Fields: {noun} ("ankle boot") and {a_noun} ("an ankle boot", with its indefinite article).
CAPTION_TEMPLATES = (
    "a photo of {a_noun}",
    "{noun}, product photo",
    "a black and white picture of {a_noun}",
    "{a_noun} on a plain background",
    "a grayscale image of {a_noun}",
    "a centered {noun}",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28  # as stored
MODEL_SIZE = 32  # as the models see it
PAD = (MODEL_SIZE - IMAGE_SIZE) // 2

SPLIT_FILES = {  # split -> (images file, labels file), without the optional .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "bash scripts/get_fashion_mnist.sh"
IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dim


# ----------------------------------------------------------------------------------------------------------- captions

def with_article(noun: str) -> str:
    """'ankle boot' -> 'an ankle boot', 'bag' -> 'a bag' (by the first letter; right for every noun used here)."""
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def caption(label: int, template: int) -> str:
    """The caption of class `label` written with CAPTION_TEMPLATES[template]."""
    noun = CLASS_NOUNS[label]
    return CAPTION_TEMPLATES[template].format(noun=noun, a_noun=with_article(noun))


def class_captions() -> tuple[list[str], list[int]]:
    """Every caption, class-major (caption index = label * len(CAPTION_TEMPLATES) + template), and its class."""
    captions, labels = [], []
    for label in range(NUM_CLASSES):
        for template in range(len(CAPTION_TEMPLATES)):
            captions.append(caption(label, template))
            labels.append(label)
    return captions, labels


def caption_index(label: int, template: int) -> int:
    """Index of caption(label, template) in class_captions()[0]."""
    return label * len(CAPTION_TEMPLATES) + template


def default_prompts() -> list[str]:
    """One caption per class (template 0), in label order: the prompts of sampling grids."""
    return [caption(label, 0) for label in range(NUM_CLASSES)]


# ------------------------------------------------------------------------------------------------------------- files

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file of unsigned bytes (images: magic 0x00000803, labels: 0x00000801), gzipped (.gz) or raw.

    Returns a uint8 array of the declared shape. Raises ValueError naming the file when the magic number is wrong,
    the file is truncated or longer than declared, or the gzip stream is broken.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot read: {e}") from e
    if len(data) < 4:
        raise ValueError(f"{path}: truncated: {len(data)} bytes, not even the 4-byte IDX magic number")
    magic = int.from_bytes(data[:4], "big")
    if magic not in (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC):
        raise ValueError(f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{IDX_IMAGES_MAGIC:08x} (images) "
                         f"or 0x{IDX_LABELS_MAGIC:08x} (labels)")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated: header of {header} bytes, found {len(data)}")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    found = len(data) - header
    if found != expected:
        what = "truncated" if found < expected else "too long"
        raise ValueError(f"{path}: {what}: header says {'×'.join(map(str, dims))} = {expected} bytes, found {found}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _idx_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def _has_fashion_mnist(directory: Path) -> bool:
    return all(_idx_file(directory, name) is not None for files in SPLIT_FILES.values() for name in files)


def cache_dir() -> Path:
    """$E2EDIFF_CACHE, default ~/.cache/e2ediff."""
    return Path(os.environ.get("E2EDIFF_CACHE", Path.home() / ".cache" / "e2ediff")).expanduser()


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the Fashion-MNIST IDX files ({train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]).

    An explicit `data_dir` must hold them, and so must $E2EDIFF_DATA_DIR when it is set. Otherwise the search order
    is: $E2EDIFF_CACHE/fashion-mnist/usr/share/datasets/fashion-mnist (where the install script unpacks without
    root), /usr/share/datasets/fashion-mnist (the Debian package).
    """
    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        if not _has_fashion_mnist(directory):
            raise FileNotFoundError(f"{directory} does not hold the Fashion-MNIST files "
                                    f"{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]; install them with "
                                    f"`{INSTALL_HINT}` or pass the folder that holds them")
        return directory
    if os.environ.get("E2EDIFF_DATA_DIR"):  # set on purpose: never fall back silently to another copy
        directory = Path(os.environ["E2EDIFF_DATA_DIR"]).expanduser()
        if not _has_fashion_mnist(directory):
            raise FileNotFoundError(f"E2EDIFF_DATA_DIR={directory} does not hold the Fashion-MNIST files "
                                    f"{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]; install them with "
                                    f"`{INSTALL_HINT}` or unset E2EDIFF_DATA_DIR")
        return directory
    candidates = [cache_dir() / "fashion-mnist" / "usr" / "share" / "datasets" / "fashion-mnist"]
    candidates.append(SYSTEM_DIR)
    for directory in candidates:
        if _has_fashion_mnist(directory):
            return directory
    raise FileNotFoundError("Fashion-MNIST not found; looked in " + ", ".join(map(str, candidates))
                            + f". Install it with `{INSTALL_HINT}` or set E2EDIFF_DATA_DIR to the folder holding "
                            "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]")


def load_fashion_mnist(split: str, data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of split "train" (N = 60000) or "test" (N = 10000)."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    directory = find_fashion_mnist(data_dir)
    images_path, labels_path = (_idx_file(directory, name) for name in SPLIT_FILES[split])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{images_path}: images have shape {images.shape}, expected [N, 28, 28]")
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: labels have shape {labels.shape}, expected [N]")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise ValueError(f"{labels_path}: label {labels.max()} out of range 0..{NUM_CLASSES - 1}")
    return images, labels.astype(np.int64)


def train_val_split(n: int, n_val: int, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed held-out split of range(n): (train indices, validation indices), each sorted, int64.

    The same (n, n_val, seed) always gives the same split, on any machine (torch's CPU generator).
    """
    if not 0 <= n_val <= n:
        raise ValueError(f"n_val must be in 0..n = 0..{n}, got {n_val}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


# ------------------------------------------------------------------------------------------------------ model images

def to_model_images(images: np.ndarray | Tensor) -> Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 32, 32] in [-1, 1], padded by 2 px with the background value -1."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 3:
        raise ValueError(f"images must be uint8 [N, H, W], got {x.dtype} {tuple(x.shape)}")
    x = x.float() / 127.5 - 1.0
    return torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD), value=-1.0).unsqueeze(1)


def from_model_images(x: Tensor) -> np.ndarray:
    """float [N, 1, 32, 32] in [-1, 1] -> uint8 [N, 28, 28]: crop the padding, clamp, round to the nearest level."""
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[2:] != (MODEL_SIZE, MODEL_SIZE):
        raise ValueError(f"model images must be [N, 1, {MODEL_SIZE}, {MODEL_SIZE}], got {tuple(x.shape)}")
    x = x.detach()[:, 0, PAD:PAD + IMAGE_SIZE, PAD:PAD + IMAGE_SIZE].float().cpu()
    return ((x + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8).numpy()


# ------------------------------------------------------------------------------------------------------------ dataset

def _stable_choice(seed: int, epoch: int, index: int, n: int) -> int:
    """An integer in [0, n) fixed by (seed, epoch, index), the same in every process and Python version."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


class FashionMNISTText(Dataset):
    """Fashion-MNIST images with class captions.

    Item i: {"image": float32 [1, 32, 32] in [-1, 1], "label": int64 [], "caption_index": int64 []}, where
    caption_index indexes `self.captions` (= class_captions()[0]) and picks one of the label's templates, fixed by
    (seed, epoch, index in the split): call `set_epoch` at each epoch for a new draw.
    `indices` (e.g. from train_val_split) selects a subset of the split.
    """

    def __init__(self, split: str, data_dir: str | os.PathLike | None = None,
                 indices: Tensor | np.ndarray | list[int] | None = None, seed: int = 0):
        images, labels = load_fashion_mnist(split, data_dir)
        if indices is None:
            self.indices = np.arange(len(labels))
        else:
            self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
            if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(labels)):
                raise ValueError(f"indices must lie in 0..{len(labels) - 1} for split {split!r}, got "
                                 f"{self.indices.min()}..{self.indices.max()}")
        self.split = split
        self.images = images[self.indices]
        self.labels = labels[self.indices]
        self.seed = seed
        self.epoch = 0
        self.captions, self.caption_labels = class_captions()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        label = int(self.labels[i])
        template = _stable_choice(self.seed, self.epoch, int(self.indices[i]), len(CAPTION_TEMPLATES))
        return {"image": to_model_images(self.images[i:i + 1])[0],
                "label": torch.tensor(label, dtype=torch.int64),
                "caption_index": torch.tensor(caption_index(label, template), dtype=torch.int64)}
