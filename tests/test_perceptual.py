"""LPIPS structure against a float64 hand computation; backbones load torchvision-named weights from local files;
the Fashion-MNIST feature net trains contrastively and gives a distance that grows with noise."""
import math

import pytest
import torch
from torch import nn

from e2ediff.losses.perceptual import (LPIPS, AlexNetFeatures, FashionFeatureNet, VGG16Features, augment, nt_xent,
                                       train_feature_net)

SMALL = (4, 8, 16)


def _shapes_uint8(n, size, seed):
    """Random rectangles on a black background: structured stand-ins for Fashion-MNIST."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(n, size, size, dtype=torch.uint8)
    for i in range(n):
        for _ in range(2):
            r0, c0 = torch.randint(0, size - 6, (2,), generator=g).tolist()
            h, w = torch.randint(3, size // 2, (2,), generator=g).tolist()
            img[i, r0:r0 + h, c0:c0 + w] = int(torch.randint(100, 256, (1,), generator=g))
    return img


def _as_images(img_uint8):
    x = img_uint8.float().div(127.5).sub(1).unsqueeze(1)
    return nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)


@pytest.fixture(scope="module")
def trained_net():
    losses = []
    net = train_feature_net(_shapes_uint8(64, 12, 0), steps=60, batch_size=32, lr=3e-3, seed=0,
                            channels=SMALL, on_step=lambda step, loss: losses.append(loss))
    return net, losses


class _Tiny(nn.Module):
    channels = [2, 3]
    in_channels = 1

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3, padding=1)
        self.c2 = nn.Conv2d(2, 3, 3, stride=2, padding=1)

    def forward(self, x):
        h1 = torch.relu(self.c1(x))
        return [h1, self.c2(h1)]


def test_lpips_matches_float64_hand_computation():
    torch.manual_seed(0)
    backbone = _Tiny().double()
    heads = [torch.tensor([0.25, 1.25], dtype=torch.float64), torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)]
    lp = LPIPS(backbone, heads=heads).double()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    got = lp(x, y)
    fx, fy = backbone(x), backbone(y)
    for b in range(2):
        total = 0.0
        for f1, f2, w in zip(fx, fy, heads):
            c, hh, ww = f1.shape[1:]
            acc = 0.0
            for i in range(hh):
                for j in range(ww):
                    v1 = [f1[b, k, i, j].item() for k in range(c)]
                    v2 = [f2[b, k, i, j].item() for k in range(c)]
                    n1 = math.sqrt(sum(v * v for v in v1)) + 1e-10
                    n2 = math.sqrt(sum(v * v for v in v2)) + 1e-10
                    acc += sum(w[k].item() * (v1[k] / n1 - v2[k] / n2) ** 2 for k in range(c))
            total += acc / (hh * ww)
        assert got[b].item() == pytest.approx(total, rel=1e-10)


def test_lpips_identity_is_zero_and_default_heads():
    torch.manual_seed(0)
    lp = LPIPS(FashionFeatureNet(SMALL))
    x = _as_images(_shapes_uint8(3, 28, 1))
    assert torch.equal(lp(x, x), torch.zeros(3))
    for lin, c in zip(lp.lins, SMALL):
        assert torch.allclose(lin.weight, torch.full((1, c, 1, 1), 1.0 / c))
    assert not any(p.requires_grad for p in lp.parameters())
    lp.train()
    assert not lp.backbone.training


def test_negative_head_weights_are_clamped():
    torch.manual_seed(0)
    lp = LPIPS(FashionFeatureNet(SMALL))
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1, torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        lp.lins[1].weight[0, :4] = -5.0
    negative = lp(x, y)
    with torch.no_grad():
        lp.lins[1].weight[0, :4] = 0.0
    torch.testing.assert_close(negative, lp(x, y))
    assert (negative >= 0).all()


def _noise_curve(lp, seed):
    x = _as_images(_shapes_uint8(6, 28, seed))
    g = torch.Generator().manual_seed(seed)
    curve = []
    for sigma in (0.05, 0.1, 0.2, 0.4, 0.8):
        noisy = (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)
        curve.append(lp(x, noisy).mean().item())
    return curve


def test_lpips_grows_with_noise_random_init():
    torch.manual_seed(0)
    curve = _noise_curve(LPIPS(FashionFeatureNet(SMALL)), 3)
    assert all(a < b for a, b in zip(curve, curve[1:])), curve


def test_lpips_grows_with_noise_trained_net(trained_net):
    curve = _noise_curve(LPIPS(trained_net[0]), 4)
    assert all(a < b for a, b in zip(curve, curve[1:])), curve


def test_contrastive_training_decreases_loss(trained_net):
    _, losses = trained_net
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.25, losses   # measured drop ≈ 0.45–0.8 over seeds


def test_train_feature_net_deterministic_and_validates():
    imgs = _shapes_uint8(8, 12, 5)
    a = train_feature_net(imgs, steps=2, batch_size=4, lr=1e-3, seed=7, channels=(2, 2, 2))
    b = train_feature_net(imgs, steps=2, batch_size=4, lr=1e-3, seed=7, channels=(2, 2, 2))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    with pytest.raises(ValueError, match="images_uint8"):
        train_feature_net(imgs.float(), steps=1, batch_size=4, lr=1e-3, seed=0)


def test_nt_xent_against_formula():
    g = torch.Generator().manual_seed(6)
    z1, z2 = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    got = nt_xent(z1, z2, 0.5)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    for i in range(6):
        pos = (i + 3) % 6
        denom = sum(math.exp((z[i] @ z[k]).item() / 0.5) for k in range(6) if k != i)
        assert got[i].item() == pytest.approx(-(z[i] @ z[pos]).item() / 0.5 + math.log(denom), rel=1e-10)


def test_augment_keeps_range_and_background():
    x = torch.full((4, 1, 16, 16), -1.0)
    view = augment(x, torch.Generator().manual_seed(0))
    assert view.shape == x.shape and view.min() >= -1 and view.max() <= 1
    assert (view + 1).abs().mean() < 0.1          # a blank image stays (noisy) background


def test_fashion_net_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = FashionFeatureNet(SMALL)
    net.save(tmp_path / "f.safetensors")
    loaded = FashionFeatureNet.load(tmp_path / "f.safetensors")
    assert loaded.channels == list(SMALL)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    for a, b in zip(net(x), loaded(x)):
        assert torch.equal(a, b)
    lp = LPIPS.from_local("fashion", tmp_path / "f.safetensors")
    assert lp(x, x.flip(-1)).shape == (2,)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        FashionFeatureNet.load(tmp_path / "missing.safetensors")


VGG_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
ALEX_CONVS = [0, 3, 6, 8, 10]


@pytest.mark.parametrize("cls,convs,net,size,suffix", [(VGG16Features, VGG_CONVS, "vgg", 32, ".safetensors"),
                                                       (AlexNetFeatures, ALEX_CONVS, "alex", 64, ".pth")])
def test_torchvision_backbones_load_local_weights(tmp_path, cls, convs, net, size, suffix):
    torch.manual_seed(0)
    src = cls()
    state = src.state_dict()
    assert sorted(state) == sorted(f"features.{i}.{p}" for i in convs for p in ("weight", "bias"))
    full = dict(state, **{"classifier.1.weight": torch.zeros(2, 2)})     # a full torchvision checkpoint
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(src.channels)}
    path, heads_path = tmp_path / f"backbone{suffix}", tmp_path / f"heads{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(full, str(path))
        save_file(heads, str(heads_path))
    else:
        torch.save(full, path)
        torch.save(heads, heads_path)
    lp = LPIPS.from_local(net, path, heads_path)
    for k, v in state.items():
        assert torch.equal(lp.backbone.state_dict()[k], v)
    for i, lin in enumerate(lp.lins):
        assert torch.equal(lin.weight, heads[f"lin{i}.model.1.weight"])
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(1, 1, size, size, generator=g) * 2 - 1, torch.rand(1, 1, size, size, generator=g) * 2 - 1
    d = lp(x, y)
    assert d.shape == (1,) and d.item() > 0
    torch.testing.assert_close(d, lp(x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)))   # gray -> RGB


def test_weight_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        AlexNetFeatures().load_state_dict_from_file(tmp_path / "nowhere.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11)}, bad)
    with pytest.raises(ValueError, match="bad.pth.*missing"):
        AlexNetFeatures().load_state_dict_from_file(bad)
    wrong_shape = tmp_path / "wrong.pth"
    state = AlexNetFeatures().state_dict()
    state["features.0.weight"] = torch.zeros(1)
    torch.save(state, wrong_shape)
    with pytest.raises(ValueError, match="wrong.pth: features.0.weight"):
        AlexNetFeatures().load_state_dict_from_file(wrong_shape)
    lp = LPIPS(AlexNetFeatures())
    with pytest.raises(ValueError, match="bad.pth: missing LPIPS head keys"):
        lp.load_linear_heads(bad)
    with pytest.raises(ValueError, match="expected 'vgg'"):
        LPIPS.from_local("resnet", bad)
    with pytest.raises(ValueError, match="channels"):
        LPIPS(nn.Identity())
