"""Score the teacher anchor's target as if it were a model: the teacher in the student's K-step sampler
(loss.teacher_renoise; e2ediff.e2e.teacher_target), with the evaluator of `e2ediff evaluate` (FD, alignment,
diversity on a split). It tells how good and how diverse the target the student regresses to is, per guidance setting
— the ceiling of the anchor. The noises are drawn as `e2ediff evaluate` draws them for an LCM row at the same seed
(z_T, then the K − 1 re-noise draws), so a student row and its target share them.

    python scripts/anchor_target.py --teacher checkpoints/base/teacher.safetensors --steps 2 --gains 3,1 \
        --interval 0,300 --num-samples 1000 --split val --output target_k2_g31.json
--steps 0 scores the teacher's plain DDIM solve from z_T (one solve, gains[0]).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def main() -> None:
    from e2ediff.assets import load_pipeline
    from e2ediff.data.fashion_mnist import default_prompts, from_model_images
    from e2ediff.denoiser import check_guidance_interval
    from e2ediff.e2e import teacher_target
    from e2ediff.evaluate import score_images, write_json
    from e2ediff.generate import balanced_labels, sample_noises, save_samples_npz, text_features
    from e2ediff.schedules import ddim_timesteps, lcm_timesteps

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, required=True, help="the teacher pipeline file")
    p.add_argument("--steps", type=int, default=2, help="K of the student's LCM sampler (0: the plain DDIM solve)")
    p.add_argument("--teacher-steps", type=int, default=16, help="DDIM steps of the teacher's grid (loss.teacher_steps)")
    p.add_argument("--w", type=float, default=1.5, help="the chains' w (the student's guidance input)")
    p.add_argument("--gains", type=floats, default=(1.0,), help="loss.teacher_solve_gains, e.g. 3,1")
    p.add_argument("--interval", type=floats, default=None, help="loss.teacher_guidance_interval, e.g. 0,300")
    p.add_argument("--gamma", type=float, default=1.0,
                   help="renoise_gamma: the fresh draws' share of each re-noise (0: deterministic)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--classifier", type=Path, default=Path("checkpoints/classifier"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", type=Path, required=True, help="JSON file for the row")
    p.add_argument("--save-samples", type=Path, help="also write the target's images as DIR/samples.npz")
    args = p.parse_args()
    if args.steps < 0 or args.teacher_steps < 1 or args.num_samples < 10:
        p.error(f"--steps >= 0, --teacher-steps >= 1 and --num-samples >= 10 needed, got {args.steps}, "
                f"{args.teacher_steps}, {args.num_samples}")
    if any(g < 0 for g in args.gains):
        p.error(f"--gains must be >= 0, got {args.gains}")
    if not 0.0 <= args.gamma <= 1.0:
        p.error(f"--gamma must be in [0, 1], got {args.gamma}")
    try:
        interval = check_guidance_interval(args.interval, "--interval")
    except ValueError as e:
        p.error(str(e))

    pipe = load_pipeline(args.teacher, args.device)
    schedule = pipe.denoiser.schedule
    grid = ddim_timesteps(args.teacher_steps, schedule.T, spacing="trailing")
    timesteps = lcm_timesteps(args.steps) if args.steps else grid[:1]
    labels = balanced_labels(args.num_samples)
    prompts = [default_prompts()[c] for c in labels]
    cond = text_features(prompts, pipe.meta.get("captions"))
    z_T, noises = sample_noises(pipe, args.num_samples, len(timesteps) - 1, args.seed)   # as `evaluate` draws
    t0, out = time.perf_counter(), []
    with torch.no_grad():
        for s in range(0, args.num_samples, args.batch_size):
            sl = slice(s, s + args.batch_size)
            z = z_T[sl].to(args.device)
            w = torch.full((len(z),), args.w, device=z.device)
            x0 = teacher_target(pipe.denoiser, z, cond[sl].to(args.device), w, timesteps,
                                [e[sl].to(args.device) for e in noises], grid, gains=args.gains, interval=interval,
                                gamma=args.gamma)
            out.append(pipe.autoencoder.decode_latents(x0).clamp(-1, 1).cpu())
    seconds = time.perf_counter() - t0
    images = from_model_images(torch.cat(out))
    result = score_images(images, labels, args.classifier, args.split, device=args.device, seed=args.seed)
    result.update({"teacher": str(args.teacher), "student_timesteps": timesteps, "teacher_steps": args.teacher_steps,
                   "w": args.w, "gains": list(args.gains), "interval": None if interval is None else list(interval),
                   "gamma": args.gamma,
                   "seed": args.seed, "sample_seconds": seconds})
    write_json(args.output, result)
    if args.save_samples:
        save_samples_npz(args.save_samples / "samples.npz", images, labels, prompts)
    print(json.dumps({k: result[k] for k in ("fd", "alignment", "diversity_rel", "n")}))


if __name__ == "__main__":
    main()
