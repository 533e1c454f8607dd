"""``e2ediff`` command line: thin commands over the library.

Training commands take ``--preset`` (tiny | base), ``--config file.yaml`` and ``key.sub=value`` overrides, write the
resolved config into ``--run-dir`` and resume from it when it already holds checkpoints.
Errors in user input print one line (``error: …``) and exit with status 2; set ``E2EDIFF_DEBUG=1`` for tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch


def _training_parser(sub, name: str, help: str, presets: list[str]) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--preset", default="tiny", choices=presets, help="named defaults (tiny: CPU, base: one GPU)")
    p.add_argument("--config", type=Path, help="YAML file with overrides of the preset")
    p.add_argument("--run-dir", type=Path, required=True, help="run folder: config, checkpoints, logs, model file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, e.g. train.steps=100")
    return p


def build_parser() -> argparse.ArgumentParser:
    from e2ediff import autoencoder_training, pretrain

    parser = argparse.ArgumentParser(prog="e2ediff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("encode-prompts", help="encode captions with MiniLM into a safetensors cache")
    p.add_argument("--captions", type=Path, help="text file, one caption per line (default: Fashion-MNIST captions)")
    p.add_argument("--output", type=Path, help="cache file (default: the cache the training commands look for)")

    _training_parser(sub, "train-autoencoder", "train the latent KL autoencoder", list(autoencoder_training.PRESETS))
    _training_parser(sub, "pretrain", "train the diffusion teacher (paper Eq. 6)", list(pretrain.PRESETS))
    for name, help in (("distill", "latent consistency distillation: the few-step LCM student"),
                       ("finetune", "end-to-end fine-tuning through the unrolled sampler (paper Algorithm 1)")):
        try:
            module = __import__(f"e2ediff.{'distill' if name == 'distill' else 'e2e'}", fromlist=["PRESETS"])
            _training_parser(sub, name, help, list(module.PRESETS))
        except ImportError:
            pass

    p = sub.add_parser("sample", help="sample images from a model file; writes a PNG grid and samples.npz")
    p.add_argument("--checkpoint", type=Path, required=True, help="model.safetensors (or its run folder)")
    p.add_argument("--output", type=Path, required=True, help="output folder")
    p.add_argument("--num-samples", type=int, default=100, help="balanced over the 10 classes unless --prompt")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: one per Fashion-MNIST class")
    p.add_argument("--sampler", choices=["ddim", "lcm"], help="default: the one the model file names")
    p.add_argument("--steps", type=int, help="number of sampling steps (default: the model file's)")
    p.add_argument("--timesteps", help="explicit comma-separated timestep list, e.g. 999,759,499,259")
    p.add_argument("--renoise", choices=["vp", "ve"], help="LCM re-noise form")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (DDIM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="auto")
    p.add_argument("--prompt-cache", type=Path, help="caption-feature cache to read instead of running MiniLM")
    p.add_argument("--grid-columns", type=int, default=10, help="samples per row of the PNG grid")
    return parser


def _device(name: str) -> torch.device:
    from e2ediff.trainer import resolve_device

    return resolve_device(name)


def cmd_encode_prompts(args) -> None:
    from e2ediff.assets import default_prompt_cache_path
    from e2ediff.data.fashion_mnist import class_captions
    from e2ediff.models.text import PromptCache

    if args.captions is not None:
        if not args.captions.is_file():
            raise FileNotFoundError(f"--captions file {args.captions} does not exist")
        captions = [line.strip() for line in args.captions.read_text().splitlines() if line.strip()]
        if not captions:
            raise ValueError(f"--captions file {args.captions} holds no captions")
    else:
        captions, _ = class_captions()
    cache = PromptCache.build(captions)
    if args.output is None:
        args.output = default_prompt_cache_path(captions)
    cache.save(args.output)
    print(f"{len(captions)} captions encoded -> {args.output}")


def _resolve_run(args, presets):
    from e2ediff.config import resolve

    return resolve(presets[args.preset], args.config, args.overrides)


def cmd_train(args) -> None:
    from e2ediff.trainer import train

    if args.command == "train-autoencoder":
        from e2ediff.autoencoder_training import PRESETS, AutoencoderTask, reconstruction_psnr

        cfg = _resolve_run(args, PRESETS)
        device = _device(cfg.train.device)
        task = AutoencoderTask(cfg, device)
        train(task, cfg.train, args.run_dir, cfg, args.command)
        from e2ediff.assets import TrainingData, load_autoencoder

        ae = load_autoencoder(args.run_dir / "model.safetensors").to(device)
        test = TrainingData(cfg.data, "test", device, prompt_cache=None)
        value = reconstruction_psnr(ae, test.images)
        from e2ediff.checkpoint import atomic_write_text

        atomic_write_text(args.run_dir / "eval.json", json.dumps({"test_psnr_db": value, "n": len(test)}) + "\n")
        print(f"autoencoder: test-split reconstruction PSNR {value:.2f} dB (28x28 crop, {len(test)} images); "
              f"model -> {args.run_dir / 'model.safetensors'}")
        return
    if args.command == "pretrain":
        from e2ediff.pretrain import PRESETS, PretrainTask

        cfg = _resolve_run(args, PRESETS)
        task = PretrainTask(cfg, _device(cfg.train.device))
    elif args.command == "distill":
        from e2ediff.distill import PRESETS, DistillTask

        cfg = _resolve_run(args, PRESETS)
        task = DistillTask(cfg, _device(cfg.train.device))
    else:
        from e2ediff.e2e import PRESETS, FinetuneTask

        cfg = _resolve_run(args, PRESETS)
        task = FinetuneTask(cfg, _device(cfg.train.device))
    train(task, cfg.train, args.run_dir, cfg, args.command)
    print(f"{args.command}: model -> {args.run_dir / 'model.safetensors'}")


def cmd_sample(args) -> None:
    from e2ediff.assets import load_pipeline
    from e2ediff.data.fashion_mnist import default_prompts, from_model_images
    from e2ediff.generate import SamplerSpec, balanced_labels, generate, save_grid, save_samples_npz, text_features

    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    device = _device(args.device)
    pipe = load_pipeline(args.checkpoint, device)
    spec = SamplerSpec.from_meta(pipe.meta)
    if args.sampler:
        spec.name = args.sampler
    if args.steps is not None:
        spec.steps, spec.timesteps = args.steps, None
    if args.timesteps:
        try:
            spec.timesteps = tuple(int(t) for t in args.timesteps.split(","))
        except ValueError:
            raise ValueError(f"--timesteps {args.timesteps!r} is not a comma-separated list of integers") from None
    if args.renoise:
        spec.renoise = args.renoise
    if args.guidance is not None:
        spec.guidance = args.guidance
    if args.prompt:
        prompts = [args.prompt[i % len(args.prompt)] for i in range(args.num_samples)]
        prompts = sorted(prompts, key=args.prompt.index)
        labels, rows = None, len(args.prompt)
        classes = default_prompts()
        if all(p in classes for p in args.prompt):
            labels = np.array([classes.index(p) for p in prompts])
    else:
        labels = balanced_labels(args.num_samples)
        classes = default_prompts()
        prompts = [classes[c] for c in labels]
        rows = len(set(labels.tolist()))
    cond = text_features(prompts, pipe.meta.get("captions"), args.prompt_cache)
    images = generate(pipe, cond, spec, seed=args.seed, batch_size=args.batch_size, device=device)
    uint8 = from_model_images(images)
    args.output.mkdir(parents=True, exist_ok=True)
    save_samples_npz(args.output / "samples.npz", uint8, labels, prompts)
    per_row = max(1, -(-len(uint8) // rows))
    cols = min(args.grid_columns, per_row)
    grid_idx = np.concatenate([np.arange(r * per_row, min((r + 1) * per_row, len(uint8)))[:cols] for r in range(rows)])
    save_grid(uint8[grid_idx], rows, args.output / "grid.png", row_labels=None)
    ts = spec.resolved_timesteps()
    print(f"{len(uint8)} samples ({spec.name}, timesteps {ts}, NFE {spec.nfe}) -> "
          f"{args.output / 'samples.npz'}, {args.output / 'grid.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"encode-prompts": cmd_encode_prompts, "sample": cmd_sample}
    try:
        handlers.get(args.command, cmd_train)(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from e2ediff.checkpoint import CheckpointError
        from e2ediff.config import ConfigError
        from e2ediff.trainer import TrainingStopped

        user_errors = (ConfigError, CheckpointError, FileNotFoundError, ValueError, ImportError, TrainingStopped)
        if os.environ.get("E2EDIFF_DEBUG") or not isinstance(e, user_errors):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
