"""Speed levers for a diffusers network behind an adapter (PixArt transformer, SD UNet).

- bf16 weights: `load_pretrained(..., dtype="bfloat16")`, as `from_pretrained(torch_dtype=torch.bfloat16)`; sampling
  needs no float32 master copy (training keeps one: AdamW's updates at lr 1e-6 vanish in bf16 weights).
- `fuse_qkv`: diffusers' `fuse_qkv_projections()` concatenates to_q/to_k/to_v (self-attention) and to_k/to_v
  (cross-attention) into one matmul each; the output equals the unfused one up to rounding. For sampling: the fused
  weights are copies, so training them would leave to_q/to_k/to_v stale, and LoRA adapters on the projections are
  merged into the base weights first (fusing would silently drop them).
- `compile_network`: regional torch.compile (dynamic=False). PixArt's transformer blocks are identical, so each is
  compiled with one shared graph (two: the first block sees another input layout) and compiling costs about as much
  as one block, not 28 (the PyTorch regional-compilation recipe; diffusers' `compile_repeated_blocks`); the project's
  DiT names its blocks the same way (`DiT.repeated_blocks()`); networks without repeated blocks (UNets) are compiled
  whole. Parameter names, state dicts and exports are unchanged.
- `attention_backend`: the order in which scaled_dot_product_attention tries its kernels, e.g. cuDNN first (Hopper);
  a kernel that cannot take a call (head dim, mask) is skipped for the next one, so every order gives a result.
- `float8_linear` (any nn.Module, the project's DiT too): FP8 (e4m3) matmuls for sampling, as torchao's
  `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`: each weight quantized once per output channel,
  each input per row (token) at every call, float32 scales amax/448, one `torch._scaled_mm` with fast accumulation
  (about twice bf16's tensor-core throughput on Hopper / Ada; elsewhere the same numbers, not faster). Costs
  quantization error: a few % per matmul output, about 1 % on a tiny PixArt's or DiT's output (tests/test_fp8.py).
  Only linears whose in/out features are multiples of 16 (`_scaled_mm`'s rule; torchao skips the others too) and,
  by default, only those inside the network's repeated blocks: the first and last layers (patch, caption and
  timestep embeddings, the adaLN projection, the output projection) stay in the weights' dtype, as diffusers' FP8
  layerwise casting keeps pos_embed / patch_embed / proj_in / proj_out. At PixArt-XL size they are 0.14 % of the
  linear FLOPs, so the speed is the same; their error would not be averaged over blocks (the timestep embedding
  modulates every block, proj_out writes the prediction). Call it after `fuse_qkv` and before `compile_network`,
  with the model already on its device and dtype (`.to(dtype)` would cast the FP8 buffers).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from e2ediff.adapters.lora import has_lora, merge_lora

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ATTENTION_BACKENDS = ("default", "cudnn", "flash", "efficient", "math")


def fuse_qkv(model: nn.Module) -> nn.Module:
    """`model.fuse_qkv_projections()` in place, merging LoRA adapters into the base weights first. Returns model."""
    if not hasattr(model, "fuse_qkv_projections"):
        raise ValueError(f"{type(model).__name__} has no fuse_qkv_projections() (diffusers)")
    if has_lora(model):
        merge_lora(model)
    model.fuse_qkv_projections()
    return model


def compile_network(net: nn.Module, mode: str = "default") -> list[nn.Module]:
    """torch.compile network `net` in place: its repeated blocks when it names them (`net.repeated_blocks()`: the
    PixArt adapter, the project's DiT), else the whole model (the diffusers model behind an adapter, `net.model`, or
    `net` itself). Returns the compiled modules."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    blocks = net.repeated_blocks() if hasattr(net, "repeated_blocks") else None
    targets = list(blocks) if blocks is not None and len(blocks) else [getattr(net, "model", net)]
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


# ----------------------------------------------------------------------------------------------------------------------
# FP8 matmuls (sampling)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max                       # 448
AMAX_FLOOR = 1e-12                                     # an all-zero row: scale 2e-15, q = 0, no 0/0


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row e4m3 quantization of a 2-D tensor: x ≈ q · scale, scale = max|row| / 448, float32 [M, 1]."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=AMAX_FLOOR) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Float8Linear(nn.Module):
    """An nn.Linear for sampling: y = (q_x s_x)(q_w s_w)ᵀ + b by one `torch._scaled_mm`, the weight quantized once per
    output channel (s_w [1, N]), the input per row at every call (s_x [M, 1]); inputs of any leading shape, output in
    the input's dtype. No parameters: the FP8 weight, its scales and the bias are buffers; gradients are refused."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", weight)                              # [N, K] e4m3
        self.register_buffer("weight_scale", scale.t().contiguous())            # [1, N] float32
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("Float8Linear is for sampling: FP8 matmuls have no gradients here (run under "
                               "torch.no_grad(), or train the unquantized network)")
        x_fp8, x_scale = quantize_rows(x.reshape(-1, self.in_features).contiguous())
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = torch._scaled_mm(x_fp8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale, bias=bias,
                             out_dtype=x.dtype, use_fast_accum=True)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def outside_repeated_blocks(model: nn.Module) -> Callable[[str], bool]:
    """The default skip rule of `float8_linear`: true for a module name outside every nn.ModuleList whose members are
    all of one class (the repeated blocks: PixArt's transformer_blocks, the DiT's blocks, a UNet's attentions)."""
    blocks = [name for name, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1]
    return lambda name: not any(not prefix or name.startswith(f"{prefix}.") for prefix in blocks)


def float8_linear(model: nn.Module, *, skip: Callable[[str], bool] | None = None) -> list[str]:
    """Replace in place every nn.Linear of `model` (exactly that class) whose in/out features are multiples of 16
    and whose name `skip` does not claim by a `Float8Linear` (default skip: `outside_repeated_blocks(model)`; pass
    `lambda name: False` to quantize every eligible linear, as torchao's quantize_ does). For sampling: LoRA adapters
    must be merged first (e2ediff.adapters.lora.merge_lora). Returns the names of the replaced modules."""
    if has_lora(model):
        raise ValueError(f"{type(model).__name__} has unmerged LoRA adapters: merge them into the base weights first "
                         "(e2ediff.adapters.lora.merge_lora), or FP8 would quantize the base layers without them")
    skip = outside_repeated_blocks(model) if skip is None else skip
    replaced = []
    for name, module in list(model.named_modules()):
        if (type(module) is nn.Linear and module.in_features % 16 == 0 and module.out_features % 16 == 0
                and not skip(name)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Float8Linear(module))
            replaced.append(name)
    return replaced
