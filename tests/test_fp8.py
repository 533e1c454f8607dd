"""FP8 (e4m3) matmuls for sampling: `e2ediff.adapters.speed.float8_linear` / `Float8Linear`.

References: the same row-wise quantize-dequantize written in float64 (scale = amax / 448, per output channel for the
weight, per row for the input), the unquantized float64 linear, and the unquantized tiny PixArt transformer.
"""
import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import tiny_diffusers as td
from e2ediff.adapters import speed
from e2ediff.adapters.lora import add_lora
from e2ediff.adapters.pipeline import wrap_pipeline
from e2ediff.cli import main
from e2ediff.conditioning import TextCond
from e2ediff.models.dit import DiT, DiTConfig
from helpers import record_compile

PROMPTS = ["a red boot", "a blue shirt"]


def rel(a, b):
    """Relative error in the Frobenius norm (what quantization noise averages to)."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def reference_fp8_linear(x, weight, bias):
    """(q_x · s_x)(q_w · s_w)ᵀ + b in float64, every scale amax / 448 of its row (float64 throughout)."""
    def quantize(t):
        scale = t.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
        return (t / scale).clamp(-448, 448).to(torch.float8_e4m3fn).double() * scale

    x2 = x.double().reshape(-1, x.shape[-1])
    y = quantize(x2) @ quantize(weight.double()).T + bias.double()
    return y.reshape(*x.shape[:-1], weight.shape[0])


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(64, 48)


def test_float8_linear_is_the_quantize_dequantize_product(linear):
    """Any leading shape; float32 in, float32 out equals the float64 quantize-dequantize product to float32 rounding
    of the accumulation; bf16 in gives bf16 out; no parameters."""
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)) * 3
    fp8 = speed.Float8Linear(linear)
    ref = reference_fp8_linear(x, linear.weight.detach(), linear.bias.detach())
    y = fp8(x)
    assert y.shape == (3, 5, 48) and y.dtype == torch.float32
    assert rel(y, ref) < 1e-6
    assert fp8(x.bfloat16()).dtype == torch.bfloat16
    assert rel(fp8(x.bfloat16()), reference_fp8_linear(x.bfloat16(), linear.weight.detach(),
                                                        linear.bias.detach())) < 1e-2
    assert list(fp8.parameters()) == [] and fp8.weight_fp8.dtype == torch.float8_e4m3fn
    assert fp8.weight_scale.shape == (1, 48) and fp8.weight_scale.dtype == torch.float32


def test_float8_linear_error_against_the_unquantized_linear(linear):
    """e4m3 keeps 3 mantissa bits: each factor is off by up to 2⁻⁴ relative, the product by a few % (not more)."""
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    exact = nn.functional.linear(x.double(), linear.weight.detach().double(), linear.bias.detach().double())
    error = rel(speed.Float8Linear(linear)(x), exact)
    assert 1e-3 < error < 0.05, error


def test_zero_rows_give_the_bias_not_nan(linear):
    x = torch.randn(4, 64)
    x[1] = 0
    y = speed.Float8Linear(linear)(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[1], linear.bias.detach())
    zero = nn.Linear(64, 16, bias=False)
    nn.init.zeros_(zero.weight)
    assert torch.equal(speed.Float8Linear(zero)(x), torch.zeros(4, 16))


def test_float8_linear_refuses_gradients_and_unmerged_lora(linear):
    fp8 = speed.Float8Linear(linear)
    with pytest.raises(RuntimeError, match="for sampling"):
        fp8(torch.randn(2, 64, requires_grad=True))
    with torch.no_grad():
        fp8(torch.randn(2, 64, requires_grad=True))            # no gradients asked: fine
    model = td.pixart_pipeline().transformer
    add_lora(model, rank=2)
    with pytest.raises(ValueError, match="merge_lora"):
        speed.float8_linear(model)


def test_skip_rule_keeps_first_and_last_layers_and_odd_sizes():
    """Default: only linears inside repeated blocks (a ModuleList of one class), in/out multiples of 16; a ModuleList
    of mixed modules (diffusers' to_out: Linear + Dropout) is not a block; `skip` replaces the rule."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(16, 32)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 24)) for _ in range(2))
            self.out = nn.ModuleList([nn.Linear(32, 16), nn.Dropout(0.0)])

    net = Net()
    assert speed.float8_linear(copy.deepcopy(net)) == ["blocks.0.0", "blocks.1.0"]
    everything = copy.deepcopy(net)
    assert speed.float8_linear(everything, skip=lambda name: False) == ["embed", "blocks.0.0", "blocks.1.0", "out.0"]
    assert isinstance(everything.blocks[0][1], nn.Linear)         # 24 outputs: not a multiple of 16
    assert speed.float8_linear(copy.deepcopy(net), skip=lambda name: name.endswith(".0.0")) == ["embed", "blocks.1.0",
                                                                                               "out.0"]


def _net_output(pp, cond):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pp.net(z, torch.tensor([999.0, 259.0]), cond)


def test_tiny_pixart_in_fp8_stays_close(monkeypatch):
    """A tiny random PixArtTransformer2DModel: FP8 in the blocks' linears (after fuse_qkv, before the regional
    compile), the embeddings, adaLN and proj_out untouched; output close to the float32 original, not equal; the
    compiled blocks (aot_eager here) give the eager FP8 output."""
    pp = wrap_pipeline(td.pixart_pipeline(seed=3), "tiny")
    cond = pp.encode_prompts(PROMPTS)
    before = _net_output(pp, cond)
    speed.fuse_qkv(pp.trained)
    replaced = speed.float8_linear(pp.trained)
    assert replaced and all(name.startswith("transformer_blocks.") for name in replaced)
    assert {"transformer_blocks.0.attn1.to_qkv", "transformer_blocks.0.attn2.to_kv",
            "transformer_blocks.1.ff.net.2"} <= set(replaced)
    linears = {name for name, m in pp.trained.named_modules() if type(m) is nn.Linear}
    assert {"proj_out", "caption_projection.linear_1", "adaln_single.linear"} <= linears
    after = _net_output(pp, cond)
    error = rel(after, before)
    print(f"tiny PixArt, FP8 blocks vs float32: relative error {error:.4f}")
    assert 0 < error < 0.1
    calls = record_compile(monkeypatch, "aot_eager")
    speed.compile_network(pp.net)
    assert len(calls) == 2
    assert rel(_net_output(pp, cond), after) < 1e-6


def test_our_dit_in_fp8_stays_close():
    """float8_linear takes any nn.Module: the project's DiT (random weights everywhere, so every path reaches the
    output) keeps its timestep / caption embedders and final layer, and its output moves by a few %."""
    cfg = DiTConfig(hidden_size=32, depth=2, num_heads=4, text_dim=16, max_text_len=6)
    g = torch.Generator().manual_seed(0)
    net = DiT(cfg, generator=g).requires_grad_(False)
    for p in net.parameters():
        p.normal_(0.0, 0.1, generator=g)
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.rand(3, generator=g) * 1000
    cond = TextCond(torch.randn(3, 5, 16, generator=g), torch.ones(3, 5, dtype=torch.bool), torch.randn(3, 16,
                                                                                                      generator=g))
    before = net(x, t, cond)
    replaced = speed.float8_linear(net)
    assert len(replaced) == 2 * 7 and all(name.startswith("blocks.") for name in replaced)
    error = rel(net(x, t, cond), before)
    print(f"tiny DiT, FP8 blocks vs float32: relative error {error:.4f}")
    assert 0 < error < 0.1


def test_sample_pretrained_fp8_flag(tmp_path):
    """`e2ediff sample --pretrained DIR --fp8`: samples from the same noise, close to the plain ones, not equal."""
    td.pixart_pipeline().save_pretrained(tmp_path / "pixart")

    def samples(name, *options):
        out = tmp_path / name
        argv = ["sample", "--pretrained", str(tmp_path / "pixart"), "--output", str(out), "--num-samples", "2",
                "--seed", "3", "--device", "cpu", *options] + sum((["--prompt", p] for p in PROMPTS), [])
        assert main(argv) == 0
        return load_file(str(out / "latents.safetensors"))["latents"]

    plain, fp8 = samples("plain"), samples("fp8", "--fp8", "--fuse-qkv")
    error = rel(fp8, plain)
    print(f"tiny PixArt pipeline, 2 prompts, --fp8 vs float32 latents: relative error {error:.4f}")
    assert 0 < error < 0.1
