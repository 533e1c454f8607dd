"""Speed levers for a diffusers network behind an adapter (PixArt transformer, SD UNet).

- bf16 weights: `load_pretrained(..., dtype="bfloat16")`, as `from_pretrained(torch_dtype=torch.bfloat16)`; sampling
  needs no float32 master copy (training keeps one: AdamW's updates at lr 1e-6 vanish in bf16 weights).
- `fuse_qkv`: diffusers' `fuse_qkv_projections()` concatenates to_q/to_k/to_v (self-attention) and to_k/to_v
  (cross-attention) into one matmul each; the output equals the unfused one up to rounding. For sampling: the fused
  weights are copies, so training them would leave to_q/to_k/to_v stale, and LoRA adapters on the projections are
  merged into the base weights first (fusing would silently drop them).
- `compile_network`: regional torch.compile (dynamic=False). PixArt's transformer blocks are identical, so each is
  compiled with one shared graph (two: the first block sees another input layout) and compiling costs about as much
  as one block, not 28 (the PyTorch regional-compilation recipe; diffusers' `compile_repeated_blocks`); networks
  without repeated blocks (UNets) are compiled whole. Parameter names, state dicts and exports are unchanged.
- `attention_backend`: the order in which scaled_dot_product_attention tries its kernels, e.g. cuDNN first (Hopper);
  a kernel that cannot take a call (head dim, mask) is skipped for the next one, so every order gives a result.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ATTENTION_BACKENDS = ("default", "cudnn", "flash", "efficient", "math")


def fuse_qkv(model: nn.Module) -> nn.Module:
    """`model.fuse_qkv_projections()` in place, merging LoRA adapters into the base weights first. Returns model."""
    from e2ediff.adapters.lora import has_lora, merge_lora

    if not hasattr(model, "fuse_qkv_projections"):
        raise ValueError(f"{type(model).__name__} has no fuse_qkv_projections() (diffusers)")
    if has_lora(model):
        merge_lora(model)
    model.fuse_qkv_projections()
    return model


def compile_network(net: nn.Module, mode: str = "default") -> list[nn.Module]:
    """torch.compile the diffusers model behind adapter `net` in place: its repeated blocks when the adapter names
    them (`net.repeated_blocks()`), else the whole model. Returns the compiled modules."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    blocks = net.repeated_blocks() if hasattr(net, "repeated_blocks") else None
    targets = list(blocks) if blocks is not None and len(blocks) else [net.model]
    kwargs = {"dynamic": False} if mode == "default" else {"dynamic": False, "mode": mode}
    for module in targets:
        module.compile(**kwargs)
    return targets


@contextlib.contextmanager
def attention_backend(name: str = "default") -> Iterator[None]:
    """Inside the block, scaled_dot_product_attention tries `name`'s kernel first, then the others ("math": only
    the reference kernel). A compiled graph keeps the kernels chosen while it was traced: compile inside the block."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name == "default":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rest = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    order = [first] if name == "math" else [first] + [b for b in rest if b != first]
    with sdpa_kernel(order, set_priority=True):
        yield
