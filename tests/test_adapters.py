"""diffusers pipelines through the adapters: our differentiable LCM sampler against the pipelines themselves.

References: `PixArtAlphaPipeline` and `StableDiffusionPipeline` with `LCMScheduler`, run by diffusers on the same
generator seed (our sampler draws the initial latents, then one noise per re-noised step, as the pipelines do), the
pipelines' `vae.decode`, and peft's unmerged LoRA layers.
"""
import pytest
import torch

import tiny_diffusers as td
from e2ediff.adapters import speed
from e2ediff.adapters.lora import add_lora, merge_lora
from e2ediff.adapters.pipeline import sample_pretrained, wrap_pipeline
from e2ediff.conditioning import TextCond
from e2ediff.denoiser import Denoiser
from e2ediff.e2e import e2e_step
from e2ediff.models.dit import DiT, DiTConfig
from e2ediff.samplers import lcm
from e2ediff.schedules import VPSchedule, lcm_timesteps
from helpers import record_compile

PROMPTS = ["a red boot", "a blue shirt", "a black bag"]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def pixart():
    pipe = td.pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, wrap_pipeline(pipe, "tiny-pixart")


@pytest.mark.parametrize("steps", [4, 1])
def test_pixart_lcm_matches_pixart_alpha_pipeline(pixart, steps):
    pipe, pp = pixart
    assert pp.timesteps(4) == [999, 759, 499, 259]
    ours = sample_pretrained(pp, pp.encode_prompts(PROMPTS), pp.timesteps(steps), seed=3)
    ref = pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=1.0, output_type="latent", height=16,
               width=16, generator=torch.Generator().manual_seed(3), clean_caption=False,
               use_resolution_binning=False).images
    assert _rel(ours, ref) < 1e-5
    with torch.no_grad():
        decoded = pp.autoencoder.decode_latents(ours)
        assert _rel(decoded, pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample) < 1e-5


def test_pixart_micro_conditions_follow_the_pipeline():
    """A 1024-px style transformer (use_additional_conditions): resolution and aspect ratio in pixels."""
    from diffusers.models.embeddings import PixArtAlphaCombinedTimestepSizeEmbeddings

    pipe = td.pixart_pipeline(seed=1, heads=3)
    inner = pipe.transformer.inner_dim
    torch.manual_seed(5)
    pipe.transformer.adaln_single.emb = PixArtAlphaCombinedTimestepSizeEmbeddings(inner, inner // 3,
                                                                                 use_additional_conditions=True)
    pipe.transformer.use_additional_conditions = True
    pipe.transformer.register_to_config(sample_size=128)        # what the pipeline checks
    pipe.set_progress_bar_config(disable=True)
    pp = wrap_pipeline(pipe, "tiny-pixart-ms")
    ours = sample_pretrained(pp, pp.encode_prompts(PROMPTS[:2]), pp.timesteps(2), seed=1, resolution=16)
    ref = pipe(prompt=PROMPTS[:2], num_inference_steps=2, guidance_scale=1.0, output_type="latent", height=16,
               width=16, generator=torch.Generator().manual_seed(1), clean_caption=False,
               use_resolution_binning=False).images
    assert _rel(ours, ref) < 1e-5


@pytest.mark.parametrize("time_cond", [None, 8])
def test_sd_lcm_matches_stable_diffusion_pipeline(time_cond):
    """SD + LCMScheduler (an LCM-LoRA style UNet, no w input) and an LCM UNet that embeds w (guidance 8.5)."""
    pipe = td.sd_pipeline(time_cond_proj_dim=time_cond)
    pipe.set_progress_bar_config(disable=True)
    pp = wrap_pipeline(pipe, "tiny-sd")
    w = pp.default_w()
    assert (w is None) == (time_cond is None)
    ours = sample_pretrained(pp, pp.encode_prompts(PROMPTS), pp.timesteps(4), seed=7, w=w)
    ref = pipe(prompt=PROMPTS, num_inference_steps=4, guidance_scale=w or 1.0, output_type="latent", height=16,
               width=16, generator=torch.Generator().manual_seed(7)).images
    assert _rel(ours, ref) < 1e-5
    if time_cond:   # the w input matters: another scale gives another sample
        other = sample_pretrained(pp, pp.encode_prompts(PROMPTS), pp.timesteps(4), seed=7, w=3.0)
        assert _rel(other, ref) > 1e-3


def test_sdxl_lcm_matches_stable_diffusion_xl_pipeline():
    """SDXL: pooled text embeds of the second encoder and (H, W, 0, 0, H, W) time ids as the pipeline passes them."""
    pipe = td.sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pp = wrap_pipeline(pipe, "tiny-sdxl")
    assert pp.family == "sdxl"
    ours = sample_pretrained(pp, pp.encode_prompts(PROMPTS), pp.timesteps(4), seed=5, resolution=16)
    ref = pipe(prompt=PROMPTS, num_inference_steps=4, guidance_scale=1.0, output_type="latent", height=16,
               width=16, generator=torch.Generator().manual_seed(5)).images
    assert _rel(ours, ref) < 1e-5


def test_checkpointed_unroll_gives_the_same_gradients(pixart):
    """Per-step checkpointing through the diffusers transformer: gradients equal the stored-activation ones."""
    _, pp = pixart
    cond = pp.encode_prompts(PROMPTS[:2])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpoint in (False, True):
        pp.trained.zero_grad(set_to_none=True)
        pp.trained.requires_grad_(True)
        out = lcm(pp.denoiser, noise, pp.timesteps(3), cond, generator=torch.Generator().manual_seed(1),
                  checkpoint=checkpoint, timestep_scaling=pp.timestep_scaling)
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in pp.trained.parameters() if p.grad is not None]))
    pp.trained.requires_grad_(False).zero_grad(set_to_none=True)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_null_caption_is_the_pipelines_negative_prompt(pixart):
    """Dropped captions (CFG's unconditional branch) use the embedding of "" that the pipeline's CFG uses."""
    pipe, pp = pixart
    guidance = 3.0
    from e2ediff.denoiser import guided

    cond = pp.encode_prompts(PROMPTS[:2])
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    ours = lcm(guided(pp.denoiser, guidance), noise, pp.timesteps(2), cond, generator=g,
               timestep_scaling=pp.timestep_scaling)
    ref = pipe(prompt=PROMPTS[:2], negative_prompt="", num_inference_steps=2, guidance_scale=guidance,
               output_type="latent", height=16, width=16, generator=torch.Generator().manual_seed(2),
               clean_caption=False, use_resolution_binning=False).images
    assert _rel(ours, ref) < 1e-5


def test_merged_lora_equals_the_adapters():
    pipe = td.pixart_pipeline(seed=2)
    pp = wrap_pipeline(pipe, "tiny")
    add_lora(pp.trained, rank=2)
    trainable = [n for n, p in pp.trained.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    torch.manual_seed(0)
    for n, p in pp.trained.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)                     # B starts at zero: make the adapters do something
    cond = pp.encode_prompts(PROMPTS[:2])
    z = torch.randn(2, 4, 8, 8)
    t = torch.full((2,), 499.0)
    with torch.no_grad():
        with_adapters = pp.net(z, t, cond)
        merge_lora(pp.trained)
        merged = pp.net(z, t, cond)
    assert not any("lora_" in n for n, _ in pp.trained.named_parameters())
    assert _rel(merged, with_adapters) < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# Speed levers (e2ediff.adapters.speed): each keeps the sampler's output and the checkpointed gradients


def _net_output(pp, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        return pp.net(z, torch.tensor([999.0, 259.0]), cond)


@pytest.mark.parametrize("lora", [False, True])
def test_fused_qkv_keeps_the_transformer_output(lora):
    """diffusers' fuse_qkv_projections on PixArt: one q/k/v matmul (self-attention), one k/v matmul (cross); with
    LoRA adapters on the projections they are merged first, so the fused network still applies them."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    pp = wrap_pipeline(td.pixart_pipeline(seed=3), "tiny")
    if lora:
        add_lora(pp.trained, rank=2)
        for n, p in pp.trained.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    cond = pp.encode_prompts(PROMPTS[:2])
    before = _net_output(pp, cond)
    speed.fuse_qkv(pp.trained)
    processors = set(type(p) for p in pp.trained.attn_processors.values())
    assert processors == {FusedAttnProcessor2_0}
    assert hasattr(pp.trained.transformer_blocks[0].attn1, "to_qkv")
    assert hasattr(pp.trained.transformer_blocks[0].attn2, "to_kv")
    assert _rel(_net_output(pp, cond), before) < 1e-5


def test_regional_compile_keeps_samples_and_checkpointed_gradients(monkeypatch):
    """compile_network compiles each PixArt block (dynamic=False) in place; sampling and the gradients of a
    checkpointed unroll (every step, and every step but the last) through the compiled blocks equal eager ones."""
    calls = record_compile(monkeypatch, "aot_eager")
    pp = wrap_pipeline(td.pixart_pipeline(seed=4), "tiny")
    cond = pp.encode_prompts(PROMPTS[:2])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def sample_and_grads(checkpoint):
        pp.trained.zero_grad(set_to_none=True)
        pp.trained.requires_grad_(True)
        out = lcm(pp.denoiser, noise, pp.timesteps(3), cond, generator=torch.Generator().manual_seed(1),
                  checkpoint=checkpoint, timestep_scaling=pp.timestep_scaling)
        out.square().mean().backward()
        grads = torch.cat([p.grad.flatten() for p in pp.trained.parameters() if p.grad is not None])
        pp.trained.requires_grad_(False)
        return out.detach(), grads

    eager_out, eager_grads = sample_and_grads(False)
    compiled = speed.compile_network(pp.net)
    assert compiled == list(pp.trained.transformer_blocks) and len(calls) == len(compiled) == 2
    assert {mode for _, mode in calls} == {None}
    for checkpoint in (False, True, "except_last"):
        out, grads = sample_and_grads(checkpoint)
        assert _rel(out, eager_out) < 1e-6 and _rel(grads, eager_grads) < 1e-6, checkpoint
    with pytest.raises(ValueError, match="compile mode"):
        speed.compile_network(pp.net, "fastest")


def test_speed_compile_network_compiles_each_dit_block(monkeypatch):
    """compile_network on the project's DiT (no adapter): each DiTBlock, in place, as PixArt's blocks; the E2E step's
    sample and its gradients through a checkpointed unroll (every step, every step but the last) equal eager ones."""
    calls = record_compile(monkeypatch, "aot_eager")
    cfg = DiTConfig(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=4, text_dim=16, max_text_len=6,
                    pooled_cond=False, guidance_embed=True)
    g = torch.Generator().manual_seed(0)
    net = DiT(cfg, generator=g)
    with torch.no_grad():                              # every path (cross-attention, final layer) reaches the output
        for p in net.parameters():
            p.normal_(0.0, 0.1, generator=g)
    denoiser = Denoiser(net, VPSchedule.from_name("linear"), "eps")
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    cond = TextCond(torch.randn(2, 6, 16, generator=g), mask, torch.randn(2, 16, generator=g))
    images = torch.randn(2, 4, 8, 8, generator=g)

    def sample_and_grads(checkpoint):
        net.zero_grad(set_to_none=True)
        _, out = e2e_step(denoiser, None, images, cond, timesteps=lcm_timesteps(3), m=1, w=1.5, z0=images,
                          generator=torch.Generator().manual_seed(1), checkpoint=checkpoint)
        out.square().mean().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])

    eager_out, eager_grads = sample_and_grads(False)
    compiled = speed.compile_network(net)
    assert compiled == list(net.blocks) and len(calls) == cfg.depth
    for checkpoint in (False, True, "except_last"):
        out, grads = sample_and_grads(checkpoint)
        assert _rel(out, eager_out) < 1e-6 and _rel(grads, eager_grads) < 1e-6, checkpoint
    assert [name for name, _ in net.named_parameters()] == [name for name, _ in DiT(cfg).named_parameters()]


def test_attention_backend_order_keeps_the_output(pixart):
    _, pp = pixart
    cond = pp.encode_prompts(PROMPTS[:2])
    ref = _net_output(pp, cond)
    for name in speed.ATTENTION_BACKENDS:
        with speed.attention_backend(name):
            assert _rel(_net_output(pp, cond), ref) < 1e-5, name
    with pytest.raises(ValueError, match="attention backend"):
        with speed.attention_backend("xformers"):
            pass
