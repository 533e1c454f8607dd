"""A small PixArt-α-style diffusion transformer (DiT) for latents [B, 4, 8, 8].

Follows PixArt-α (Chen et al. 2023, arXiv 2310.00426) and its reference code (PixArt-alpha/PixArt-alpha,
``diffusion/model/nets/PixArt.py``):
  * patch embedding + fixed 2D sin-cos positional embedding (DiT);
  * adaLN-single: the timestep embedding goes through ONE shared MLP (``t_block``) to 6·hidden modulation values,
    and each block adds its own learned ``scale_shift_table`` [6, hidden];
  * each block: modulated self-attention with gate, cross-attention to the projected caption tokens, modulated MLP
    with gate;
  * caption dropout by a learned null caption ``y_embedding`` (classifier-free guidance);
  * T2IFinalLayer (norm, shift/scale from a table + timestep embedding, zero-initialised linear), unpatchify.
Additions for this project: a pooled-caption MLP added to the timestep embedding (``pooled_cond``) and LCM's
guidance-scale embedding (``guidance_embed``) whose last layer starts at zero, so a teacher checkpoint loaded into a
student behaves identically. No learned sigma: the output has the input's shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from e2ediff.conditioning import TextCond

FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal features of t (and of w), as DiT / PixArt


@dataclass
class DiTConfig:
    in_channels: int = 4           # latent channels (output has the same number: no learned sigma)
    input_size: int = 8            # latent height = width
    patch_size: int = 1            # tokens = (input_size / patch_size)²
    hidden_size: int = 192
    depth: int = 6                 # number of transformer blocks
    num_heads: int = 6
    mlp_ratio: float = 4.0
    text_dim: int = 384            # caption token / pooled feature size (MiniLM: 384)
    max_text_len: int = 16         # caption tokens; the learned null caption has this length
    pooled_cond: bool = True       # add MLP(pooled caption) to the timestep embedding
    guidance_embed: bool = False   # LCM student: add MLP(sinusoidal(w)) to the timestep embedding
    dropout: float = 0.0           # attention and MLP dropout (uses the global RNG; keep 0 for reproducible runs)

    def validate(self) -> None:
        """Raise ValueError naming the first impossible field."""
        for name in ("in_channels", "input_size", "patch_size", "hidden_size", "depth", "num_heads", "text_dim",
                     "max_text_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DiTConfig.{name} = {value!r}, expected a positive integer")
        if self.input_size % self.patch_size:
            raise ValueError(f"DiTConfig.input_size = {self.input_size} is not divisible by "
                             f"patch_size = {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiTConfig.hidden_size = {self.hidden_size} is not divisible by "
                             f"num_heads = {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"DiTConfig.hidden_size = {self.hidden_size}, expected a multiple of 4 "
                             "(the 2D sin-cos positional embedding splits it in four)")
        if not self.mlp_ratio > 0:
            raise ValueError(f"DiTConfig.mlp_ratio = {self.mlp_ratio}, expected > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DiTConfig.dropout = {self.dropout}, expected a probability in [0, 1)")

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiTConfig":
        """A copy of ``PRESETS[name]`` with fields replaced by ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}, expected one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, DiTConfig] = {
    # 3.51M parameters, 64 tokens: CPU tests and the CPU miniature.
    "tiny": DiTConfig(hidden_size=192, depth=5, num_heads=6, patch_size=1),
    # 5.41M parameters, 64 tokens: one GPU. A shipped float16 pipeline file (this net + the 2.37M base autoencoder)
    # then stays under 16 MB.
    "base": DiTConfig(hidden_size=240, depth=5, num_heads=4, patch_size=1),
    # fashion-scenes: 16 × 16 × 4 latents, patch 2 (64 tokens); captions of up to 4 clauses × 16 tokens. 6.2M
    # parameters: a float16 pipeline file (with the 1.59M scenes autoencoder) is about 15.6 MB, under the 16 MiB a device call returns per file.
    "scenes": DiTConfig(input_size=16, patch_size=2, hidden_size=256, depth=5, num_heads=4, max_text_len=64),
}


# ----------------------------------------------------------------------------------------------------------------------
# Embeddings


def sinusoidal_embedding(t: Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10000.0) -> Tensor:
    """DiT's timestep embedding: [B] -> [B, dim] = [cos(t·f_k), sin(t·f_k)], f_k = max_period^(-k/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2D sin-cos positional embedding (MAE / DiT): [grid_size², dim]; half the channels encode the row."""
    def axis(d: int, pos: Tensor) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    coords = torch.arange(grid_size, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    # DiT feeds (w, h) in this order: the first half encodes the column index, the second the row index.
    return torch.cat([axis(dim // 2, gx), axis(dim // 2, gy)], dim=1).float()


def _mlp(in_dim: int, hidden: int, out_dim: int, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), act, nn.Linear(hidden, out_dim))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """PixArt's t2i_modulate: x·(1 + scale) + shift; x [B, N, H], shift/scale [B, 1, H]."""
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------------------------------
# Blocks


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, N, H] -> [B, N, H]."""
        b, n, h = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, h))


class CrossAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        """x [B, N, H] attends to caption tokens y [B, L, H] where mask [B, L] is True -> [B, N, H].

        A row without any real token would be a softmax over nothing (NaN); such rows attend to all tokens for a
        finite computation and their result is then zeroed, so they receive no caption information.
        """
        b, n, h = x.shape
        length, hd = y.shape[1], h // self.heads
        q = self.q(x).view(b, n, self.heads, hd).transpose(1, 2)
        k, v = self.kv(y).view(b, length, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        has_token = mask.any(dim=1)
        safe_mask = mask | ~has_token[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask[:, None, None, :],
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out * has_token[:, None, None, None].to(out.dtype)
        return self.proj(out.transpose(1, 2).reshape(b, n, h))


class DiTBlock(nn.Module):
    """PixArt block: adaLN-single modulated self-attention, cross-attention, modulated MLP."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden, heads, dropout)
        self.cross_attn = CrossAttention(hidden, heads, dropout)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(mlp_hidden, hidden))
        self.scale_shift_table = nn.Parameter(torch.zeros(6, hidden))

    def forward(self, x: Tensor, y: Tensor, mask: Tensor, t6: Tensor) -> Tensor:
        """x [B, N, H], y [B, L, H], mask [B, L], t6 [B, 6H] (shared t_block output) -> [B, N, H]."""
        b, _, h = x.shape
        # adaLN-single (PixArt-α Sec. 2.3): per-block table + shared global modulation.
        mod = self.scale_shift_table[None] + t6.view(b, 6, h)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(x, y, mask)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """PixArt's T2IFinalLayer: LayerNorm, shift/scale = table + timestep embedding, linear to patch pixels."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x [B, N, H], c [B, H] (timestep + extra embeddings) -> [B, N, p·p·C]."""
        shift, scale = (self.scale_shift_table[None] + c[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------------------------------------------------
# The network


class DiT(nn.Module):
    """PixArt-α-style DiT: ``forward(x [B,C,S,S], t [B], cond: TextCond, w [B] | None) -> [B,C,S,S]``.

    ``generator`` seeds every initial weight, so two networks built with equally seeded generators are identical.
    """

    def __init__(self, config: DiTConfig, generator: torch.Generator | None = None):
        super().__init__()
        config.validate()
        self.config = config
        hidden, p = config.hidden_size, config.patch_size
        self.gradient_checkpointing = False

        self.x_embedder = nn.Conv2d(config.in_channels, hidden, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, config.input_size // p)[None],
                             persistent=False)
        self.t_embedder = _mlp(FREQUENCY_EMBEDDING_SIZE, hidden, hidden, nn.SiLU())
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.y_embedder = _mlp(config.text_dim, hidden, hidden, nn.GELU(approximate="tanh"))
        self.y_embedding = nn.Parameter(torch.zeros(config.max_text_len, config.text_dim))  # null caption
        if config.pooled_cond:
            self.pooled_embedder = _mlp(config.text_dim, hidden, hidden, nn.SiLU())
            self.pooled_null = nn.Parameter(torch.zeros(config.text_dim))
        if config.guidance_embed:
            self.w_embedder = _mlp(FREQUENCY_EMBEDDING_SIZE, hidden, hidden, nn.SiLU())
        self.blocks = nn.ModuleList(DiTBlock(hidden, config.num_heads, config.mlp_ratio, config.dropout)
                                    for _ in range(config.depth))
        self.final_layer = FinalLayer(hidden, p, config.in_channels)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PixArt's initialize_weights: xavier linears, N(0, 0.02) embedders, zero cross-attn out and final layer."""
        g = generator
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=g)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1), generator=g)
        nn.init.zeros_(self.x_embedder.bias)
        embedders = [self.t_embedder[0], self.t_embedder[2], self.t_block[1], self.y_embedder[0], self.y_embedder[2]]
        if self.config.pooled_cond:
            embedders += [self.pooled_embedder[0], self.pooled_embedder[2]]
            self.pooled_null.normal_(0.0, self.config.text_dim ** -0.5, generator=g)
        if self.config.guidance_embed:
            embedders.append(self.w_embedder[0])
        for linear in embedders:
            linear.weight.normal_(0.0, 0.02, generator=g)
        self.y_embedding.normal_(0.0, self.config.text_dim ** -0.5, generator=g)
        hidden = self.config.hidden_size
        for block in self.blocks:
            block.scale_shift_table.normal_(0.0, hidden ** -0.5, generator=g)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        self.final_layer.scale_shift_table.normal_(0.0, hidden ** -0.5, generator=g)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.config.guidance_embed:
            # Zero last layer: at initialisation w adds nothing, so a teacher's weights give the teacher's output.
            nn.init.zeros_(self.w_embedder[2].weight)
            nn.init.zeros_(self.w_embedder[2].bias)

    def repeated_blocks(self) -> nn.ModuleList:
        """The identical transformer blocks: what regional compilation compiles (e2ediff.adapters.speed.compile_network,
        the same contract as the PixArt adapter's)."""
        return self.blocks

    def enable_gradient_checkpointing(self, flag: bool = True) -> None:
        """Recompute each block's activations in backward (torch.utils.checkpoint, non-reentrant)."""
        self.gradient_checkpointing = flag

    # ------------------------------------------------------------------------------------------------------------------

    def _check_inputs(self, x: Tensor, t: Tensor, cond: TextCond, w: Tensor | None) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"DiT input x has shape {tuple(x.shape)}, expected [B, {', '.join(map(str, expected))}]")
        b = x.shape[0]
        if t.shape != (b,):
            raise ValueError(f"DiT timestep t has shape {tuple(t.shape)}, expected ({b},)")
        if len(cond) != b:
            raise ValueError(f"TextCond has batch {len(cond)}, expected {b} (the batch of x)")
        if cond.tokens.shape[-1] != cfg.text_dim or cond.pooled.shape[-1] != cfg.text_dim:
            raise ValueError(f"TextCond features have size {cond.tokens.shape[-1]} (tokens) / "
                             f"{cond.pooled.shape[-1]} (pooled), expected text_dim = {cfg.text_dim}")
        if cond.tokens.shape[1] > cfg.max_text_len:
            raise ValueError(f"TextCond.tokens has {cond.tokens.shape[1]} tokens, expected at most "
                             f"max_text_len = {cfg.max_text_len}")
        if cfg.guidance_embed and w is None:
            raise ValueError("this DiT has guidance_embed=True: pass the guidance scale w [B]")
        if not cfg.guidance_embed and w is not None:
            raise ValueError("a guidance scale w was passed but this DiT has guidance_embed=False")
        if w is not None and w.shape != (b,):
            raise ValueError(f"guidance scale w has shape {tuple(w.shape)}, expected ({b},)")

    def caption(self, cond: TextCond) -> tuple[Tensor, Tensor, Tensor]:
        """Pad tokens to max_text_len, zero padded features, substitute the null caption where cond.drop.

        Returns tokens [B, max_text_len, text_dim], mask [B, max_text_len] bool, pooled [B, text_dim].
        """
        tokens, mask, pooled = cond.tokens, cond.mask.bool(), cond.pooled
        pad = self.config.max_text_len - tokens.shape[1]
        tokens = F.pad(tokens, (0, 0, 0, pad))
        mask = F.pad(mask, (0, pad), value=False)
        tokens = tokens * mask[..., None].to(tokens.dtype)  # padded features can never reach the output
        if cond.drop is not None:
            drop = cond.drop.bool()
            # PixArt's caption dropout: the learned null caption, with every one of its tokens attended to.
            tokens = torch.where(drop[:, None, None], self.y_embedding[None].to(tokens.dtype), tokens)
            mask = mask | drop[:, None]
            if self.config.pooled_cond:
                pooled = torch.where(drop[:, None], self.pooled_null[None].to(pooled.dtype), pooled)
        return tokens, mask, pooled

    def unpatchify(self, h: Tensor) -> Tensor:
        """[B, N, p·p·C] -> [B, C, S, S]."""
        p, c = self.config.patch_size, self.config.in_channels
        g = self.config.input_size // p
        h = h.view(h.shape[0], g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", h).reshape(h.shape[0], c, g * p, g * p)

    def forward(self, x: Tensor, t: Tensor, cond: TextCond, w: Tensor | float | None = None) -> Tensor:
        """x [B, C, S, S] latents, t [B] timesteps in [0, 1000), cond captions, w [B] guidance scale -> [B, C, S, S]."""
        if w is not None and not torch.is_tensor(w):
            w = torch.full((x.shape[0],), float(w), device=x.device)
        self._check_inputs(x, t, cond, w)
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)  # [B, N, H]
        c = self.t_embedder(sinusoidal_embedding(t).to(x.dtype))                         # [B, H]
        tokens, mask, pooled = self.caption(cond)
        if self.config.pooled_cond:
            c = c + self.pooled_embedder(pooled.to(x.dtype))
        if self.config.guidance_embed:
            # LCM's guidance-scale embedding: sinusoidal features of 1000·w (diffusers get_guidance_scale_embedding).
            c = c + self.w_embedder(sinusoidal_embedding(1000.0 * w).to(x.dtype))
        t6 = self.t_block(c)                                                              # [B, 6H]
        y = self.y_embedder(tokens.to(x.dtype))                                           # [B, L, H]
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, y, mask, t6, use_reentrant=False)
            else:
                h = block(h, y, mask, t6)
        return self.unpatchify(self.final_layer(h, c))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
