"""L1 / L2 / hybrid reconstruction distances against direct float64 loops."""
import pytest
import torch

from e2ediff.losses.recon import HybridWeights, hybrid, l1, l2


def _pair():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    return x, y


def test_l1_l2_match_loops():
    x, y = _pair()
    for b in range(3):
        vals = [(x[b].flatten()[i] - y[b].flatten()[i]).item() for i in range(256)]
        assert l1(x, y)[b].item() == pytest.approx(sum(abs(v) for v in vals) / 256, rel=1e-12)
        assert l2(x, y)[b].item() == pytest.approx(sum(v * v for v in vals) / 256, rel=1e-12)


class _FakeLPIPS(torch.nn.Module):
    def forward(self, x, y):
        return (x - y).flatten(1).amax(1)


def test_hybrid_weights_and_lpips():
    x, y = _pair()
    w = HybridWeights(l1=0.3, l2=2.0, lpips=0.5)
    got = hybrid(x, y, w, lpips=_FakeLPIPS())
    want = 0.3 * l1(x, y) + 2.0 * l2(x, y) + 0.5 * (x - y).flatten(1).amax(1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert got.shape == (3,)
    torch.testing.assert_close(hybrid(x, y, HybridWeights()), l2(x, y))
    torch.testing.assert_close(hybrid(x, y, HybridWeights(l1=1.0, l2=0.0)), l1(x, y))


def test_hybrid_errors():
    x, y = _pair()
    with pytest.raises(ValueError, match="HybridWeights.l1"):
        HybridWeights(l1=-1.0)
    with pytest.raises(ValueError, match="HybridWeights.lpips"):
        HybridWeights(lpips=-0.1)
    with pytest.raises(ValueError, match="no lpips module"):
        hybrid(x, y, HybridWeights(lpips=1.0))
    w = HybridWeights()
    w.l2 = -1.0
    with pytest.raises(ValueError, match="HybridWeights.l2"):
        hybrid(x, y, w)
    with pytest.raises(ValueError, match="shape"):
        l2(x, y[:2])
