"""Energy score / energy distance against float64 loops, finite differences, and their defining property:
the true distribution wins in expectation, and a generator trained with it keeps both modes where L2 collapses."""
import itertools

import pytest
import torch

from e2ediff.losses.energy import energy_distance_by_group, energy_score
from e2ediff.losses.recon import l2


def _dist(a, b):
    return torch.sqrt(((a - b) ** 2).sum()).item()


def test_energy_score_matches_loop():
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(3, 4, 2, 3, 3, generator=g, dtype=torch.float64)
    target = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    lam = 0.7
    got = energy_score(samples, target, lam=lam)
    for b in range(3):
        m = 4
        first = sum(_dist(samples[b, j], target[b]) for j in range(m)) / m
        pairs = sum(_dist(samples[b, j], samples[b, k]) for j, k in itertools.permutations(range(m), 2))
        want = first - lam / (2 * m * (m - 1)) * pairs
        assert got[b].item() == pytest.approx(want, rel=1e-12)


def test_energy_score_bad_input():
    with pytest.raises(ValueError, match="m >= 2"):
        energy_score(torch.zeros(2, 1, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="samples"):
        energy_score(torch.zeros(2, 3, 3), torch.zeros(3, 3))


def test_energy_score_gradcheck_and_zero_distance():
    g = torch.Generator().manual_seed(1)
    samples = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, t: energy_score(s, t, lam=1.0), (samples, target))
    # identical samples (collapsed generator) and a sample equal to the target: gradient finite (subgradient 0 at 0)
    same = torch.zeros(1, 3, 5, dtype=torch.float64)
    same[0, :, 0] = 1.0
    same.requires_grad_(True)
    tgt = torch.zeros(1, 5, dtype=torch.float64)
    tgt[0, 0] = 1.0
    energy_score(same, tgt).sum().backward()
    assert torch.isfinite(same.grad).all()
    assert same.grad.abs().max().item() == 0.0


def test_energy_distance_by_group_matches_loop():
    g = torch.Generator().manual_seed(2)
    gen = torch.randn(7, 2, 3, generator=g, dtype=torch.float64)
    real = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    gen_groups = torch.tensor([0, 1, 0, 2, 1, 2, 0])
    real_groups = torch.tensor([2, 0, 1, 1, 2, 0])
    lam = 0.9
    for include_real in (False, True):
        got = energy_distance_by_group(gen, real, gen_groups, real_groups, lam=lam, include_real_term=include_real)
        assert got.shape == (7,)
        total = 0.0
        for grp in (0, 1, 2):
            G = [gen[i] for i in range(7) if gen_groups[i] == grp]
            R = [real[i] for i in range(6) if real_groups[i] == grp]
            cross = sum(_dist(a, b) for a in G for b in R) / (len(G) * len(R))
            gg = sum(_dist(G[j], G[k]) for j, k in itertools.permutations(range(len(G)), 2)) / (len(G) * (len(G) - 1))
            rr = sum(_dist(R[j], R[k]) for j, k in itertools.permutations(range(len(R)), 2)) / (len(R) * (len(R) - 1))
            ed = 2 * cross - lam * gg - (rr if include_real else 0.0)
            mask = gen_groups == grp
            assert got[mask].mean().item() == pytest.approx(ed, rel=1e-12)
            total += len(G) * ed
        assert got.mean().item() == pytest.approx(total / 7, rel=1e-12)


def test_energy_distance_by_group_gradcheck_and_errors():
    g = torch.Generator().manual_seed(3)
    gen = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    real = torch.randn(3, 3, generator=g, dtype=torch.float64)
    gg, rg = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1])
    assert torch.autograd.gradcheck(lambda x: energy_distance_by_group(x, real, gg, rg), (gen,))
    with pytest.raises(ValueError, match="group 1"):
        energy_distance_by_group(gen, real, torch.tensor([0, 0, 0, 1]), rg)
    with pytest.raises(ValueError, match="group 2"):
        energy_distance_by_group(gen, real, torch.tensor([0, 0, 2, 2]), rg)
    with pytest.raises(ValueError, match="gen_groups"):
        energy_distance_by_group(gen, real, torch.tensor([0, 0, 1]), rg)


def _bimodal(n, g, sigma=0.2):
    sign = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return sign + sigma * torch.randn(n, generator=g, dtype=torch.float64)


def test_true_distribution_minimises_expected_energy_score():
    g = torch.Generator().manual_seed(4)
    n, m = 20000, 8
    targets = _bimodal(n, g)[:, None]                                         # [n, 1]
    candidates = {
        "true": _bimodal(n * m, g).view(n, m, 1),
        "point_mass_at_mean": torch.zeros(n, m, 1, dtype=torch.float64),
        "too_narrow": 0.1 * torch.randn(n, m, 1, generator=g, dtype=torch.float64),
        "moment_matched_gaussian": (1 + 0.2 ** 2) ** 0.5 * torch.randn(n, m, 1, generator=g, dtype=torch.float64),
        "under_dispersed_modes": _bimodal(n * m, g, sigma=0.02).view(n, m, 1),
    }
    scores = {k: energy_score(v, targets).mean().item() for k, v in candidates.items()}
    # point mass at 0: ES = E|x| exactly (no interaction term)
    assert scores["point_mass_at_mean"] == pytest.approx(targets.abs().mean().item(), rel=1e-12)
    for name, value in scores.items():
        if name != "true":
            assert scores["true"] + 0.005 < value, scores          # standard error of each mean ≈ 0.002


def test_l2_collapses_to_the_mean_energy_score_keeps_both_modes():
    def train(loss_name):
        g = torch.Generator().manual_seed(5)
        mu = torch.tensor([-0.1, 0.15], requires_grad=True)                   # one location per mode
        log_s = torch.log(torch.tensor([0.5, 0.5])).requires_grad_(True)      # one scale per mode
        steps = 800
        opt = torch.optim.Adam([mu, log_s], lr=0.05)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)

        def sample(shape):
            k = torch.randint(0, 2, shape, generator=g)
            return mu[k] + log_s.exp()[k] * torch.randn(shape, generator=g)

        for _ in range(steps):
            y = _bimodal(64, g).float()                                        # targets independent of the noise
            if loss_name == "l2":
                loss = l2(sample((64,))[:, None], y[:, None]).mean()
            else:
                loss = energy_score(sample((64, 8))[..., None], y[:, None]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            decay.step()
        with torch.no_grad():
            order = mu.argsort()
            return sample((20000,)).std().item(), mu.detach()[order], log_s.exp().detach()[order]

    true_std = (1 + 0.2 ** 2) ** 0.5
    spread_l2, mu_l2, _ = train("l2")
    spread_es, mu_es, s_es = train("es")
    assert spread_l2 < 0.1 * true_std and mu_l2.abs().max() < 0.05          # collapsed onto the mean 0
    assert abs(spread_es - true_std) < 0.05                                  # spread of the true distribution
    assert torch.allclose(mu_es, torch.tensor([-1.0, 1.0]), atol=0.05)       # both modes
    assert torch.allclose(s_es, torch.tensor([0.2, 0.2]), atol=0.03)         # and their widths
