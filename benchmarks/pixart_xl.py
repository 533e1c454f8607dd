"""PixArt-XL-2 size on one GPU: E2E step vs standard step, memory flat in K, MFU, full vs LoRA, 4-step sampling.

    PYTHONPATH=src python3 benchmarks/pixart_xl.py --out pixart_xl.json --budget-s 540          # H100 / H200
    PYTHONPATH=src python3 benchmarks/pixart_xl.py --out pixart_xl.json --budget-s 540 --compile
    PYTHONPATH=src python3 benchmarks/pixart_xl.py --tiny --device cpu --out /tmp/tiny.json     # CPU smoke run

Model: diffusers `PixArtTransformer2DModel` at PixArt-XL-2 size (28 blocks × 1152, 16 heads × 72, patch 2, learned
sigma, T5 4096-d × 120 caption tokens), random weights, behind the project's adapter (e2ediff.adapters.pixart),
512-px latents (4 × 64 × 64), batch 32, bf16 autocast over float32 master weights (`--weights bf16`: bf16 weights).
Rows (each measured in this one process, so every ratio compares two measurements of one run):
  standard   one diffusion training step: ε-prediction MSE at a random t, backward, AdamW
  e2e_K      one E2E step (`e2e.e2e_step`, Algorithm 1) through K LCM steps with per-step activation checkpointing,
             L2 on ẑ0, backward, AdamW; ratio e2e_4 / standard against the floor (4K − 1)/3
  memory     peak `max_memory_allocated` of an E2E step at K = 1 and K = 8 (checkpointed), full and LoRA
  mfu        model FLOPs counted by FlopCounterMode in a SEPARATE pass at batch 2 without checkpointing (the counter
             defeats checkpointing; its memory is never reported), scaled to the batch, / time / peak FLOP/s
  sampling   4-step LCM sampling, latents out, no grad: the project's `samplers.lcm` (compiled with --compile, and
             eager) vs diffusers' `PixArtAlphaPipeline(prompt_embeds=…, output_type="latent")` on the same (eager)
             transformer and batch; both speed-ups are reported
Every row is written to --out as soon as it is measured; rows that would start after --budget-s are skipped and
listed under "skipped".
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from e2ediff.adapters.lora import add_lora
from e2ediff.adapters.pixart import PixArtNet
from e2ediff.conditioning import TextCond
from e2ediff.denoiser import Denoiser
from e2ediff.e2e import e2e_step
from e2ediff.samplers import lcm
from e2ediff.schedules import VPSchedule, lcm_timesteps

XL = dict(num_layers=28, attention_head_dim=72, num_attention_heads=16, caption_channels=4096, cross_attention_dim=1152)
TINY = dict(num_layers=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32, cross_attention_dim=16)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}      # dense bf16 tensor-core peak


def build_transformer(size: dict, latent: int, device, weights_dtype):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(sample_size=latent, patch_size=2, in_channels=4, out_channels=8,
                                     attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                     norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                     use_additional_conditions=False, **size)
    return model.to(device=device, dtype=weights_dtype)


@contextlib.contextmanager
def eager(model):
    """Run a `Module.compile`d model eagerly inside the block (same weights, no compiled graph)."""
    saved = getattr(model, "_compiled_call_impl", None)
    model._compiled_call_impl = None
    try:
        yield
    finally:
        model._compiled_call_impl = saved


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.start = time.perf_counter()
        self.result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                       "torch": torch.__version__, "device": torch.cuda.get_device_name() if self.cuda else "cpu",
                       "settings": vars(args), "rows": {}, "skipped": []}
        size = TINY if args.tiny else XL
        self.latent = args.resolution // 8
        self.weights_dtype = torch.bfloat16 if args.weights == "bf16" else torch.float32
        self.model = build_transformer(size, self.latent, self.device, self.weights_dtype)
        self.text_dim = size["caption_channels"]
        g = torch.Generator().manual_seed(1)
        b, length = args.batch, args.tokens
        self.cond = TextCond(torch.randn(b, length, self.text_dim, generator=g).to(self.device),
                             torch.ones(b, length, dtype=torch.bool, device=self.device),
                             torch.randn(b, self.text_dim, generator=g).to(self.device))
        self.net = PixArtNet(self.model, torch.zeros(length, self.text_dim), torch.ones(length, dtype=torch.bool),
                             vae_downsample=8).to(self.device)
        self.schedule = VPSchedule.from_name("linear")
        self.denoiser = Denoiser(self.net, self.schedule, "eps")
        self.z0 = torch.randn(b, 4, self.latent, self.latent, generator=g).to(self.device)
        gpu = self.result["device"]
        self.peak = next((v for k, v in PEAK_FLOPS.items() if k in gpu), None)

    # -- helpers --------------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def save(self):
        if self.args.out:
            Path(self.args.out).write_text(json.dumps(self.result, indent=1, default=str) + "\n")

    def row(self, name: str, fn):
        if self.left() <= 0:
            self.result["skipped"].append(name)
            print(f"{name}: skipped (budget)", flush=True)
            return None
        try:
            value = fn()
        except torch.cuda.OutOfMemoryError as e:
            value = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            torch.cuda.empty_cache()
        self.result["rows"][name] = value
        print(f"{name}: {json.dumps(value)}", flush=True)
        self.save()
        return value

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, step, iters=None, warmup=None) -> float:
        iters = self.args.iters if iters is None else iters
        warmup = self.args.warmup if warmup is None else warmup
        times = []
        for i in range(warmup + iters):
            self.sync()
            t = time.perf_counter()
            step(i)
            self.sync()
            if i >= warmup:
                times.append(time.perf_counter() - t)
            if self.left() < -60:                       # far past the budget: stop timing this row
                break
        return statistics.median(times) if times else float("nan")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.autocast)

    def optimizer(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-6, weight_decay=1e-8, fused=self.cuda and self.weights_dtype == torch.float32)

    # -- the steps ------------------------------------------------------------------------------------------------
    def standard_loss(self, i, batch=None):
        b = batch or self.args.batch
        g = torch.Generator(device=self.device).manual_seed(i)
        z0, cond = self.z0[:b], self.cond[:b]
        t = torch.randint(0, 1000, (b,), generator=g, device=self.device).float()
        noise = torch.randn(z0.shape, generator=g, device=self.device)
        z_t = self.schedule.add_noise(z0, noise, t)
        with self.autocast():
            eps = self.net(z_t, t, cond)
        return (eps.float() - noise).square().mean()

    def e2e_loss(self, i, k, checkpoint=True, batch=None):
        b = batch or self.args.batch
        g = torch.Generator(device=self.device).manual_seed(i)
        with self.autocast():
            z0, z0_hat = e2e_step(self.denoiser, None, self.z0[:b], self.cond[:b], timesteps=lcm_timesteps(k), m=1,
                                  generator=g, checkpoint=checkpoint, z0=self.z0[:b])
        return (z0_hat.float() - z0).square().mean()

    def train_step(self, loss_fn, opt):
        def step(i):
            opt.zero_grad(set_to_none=True)
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

    def count_flops(self, loss_fn) -> float:
        """Model FLOPs of forward + backward at batch 2 (no checkpointing, no optimizer), scaled to the batch."""
        from torch.utils.flop_counter import FlopCounterMode

        small = 2
        with FlopCounterMode(display=False) as counter:
            loss_fn(small).backward()
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops() * self.args.batch / small

    # -- rows -----------------------------------------------------------------------------------------------------
    def run(self):
        a = self.args
        self.model.requires_grad_(True).train()
        # FLOPs first, eagerly (a compiled graph hides its ops from the counter), at batch 2: a separate pass whose
        # memory is never reported
        flops = {"standard": self.count_flops(lambda b: self.standard_loss(0, b)),
                 "e2e_K4": self.count_flops(lambda b: self.e2e_loss(0, 4, checkpoint=False, batch=b))}
        if self.cuda:
            torch.cuda.empty_cache()
        if a.compile:
            self.model.compile()
        opt = self.optimizer()
        std = self.row("standard_step", lambda: {"s": self.timed(self.train_step(self.standard_loss, opt))})
        e2e = {}
        for k in a.k:
            r = self.row(f"e2e_step_K{k}", lambda k=k: {"s": self.timed(self.train_step(
                lambda i: self.e2e_loss(i, k), opt))})
            if r and "s" in r:
                e2e[k] = r["s"]
        if std and "s" in std:
            self.result["rows"]["ratios"] = {f"K{k}": {"e2e_over_standard": s / std["s"], "floor": (4 * k - 1) / 3,
                                                       "bar_1.1x_floor": 1.1 * (4 * k - 1) / 3} for k, s in e2e.items()}
            self.save()
        mem = {}
        for k in (1, 4, 8):
            r = self.row(f"peak_memory_full_K{k}_GiB", lambda k=k: {"GiB": self.peak_memory(
                self.train_step(lambda i: self.e2e_loss(i, k), opt))})
            if r and r.get("GiB"):
                mem[k] = r["GiB"]
        if 1 in mem and 8 in mem:
            self.result["rows"]["memory_K8_over_K1"] = mem[8] / mem[1]
            self.save()
        if self.peak is not None or a.tiny:
            def mfu():
                out = {}
                for name, secs in (("standard", std and std.get("s")), ("e2e_K4", e2e.get(4))):
                    out[name] = {"flops": flops[name], "s": secs,
                                 "mfu": flops[name] / secs / self.peak if secs and self.peak else None}
                return out
            self.row("mfu", mfu)
        del opt
        self.model.zero_grad(set_to_none=True)
        self.row("sampling_4step", self.sampling)
        if a.lora_rank > 0:
            def lora():
                add_lora(self.model, a.lora_rank)
                self.model.to(self.device)
                lopt = self.optimizer()
                return {"rank": a.lora_rank, "trainable_params": sum(p.numel() for p in self.model.parameters()
                                                                     if p.requires_grad),
                        "peak_GiB_K4": self.peak_memory(self.train_step(lambda i: self.e2e_loss(i, 4), lopt)),
                        "s_K4": self.timed(self.train_step(lambda i: self.e2e_loss(i, 4), lopt), iters=3, warmup=1)}
            self.row("lora_e2e_K4", lora)
        self.result["elapsed_s"] = time.perf_counter() - self.start
        self.save()

    @torch.no_grad()
    def sampling(self):
        from diffusers import AutoencoderKL, LCMScheduler, PixArtAlphaPipeline

        self.model.eval()
        steps = lcm_timesteps(4)
        b = self.args.batch
        dtype = torch.bfloat16
        model = self.model.to(dtype)
        cond = TextCond(self.cond.tokens.to(dtype), self.cond.mask, self.cond.pooled.to(dtype))
        # a tiny VAE with the real 8× downsampling: the pipeline reads vae_scale_factor from it; latents come out
        vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8).to(self.device)
        pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=model,
                                   scheduler=LCMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02))
        pipe.set_progress_bar_config(disable=True)
        size = self.latent * 8

        def ours(i):
            g = torch.Generator(device=self.device).manual_seed(i)
            noise = torch.randn(b, 4, self.latent, self.latent, generator=g, device=self.device, dtype=dtype)
            lcm(self.denoiser, noise, steps, cond, generator=g)

        def theirs(i):
            pipe(prompt=None, prompt_embeds=cond.tokens, prompt_attention_mask=cond.mask.long(),
                 num_inference_steps=4, guidance_scale=1.0, height=size, width=size, output_type="latent",
                 use_resolution_binning=False, generator=torch.Generator(device=self.device).manual_seed(i))

        t_ours = self.timed(ours)
        with eager(model):                               # the pipeline as users run it: an uncompiled transformer
            t_theirs = self.timed(theirs)
            t_ours_eager = self.timed(ours) if self.args.compile else t_ours
        self.model.to(self.weights_dtype)
        return {"ours_s": t_ours, "ours_compiled": self.args.compile, "ours_eager_s": t_ours_eager,
                "diffusers_pipeline_eager_s": t_theirs, "speedup": t_theirs / t_ours,
                "speedup_eager_vs_eager": t_theirs / t_ours_eager,
                "images_per_s_ours": b / t_ours, "images_per_s_pipeline": b / t_theirs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="JSON results file (rewritten after every row)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--resolution", type=int, default=512, help="pixels; latents are resolution/8")
    p.add_argument("--tokens", type=int, default=120, help="T5 caption tokens")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="E2E steps K to time")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--weights", choices=["fp32", "bf16"], default="fp32", help="master weights dtype")
    p.add_argument("--no-autocast", dest="autocast", action="store_false", help="no bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (Module.compile)")
    p.add_argument("--lora-rank", type=int, default=64, help="LoRA row (0: skip)")
    p.add_argument("--budget-s", type=float, default=540, help="start no new row after this many seconds")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model: a CPU smoke run of this script")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.resolution, args.tokens = min(args.batch, 4), min(args.resolution, 64), min(args.tokens, 8)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bench = Bench(args)
    print(f"{bench.result['device']}, torch {torch.__version__}, batch {args.batch}, {args.resolution} px", flush=True)
    bench.run()
    print(json.dumps(bench.result["rows"].get("ratios", {})))


if __name__ == "__main__":
    main()
