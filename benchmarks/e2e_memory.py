"""Peak memory of one E2E training step (forward + backward through the unrolled K-step sampler and the objective).

The issue asks that activation checkpointing keep the memory of K = 8 within 15 % of K = 1: with every step's model
call checkpointed, the chain only stores each step's input latent, and backward recomputes one step at a time.

    python benchmarks/e2e_memory.py                                  # base DiT, 64 chains, CUDA when available
    python benchmarks/e2e_memory.py --device cpu --preset tiny --batch 8

The step is `FinetuneTask.losses` (the training code itself: e2e_step + E2EObjective) followed by backward, on
synthetic images and caption features. `--batch` counts sampler chains (images × m samples per caption).

Measurement:
  cuda      torch.cuda.max_memory_allocated after reset_peak_memory_stats (caching allocator, exact).
  dispatch  (CPU) peak of the bytes of live tensor storages created during the step, tracked by a
            TorchDispatchMode over every op of forward, recomputation and backward (the CPU allocator keeps no
            statistics; tracemalloc does not see torch's allocations).
  saved     (CPU) sum of the tensors autograd saves for backward (saved_tensors_hooks): activations only; tensors
            saved inside a checkpointed region are held by the checkpoint and not seen, so it reads near 0 there.
"peak" = memory at rest (weights, frozen models, data) + the step's peak above it. The last line is the key ratio.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from e2ediff.assets import Pipeline
from e2ediff.conditioning import TextCond
from e2ediff.config import TrainConfig
from e2ediff.denoiser import Denoiser
from e2ediff.e2e import E2ELoss, FinetuneRun, FinetuneTask
from e2ediff.models.autoencoder import AutoencoderConfig, AutoencoderKL
from e2ediff.models.dit import DiT, DiTConfig
from e2ediff.schedules import VPSchedule

MiB = 2 ** 20


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic setup (shared with step_time.py)


class SyntheticData:
    """The TrainingData interface: random images in [-1, 1] [n, 1, 32, 32], 10 classes, random caption features."""

    def __init__(self, n: int, device: torch.device, text_dim: int = 384, length: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.device = device
        self.images = (torch.rand(n, 1, 32, 32, generator=g) * 2 - 1).to(device)
        self.labels = (torch.arange(n) % 10).to(device)
        self.captions = [f"class {c}" for c in range(10)]
        self.cond = TextCond(torch.randn(10, length, text_dim, generator=g).to(device),
                             torch.ones(10, length, dtype=torch.bool, device=device),
                             torch.randn(10, text_dim, generator=g).to(device))

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None):
        labels = self.labels[idx.to(self.device)]
        return self.images[idx.to(self.device)], self.cond[labels], labels, labels


def build_pipeline(preset: str, device: torch.device, guidance_embed: bool = True) -> Pipeline:
    """A randomly initialised LCM-student pipeline of DiT preset `preset` (autoencoder preset of the same name)."""
    torch.manual_seed(0)
    net = DiT(DiTConfig.from_preset(preset, guidance_embed=guidance_embed))
    ae = AutoencoderKL(AutoencoderConfig.from_preset(preset))
    meta = {"kind": "lcm", "schedule": "linear", "prediction": "eps", "text_encoder": "synthetic",
            "sampler": {"name": "lcm", "w": 1.5}}
    return Pipeline(Denoiser(net, VPSchedule.from_name("linear"), "eps").eval().requires_grad_(False),
                    ae.eval().requires_grad_(False), meta).to(device)


def finetune_task(pipe: Pipeline, data: SyntheticData, k: int, chains: int, m: int, loss: str,
                  checkpointing: bool, device: torch.device) -> FinetuneTask:
    if chains % m:
        raise ValueError(f"--batch {chains} must be a multiple of --m {m}")
    losses = {"energy": E2ELoss(energy=1.0), "l2": E2ELoss(energy=0.0, l2=1.0),
              "energy+l2": E2ELoss(energy=1.0, l2=1.0)}
    cfg = FinetuneRun(init="synthetic", sampler_steps=k, samples_per_caption=m, checkpointing=checkpointing,
                      loss=losses[loss], train=TrainConfig(batch_size=chains // m, device=str(device)))
    return FinetuneTask(cfg, device, data=data, init=pipe)


def module_bytes(*modules: torch.nn.Module) -> int:
    seen, total = set(), 0
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------------------------------------------------
# CPU measurement


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of tensor storages created under this mode and still alive. Freed storages are dropped lazily,
    whenever the running total would set a new peak (the total without dropping is an upper bound)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def _drop_freed(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if not key:
                    continue
                if key in self.live:
                    if not self.live[key][0].expired():
                        continue                          # a view or an in-place result: already counted
                    self.current -= self.live.pop(key)[1]  # the address was freed and reused
                self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                self.current += storage.nbytes()
        if self.current > self.peak:
            self._drop_freed()
            self.peak = max(self.peak, self.current)
        return out


def saved_tensor_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    k: int
    checkpointing: bool
    rest: int
    step_peak: int


def measure(task: FinetuneTask, method: str, device: torch.device) -> tuple[int, int]:
    """(bytes at rest, peak bytes of one forward + backward above rest)."""
    net = task.parts[0].module
    net.zero_grad(set_to_none=True)

    def step(backward: bool = True):
        losses, _ = task.losses(0, torch.Generator(device=device).manual_seed(0))
        if backward:
            losses["net"].backward()

    if method == "cuda":
        step()                                          # warm-up (cuBLAS workspaces, allocator pools)
        net.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        rest = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - rest
    elif method == "dispatch":
        rest = module_bytes(net, task.init.denoiser, task.init.autoencoder, task.objective) + \
            task.data.images.numel() * task.data.images.element_size()
        tracker = LiveTensorPeak()
        with tracker:
            step()
        peak = tracker.peak
    else:
        rest = module_bytes(net, task.init.denoiser, task.init.autoencoder, task.objective)
        peak = saved_tensor_bytes(lambda: step(backward=False))
    net.zero_grad(set_to_none=True)
    return rest, peak


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="base", help="DiT and autoencoder preset (tiny | base)")
    p.add_argument("--batch", type=int, default=64, help="sampler chains per step (images × m)")
    p.add_argument("--m", type=int, default=4, help="samples per caption")
    p.add_argument("--loss", default="energy+l2", choices=["energy", "l2", "energy+l2"])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 8], help="sampler steps K to compare")
    p.add_argument("--method", default="auto", choices=["auto", "cuda", "dispatch", "saved"])
    p.add_argument("--no-contrast", action="store_true", help="skip the runs without checkpointing")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    method = args.method if args.method != "auto" else ("cuda" if device.type == "cuda" else "dispatch")
    if method == "cuda" and device.type != "cuda":
        raise ValueError("--method cuda needs --device cuda")
    if args.loss != "l2" and args.m < 2:
        raise ValueError(f"--loss {args.loss} needs --m >= 2 (the energy score compares samples)")

    pipe = build_pipeline(args.preset, device)
    data = SyntheticData(max(64, args.batch), device, pipe.net.config.text_dim)
    rows = []
    for checkpointing in ([True] if args.no_contrast else [True, False]):
        for k in args.steps:
            task = finetune_task(pipe, data, k, args.batch, args.m, args.loss, checkpointing, device)
            rest, peak = measure(task, method, device)
            rows.append(Row(k, checkpointing, rest, peak))
            del task
    params = sum(p.numel() for p in pipe.net.parameters())
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, method {method}, DiT preset {args.preset} ({params / 1e6:.1f}M params), "
          f"{args.batch} chains = {args.batch // args.m} captions × m={args.m}, loss {args.loss}")
    print(f"{'K':>3} {'checkpointing':>13} {'at rest MiB':>12} {'step peak MiB':>14} {'peak MiB':>10}")
    for r in rows:
        print(f"{r.k:>3} {str(r.checkpointing):>13} {r.rest / MiB:>12.1f} {r.step_peak / MiB:>14.1f} "
              f"{(r.rest + r.step_peak) / MiB:>10.1f}")
    ck = {r.k: r for r in rows if r.checkpointing}
    lo, hi = min(args.steps), max(args.steps)
    ratio = (ck[hi].rest + ck[hi].step_peak) / (ck[lo].rest + ck[lo].step_peak)
    step_ratio = ck[hi].step_peak / max(ck[lo].step_peak, 1)
    print(f"step peak (above rest) K={hi} / K={lo} (checkpointed): {step_ratio:.2f}")
    print(f"peak K={hi} / K={lo} (checkpointed): {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main(sys.argv[1:])
