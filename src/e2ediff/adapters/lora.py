"""LoRA through peft: add adapters to a transformer/UNet, their state dict, save/load, merge.

The default target modules are the attention projections (to_q, to_k, to_v, to_out.0), as diffusers' LoRA training
scripts use. SD/SDXL LoRA files are written in diffusers' format (`pytorch_lora_weights.safetensors`, loadable with
`pipe.load_lora_weights`); PixArt has no LoRA loader in diffusers, so its file holds the peft state dict next to a
`lora_config.json` (`load_lora` reads both; `merge_lora` folds the adapters into the base weights).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PEFT_FILE = "transformer_lora.safetensors"
CONFIG_FILE = "lora_config.json"


def lora_config(rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS):
    from peft import LoraConfig

    return LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha else rank), target_modules=list(targets),
                      init_lora_weights="gaussian")


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS) -> nn.Module:
    """Freeze `model` and inject LoRA adapters (trainable); B starts at zero, so the model is unchanged."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(lora_config(rank, alpha, targets), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft's state dict of the adapters (keys without the adapter name)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def save_sd_lora(pipe_cls, model: nn.Module, folder: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """`pytorch_lora_weights.safetensors` in diffusers' format for `pipe.load_lora_weights(folder)`."""
    from diffusers.utils import convert_state_dict_to_diffusers

    state = lora_state_dict(model) if state is None else state
    pipe_cls.save_lora_weights(save_directory=str(folder), unet_lora_layers=convert_state_dict_to_diffusers(state),
                               safe_serialization=True)
    return Path(folder) / "pytorch_lora_weights.safetensors"


def save_peft_lora(model: nn.Module, folder: Path, rank: int, alpha: float, targets,
                   state: dict[str, torch.Tensor] | None = None) -> Path:
    """The peft state dict + its config (PixArt)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(model) if state is None else state
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / PEFT_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps({"rank": int(rank), "alpha": float(alpha),
                                                  "targets": list(targets)}) + "\n")
    return folder / PEFT_FILE


def load_lora(model: nn.Module, folder: Path) -> nn.Module:
    """Inject the adapters described by folder/lora_config.json and load folder/transformer_lora.safetensors."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    spec = json.loads((folder / CONFIG_FILE).read_text())
    add_lora(model, spec["rank"], spec["alpha"], spec["targets"])
    result = set_peft_model_state_dict(model, load_file(str(folder / PEFT_FILE)))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{folder / PEFT_FILE}: keys that fit no adapter: {unexpected[:4]}")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer (W ← W + α/r·B·A) and put the plain layer back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model
