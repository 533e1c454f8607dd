"""PixArt-XL-2 size on one GPU: 4-step sampling vs PixArtAlphaPipeline, E2E step (time, MFU), memory flat in K.

    PYTHONPATH=src python3 benchmarks/pixart_xl.py --out pixart_xl.json --budget-s 480 --compile --lora-rank 0
    PYTHONPATH=src python3 benchmarks/pixart_xl.py --out pixart_xl.json --budget-s 540                  # all eager
    PYTHONPATH=src python3 benchmarks/pixart_xl.py --out sampling.json --budget-s 300 --compile --only-sampling
    PYTHONPATH=src python3 benchmarks/pixart_xl.py --tiny --device cpu --out /tmp/tiny.json [--compile]  # smoke run
    PYTHONPATH=src python3 benchmarks/pixart_xl.py --network dit --out dit_xl.json --budget-s 420 --compile \
        --lora-rank 0 --extras memory_budget bf16_weights                      # the project's DiT, training rows

Model: diffusers `PixArtTransformer2DModel` at PixArt-XL-2 size (28 blocks × 1152, 16 heads × 72, patch 2, learned
sigma, T5 4096-d × 120 caption tokens), random weights, behind the project's adapter (e2ediff.adapters.pixart),
512-px latents (4 × 64 × 64), batch 32. Training: float32 master weights under bf16 autocast (`--weights bf16`:
bf16 weights), AdamW (fused on CUDA). Sampling: bf16 weights. "Compiled" is the product's regional compilation
(e2ediff.adapters.speed.compile_network: each transformer block, dynamic=False, `--compile-mode`).

Rows, in this order; each is written to --out as soon as it is measured. A row that raises records its error and the
next row runs; a row whose estimated cost (NEED_S) exceeds the time left is listed under "skipped"; at --budget-s +
30 s the row in flight is abandoned and the file is closed. Times are medians over --iters calls after --warmup calls
(synchronised); `first_s` is the first call alone, also given as `compile_warmup_s` when it compiled graphs
(`graphs_compiled`: graphs compiled during the row; 0 on a compiled row means the existing graphs served).
  flops                model FLOPs counted by FlopCounterMode in a separate eager pass at batch 2 (the counter defeats
                       activation checkpointing; its memory is never reported), scaled to the batch: one forward, the
                       standard step, the E2E K = 4 step (forward + backward, no recomputation)
  sampling_*           4 LCM steps (999/759/499/259), latents out, no gradients, same noise (one generator seed per
                       call), same T5-shaped features, same batch:
    pipeline_bf16          diffusers' PixArtAlphaPipeline as users run it: bf16 weights (from_pretrained(torch_dtype=
                           torch.bfloat16)), eager, prompt_embeds given, output_type="latent"  — the denominator
    pipeline_fp32_autocast the same pipeline on float32 weights under bf16 autocast
    ours_eager             the product path `adapters.pipeline.sample_pretrained` on the same bf16 transformer
    ours_fused             + fused q/k/v projections (speed.fuse_qkv)
    ours_{eager,fused}_cudnn   the same with cuDNN attention first (speed.attention_backend)
    ours_fp8               the fastest of those four (with --attention: of those with that order) with FP8 matmuls in
                           the transformer blocks (speed.float8_linear: e4m3, weights per channel, activations per
                           token), eager; rel_diff_*: its latents against ours_eager's and the pipeline's
    ours_compiled          the fastest of those four under regional torch.compile; rel_diff_*: its latents against
                           the eager ones and the pipeline's
    ours_compiled_fp8      ours_compiled's settings + float8_linear, its own regional compile; rel_diff_*: its
                           latents against ours_compiled's (bf16) and the pipeline's
    summary                speed-ups over both pipeline rows; ours vs pipeline latents (same noise)
  attention_check      (only when the sampling rows chose a non-default attention order, which training then uses)
                       one eager forward + backward at batch 4 with that order vs torch's default: relative difference
                       of loss and gradients; training keeps torch's order unless they agree
  e2e_step_K4          one E2E step (`e2e.e2e_step`, Algorithm 1) through 4 LCM steps, every step checkpointed, L2 on
                       ẑ0, backward, AdamW; MFU = model FLOPs / time / peak, HFU adds the recomputed forwards
  e2e_step_K4_except_last   the same with the last step not checkpointed (samplers.unroll checkpoint="except_last")
  standard_step        one diffusion training step: ε-MSE at a random t, backward, AdamW
  mfu                  the MFU of those three rows side by side (model FLOPs only: recomputation earns nothing)
  e2e_step_K{1,2}, ratios   E2E / standard against the floor (4K − 1)/3
  peak_memory_*        max_memory_allocated of an E2E step at K = 1, 4, 8 (every step checkpointed; K = 1, 8 also
                       except_last), weights + gradients + AdamW state included; memory_K8_over_K1
  extras (--extras, in this order):
    memory_budget      E2E K = 4 with no per-step checkpointing: the compiled blocks save only what
                       torch._functorch.config.activation_memory_budget = --memory-budget allows and recompute the rest
                       in backward (recompiles); time, MFU, peak memory
    pipeline_compiled  the pipeline's bf16 transformer under the same regional compile (compiled vs compiled)
    bf16_weights       E2E K = 4 (except_last) with bf16 weights and bf16 AdamW, no autocast (recompiles). Not a
                       training recipe: AdamW updates at lr 1e-6 are below bf16's resolution of the weights
    sampling_autotune  ours_compiled again with mode max-autotune-no-cudagraphs (fresh compile)
    lora               LoRA (--lora-rank) E2E K = 4: peak memory and time (recompiles)
--only-sampling: the flops row counts the forward only, then the sampling rows and the sampling extras
(pipeline_compiled, sampling_autotune, if in --extras); no training, memory or training-extra row.

--network dit: the same training rows on the project's own DiT (e2ediff.models.dit) at the same size, used as the
trainer uses it: the network itself behind `Denoiser` (no adapter), 28 DiTBlocks × 1152, 16 heads × 72, patch 2,
T5-sized 4096-d × --tokens captions (mask, pooled features unused: pooled_cond=False), LCM student's guidance-scale
embedding (w = DIT_W); "compiled" compiles each DiTBlock (its `repeated_blocks()`). The JSON records "network" and
"dit_config". PixArtAlphaPipeline cannot run it: the sampling rows and the pipeline_compiled / sampling_autotune
extras are not run (reasons under "not_run"); the lora row puts the adapters on the DiT's attention projections
(DIT_LORA_TARGETS); bf16_weights also gives the DiT bf16 latents and features (it has no adapter that casts them).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

T0 = time.perf_counter()

import torch  # noqa: E402

from e2ediff.adapters import speed  # noqa: E402
from e2ediff.adapters.lora import DEFAULT_TARGETS, add_lora  # noqa: E402
from e2ediff.adapters.pixart import PixArtNet  # noqa: E402
from e2ediff.conditioning import TextCond  # noqa: E402
from e2ediff.denoiser import Denoiser  # noqa: E402
from e2ediff.e2e import e2e_step  # noqa: E402
from e2ediff.models.dit import DiT, DiTConfig  # noqa: E402
from e2ediff.schedules import VPSchedule, lcm_timesteps  # noqa: E402

XL = dict(num_layers=28, attention_head_dim=72, num_attention_heads=16, caption_channels=4096, cross_attention_dim=1152)
TINY = dict(num_layers=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32, cross_attention_dim=16)
# --network dit: the project's DiT at the same sizes (input_size and max_text_len come from --resolution, --tokens)
DIT_XL = dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0, text_dim=4096)
DIT_TINY = dict(patch_size=2, hidden_size=16, depth=2, num_heads=2, mlp_ratio=4.0, text_dim=32)
DIT_W = 1.5                                    # guidance-scale input of the LCM student (distill's sample_guidance)
DIT_LORA_TARGETS = ("qkv", "proj", "q", "kv")  # the DiT's attention projections, as to_q/to_k/to_v/to_out.0 in PixArt
NETWORKS = ("pixart", "dit")
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}      # dense bf16 tensor-core peak
EXTRAS = ("memory_budget", "pipeline_compiled", "bf16_weights", "sampling_autotune", "lora")
SAMPLING_EXTRAS = ("pipeline_compiled", "sampling_autotune")
# Seconds a row may need on an H100 (compiles included); a row starts only with this much of the budget left.
NEED_S = {"flops": 20, "sampling_eager": 12, "sampling_compiled": 100, "e2e_compiled": 160, "e2e": 25, "standard": 10,
          "memory": 15, "recompile_e2e": 160, "pipeline_compiled": 90, "sampling_autotune": 200, "lora": 160}
NEED_S["sampling_fp8"] = NEED_S["sampling_eager"]                      # + quantizing 611M weights: under a second
NEED_S["sampling_compiled_fp8"] = NEED_S["sampling_compiled"]          # its own compile of the blocks


class BudgetExceeded(BaseException):
    """Raised by the alarm at --budget-s + 30 s (a BaseException: no library's `except Exception` swallows it)."""


def build_transformer(size: dict, latent: int, device, weights_dtype):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):                          # initialised where it runs (611M parameters)
        model = PixArtTransformer2DModel(sample_size=latent, patch_size=2, in_channels=4, out_channels=8,
                                         attention_bias=True, activation_fn="gelu-approximate",
                                         num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                         norm_elementwise_affine=False, norm_eps=1e-6,
                                         use_additional_conditions=False, **size)
    return model.to(device=device, dtype=weights_dtype)


def dit_config(args) -> DiTConfig:
    """The project's DiT at PixArt-XL-2 size (--tiny: 2 small blocks) as an LCM student: guidance-scale embedding, no
    pooled caption (T5 gives none)."""
    return DiTConfig(in_channels=4, input_size=args.resolution // 8, max_text_len=args.tokens, pooled_cond=False,
                     guidance_embed=True, **(DIT_TINY if args.tiny else DIT_XL))


def build_dit(config: DiTConfig, device, weights_dtype) -> DiT:
    torch.manual_seed(0)
    with torch.device(device):                          # initialised where it runs (the global generator)
        model = DiT(config)
    return model.to(device=device, dtype=weights_dtype)


def rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                       "torch": torch.__version__, "device": torch.cuda.get_device_name() if self.cuda else "cpu",
                       "settings": vars(args), "rows": {}, "skipped": []}
        if self.cuda:       # cuDNN >= 9.15 on Hopper: torch may try cuDNN attention first (else flash / efficient)
            self.result["cudnn"] = torch.backends.cudnn.version()
        try:
            import diffusers
            self.result["diffusers"] = diffusers.__version__
        except ImportError:
            pass
        self.latent = args.resolution // 8
        self.weights_dtype = torch.bfloat16 if args.weights == "bf16" else torch.float32
        self.dit = args.network == "dit"
        self.result["network"] = args.network
        if self.dit:                                     # the network itself is the denoiser's net (no adapter)
            config = dit_config(args)
            self.result["dit_config"] = dataclasses.asdict(config)
            self.model = build_dit(config, self.device, self.weights_dtype)
            self.text_dim = config.text_dim
            self.w = DIT_W
        else:
            size = TINY if args.tiny else XL
            self.model = build_transformer(size, self.latent, self.device, self.weights_dtype)
            self.text_dim = size["caption_channels"]
            self.w = None                                # PixArt-δ embeds no guidance scale
        self.result["params"] = sum(p.numel() for p in self.model.parameters())
        g = torch.Generator().manual_seed(1)
        b, length = args.batch, args.tokens
        self.cond = TextCond(torch.randn(b, length, self.text_dim, generator=g).to(self.device),
                             torch.ones(b, length, dtype=torch.bool, device=self.device),
                             torch.randn(b, self.text_dim, generator=g).to(self.device))
        self.null = (torch.zeros(length, self.text_dim), torch.ones(length, dtype=torch.bool))
        self.net = self.model if self.dit else PixArtNet(self.model, *self.null, vae_downsample=8).to(self.device)
        self.schedule = VPSchedule.from_name("linear")
        self.denoiser = Denoiser(self.net, self.schedule, "eps")
        self.z0 = torch.randn(b, 4, self.latent, self.latent, generator=g).to(self.device)
        self.peak = next((v for k, v in PEAK_FLOPS.items() if k in self.result["device"]), None)
        self.flops: dict[str, float] = {}
        self.sampling: dict = {}
        self.train_attention = "default"
        self.train_compiled = False

    # -- helpers --------------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - T0)

    def need(self, key: str) -> float:
        return 0.0 if self.args.tiny else NEED_S[key]

    def save(self):
        self.result["elapsed_s"] = time.perf_counter() - T0
        if self.args.out:
            Path(self.args.out).write_text(json.dumps(self.result, indent=1, default=str) + "\n")

    def cleanup(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def row(self, name: str, fn, need: str | None = None):
        """Run fn() and record what it returns (a dict), its error, or that it was skipped for lack of time."""
        if need is not None and self.left() < self.need(need):
            self.result["skipped"].append({"row": name, "needs_s": self.need(need), "left_s": round(self.left(), 1)})
            print(f"{name}: skipped ({self.left():.0f} s left, needs {self.need(need)})", flush=True)
            self.save()
            return None
        start, graphs = time.perf_counter(), graphs_compiled()
        try:
            value = fn()
        except torch.cuda.OutOfMemoryError as e:
            value = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        except BudgetExceeded:
            self.result["rows"][name] = {"error": "abandoned: --budget-s + 30 s reached during this row"}
            self.save()
            raise
        except Exception as e:                                    # one row's failure must not lose the others
            traceback.print_exc()
            message = " ".join(str(e).split())
            oom = "out of memory" in message.lower()             # also when a compiler wrapped the OOM
            value = {"error": ("out of memory: " if oom else f"{type(e).__name__}: ") + message[:400]}
        if isinstance(value, dict):
            value["row_wall_s"] = round(time.perf_counter() - start, 2)
            value["graphs_compiled"] = graphs_compiled() - graphs
        if "error" in (value or {}):
            self.cleanup()
        self.result["rows"][name] = value
        print(f"{name}: {json.dumps(value, default=str)}", flush=True)
        self.save()
        return value

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, step, iters=None, warmup=None) -> dict:
        """{"s": median of the timed calls, "first_s": the first call, "n": calls timed}, and "compile_warmup_s" (the
        first call) when it compiled graphs."""
        iters = self.args.iters if iters is None else iters
        warmup = self.args.warmup if warmup is None else warmup
        times, graphs = [], graphs_compiled()
        for i in range(warmup + iters):
            self.sync()
            t = time.perf_counter()
            step(i)
            self.sync()
            times.append(time.perf_counter() - t)
            if i == 0:
                graphs = graphs_compiled() - graphs
        steady = times[warmup:] or times[-1:]
        out = {"s": statistics.median(steady), "first_s": times[0], "n": len(steady)}
        if graphs:
            out["compile_warmup_s"] = times[0]
        return out

    def autocast(self, enabled=None):
        on = self.args.autocast if enabled is None else enabled
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    def optimizer(self, model=None):
        params = [p for p in (model or self.model).parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-6, weight_decay=1e-8, fused=self.cuda)

    def mfu(self, flops: float, secs: float | None) -> float | None:
        return flops / secs / self.peak if flops and secs and self.peak else None

    # -- the steps ------------------------------------------------------------------------------------------------
    def standard_loss(self, i, batch=None, autocast=None):
        b = batch or self.args.batch
        g = torch.Generator(device=self.device).manual_seed(i)
        z0, cond = self.z0[:b], self.cond[:b]
        t = torch.randint(0, 1000, (b,), generator=g, device=self.device).float()
        noise = torch.randn(z0.shape, generator=g, device=self.device)
        z_t = self.schedule.add_noise(z0, noise, t)
        with self.autocast(autocast):
            eps = self.net(z_t, t, cond, w=self.w)
        return (eps.float() - noise).square().mean()

    def e2e_loss(self, i, k, checkpoint=True, batch=None, autocast=None, dtype=None):
        """dtype: latents and caption features in this dtype (bf16 weights of the DiT, which no adapter casts for)."""
        b = batch or self.args.batch
        g = torch.Generator(device=self.device).manual_seed(i)
        z0, cond = self.z0[:b], self.cond[:b]
        if dtype is not None:
            z0, cond = z0.to(dtype), cond.to(dtype=dtype)
        with self.autocast(autocast):
            z0, z0_hat = e2e_step(self.denoiser, None, z0, cond, timesteps=lcm_timesteps(k), m=1, generator=g,
                                  w=self.w, checkpoint=checkpoint, z0=z0)
        return (z0_hat.float() - z0.float()).square().mean()

    def train_step(self, loss_fn, opt):
        def step(i):
            opt.zero_grad(set_to_none=True)
            with speed.attention_backend(self.train_attention):
                loss_fn(i).backward()
            opt.step()
        return step

    def peak_memory(self, step) -> float | None:
        if not self.cuda:
            return None
        step(0)                                          # warm: optimizer state allocated
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        step(1)
        self.sync()
        return torch.cuda.max_memory_allocated() / 2 ** 30

    def count_flops(self, loss_fn, backward=True) -> float:
        """Model FLOPs at batch 2 (eager, no checkpointing, no optimizer), scaled linearly to the batch."""
        from torch.utils.flop_counter import FlopCounterMode

        small = 2
        # torch's fused CPU attention kernel has no FLOP formula (CUDA's flash / efficient / cuDNN kernels have one):
        # on CPU the attention is counted through the math kernel's matmuls
        order = "math" if self.device.type == "cpu" else "default"
        with speed.attention_backend(order), FlopCounterMode(display=False) as counter:
            if backward:
                loss_fn(small).backward()
            else:
                with torch.no_grad():
                    loss_fn(small)
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops() * self.args.batch / small

    # -- rows -----------------------------------------------------------------------------------------------------
    def section(self, name: str, fn):
        """A group of rows; an error outside its rows (set-up) is recorded and the next group runs."""
        try:
            fn()
        except BudgetExceeded:
            raise
        except Exception as e:
            traceback.print_exc()
            self.result.setdefault("section_errors", {})[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
            self.save()
        finally:
            self.cleanup()

    def run(self):
        a = self.args
        self.row("flops", self.count_all_flops, need="flops")
        if self.dit:
            why = "PixArtAlphaPipeline runs diffusers' PixArt transformer only, not the project's DiT"
            not_run = self.result["not_run"] = {"sampling": why + ": the sampling rows compare against it"}
            for name in SAMPLING_EXTRAS:
                if name in a.extras:
                    not_run[name] = why
        else:
            self.section("sampling", self.sampling_rows)
            self.section("sampling_cleanup", self.sampling_cleanup)
        if not a.only_sampling:
            self.section("training", self.training_rows)
        extras = {"memory_budget": self.memory_budget_row, "pipeline_compiled": self.pipeline_compiled_row,
                  "bf16_weights": self.bf16_weights_row, "sampling_autotune": self.sampling_autotune_row,
                  "lora": self.lora_row}
        for name in a.extras:
            if (name == "lora" and a.lora_rank <= 0) or (a.only_sampling and name not in SAMPLING_EXTRAS) or (
                    self.dit and name in SAMPLING_EXTRAS):
                continue
            self.section(name, extras[name])
        self.save()

    def count_all_flops(self):
        self.model.requires_grad_(True).train()
        f = {"forward": self.count_flops(lambda b: self.standard_loss(0, b, autocast=True), backward=False)}
        if not self.args.only_sampling:
            f["standard"] = self.count_flops(lambda b: self.standard_loss(0, b))
            f["e2e_K4"] = self.count_flops(lambda b: self.e2e_loss(0, 4, checkpoint=False, batch=b))
        self.flops = f
        self.cleanup()
        return {**f, "batch": self.args.batch, "counted_at_batch": 2}

    # -- sampling -------------------------------------------------------------------------------------------------
    def pixart_pipeline(self, transformer):
        """PixArtAlphaPipeline around `transformer` with a tiny VAE of the real 8× downsampling (the pipeline reads
        vae_scale_factor from it; latents come out, it never decodes) and PixArt-δ's LCMScheduler."""
        from diffusers import AutoencoderKL, LCMScheduler, PixArtAlphaPipeline

        vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8).to(self.device)
        pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                   scheduler=LCMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_call(self, pipe, cond: TextCond, i: int):
        """The pipeline as users call it with precomputed T5 features: 4 steps, latents out, a seeded generator."""
        size = self.latent * 8
        return pipe(prompt=None, prompt_embeds=cond.tokens, prompt_attention_mask=cond.mask.long(),
                    num_inference_steps=4, guidance_scale=1.0, height=size, width=size, output_type="latent",
                    use_resolution_binning=False, generator=torch.Generator(device=self.device).manual_seed(i)).images

    def ours_call(self, pp, cond: TextCond, i: int):
        """The product path of `e2ediff sample --pretrained`, from the same generator seed as pipeline_call."""
        from e2ediff.adapters.pipeline import sample_pretrained

        return sample_pretrained(pp, cond, pp.timesteps(4), resolution=self.latent * 8,
                                 generator=torch.Generator(device=self.device).manual_seed(i))

    def bf16_cond(self) -> TextCond:
        return TextCond(self.cond.tokens.to(torch.bfloat16), self.cond.mask, self.cond.pooled.to(torch.bfloat16))

    def product_pipeline(self, pipe, transformer):
        """The product's PretrainedPipeline around a transformer (what `e2ediff sample --pretrained` builds, without
        a text encoder: the features are given)."""
        from diffusers import LCMScheduler

        from e2ediff.adapters.autoencoder import DiffusersAutoencoder
        from e2ediff.adapters.pipeline import PretrainedPipeline

        lcm = LCMScheduler.from_config(pipe.scheduler.config)
        net = PixArtNet(transformer, *self.null, vae_downsample=8).to(self.device)
        return PretrainedPipeline(pipe, "pixart", net, DiffusersAutoencoder(pipe.vae),
                                  VPSchedule(lcm.alphas_cumprod.to(torch.float64)), "eps",
                                  float(lcm.config.timestep_scaling), "benchmark")

    def sampling_rows(self):
        a = self.args
        self.model.requires_grad_(False).eval()
        users = copy.deepcopy(self.model).to(torch.bfloat16)   # as from_pretrained(torch_dtype=torch.bfloat16)
        pipe, pipe32 = self.pixart_pipeline(users), self.pixart_pipeline(self.model)
        cond = self.bf16_cond()
        pp = self.product_pipeline(pipe, users)
        self.sampling.update(pipe=pipe, pp=pp, cond=cond)
        per = self.sampling["per"] = {}

        def timing(name, step, context=contextlib.nullcontext):
            def fn():
                with torch.no_grad(), context():
                    r = self.timed(step)
                r["images_per_s"] = a.batch / r["s"]
                r["mfu"] = self.mfu(4 * self.flops.get("forward", 0.0), r["s"])
                per[name] = r["s"]
                return r
            return self.row(f"sampling_{name}", fn, need="sampling_eager")

        timing("pipeline_bf16", lambda i: self.pipeline_call(pipe, cond, i))
        timing("pipeline_fp32_autocast", lambda i: self.pipeline_call(pipe32, cond, i), lambda: self.autocast(True))
        fast = copy.deepcopy(users)
        speed.fuse_qkv(fast)
        fast_pp = self.product_pipeline(pipe, fast)
        self.sampling["fast_pp"] = fast_pp
        products = {"eager": pp, "fused": fast_pp}
        for attention in ("default", "cudnn"):                 # fused q/k/v × attention order, all eager
            for kind, product in products.items():
                name = f"ours_{kind}" + ("" if attention == "default" else f"_{attention}")
                timing(name, lambda i, product=product: self.ours_call(product, cond, i),
                       lambda attention=attention: speed.attention_backend(attention))
        variants = {(kind, attention): per.get(f"ours_{kind}" + ("" if attention == "default" else f"_{attention}"))
                    for kind in products for attention in ("default", "cudnn")
                    if a.attention == "auto" or attention == a.attention}
        variants = {k: v for k, v in variants.items() if v is not None}
        kind, chosen = min(variants, key=variants.get) if variants else ("fused", "default")
        if a.attention != "auto":
            chosen = a.attention
        self.sampling["attention"] = chosen

        def references():
            """ours_eager's and the pipeline's latents of call 0, computed once (before anything is compiled)."""
            if "z_eager" not in self.sampling:
                with torch.no_grad():
                    self.sampling.update(z_eager=self.ours_call(pp, cond, 0), z_pipe=self.pipeline_call(pipe, cond, 0))
            return self.sampling["z_eager"], self.sampling["z_pipe"]

        def fp8_product():
            """A copy of the chosen variant's bf16 transformer with FP8 matmuls in its blocks."""
            fp8 = copy.deepcopy(users)
            if kind == "fused":
                speed.fuse_qkv(fp8)
            layers = speed.float8_linear(fp8)
            return self.product_pipeline(pipe, fp8), {"fused_qkv": kind == "fused", "fp8_layers": len(layers)}

        def eager_fp8():
            z_eager, z_pipe = references()
            product, r = fp8_product()
            with torch.no_grad(), speed.attention_backend(chosen):
                r.update(self.timed(lambda i: self.ours_call(product, cond, i)))
                z_fp8 = self.ours_call(product, cond, 0)
            r.update(attention=chosen, images_per_s=a.batch / r["s"],
                     mfu=self.mfu(4 * self.flops.get("forward", 0.0), r["s"]),
                     rel_diff_vs_ours_eager=rel(z_fp8, z_eager), rel_diff_vs_pipeline=rel(z_fp8, z_pipe))
            per["ours_fp8"] = r["s"]
            return r
        self.row("sampling_ours_fp8", eager_fp8, need="sampling_fp8")
        if a.compile:
            def compiled():
                z_eager, z_pipe = references()
                # the pipeline's transformer stays eager: an unfused choice is compiled on a copy
                product = fast_pp if kind == "fused" else self.product_pipeline(pipe, copy.deepcopy(users))
                speed.compile_network(product.net, a.compile_mode)
                with torch.no_grad(), speed.attention_backend(chosen):
                    r = self.timed(lambda i: self.ours_call(product, cond, i))
                    z_compiled = self.sampling["z_compiled"] = self.ours_call(product, cond, 0)
                r.update(mode=a.compile_mode, fused_qkv=kind == "fused",
                         attention=chosen, images_per_s=a.batch / r["s"],
                         mfu=self.mfu(4 * self.flops.get("forward", 0.0), r["s"]),
                         rel_diff_vs_ours_eager=rel(z_compiled, z_eager), rel_diff_vs_pipeline=rel(z_compiled, z_pipe))
                per["ours_compiled"] = r["s"]
                return r
            r = self.row("sampling_ours_compiled", compiled, need="sampling_compiled")
            if r is not None and "error" in r and "out of memory" not in r["error"] and chosen != "default":
                # the compile failed with this attention order: keep the error, compile again with torch's order
                rows = self.result["rows"]
                rows[f"sampling_ours_compiled_error_{chosen}"] = rows.pop("sampling_ours_compiled")
                torch._dynamo.reset()
                chosen = self.sampling["attention"] = "default"
                self.row("sampling_ours_compiled", compiled, need="sampling_compiled")

            def compiled_fp8():
                _, z_pipe = references()
                product, r = fp8_product()
                speed.compile_network(product.net, a.compile_mode)
                with torch.no_grad(), speed.attention_backend(chosen):
                    r.update(self.timed(lambda i: self.ours_call(product, cond, i)))
                    z_fp8 = self.ours_call(product, cond, 0)
                r.update(mode=a.compile_mode, attention=chosen, images_per_s=a.batch / r["s"],
                         mfu=self.mfu(4 * self.flops.get("forward", 0.0), r["s"]),
                         rel_diff_vs_pipeline=rel(z_fp8, z_pipe))
                if "z_compiled" in self.sampling:
                    r["rel_diff_vs_ours_compiled"] = rel(z_fp8, self.sampling["z_compiled"])
                per["ours_compiled_fp8"] = r["s"]
                return r
            self.row("sampling_ours_compiled_fp8", compiled_fp8, need="sampling_compiled_fp8")
        self.row("sampling_summary", self.sampling_summary)

    def sampling_summary(self):
        sm, per = self.sampling, self.sampling["per"]
        out = {"attention": sm["attention"]}
        with torch.no_grad():
            z_ours = self.ours_call(sm["pp"], sm["cond"], 0)
            z_pipe = self.pipeline_call(sm["pipe"], sm["cond"], 0)
        out["rel_diff_ours_eager_vs_pipeline"] = rel(z_ours, z_pipe)     # same noise; ours keeps latents in float32
        best = "ours_compiled" if "ours_compiled" in per else min(   # the bf16 product path (FP8: its own rows)
            (k for k in per if k.startswith("ours") and "fp8" not in k), key=per.get, default=None)
        for base in ("pipeline_bf16", "pipeline_fp32_autocast"):
            if base not in per:
                continue
            for ours in ("ours_eager", "ours_eager_cudnn", "ours_fused", "ours_fused_cudnn", "ours_fp8",
                         "ours_compiled", "ours_compiled_fp8"):
                if ours in per:
                    out[f"speedup_{ours}_over_{base}"] = per[base] / per[ours]
        if best and "pipeline_bf16" in per:
            out["speedup"] = per["pipeline_bf16"] / per[best]
            out["speedup_row"] = best
        if "ours_compiled_fp8" in per and "ours_compiled" in per:
            out["speedup_fp8_over_bf16_compiled"] = per["ours_compiled"] / per["ours_compiled_fp8"]
        return out

    def sampling_cleanup(self):
        """Free the bf16 copies and forget their compiled graphs before the training rows measure memory."""
        self.sampling = {k: v for k, v in self.sampling.items() if k == "attention"}
        torch._dynamo.reset()
        self.cleanup()

    # -- training -------------------------------------------------------------------------------------------------
    def compile_training(self):
        speed.compile_network(self.net, self.args.compile_mode)
        self.train_compiled = True

    def uncompile_training(self):
        torch._dynamo.reset()
        for block in self.net.repeated_blocks():
            block._compiled_call_impl = None
        self.train_compiled = False

    def attention_check(self, name: str):
        """Output and gradients of one eager forward + backward at batch 4 with `name` first vs torch's order."""
        results = []
        for order in ("default", name):
            self.model.zero_grad(set_to_none=True)
            with speed.attention_backend(order):
                loss = self.standard_loss(0, batch=min(4, self.args.batch))
                loss.backward()
            grads = torch.cat([p.grad.flatten().float() for p in self.model.parameters() if p.grad is not None])
            results.append((loss.detach(), grads))
        self.model.zero_grad(set_to_none=True)
        out = {"attention": name, "rel_diff_loss": rel(results[1][0], results[0][0]),
               "rel_diff_grads": rel(results[1][1], results[0][1])}
        out["ok"] = out["rel_diff_grads"] < 0.05 and out["rel_diff_loss"] < 0.01
        return out

    def training_rows(self):
        a = self.args
        self.model.requires_grad_(True).train()
        chosen = self.sampling.get("attention", "default") if a.attention == "auto" else a.attention
        if chosen != "default":
            check = self.row("attention_check", lambda: self.attention_check(chosen))
            self.train_attention = chosen if check and check.get("ok") else "default"
        if a.compile:
            try:
                self.compile_training()
            except Exception as e:                       # then eager rows, with the reason on record
                traceback.print_exc()
                self.result["rows"]["training_compile_error"] = f"{type(e).__name__}: {e}"
        opt = self.optimizer()
        e2e = {}

        def e2e_row(k, checkpoint, need):
            name = f"e2e_step_K{k}" + ("_except_last" if checkpoint == "except_last" else "")

            def fn():
                r = self.timed(self.train_step(lambda i: self.e2e_loss(i, k, checkpoint), opt))
                r.update(compiled=self.train_compiled, attention=self.train_attention, checkpoint=checkpoint)
                if k == 4 and self.flops.get("e2e_K4"):
                    recomputed = k if checkpoint is True else k - 1
                    r["mfu"] = self.mfu(self.flops["e2e_K4"], r["s"])
                    r["hfu"] = self.mfu(self.flops["e2e_K4"] + recomputed * self.flops["forward"], r["s"])
                e2e[name] = r["s"]
                return r
            r = self.row(name, fn, need=need)
            return r

        first = e2e_row(4, True, "e2e_compiled" if a.compile else "e2e")
        rows = self.result["rows"]
        if a.compile and first is not None and "error" in first and "out of memory" not in first["error"]:
            # the compiled step failed: keep its error, retry with torch's attention order, then eagerly
            rows[f"e2e_step_K4_compile_error_{self.train_attention}"] = rows.pop("e2e_step_K4")
            self.uncompile_training()
            if self.train_attention != "default":
                self.train_attention = "default"
                self.compile_training()
                first = e2e_row(4, True, "e2e_compiled")
                if first is not None and "error" in first and "out of memory" not in first["error"]:
                    rows["e2e_step_K4_compile_error_default"] = rows.pop("e2e_step_K4")
                    self.uncompile_training()
            if not self.train_compiled:
                e2e_row(4, True, "e2e")
        e2e_row(4, "except_last", "e2e")

        def standard():
            r = self.timed(self.train_step(self.standard_loss, opt))
            r.update(compiled=self.train_compiled, attention=self.train_attention)
            if self.flops.get("standard"):
                r["mfu"] = self.mfu(self.flops["standard"], r["s"])
            return r
        std = self.row("standard_step", standard, need="standard")
        if self.flops:
            self.result["rows"]["mfu"] = {
                name: {"flops": self.flops[key], "s": (self.result["rows"].get(name) or {}).get("s"),
                       "mfu": (self.result["rows"].get(name) or {}).get("mfu")}
                for name, key in (("standard_step", "standard"), ("e2e_step_K4", "e2e_K4"),
                                  ("e2e_step_K4_except_last", "e2e_K4"))}
            self.save()
        for k in a.k:
            if k != 4:
                e2e_row(k, True, "e2e")
        if std and "s" in std:
            ratios = {}
            for name, s in e2e.items():
                k = int(name.split("_K")[1].split("_")[0])
                ratios[name] = {"e2e_over_standard": s / std["s"], "floor": (4 * k - 1) / 3,
                                "bar_1.1x_floor": 1.1 * (4 * k - 1) / 3}
            self.result["rows"]["ratios"] = ratios
            self.save()
        mem = {}
        for k, checkpoint in ((1, True), (8, True), (4, True), (1, "except_last"), (8, "except_last")):
            name = f"peak_memory_full_K{k}" + ("_except_last" if checkpoint == "except_last" else "") + "_GiB"
            r = self.row(name, lambda k=k, c=checkpoint: {"GiB": self.peak_memory(
                self.train_step(lambda i: self.e2e_loss(i, k, c), opt)), "compiled": self.train_compiled},
                need="memory")
            if r and r.get("GiB"):
                mem[name] = r["GiB"]
        if "peak_memory_full_K1_GiB" in mem and "peak_memory_full_K8_GiB" in mem:
            self.result["rows"]["memory_K8_over_K1"] = mem["peak_memory_full_K8_GiB"] / mem["peak_memory_full_K1_GiB"]
            self.save()
        del opt
        self.model.zero_grad(set_to_none=True)
        self.cleanup()

    # -- extras ---------------------------------------------------------------------------------------------------
    def memory_budget_row(self):
        a = self.args
        if not self.train_compiled:                    # eager, this step would hold 4 steps' activations
            return

        def fn():
            import torch._functorch.config as functorch_config

            saved = functorch_config.activation_memory_budget
            torch._dynamo.reset()                      # the partitioner reads the budget when it compiles
            functorch_config.activation_memory_budget = a.memory_budget
            opt = self.optimizer()
            try:
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats()
                r = self.timed(self.train_step(lambda i: self.e2e_loss(i, 4, checkpoint=False), opt))
                r["peak_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30 if self.cuda else None
            finally:
                functorch_config.activation_memory_budget = saved
                del opt
                self.model.zero_grad(set_to_none=True)
                torch._dynamo.reset()
            r.update(memory_budget=a.memory_budget, checkpoint=False,
                     attention=self.train_attention)
            if self.flops.get("e2e_K4"):
                r["mfu"] = self.mfu(self.flops["e2e_K4"], r["s"])
            return r
        self.row("e2e_step_K4_memory_budget", fn, need="recompile_e2e")
        self.cleanup()

    def pipeline_compiled_row(self):
        """The pipeline's unfused bf16 transformer under the same regional compile and attention order."""
        a = self.args
        if not a.compile:
            return

        def build(users):
            pipe, cond = self.pixart_pipeline(users), self.bf16_cond()
            return PixArtNet(users, *self.null, vae_downsample=8), lambda i: self.pipeline_call(pipe, cond, i)

        def fn():
            r = self.compiled_sampling(build, a.compile_mode)
            ours = self.result["rows"].get("sampling_ours_compiled") or {}
            if ours.get("s"):
                r["speedup_ours_compiled_over_this"] = r["s"] / ours["s"]
            return r
        self.row("sampling_pipeline_compiled", fn, need="pipeline_compiled")

    def compiled_sampling(self, build, mode: str) -> dict:
        """A bf16 copy of the model, wrapped by ``build(copy) -> (network to compile, call(i))``, compiled with
        ``mode`` and timed under the chosen attention order; the copy and its graphs are freed afterwards."""
        users = copy.deepcopy(self.model).to(torch.bfloat16).eval().requires_grad_(False)
        net, call = build(users)
        speed.compile_network(net, mode)
        attention = self.sampling.get("attention", "default")
        try:
            with torch.no_grad(), speed.attention_backend(attention):
                r = self.timed(call)
        finally:
            del net, call, users
            torch._dynamo.reset()
        r.update(attention=attention, mode=mode)
        return r

    def bf16_weights_row(self):
        """The model converted to bf16 in place (the last training row that needs the float32 one)."""
        def fn():
            torch._dynamo.reset()
            self.model.to(torch.bfloat16)
            opt = self.optimizer()
            try:
                dtype = torch.bfloat16 if self.dit else None     # PixArtNet casts to the weights' dtype itself
                step = self.train_step(lambda i: self.e2e_loss(i, 4, "except_last", autocast=False, dtype=dtype), opt)
                r = self.timed(step)
                r["peak_GiB"] = self.peak_memory(step)
            finally:
                del opt
                self.model.zero_grad(set_to_none=True)
            r.update(compiled=self.train_compiled, attention=self.train_attention, checkpoint="except_last",
                     note="bf16 weights + bf16 AdamW: lr 1e-6 updates vanish in bf16; speed only"
                     + ("; bf16 latents and features (the DiT has no adapter casting them)" if self.dit else ""))
            if self.flops.get("e2e_K4"):
                r["mfu"] = self.mfu(self.flops["e2e_K4"], r["s"])
            return r
        self.row("e2e_step_K4_bf16_weights", fn, need="recompile_e2e" if self.train_compiled else "e2e")
        self.cleanup()

    def sampling_autotune_row(self):
        """ours_compiled again with mode max-autotune-no-cudagraphs (Triton GEMM templates, fused epilogues)."""
        a = self.args
        if not a.compile:
            return

        def build(fast):
            speed.fuse_qkv(fast)
            pp, cond = self.product_pipeline(self.pixart_pipeline(fast), fast), self.bf16_cond()
            return pp.net, lambda i: self.ours_call(pp, cond, i)

        def fn():
            r = self.compiled_sampling(build, "max-autotune-no-cudagraphs")
            base = self.result["rows"].get("sampling_pipeline_bf16") or {}
            if base.get("s"):
                r["speedup_over_pipeline_bf16"] = base["s"] / r["s"]
            return r
        self.row("sampling_ours_compiled_max_autotune", fn, need="sampling_autotune")

    def lora_row(self):
        a = self.args

        def fn():
            torch._dynamo.reset()
            self.model.to(self.weights_dtype)
            targets = DIT_LORA_TARGETS if self.dit else DEFAULT_TARGETS
            add_lora(self.model, a.lora_rank, targets=targets)
            self.model.to(self.device)
            lopt = self.optimizer()
            step = self.train_step(lambda i: self.e2e_loss(i, 4), lopt)
            return {"rank": a.lora_rank, "targets": list(targets), "compiled": self.train_compiled,
                    "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                    "peak_GiB_K4": self.peak_memory(step), **self.timed(step, iters=3, warmup=1)}
        self.row("lora_e2e_K4", fn, need="lora" if self.train_compiled else "e2e")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="JSON results file (rewritten after every row)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--network", choices=NETWORKS, default="pixart", help="pixart: diffusers' PixArtTransformer2DModel "
                   "behind the project's adapter; dit: the project's DiT at the same size (training rows only)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--resolution", type=int, default=512, help="pixels; latents are resolution/8")
    p.add_argument("--tokens", type=int, default=120, help="T5 caption tokens")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="E2E steps K to time (4 always)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--weights", choices=["fp32", "bf16"], default="fp32", help="master weights dtype of training")
    p.add_argument("--no-autocast", dest="autocast", action="store_false", help="no bf16 autocast in training")
    p.add_argument("--compile", action="store_true", help="regional torch.compile (sampling and training rows)")
    p.add_argument("--compile-mode", default="default", choices=speed.COMPILE_MODES)
    p.add_argument("--attention", default="auto", choices=("auto",) + speed.ATTENTION_BACKENDS,
                   help="attention kernel order of the compiled sampling and the training rows; auto: the faster of "
                   "default and cudnn in the eager sampling rows (training falls back to default unless "
                   "attention_check agrees)")
    p.add_argument("--extras", nargs="*", default=list(EXTRAS), choices=EXTRAS, help="optional rows, in order")
    p.add_argument("--memory-budget", type=float, default=0.25,
                   help="torch._functorch.config.activation_memory_budget of the memory_budget row")
    p.add_argument("--lora-rank", type=int, default=64, help="LoRA row (0: skip)")
    p.add_argument("--budget-s", type=float, default=540, help="seconds from start: no row starts that would "
                   "need more than what is left (NEED_S); at budget + 30 s the row in flight is abandoned")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model: a CPU smoke run of this script")
    p.add_argument("--only-sampling", action="store_true", help="the sampling rows (and the sampling extras) only: "
                   "no training, memory or training-extra row")
    args = p.parse_args(argv)
    if args.network == "dit" and args.only_sampling:
        p.error("--only-sampling compares against PixArtAlphaPipeline, which cannot run --network dit")
    if args.tiny:
        args.batch, args.resolution, args.tokens = min(args.batch, 4), min(args.resolution, 64), min(args.tokens, 8)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dynamo = torch._dynamo.config                       # one code object per block kind holds every variant's graph
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), 64))

    def alarm(signum, frame):
        raise BudgetExceeded()

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(max(1, int(args.budget_s + 30 - (time.perf_counter() - T0))))
    bench = Bench(args)
    print(f"{bench.result['device']}, torch {torch.__version__}, {args.network} ({bench.result['params']:,} "
          f"parameters), batch {args.batch}, {args.resolution} px", flush=True)
    try:
        bench.run()
    except BudgetExceeded:
        print("budget + 30 s reached: stopped", flush=True)
    finally:
        signal.alarm(0)
        bench.save()
    rows = bench.result["rows"]
    print(json.dumps({"sampling": rows.get("sampling_summary"), "ratios": rows.get("ratios"),
                      "memory_K8_over_K1": rows.get("memory_K8_over_K1"),
                      "mfu_e2e_K4": {k: (rows.get(k) or {}).get("mfu") for k in
                                     ("e2e_step_K4", "e2e_step_K4_except_last", "e2e_step_K4_memory_budget",
                                      "e2e_step_K4_bf16_weights")}}, default=str))


if __name__ == "__main__":
    main()
