"""`base` E2E fine-tuning steps per second, before/after, measured side by side in one run (issue #9).

    python benchmarks/e2e_speed.py --old-src .gpu/old_src --device cuda          # old code vs today's variants
    python benchmarks/e2e_speed.py --device cpu --preset tiny --warmup 1 --iters 2 --batch 4   # a smoke run

Every variant runs the same `e2ediff finetune` command (the shipped `base` LCM student, real Fashion-MNIST batches,
K = 4, `--batch` captions × m = 4 samples each, AdamW, EMA, gradient clipping, per-step checkpointing unless a
variant turns it off) in its own process, one after another on an otherwise idle device. Steps per second are timed
between the start of step `--warmup` and the start of step `--warmup + --iters` (the device synchronised at both
ends), so compilation and CUDA-graph capture fall into the warm-up. `--old-src` is the `src` folder of an earlier
checkout (e.g. `git archive 0ae16b9 src | tar -x -C .gpu/old`); its row is the "before". The last line prints each
variant's steps/s relative to the first row.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(src: str, warmup: int, iters: int, argv: list[str]) -> None:
    """Run `e2ediff <argv>` with the package from `src`, timing FinetuneTask.losses calls (one per step)."""
    sys.path.insert(0, src)
    import torch

    import e2ediff.e2e as e2e
    from e2ediff.cli import main

    assert Path(e2e.__file__).resolve().is_relative_to(Path(src).resolve()), e2e.__file__
    marks: dict[str, float] = {}
    calls = [0]
    original = e2e.FinetuneTask.losses

    def timed(self, step, generator):
        if calls[0] in (warmup, warmup + iters):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            marks["t0" if calls[0] == warmup else "t1"] = time.perf_counter()
        calls[0] += 1
        return original(self, step, generator)

    e2e.FinetuneTask.losses = timed
    rc = main(argv)
    if rc != 0 or "t1" not in marks:
        raise SystemExit(f"worker failed (exit {rc}, {calls[0]} steps)")
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
    print("RESULT " + json.dumps({"steps_per_s": iters / (marks["t1"] - marks["t0"]), "peak_mib": peak}), flush=True)


def run_variant(name: str, src: Path, overrides: list[str], args, run_root: Path) -> dict:
    steps = args.warmup + args.iters + 1
    argv = ["finetune", "--preset", args.preset, "--run-dir", str(run_root / name), f"init={args.init}",
            "sampler_steps=4", f"train.batch_size={args.batch}", "samples_per_caption=4", f"train.steps={steps}",
            f"train.checkpoint_every={steps}", f"train.log_every={steps}", "train.progress=false",
            f"train.device={args.device}", *overrides]
    cmd = [sys.executable, __file__, "--worker", str(src), "--warmup", str(args.warmup), "--iters", str(args.iters),
           "--", *argv]
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    row = {"variant": name, "overrides": overrides, "wall_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0 or not found:
        row["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    else:
        row.update(json.loads(found[-1][len("RESULT "):]))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--old-src", type=Path, help="src folder of the code to compare with (the 'before' row)")
    p.add_argument("--init", type=Path, default=ROOT / "checkpoints" / "base" / "lcm.safetensors")
    p.add_argument("--preset", default="base")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=32, help="captions per step (× m = 4 sampler chains each)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--timeout", type=float, default=300, help="seconds per variant")
    p.add_argument("--only", nargs="*", help="variant names to run")
    p.add_argument("--output", type=Path, help="write the rows as JSON here")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides added to every variant (e.g. a GAN loss: loss.gan=1.0 loss.r1=1.0)")
    p.add_argument("rest", nargs="*")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.warmup, args.iters, args.rest)

    new = ROOT / "src"
    variants = []
    if args.old_src is not None:
        variants.append(("before (old code, eager)", args.old_src, []))
    variants += [("eager", new, []),
                 ("compile", new, ["train.compile=default"]),
                 ("compile, no checkpointing", new, ["train.compile=default", "checkpointing=false"]),
                 ("CUDA graphs (reduce-overhead)", new, ["train.compile=reduce-overhead"]),
                 ("CUDA graphs, no checkpointing", new, ["train.compile=reduce-overhead", "checkpointing=false"])]
    if args.device == "cpu":
        variants = [v for v in variants if "CUDA graphs" not in v[0]]
    if args.only:
        variants = [v for v in variants if v[0] in args.only]
    import torch

    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} · {device} · torch {torch.__version__} · preset {args.preset} · "
          f"K = 4 · {args.batch} captions × m = 4 · {args.warmup} warm-up + {args.iters} timed steps"
          + (" · " + " ".join(args.set) if args.set else ""), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, src, overrides in variants:
            row = run_variant(name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", ""), src,
                              [*overrides, *args.set], args, Path(tmp))
            row["variant"] = name
            rows.append(row)
            if "error" in row:
                print(f"{name:34s} failed: {row['error']}", flush=True)
            else:
                print(f"{name:34s} {row['steps_per_s']:8.2f} steps/s  peak {row['peak_mib']:8.1f} MiB  "
                      f"(wall {row['wall_s']} s)", flush=True)
            if args.output:
                args.output.write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    ok = [r for r in rows if "error" not in r]
    if ok:
        base = ok[0]
        print("ratio vs " + base["variant"] + ": " + ", ".join(
            f"{r['variant']} {r['steps_per_s'] / base['steps_per_s']:.2f}x" for r in ok))


if __name__ == "__main__":
    main()
