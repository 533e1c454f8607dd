"""Median wall time of one teacher training step vs one E2E fine-tuning step at K = 1, 2, 4.

    python benchmarks/step_time.py                                   # base DiT, 64 chains, CUDA when available
    python benchmarks/step_time.py --device cpu --preset tiny --batch 8 --iters 3

Teacher step: `PretrainTask.losses` (the paper's Eq. 6 loss) + backward + AdamW step, on `--batch` images.
E2E step:     `FinetuneTask.losses` (e2e_step through K sampler steps + E2EObjective) + backward + AdamW step, on
              `--batch` sampler chains (= batch / m captions × m samples), so each network call sees the same batch.
Both use the same DiT preset, synthetic images and caption features (see e2e_memory.py). Warm-up steps first; CUDA
is synchronized around every timed step. The last line is the key ratio E2E / teacher at the largest K.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_memory import SyntheticData, build_pipeline, finetune_task  # noqa: E402

from e2ediff.config import TrainConfig  # noqa: E402
from e2ediff.models.dit import DiTConfig  # noqa: E402
from e2ediff.pretrain import PretrainRun, PretrainTask  # noqa: E402


def time_steps(task, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of losses + backward + AdamW step of the task's first part."""
    net = task.parts[0].module
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        losses, _ = task.losses(i, torch.Generator(device=device).manual_seed(i))
        opt.zero_grad(set_to_none=True)
        losses["net"].backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="base", help="DiT and autoencoder preset (tiny | base)")
    p.add_argument("--batch", type=int, default=64, help="teacher images = E2E sampler chains per step")
    p.add_argument("--m", type=int, default=4, help="E2E samples per caption")
    p.add_argument("--loss", default="energy+l2", choices=["energy", "l2", "energy+l2"])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="sampler steps K")
    p.add_argument("--no-checkpointing", action="store_true", help="store activations instead of recomputing")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    pipe = build_pipeline(args.preset, device)
    data = SyntheticData(max(64, args.batch), device, pipe.net.config.text_dim)
    teacher_cfg = PretrainRun(autoencoder="synthetic", model=DiTConfig.from_preset(args.preset),
                              train=TrainConfig(batch_size=args.batch, device=str(device)))
    torch.manual_seed(0)
    teacher = PretrainTask(teacher_cfg, device, data=data, autoencoder=pipe.autoencoder)
    teacher.parts[0].module.to(device)
    results = {"teacher": time_steps(teacher, device, args.warmup, args.iters)}
    del teacher
    for k in args.steps:
        task = finetune_task(pipe, data, k, args.batch, args.m, args.loss, not args.no_checkpointing, device)
        results[f"e2e K={k}"] = time_steps(task, device, args.warmup, args.iters)
        del task

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"DiT preset {args.preset}, batch {args.batch} (E2E: {args.batch // args.m} captions × m={args.m}), "
          f"loss {args.loss}, checkpointing {not args.no_checkpointing}, median of {args.iters} after {args.warmup} "
          "warm-up")
    print(f"{'step':>10} {'median s':>10} {'× teacher':>10}")
    for label, seconds in results.items():
        print(f"{label:>10} {seconds:>10.4f} {seconds / results['teacher']:>10.2f}")
    k = max(args.steps)
    ratio = results[f"e2e K={k}"] / results["teacher"]
    print(f"E2E K={k} / teacher step time: {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main(sys.argv[1:])
