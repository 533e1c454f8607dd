"""Data: IDX reader, Fashion-MNIST search and loading, captions, padding, datasets, image folders."""
from __future__ import annotations

import gzip
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from e2ediff.data import fashion_mnist as fm
from e2ediff.data import (CAPTION_TEMPLATES, CLASS_NOUNS, FashionMNISTText, ImageFolderText, class_captions,
                          default_prompts, find_fashion_mnist, from_model_images, load_fashion_mnist, read_idx,
                          to_model_images, train_val_split)


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file of unsigned bytes, written independently of the reader."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_split(directory, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = idx_bytes(array)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)


def fake_fashion_mnist(directory, n_train=30, n_test=10, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        write_split(directory, prefix, images, labels, gz)
        data[prefix] = (images, labels)
    return data


# ------------------------------------------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    images = np.random.default_rng(1).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    write_split(tmp_path, "train", images, labels, gz)
    suffix = ".gz" if gz else ""
    got_images = read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}")
    got_labels = read_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}")
    assert got_images.dtype == np.uint8 and got_images.shape == (5, 28, 28)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_read_idx_wrong_magic(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((2, 28, 28), np.uint8), magic=0x00000D03))  # float32 code
    with pytest.raises(ValueError, match=r"x-idx3-ubyte: bad IDX magic number 0x00000d03"):
        read_idx(path)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_truncated(tmp_path, gz):
    data = idx_bytes(np.zeros((60000, 28, 28), np.uint8))[:16 + 1000]
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError) as err:
        read_idx(path)
    assert str(err.value) == f"{path}: truncated: header says 60000×28×28 = 47040000 bytes, found 1000"


def test_read_idx_too_long_and_broken_gzip(tmp_path):
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(4, np.uint8)) + b"\x00")
    with pytest.raises(ValueError, match="too long: header says 4 = 4 bytes, found 5"):
        read_idx(path)
    broken = tmp_path / "labels-idx1-ubyte.gz"
    broken.write_bytes(gzip.compress(idx_bytes(np.zeros(400, np.uint8)))[:30])
    with pytest.raises(ValueError, match="labels-idx1-ubyte.gz: cannot read"):
        read_idx(broken)


def test_load_label_count_mismatch(tmp_path):
    fake_fashion_mnist(tmp_path)
    labels = np.zeros(29, np.uint8)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(ValueError, match="holds 30 images but .*train-labels-idx1-ubyte.gz holds 29 labels"):
        load_fashion_mnist("train", tmp_path)


def test_load_label_out_of_range(tmp_path):
    fake_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(10, 10, np.uint8))))
    with pytest.raises(ValueError, match="label 10 out of range 0..9"):
        load_fashion_mnist("test", tmp_path)


@pytest.mark.parametrize("gz", [True, False])
def test_load_fake_split(tmp_path, gz):
    data = fake_fashion_mnist(tmp_path, gz=gz)
    images, labels = load_fashion_mnist("test", tmp_path)
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    np.testing.assert_array_equal(images, data["t10k"][0])
    np.testing.assert_array_equal(labels, data["t10k"][1])
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist("val", tmp_path)


# ---------------------------------------------------------------------------------------------------------- search

def test_find_search_order(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    user_dir = cache / "fashion-mnist" / "usr" / "share" / "datasets" / "fashion-mnist"
    env_dir = tmp_path / "env"
    for d in (user_dir, env_dir):
        d.mkdir(parents=True)
        fake_fashion_mnist(d, gz=(d == user_dir))
    monkeypatch.setenv("E2EDIFF_CACHE", str(cache))
    monkeypatch.setenv("E2EDIFF_DATA_DIR", str(env_dir))
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    assert find_fashion_mnist() == env_dir
    monkeypatch.delenv("E2EDIFF_DATA_DIR")
    assert find_fashion_mnist() == user_dir  # where the install script unpacks without root
    explicit = tmp_path / "explicit"
    explicit.mkdir()
    fake_fashion_mnist(explicit)
    assert find_fashion_mnist(explicit) == explicit


def test_find_missing_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("E2EDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("E2EDIFF_DATA_DIR", raising=False)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    with pytest.raises(FileNotFoundError) as err:
        find_fashion_mnist()
    message = str(err.value)
    assert str(tmp_path / "system") in message and str(tmp_path / "cache") in message
    assert "bash scripts/get_fashion_mnist.sh" in message
    partial = tmp_path / "partial"
    partial.mkdir()
    fake_fashion_mnist(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="partial does not hold"):
        find_fashion_mnist(partial)


def test_real_fashion_mnist_test_split():
    try:
        find_fashion_mnist()
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST not installed (bash scripts/get_fashion_mnist.sh)")
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 1000))


# -------------------------------------------------------------------------------------------------------- captions

def test_captions():
    captions, labels = class_captions()
    n_templates = len(CAPTION_TEMPLATES)
    assert len(CLASS_NOUNS) == 10 and len(captions) == 10 * n_templates == len(labels)
    assert labels == [c for c in range(10) for _ in range(n_templates)]
    assert len(set(captions)) == len(captions)
    for index, (text, label) in enumerate(zip(captions, labels)):
        assert CLASS_NOUNS[label] in text
        assert fm.caption_index(label, index % n_templates) == index
    assert "a photo of an ankle boot" in captions and "a photo of a t-shirt" in captions
    assert "an ankle boot on a plain background" in captions
    assert "a pair of trousers on a plain background" in captions
    assert not any(" a ankle" in c or c.startswith("a ankle") or " an t-shirt" in c for c in captions)
    prompts = default_prompts()
    assert prompts == [captions[fm.caption_index(c, 0)] for c in range(10)]
    assert prompts[9] == "a photo of an ankle boot"


# --------------------------------------------------------------------------------------------------------- padding

def test_padding_round_trip():
    x = np.random.default_rng(2).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    x[0, 0, 0], x[0, 0, 1] = 0, 255
    model = to_model_images(x)
    assert model.dtype == torch.float32 and model.shape == (4, 1, 32, 32)
    assert model.min() >= -1 and model.max() <= 1
    assert (model[:, :, :2] == -1).all() and (model[:, :, :, -2:] == -1).all()
    torch.testing.assert_close(model[:, 0, 2:30, 2:30].double(), torch.from_numpy(x).double() / 127.5 - 1)
    np.testing.assert_array_equal(from_model_images(model), x)
    np.testing.assert_array_equal(from_model_images(to_model_images(torch.from_numpy(x))), x)


def test_from_model_images_rounds_and_clamps():
    x = torch.full((1, 1, 32, 32), -1.0)
    x[0, 0, 2, 2] = 0.9 / 127.5 - 1  # level 0.9: rounds to 1 (truncation would give 0)
    x[0, 0, 2, 3] = 1.7
    x[0, 0, 2, 4] = -3.0
    out = from_model_images(x)
    assert out.dtype == np.uint8 and out.shape == (1, 28, 28)
    assert out[0, 0, 0] == 1 and out[0, 0, 1] == 255 and out[0, 0, 2] == 0
    with pytest.raises(ValueError, match="must be uint8"):
        to_model_images(np.zeros((1, 28, 28), np.float32))


# --------------------------------------------------------------------------------------------------------- dataset

def test_train_val_split():
    train, val = train_val_split(100, 20, seed=3)
    assert len(train) == 80 and len(val) == 20 and train.dtype == torch.int64
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    again_train, again_val = train_val_split(100, 20, seed=3)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert not torch.equal(val, train_val_split(100, 20, seed=4)[1])
    with pytest.raises(ValueError, match="n_val"):
        train_val_split(10, 11, seed=0)


def test_dataset_items(tmp_path):
    data = fake_fashion_mnist(tmp_path)
    captions, caption_labels = class_captions()
    ds = FashionMNISTText("train", tmp_path, indices=[3, 7, 12], seed=5)
    assert len(ds) == 3 and ds.captions == captions
    item = ds[1]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 32, 32)
    assert item["label"].dtype == torch.int64 and item["label"].shape == () and int(item["label"]) == 7
    assert item["caption_index"].dtype == torch.int64
    np.testing.assert_array_equal(from_model_images(item["image"][None]), data["train"][0][7][None])
    full = FashionMNISTText("train", tmp_path, seed=5)
    draws = []
    for epoch in range(4):
        full.set_epoch(epoch)
        indices = [int(full[i]["caption_index"]) for i in range(len(full))]
        assert all(caption_labels[c] == int(full[i]["label"]) for i, c in enumerate(indices))
        draws.append(indices)
    assert draws[0] != draws[1]  # a new draw each epoch
    assert len({c % len(CAPTION_TEMPLATES) for d in draws for c in d}) == len(CAPTION_TEMPLATES)
    full.set_epoch(0)
    assert [int(full[i]["caption_index"]) for i in range(len(full))] == draws[0]  # deterministic
    ds.set_epoch(2)
    assert int(ds[1]["caption_index"]) == draws[2][7]  # fixed by the index in the split, not in the subset
    with pytest.raises(ValueError, match="indices must lie in 0..29"):
        FashionMNISTText("train", tmp_path, indices=[30])


# --------------------------------------------------------------------------------------------------- image folders

def make_folder(root, records, size=(20, 12)):
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for r in records:
        if isinstance(r, dict) and "file" in r and r["file"].endswith(".png"):
            (root / r["file"]).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(root / r["file"])
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")


def test_image_folder_good(tmp_path):
    records = [{"file": "a.png", "caption": "a red boot"}, {"file": "sub/b.png", "caption": "a blue bag"},
               {"file": "c.png", "caption": "a red boot"}]
    make_folder(tmp_path / "f", records)
    ds = ImageFolderText(tmp_path / "f", size=16, channels=1)
    assert ds.captions == ["a blue bag", "a red boot"] and len(ds) == 3
    item = ds[1]
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    assert int(item["caption_index"]) == 0 and int(item["label"]) == -1
    assert int(ds[2]["caption_index"]) == 1
    # independent reference: PIL grayscale, bicubic resize, /127.5 - 1
    ref = np.asarray(Image.open(tmp_path / "f" / "sub" / "b.png").convert("L").resize((16, 16), Image.BICUBIC))
    torch.testing.assert_close(item["image"][0], torch.from_numpy(ref.astype(np.float32)) / 127.5 - 1)
    rgb = ImageFolderText(tmp_path / "f", size=8, channels=3)[0]["image"]
    assert rgb.shape == (3, 8, 8) and rgb.min() >= -1 and rgb.max() <= 1


@pytest.mark.parametrize("line, message", [
    ('{"file": "a.png"}', r"captions.jsonl:2: missing field 'caption'"),
    ('{"caption": "x"}', r"captions.jsonl:2: missing field 'file'"),
    ('{"file": "a.png", "caption": "x", "label": 3}', r"captions.jsonl:2: unexpected field 'label'"),
    ('{"file": "a.png", "caption": ""}', r"captions.jsonl:2: field 'caption' must be a non-empty string"),
    ('{"file": 5, "caption": "x"}', r"captions.jsonl:2: field 'file' must be a non-empty string"),
    ('["a.png", "x"]', r"captions.jsonl:2: expected a JSON object"),
    ('{"file": "a.png",', r"captions.jsonl:2: not valid JSON"),
])
def test_image_folder_bad_captions(tmp_path, line, message):
    make_folder(tmp_path / "f", [{"file": "a.png", "caption": "ok"}, line])
    with pytest.raises(ValueError, match=message):
        ImageFolderText(tmp_path / "f")


def test_image_folder_missing_jsonl(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions.jsonl not found"):
        ImageFolderText(tmp_path)


def test_image_folder_corrupt_image(tmp_path):
    records = [{"file": "a.png", "caption": "one"}, {"file": "b.png", "caption": "two"},
               {"file": "bad.png", "caption": "three"}, {"file": "gone.png", "caption": "four"}]
    make_folder(tmp_path / "f", records)
    (tmp_path / "f" / "bad.png").write_bytes(b"\x89PNG not really an image")
    (tmp_path / "f" / "gone.png").unlink()
    with pytest.raises(ValueError, match=r"bad.png: cannot read image"):
        ImageFolderText(tmp_path / "f")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolderText(tmp_path / "f", skip_bad_files=True)
    assert len(caught) == 1 and "skipped 2 of 4 unreadable images" in str(caught[0].message)
    assert len(ds) == 2 and ds.captions == ["one", "two"]
