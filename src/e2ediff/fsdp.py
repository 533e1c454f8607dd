"""FSDP2 through accelerate: the sharded parts of a run, read and written as whole tensors.

`accelerate launch --config_file fsdp.yaml` (distributed_type: FSDP, fsdp_config.fsdp_version: 2) makes the loop
prepare every ``Part.ddp`` module with its optimizer through ``accelerator.prepare``: accelerate's
``fully_shard`` splits each parameter, its gradient and its AdamW moments over the processes, and FSDP
reduce-scatters the gradients in backward (no manual all-reduce). Everything that leaves the loop still holds whole
tensors, in the same files as a one-process run:
- checkpoints: ``torch.distributed.checkpoint.state_dict`` gathers the full model and optimizer state onto process 0
  (``full_state_dict=True, cpu_offload=True``), which alone writes; the optimizer state is keyed by parameter index as
  ``optimizer.state_dict()`` keys it, so a checkpoint resumes on any process count, one process without FSDP included;
- resume: the model is loaded whole before ``fully_shard`` (which keeps each process's shard of it), the optimizer
  after it (``set_optimizer_state_dict`` shards the full state);
- EMA: sharded like the parameters it averages (a DTensor shadow per trainable parameter, updated shard by shard),
  gathered onto process 0 for checkpoints and exports.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor


def check_fsdp(accelerator, parts) -> None:
    """Refuse FSDP settings the loop cannot honour, naming the accelerate config field."""
    if not accelerator.is_fsdp2:
        raise ValueError("FSDP1 is not supported by the training loop: set fsdp_config.fsdp_version: 2 in the "
                         "accelerate config (FSDP2, torch.distributed.fsdp.fully_shard)")
    if accelerator.state.fsdp_plugin.activation_checkpointing:
        raise ValueError("fsdp_config.fsdp_activation_checkpointing: true is not supported (it renames the network's "
                         "parameters); the unrolled step already checkpoints every network call (checkpointing=true)")
    if not any(p.ddp for p in parts):
        raise ValueError("an FSDP accelerate config (distributed_type: FSDP) shards only parts whose forward is the "
                         "whole step (e2ediff finetune --pretrained); use DDP (no FSDP config) for this command")
    whole = [p.name for p in parts if not p.ddp]
    if whole:   # measured: a GAN discriminator's explicit all-reduce next to FSDP's collectives hung (2 gloo processes)
        raise ValueError(f"an FSDP accelerate config (distributed_type: FSDP) does not yet train the unsharded parts "
                         f"{whole} (the GAN discriminator: loss.gan > 0); set loss.gan=0 or use DDP (no FSDP config)")


def trainable_names(module: nn.Module) -> list[str]:
    """Names of the trainable parameters in the optimizer's order (the loop builds it from ``module.parameters()``)."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


def _options(**kwargs) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, **kwargs)


def whole_model_state(module: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The module's state dict (trainable parameters only with ``trainable_only``) as whole CPU tensors on process 0,
    {} elsewhere. Collective: every process calls it."""
    state = get_model_state_dict(module, options=_options(cpu_offload=True, ignore_frozen_params=trainable_only))
    if trainable_only:
        keep = set(trainable_names(module))
        state = {k: v for k, v in state.items() if k in keep}
    return state


def whole_optimizer_state(module: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` with whole CPU tensors, keyed by parameter index, on process 0 ({} elsewhere)."""
    full = get_optimizer_state_dict(module, opt, options=_options(cpu_offload=True))
    if not full:
        return {}
    index = {name: i for i, name in enumerate(trainable_names(module))}
    return {"state": {index[name]: st for name, st in full["state"].items()},
            "param_groups": opt.state_dict()["param_groups"]}


def load_whole_optimizer_state(module: nn.Module, opt: torch.optim.Optimizer, saved: dict) -> None:
    """Load an index-keyed whole optimizer state (as ``whole_optimizer_state`` or one process writes it) into the
    optimizer of the sharded ``module``. Collective."""
    names = trainable_names(module)
    full = {"state": {names[int(i)]: st for i, st in saved["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(module, opt, full, options=_options())


def shard_like(tensors: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Whole tensors named like ``module``'s parameters, split the way FSDP split each parameter. Collective."""
    params = dict(module.named_parameters())
    out = {}
    for name, t in tensors.items():
        p = params[name]
        out[name] = (distribute_tensor(t.to(p.device, p.dtype), p.device_mesh, p.placements)
                     if isinstance(p, DTensor) else t)
    return out


def whole_tensors(tensors: dict[str, torch.Tensor], main: bool) -> dict[str, torch.Tensor]:
    """Gather sharded (DTensor) values whole onto the CPU; process 0 keeps them, the others get {}. Collective."""
    out = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in tensors.items()}
    return out if main else {}
