"""E2E training throughput at PixArt-XL-2 size on 1 vs N GPUs of one host: DDP as the trainer uses it.

    PYTHONPATH=src python3 benchmarks/pixart_xl_ddp.py --out ddp_1gpu.json                            # 1 GPU
    PYTHONPATH=src torchrun --nproc_per_node 2 benchmarks/pixart_xl_ddp.py --out ddp_2gpu.json        # 2 GPUs
    PYTHONPATH=src torchrun --nproc_per_node 2 benchmarks/pixart_xl_ddp.py --tiny --device cpu --out /tmp/d.json

Each process holds the same random PixArt-XL-2-size transformer (benchmarks/pixart_xl.py) behind the adapter, wrapped
exactly as `e2ediff.trainer` wraps a `Part(ddp=True)`: the whole unrolled E2E step (`pretrained.E2EUnroll`, K LCM
steps, per-step checkpointing) is one forward of a `DistributedDataParallel` module, so gradients are averaged in
backward (NCCL on GPUs, gloo on CPU). `--per-gpu-batch` images per process, bf16 autocast, AdamW. The JSON (rank 0)
holds the median step time and images/s = world × per-GPU batch / step time; the scaling is images/s of the N-GPU
run over the 1-GPU run's (the bar: ≥ 1.8 for N = 2).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pixart_xl import TINY, XL, build_transformer  # noqa: E402

from e2ediff.adapters.pixart import PixArtNet  # noqa: E402
from e2ediff.conditioning import TextCond  # noqa: E402
from e2ediff.pretrained import E2EUnroll  # noqa: E402
from e2ediff.schedules import VPSchedule, lcm_timesteps  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--per-gpu-batch", type=int, default=16)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = args.device == "cuda"
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    size, latent, tokens = (TINY, 8, 8) if args.tiny else (XL, args.resolution // 8, 120)
    b = min(args.per_gpu_batch, 2) if args.tiny else args.per_gpu_batch
    model = build_transformer(size, latent, device, torch.float32).requires_grad_(True).train()
    net = PixArtNet(model, torch.zeros(tokens, size["caption_channels"]), torch.ones(tokens, dtype=torch.bool), 8)
    unroll = E2EUnroll(net.to(device), None, VPSchedule.from_name("linear"), "eps", lcm_timesteps(args.k), m=1,
                       renoise="vp", w=None, checkpoint=True, timestep_scaling=10.0)
    module = unroll
    if world > 1:
        module = torch.nn.parallel.DistributedDataParallel(unroll, device_ids=[local] if cuda else None)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-6, fused=cuda)
    g = torch.Generator().manual_seed(rank)
    cond = TextCond(torch.randn(b, tokens, size["caption_channels"], generator=g).to(device),
                    torch.ones(b, tokens, dtype=torch.bool, device=device),
                    torch.zeros(b, size["caption_channels"], device=device))
    z0 = torch.randn(b, 4, latent, latent, generator=g).to(device)
    times = []
    for i in range(args.warmup + args.iters):
        z_T = torch.randn_like(z0)
        noises = [torch.randn_like(z0) for _ in range(args.k - 1)]
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, z0_hat = module(z0, cond, z0, z_T, noises)
        loss = (z0_hat.float() - z0).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    if rank == 0:
        result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                  "device": torch.cuda.get_device_name() if cuda else "cpu", "world": world, "per_gpu_batch": b,
                  "K": args.k, "step_s": step, "images_per_s": world * b / step,
                  "peak_GiB": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None}
        print(json.dumps(result))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
