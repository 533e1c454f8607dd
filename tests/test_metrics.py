"""Fréchet distance, KID, feature extractors, CLIP score and the per-row report, each against an independent
reference (scipy sqrtm, torchmetrics, float64 loops, direct CLIP computation)."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import poly_mmd

from e2ediff.metrics.classifier import ClassifierConfig, FashionClassifier, init_weights
from e2ediff.metrics.features import ClassifierFeatures, InceptionFeatures, clip_score, to_uint8_rgb
from e2ediff.metrics.frechet import FeatureStats, feature_stats, frechet_distance, kid, mmd2_unbiased
from e2ediff.metrics.report import (alignment, diversity, evaluate_samples, load_samples_npz,
                                    relative_diversity)


def scipy_fd(a: FeatureStats, b: FeatureStats) -> float:
    """pytorch-fid's formula: sqrtm of the product, real part."""
    covmean = np.real(scipy.linalg.sqrtm(a.sigma @ b.sigma))
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def correlated(rng, n, d, scale=1.0, shift=0.0):
    mix = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mix * scale + shift


# ------------------------------------------------------------------------------------------------------- Fréchet

def test_feature_stats_match_numpy():
    x = np.random.default_rng(0).normal(size=(50, 6))
    s = feature_stats(torch.from_numpy(x).float())
    np.testing.assert_allclose(s.mu, x.astype(np.float32).astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(x.astype(np.float32).astype(np.float64), rowvar=False), rtol=1e-10)
    assert s.n == 50 and s.sigma.dtype == np.float64


@pytest.mark.parametrize("d, n1, n2", [(4, 50, 80), (16, 200, 100), (32, 20, 25), (64, 500, 40), (8, 5, 300)])
def test_frechet_distance_matches_scipy(d, n1, n2):
    rng = np.random.default_rng(d + n1)
    a = feature_stats(correlated(rng, n1, d))
    b = feature_stats(correlated(rng, n2, d, scale=1.2, shift=0.3))
    fd = frechet_distance(a, b)
    assert fd == pytest.approx(scipy_fd(a, b), rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(fd, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9 * np.trace(a.sigma))


def test_frechet_distance_closed_form_diagonal():
    # diagonal Gaussians: FD = ‖μ1−μ2‖² + Σ (√s1 − √s2)²
    a = FeatureStats(mu=np.array([0.0, 1.0, 2.0]), sigma=np.diag([1.0, 4.0, 0.0]), n=10)
    b = FeatureStats(mu=np.array([1.0, 1.0, 0.0]), sigma=np.diag([9.0, 1.0, 2.0]), n=10)
    expected = 1 + 0 + 4 + (1 - 3) ** 2 + (2 - 1) ** 2 + (0 - np.sqrt(2)) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-12)


def test_feature_stats_save_load(tmp_path):
    s = feature_stats(np.random.default_rng(1).normal(size=(20, 5)), extractor="fashion_classifier")
    s.save(tmp_path / "ref.npz")
    t = FeatureStats.load(tmp_path / "ref.npz")
    assert np.array_equal(s.mu, t.mu) and np.array_equal(s.sigma, t.sigma)
    assert (t.n, t.extractor) == (20, "fashion_classifier")
    np.savez(tmp_path / "bad.npz", mu=s.mu, n=3)
    with pytest.raises(ValueError, match="bad.npz.*sigma"):
        FeatureStats.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        FeatureStats.load(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="different extractors"):
        frechet_distance(s, FeatureStats(s.mu, s.sigma, s.n, extractor="inception_v3_pool2048"))


# ------------------------------------------------------------------------------------------------------------- KID

def mmd2_loop(x: np.ndarray, y: np.ndarray, degree=3, coef=1.0) -> float:
    """Bińkowski et al. unbiased MMD², written as explicit float64 sums."""
    m, d = x.shape
    k = lambda u, v: (u @ v / d + coef) ** degree  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / m**2


def test_mmd2_matches_loop():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.5
    assert float(mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y))) == pytest.approx(mmd2_loop(x, y), rel=1e-10)


def test_kid_matches_torchmetrics_on_same_subsets():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(60, 8)), rng.normal(size=(50, 8)) * 1.3
    mean, std = kid(a, b, subsets=7, subset_size=20, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ref = torch.stack([poly_mmd(ta[torch.randperm(60, generator=g)[:20]], tb[torch.randperm(50, generator=g)[:20]])
                       for _ in range(7)])
    assert mean == pytest.approx(float(ref.mean()), rel=1e-10)
    assert std == pytest.approx(float(ref.std(unbiased=False)), rel=1e-10)
    assert mean > 0


def test_kid_bad_subset_size():
    with pytest.raises(ValueError, match="subset_size"):
        kid(np.zeros((5, 3)), np.zeros((10, 3)), subset_size=6, generator=torch.Generator())


# -------------------------------------------------------------------------------------------------------- features

@pytest.fixture(scope="module")
def small_classifier():
    model = FashionClassifier(ClassifierConfig(channels=(4, 8, 16)))
    init_weights(model, torch.Generator().manual_seed(0))
    return model.eval()


def test_classifier_features_match_fid_in_torchmetrics(small_classifier):
    g = torch.Generator().manual_seed(0)
    real = torch.rand(80, 1, 32, 32, generator=g) * 2 - 1
    fake = (torch.rand(70, 1, 32, 32, generator=g) * 2 - 1) * 0.5
    extractor = ClassifierFeatures(small_classifier, batch_size=32)
    assert extractor.num_features == 16 and extractor(real).shape == (80, 16)
    fid = FrechetInceptionDistance(feature=extractor)  # offline: the module has num_features
    fid.update(real, real=True)
    fid.update(fake, real=False)
    ours = frechet_distance(feature_stats(extractor(real)), feature_stats(extractor(fake)))
    assert ours > 0
    assert ours == pytest.approx(float(fid.compute()), rel=1e-4)


def test_to_uint8_rgb():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5]).view(1, 1, 1, 6)
    out = to_uint8_rgb(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 1, 6)
    assert out[0, :, 0].tolist() == [[0, 0, 128, 191, 255, 255]] * 3  # round((x+1)*127.5), clamped


def test_inception_features_wraps_network():
    seen = []

    class FakeInception(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2048))

        def forward(self, x):
            seen.append(x)
            return (x.float().mean(dim=(1, 2, 3))[:, None] * self.w,)

    ext = InceptionFeatures(FakeInception(), batch_size=3)
    images = torch.rand(5, 1, 32, 32) * 2 - 1
    feats = ext(images)
    assert feats.shape == (5, 2048) and [s.shape[0] for s in seen] == [3, 2]
    assert all(s.dtype == torch.uint8 and s.shape[1] == 3 for s in seen)
    torch.testing.assert_close(feats[:, 0], to_uint8_rgb(images).float().mean(dim=(1, 2, 3)))


def test_inception_from_local_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        InceptionFeatures.from_local(tmp_path / "missing.pth")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        (tmp_path / "w.pth").write_bytes(b"")
        with pytest.raises(ModuleNotFoundError, match="torch-fidelity"):
            InceptionFeatures.from_local(tmp_path / "w.pth")


# ------------------------------------------------------------------------------------------------------ CLIP score

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP with 32×32 images and a character-level BPE vocabulary, saved like a hub model."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = tmp_path_factory.mktemp("clip")
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(letters) + [c + "</w>" for c in letters]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    image_processor = CLIPImageProcessor(do_resize=False, do_center_crop=False)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokens), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    with torch.random.fork_rng(devices=[]):  # transformers initialises from the global generator: isolate it
        torch.manual_seed(3)
        model = CLIPModel(config).eval()
    model.save_pretrained(d)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(d)
    return d, model, tokenizer


def test_clip_score_equals_direct_cosine(tiny_clip):
    path, model, tokenizer = tiny_clip
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
    prompts = ["a photo of a bag", "a sneaker", "trousers", "a grayscale image of a coat"]
    score = clip_score(images, prompts, path, batch_size=3)
    # direct: CLIP normalisation of [0, 1] pixels, the model's projections, 100·cos averaged, clipped at 0
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixels = (to_uint8_rgb(images).double() / 255 - mean) / std
    text = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        e_img = model.get_image_features(pixel_values=pixels.float())
        e_txt = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
    e_img = e_img if isinstance(e_img, torch.Tensor) else e_img.pooler_output
    e_txt = e_txt if isinstance(e_txt, torch.Tensor) else e_txt.pooler_output
    cos = torch.nn.functional.cosine_similarity(e_img.double(), e_txt.double(), dim=-1)
    expected = max(100 * float(cos.mean()), 0.0)
    assert expected > 0  # the seed gives a positive mean cosine, so the clip at 0 does not hide a mismatch
    assert score == pytest.approx(expected, rel=1e-4)


def test_clip_score_errors(tmp_path, tiny_clip):
    with pytest.raises(FileNotFoundError, match="no_clip"):
        clip_score(torch.zeros(1, 1, 32, 32), ["a bag"], tmp_path / "no_clip")
    with pytest.raises(ValueError, match="prompts"):
        clip_score(torch.zeros(2, 1, 32, 32), ["a bag"], tiny_clip[0])


# ---------------------------------------------------------------------------------------------------------- report

def diversity_loop(f: np.ndarray, y: np.ndarray) -> float:
    means = []
    for c in np.unique(y):
        fc = f[y == c]
        pairs = [np.linalg.norm(fc[i] - fc[j]) for i in range(len(fc)) for j in range(i + 1, len(fc))]
        if pairs:
            means.append(np.mean(pairs))
    return float(np.mean(means))


def test_diversity_matches_loop():
    rng = np.random.default_rng(4)
    f, y = rng.normal(size=(30, 5)), rng.integers(0, 4, size=30)
    y[0] = 9  # a class with one sample is skipped
    assert diversity(f, y) == pytest.approx(diversity_loop(f, y), rel=1e-12)


def test_relative_diversity_collapse_and_real():
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(5), 40)
    centers = rng.normal(size=(5, 8)) * 3
    real = centers[y] + rng.normal(size=(200, 8))
    real2 = centers[y] + rng.normal(size=(200, 8))
    collapsed = np.stack([real[y == c].mean(0) for c in y])
    assert relative_diversity(collapsed, y, real, y) == pytest.approx(0.0, abs=1e-12)
    assert relative_diversity(real2, y, real, y) == pytest.approx(1.0, abs=0.05)
    # only the generated classes count
    sub = y < 2
    assert relative_diversity(real2[sub], y[sub], real, y) == pytest.approx(
        diversity(real2[sub], y[sub]) / diversity(real[sub], y[sub]), rel=1e-12)


def test_alignment(small_classifier):
    images = torch.rand(10, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    pred = small_classifier(images).argmax(1)
    assert alignment(small_classifier, images, pred) == 1.0
    assert alignment(small_classifier, images, torch.cat([pred[:4], (pred[4:] + 1) % 10])) == pytest.approx(0.4)


def test_evaluate_samples(small_classifier):
    g = torch.Generator().manual_seed(2)
    real_u8 = torch.randint(0, 256, (60, 28, 28), generator=g, dtype=torch.uint8)
    real_labels = np.arange(60) % 3
    from e2ediff.data.fashion_mnist import to_model_images

    extractor = ClassifierFeatures(small_classifier)
    real_feats = extractor(to_model_images(real_u8)).double()
    reference = feature_stats(real_feats, extractor=extractor.name)
    gen_u8 = torch.randint(0, 128, (40, 28, 28), generator=g, dtype=torch.uint8).numpy()
    gen_labels = np.arange(40) % 3
    out = evaluate_samples(gen_u8, gen_labels, classifier=small_classifier, reference=reference,
                           real_features_for_kid=real_feats, real_labels=real_labels, seed=0, kid_subsets=5)
    assert set(out) == {"fd", "kid_mean", "kid_std", "n", "alignment", "diversity_rel"} and out["n"] == 40
    gen_feats = extractor(to_model_images(torch.from_numpy(gen_u8))).double()
    assert out["fd"] == pytest.approx(frechet_distance(feature_stats(gen_feats), reference), rel=1e-9)
    assert out["kid_mean"] == pytest.approx(
        kid(gen_feats, real_feats, subsets=5, subset_size=40, generator=torch.Generator().manual_seed(0))[0])
    assert out["diversity_rel"] == pytest.approx(relative_diversity(gen_feats, gen_labels, real_feats, real_labels))
    # the real set against its own statistics: FD 0
    self_eval = evaluate_samples(real_u8.numpy(), None, classifier=small_classifier, reference=reference,
                                 real_features_for_kid=real_feats, real_labels=None, seed=0, kid_subsets=2)
    assert set(self_eval) == {"fd", "kid_mean", "kid_std", "n"}
    assert self_eval["fd"] == pytest.approx(0.0, abs=1e-8)


def test_load_samples_npz(tmp_path):
    images = np.zeros((3, 28, 28), np.uint8)
    np.savez(tmp_path / "good.npz", images=images, labels=np.array([0, 1, 2]),
             prompts=np.array(["a bag", "a coat", "a shirt"]))
    x, y, p = load_samples_npz(tmp_path / "good.npz")
    assert x.shape == (3, 28, 28) and y.tolist() == [0, 1, 2] and p.tolist() == ["a bag", "a coat", "a shirt"]
    np.savez(tmp_path / "only_images.npz", images=images)
    assert load_samples_npz(tmp_path / "only_images.npz")[1:] == (None, None)
    cases = {
        "float.npz": (dict(images=images.astype(np.float32)), "images"),
        "shape.npz": (dict(images=np.zeros((3, 32, 32), np.uint8)), "images"),
        "nolabel.npz": (dict(labels=np.zeros(3, int)), "images"),
        "labels.npz": (dict(images=images, labels=np.zeros(2, int)), "labels"),
        "flabels.npz": (dict(images=images, labels=np.zeros(3, float)), "labels"),
        "prompts.npz": (dict(images=images, prompts=np.array(["a", "b"])), "prompts"),
        "objprompts.npz": (dict(images=images, prompts=np.array(["a", 1, None], dtype=object)), "prompts"),
    }
    for name, (fields, field) in cases.items():
        np.savez(tmp_path / name, **fields)
        with pytest.raises(ValueError, match=f"{name}.*{field}"):
            load_samples_npz(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_samples_npz(tmp_path / "absent.npz")
