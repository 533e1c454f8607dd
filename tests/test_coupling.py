"""Minibatch OT pairing against brute force over all group-respecting permutations."""
import itertools

import pytest
import torch

from e2ediff.losses.coupling import minibatch_ot_pairing


def _cost(gen, tgt, perm):
    return sum(((gen[i] - tgt[p]) ** 2).sum().item() for i, p in enumerate(perm))


@pytest.mark.parametrize("groups", [[0, 0, 0, 0, 0, 0], [0, 1, 0, 1, 1, 0], [3, 3, 7, 7, 7], [5, 2, 2, 5]])
def test_matches_brute_force(groups):
    g = torch.Generator().manual_seed(len(groups) + sum(groups))
    n = len(groups)
    gen = torch.randn(n, 2, 3, generator=g, dtype=torch.float64)
    tgt = torch.randn(n, 2, 3, generator=g, dtype=torch.float64)
    grp = torch.tensor(groups)
    perm = minibatch_ot_pairing(gen, tgt, grp)
    assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(n))
    assert torch.equal(grp[perm], grp)
    best = min((p for p in itertools.permutations(range(n)) if all(groups[p[i]] == groups[i] for i in range(n))),
               key=lambda p: _cost(gen, tgt, p))
    assert perm.tolist() == list(best)
    assert _cost(gen, tgt, perm.tolist()) == pytest.approx(_cost(gen, tgt, best), rel=1e-12)


def test_groups_respected_even_when_other_group_is_closer():
    gen = torch.tensor([[0.0], [10.0]])
    tgt = torch.tensor([[10.0], [0.0]])
    assert minibatch_ot_pairing(gen, tgt, torch.tensor([0, 1])).tolist() == [0, 1]
    assert minibatch_ot_pairing(gen, tgt, torch.tensor([0, 0])).tolist() == [1, 0]


def test_bad_shapes():
    with pytest.raises(ValueError, match="groups"):
        minibatch_ot_pairing(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="targets"):
        minibatch_ot_pairing(torch.zeros(3, 2), torch.zeros(2, 2), torch.zeros(3))
