"""The PixArt-style DiT: shapes, determinism, presets, caption dropout, masking, guidance embedding, checkpointing."""
import math

import numpy as np
import pytest
import torch

from e2ediff.conditioning import TextCond
from e2ediff.models.dit import PRESETS, DiT, DiTConfig, count_parameters, sincos_pos_embed_2d, sinusoidal_embedding

SMALL = DiTConfig(hidden_size=32, depth=2, num_heads=4, text_dim=16, max_text_len=6)


def make_net(cfg: DiTConfig = SMALL, seed: int = 0, randomize: bool = True) -> DiT:
    """A seeded DiT; ``randomize`` replaces every weight (zero-initialised ones included) by N(0, 0.1²) draws so
    that every path (cross-attention, final layer) actually reaches the output."""
    g = torch.Generator().manual_seed(seed)
    net = DiT(cfg, generator=g)
    if randomize:
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0.0, 0.1, generator=g)
    return net


def make_inputs(cfg: DiTConfig = SMALL, batch: int = 3, length: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    tokens = torch.randn(batch, length, cfg.text_dim, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, length - 2:] = False  # the last two tokens are padding
    pooled = torch.randn(batch, cfg.text_dim, generator=g)
    return x, t, TextCond(tokens, mask, pooled)


@pytest.mark.parametrize("patch", [1, 2])
def test_output_shape_and_finite(patch):
    cfg = DiTConfig(hidden_size=32, depth=2, num_heads=4, text_dim=16, max_text_len=6, patch_size=patch)
    net = make_net(cfg)
    x, t, cond = make_inputs(cfg)
    out = net(x, t, cond)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert net.config.num_tokens == (8 // patch) ** 2


def test_zero_init_output_is_zero():
    """PixArt zero-initialises the final linear: a fresh network predicts exactly 0."""
    net = make_net(randomize=False)
    x, t, cond = make_inputs()
    assert torch.equal(net(x, t, cond), torch.zeros_like(x))


def test_determinism():
    x, t, cond = make_inputs()
    a, b = make_net(seed=3), make_net(seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    fresh_a, fresh_b = DiT(SMALL, torch.Generator().manual_seed(5)), DiT(SMALL, torch.Generator().manual_seed(5))
    assert all(torch.equal(p, q) for p, q in zip(fresh_a.parameters(), fresh_b.parameters()))
    out = a(x, t, cond)
    assert torch.equal(out, b(x, t, cond))
    assert torch.equal(out, a(x, t, cond))
    assert not torch.allclose(out, make_net(seed=4)(x, t, cond))


def test_preset_parameter_counts():
    tiny, base = count_parameters(DiT(PRESETS["tiny"])), count_parameters(DiT(PRESETS["base"]))
    assert tiny <= 4_000_000
    assert tiny < base <= 5_600_000       # + the 2.37M base autoencoder: a float16 pipeline file <= 16 MB
    assert DiTConfig.from_preset("tiny", depth=2).depth == 2
    with pytest.raises(ValueError, match="preset"):
        DiTConfig.from_preset("huge")


def test_sinusoidal_embedding_matches_numpy():
    t = torch.tensor([0.0, 1.0, 259.0, 999.0])
    half = 128
    freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float64) / half)
    args = t.double().numpy()[:, None] * freqs[None]
    ref = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    np.testing.assert_allclose(sinusoidal_embedding(t).numpy(), ref, atol=1e-4)


def test_pos_embed_matches_dit_numpy():
    """DiT's get_2d_sincos_pos_embed (numpy, meshgrid(w, h)), rewritten independently."""
    dim, size = 32, 4

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape(2, 1, size, size)
    ref = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    np.testing.assert_allclose(sincos_pos_embed_2d(dim, size).numpy(), ref, atol=1e-6)


def test_unpatchify_matches_explicit_loop():
    cfg = DiTConfig(hidden_size=32, depth=1, num_heads=4, text_dim=16, max_text_len=6, patch_size=2)
    net = make_net(cfg)
    p, c, g = 2, cfg.in_channels, 4
    h = torch.randn(2, g * g, p * p * c, generator=torch.Generator().manual_seed(0))
    ref = torch.empty(2, c, g * p, g * p)
    for i in range(g):
        for j in range(g):
            patch = h[:, i * g + j].view(2, p, p, c)  # PixArt's linear output order: (p, q, c)
            ref[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = patch.permute(0, 3, 1, 2)
    assert torch.equal(net.unpatchify(h), ref)


def test_cross_attention_matches_float64_masked_softmax():
    net = make_net()
    attn = net.blocks[0].cross_attn
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 5, 32, generator=g), torch.randn(2, 4, 32, generator=g)
    mask = torch.tensor([[True, True, False, True], [True, False, False, False]])
    out = attn(x, y, mask)
    heads, hd = 4, 8
    wq, bq = attn.q.weight.double(), attn.q.bias.double()
    wkv, bkv = attn.kv.weight.double(), attn.kv.bias.double()
    q = (x.double() @ wq.T + bq).view(2, 5, heads, hd).transpose(1, 2)
    kv = (y.double() @ wkv.T + bkv).view(2, 4, 2, heads, hd)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 32)
    ref = ref @ attn.proj.weight.double().T + attn.proj.bias.double()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_caption_drop_uses_null_embedding():
    net = make_net()
    x, t, cond = make_inputs(batch=2)
    x, t = x[:1].repeat(2, 1, 1, 1), t[:1].repeat(2)  # same latent and timestep, two different captions
    conditional = net(x, t, cond)
    assert not torch.allclose(conditional[0], conditional[1])
    dropped = net(x, t, cond.with_drop(True))
    assert torch.equal(dropped[0], dropped[1])
    assert not torch.allclose(dropped[0], conditional[0])
    # drop only the second caption: the first row keeps its conditional output
    mixed = net(x, t, cond.with_drop(torch.tensor([False, True])))
    torch.testing.assert_close(mixed[0], conditional[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], dropped[1], atol=1e-6, rtol=0)


def test_padding_tokens_are_ignored():
    net = make_net()
    x, t, cond = make_inputs()
    out = net(x, t, cond)
    tokens = cond.tokens.clone()
    tokens[:, -2:] = 100.0 * torch.randn(tokens[:, -2:].shape, generator=torch.Generator().manual_seed(9))
    assert torch.equal(net(x, t, TextCond(tokens, cond.mask, cond.pooled)), out)
    tokens = cond.tokens.clone()
    tokens[:, 0] += 1.0  # a real token does matter
    assert not torch.allclose(net(x, t, TextCond(tokens, cond.mask, cond.pooled)), out)


def test_all_padding_mask_gives_no_nan():
    net = make_net()
    x, t, cond = make_inputs()
    x.requires_grad_(True)
    empty = TextCond(cond.tokens, torch.zeros_like(cond.mask), cond.pooled)
    out = net(x, t, empty)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_guidance_embedding_starts_at_zero():
    """A teacher checkpoint loaded into a guidance-embedding student gives the teacher's output for every w."""
    teacher = make_net()
    student = DiT(DiTConfig(**{**SMALL.__dict__, "guidance_embed": True}), torch.Generator().manual_seed(7))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("w_embedder.") for k in missing) and missing
    x, t, cond = make_inputs()
    ref = teacher(x, t, cond)
    assert torch.equal(student(x, t, cond, w=torch.tensor([1.0, 4.0, 8.0])), ref)
    assert torch.equal(student(x, t, cond, w=3.0), ref)
    with pytest.raises(ValueError, match="w"):
        student(x, t, cond)
    with pytest.raises(ValueError, match="shape"):
        student(x, t, cond, w=torch.ones(2))
    with torch.no_grad():  # once trained, w does change the output
        student.w_embedder[2].weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(student(x, t, cond, w=torch.tensor([1.0, 4.0, 8.0])),
                              student(x, t, cond, w=torch.tensor([2.0, 5.0, 9.0])))


def test_gradient_checkpointing_is_exact():
    net = make_net()
    x, t, cond = make_inputs()
    cond = cond.with_drop(torch.tensor([False, True, False]))  # every parameter, null caption included, gets a grad

    def run(flag: bool):
        net.zero_grad()
        net.enable_gradient_checkpointing(flag)
        xi = x.clone().requires_grad_(True)
        out = net(xi, t, cond)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), xi.grad, [p.grad.clone() for p in net.parameters()]

    out_a, gx_a, gp_a = run(False)
    out_b, gx_b, gp_b = run(True)
    assert (out_a - out_b).abs().max() <= 1e-6
    assert (gx_a - gx_b).abs().max() <= 1e-6
    assert gx_a.abs().max() > 0
    assert max((a - b).abs().max().item() for a, b in zip(gp_a, gp_b)) <= 1e-6


def test_bad_config_and_inputs_raise():
    with pytest.raises(ValueError, match="hidden_size"):
        DiTConfig(hidden_size=30, num_heads=4).validate()
    with pytest.raises(ValueError, match="input_size"):
        DiTConfig(input_size=8, patch_size=3).validate()
    with pytest.raises(ValueError, match="dropout"):
        DiTConfig(dropout=1.0).validate()
    net = make_net()
    x, t, cond = make_inputs(length=SMALL.max_text_len + 1)
    with pytest.raises(ValueError, match="max_text_len"):
        net(x, t, cond)
    x, t, cond = make_inputs()
    with pytest.raises(ValueError, match="guidance_embed"):
        net(x, t, cond, w=torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        net(x[:, :3], t, cond)
    with pytest.raises(ValueError, match="timestep"):
        net(x, t[:2], cond)
