"""A folder of images with captions: how users bring their own text-to-image data.

Layout:
    root/captions.jsonl      one JSON object per line: {"file": "relative/path.png", "caption": "a red boot"}
    root/relative/path.png   any image PIL reads

Every image is converted to grayscale (channels=1) or RGB (channels=3), resized to size×size (bicubic; non-square
images are stretched, so crop them beforehand if that matters) and scaled to [-1, 1].
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

CAPTION_FIELDS = ("file", "caption")


def read_captions_jsonl(path: Path) -> list[tuple[str, str]]:
    """(file, caption) pairs of a captions.jsonl; blank lines are skipped.

    Raises ValueError naming the line number and the field when a line is not a JSON object with exactly the string
    fields "file" (a relative path) and "caption" (non-empty).
    """
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object with fields {list(CAPTION_FIELDS)}, "
                                 f"got {type(record).__name__}")
            for field in CAPTION_FIELDS:
                if field not in record:
                    raise ValueError(f"{where}: missing field {field!r}")
                if not isinstance(record[field], str) or not record[field].strip():
                    raise ValueError(f"{where}: field {field!r} must be a non-empty string, got {record[field]!r}")
            extra = sorted(set(record) - set(CAPTION_FIELDS))
            if extra:
                raise ValueError(f"{where}: unexpected field {extra[0]!r} (allowed: {list(CAPTION_FIELDS)})")
            if Path(record["file"]).is_absolute() or ".." in Path(record["file"]).parts:
                raise ValueError(f"{where}: field 'file' must be a path inside the folder (relative, no '..'), "
                                 f"got {record['file'][:120]!r}")
            pairs.append((record["file"], record["caption"]))
    return pairs


class ImageFolderText(Dataset):
    """Images with captions from `root/captions.jsonl`.

    Item i: {"image": float32 [channels, size, size] in [-1, 1], "caption_index": int64 [] indexing `captions`,
    "label": int64 [] = -1 (no class)}.
    skip_bad_files: False -> an image PIL cannot read raises ValueError naming its path (checked when the dataset is
    built); True -> such images are left out, with one warning that counts them.
    """

    def __init__(self, root: str | os.PathLike, size: int = 32, channels: int = 1, skip_bad_files: bool = False,
                 captions_file: str = "captions.jsonl"):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if size < 1:
            raise ValueError(f"size must be a positive number of pixels, got {size}")
        self.root = Path(root)
        self.size = size
        self.channels = channels
        jsonl = self.root / captions_file
        if not jsonl.is_file():
            raise FileNotFoundError(f"{jsonl} not found: an image folder needs a {captions_file} with one "
                                    '{"file": ..., "caption": ...} object per line')
        pairs = read_captions_jsonl(jsonl)
        if not pairs:
            raise ValueError(f"{jsonl} lists no images")
        good, bad = [], []
        root = self.root.resolve()
        for file, text in pairs:
            if not (self.root / file).resolve().is_relative_to(root):   # a symlink that leads out of the folder
                raise ValueError(f"{self.root / file}: leads outside the dataset folder {self.root}; refused")
            error = self._check(self.root / file)
            if error is None:
                good.append((file, text))
            elif skip_bad_files:
                bad.append((file, error))
            else:
                raise ValueError(f"{self.root / file}: cannot read image ({error})")
        if bad:
            warnings.warn(f"{self.root}: skipped {len(bad)} of {len(pairs)} unreadable images "
                          f"(first: {bad[0][0]}: {bad[0][1]})", stacklevel=2)
        if not good:
            raise ValueError(f"{jsonl}: none of the {len(pairs)} listed images can be read")
        self.files = [file for file, _ in good]
        self._captions = sorted({text for _, text in good})
        position = {text: i for i, text in enumerate(self._captions)}
        self.caption_indices = [position[text] for _, text in good]

    @staticmethod
    def _check(path: Path) -> str | None:
        """None if PIL can open and verify the image, else the reason."""
        if path.exists() and not path.is_file():   # a FIFO or device would block the reader or never end
            return "not a regular file"
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception as e:  # PIL raises many types for broken files
            return f"{type(e).__name__}: {e}"
        return None

    @property
    def captions(self) -> list[str]:
        """The distinct captions, sorted; caption_index indexes this list."""
        return list(self._captions)

    def __len__(self) -> int:
        return len(self.files)

    def load_image(self, i: int) -> Tensor:
        """Image i as float32 [channels, size, size] in [-1, 1]."""
        path = self.root / self.files[i]
        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
                img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
                pixels = np.asarray(img, dtype=np.uint8)
        except Exception as e:
            raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
        x = torch.from_numpy(pixels.copy()).float() / 127.5 - 1.0
        return x.unsqueeze(0) if self.channels == 1 else x.permute(2, 0, 1).contiguous()

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.load_image(i),
                "caption_index": torch.tensor(self.caption_indices[i], dtype=torch.int64),
                "label": torch.tensor(-1, dtype=torch.int64)}
