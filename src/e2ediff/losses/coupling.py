"""Minibatch optimal-transport coupling of generated outputs and targets inside caption groups.

With independent noise, pairing each generated sample with an arbitrary target that shares its caption makes a
per-sample regression loss chase the group mean. Re-pairing the targets by the exact minibatch OT assignment
(Hungarian algorithm on squared Euclidean distances, as in minibatch-OT flow matching) pairs each output with the
nearest target of its own group.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def minibatch_ot_pairing(generated: Tensor, targets: Tensor, groups: Tensor) -> Tensor:
    """Permutation perm [N] (long) such that targets[perm][i] is the target assigned to generated[i].

    generated, targets: [N, ...]; groups: [N] ints, the group (caption) of both generated[i] and targets[i].
    Inside each group the assignment minimises Σ_i ‖generated[i] − targets[perm[i]]‖² (scipy's
    linear_sum_assignment on detached distances); a target is only ever assigned inside its own group, so
    groups[perm] == groups.
    """
    if generated.shape != targets.shape:
        raise ValueError(f"generated has shape {tuple(generated.shape)} and targets {tuple(targets.shape)}; "
                         "expected equal shapes [N, ...]")
    if groups.shape != (generated.shape[0],):
        raise ValueError(f"groups has shape {tuple(groups.shape)}, expected {(generated.shape[0],)}")
    gen = generated.detach().flatten(1).double().cpu()
    tgt = targets.detach().flatten(1).double().cpu()
    groups_cpu = groups.detach().cpu()
    perm = torch.arange(gen.shape[0])
    for g in torch.unique(groups_cpu).tolist():
        idx = (groups_cpu == g).nonzero().squeeze(1)
        cost = (gen[idx][:, None] - tgt[idx][None]).square().sum(-1)    # C[a, b] = ‖gen_a − tgt_b‖²
        rows, cols = linear_sum_assignment(cost.numpy())
        perm[idx[torch.as_tensor(rows)]] = idx[torch.as_tensor(cols)]
    return perm.to(groups.device)
