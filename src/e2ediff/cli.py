"""``e2ediff`` command line: thin commands over the library.

Training commands take ``--preset`` (tiny | base), ``--config file.yaml`` and ``key.sub=value`` overrides, write the
resolved config into ``--run-dir`` and resume from it when it already holds checkpoints.
Errors in user input print one line (``error: …``) and exit with status 2; set ``E2EDIFF_DEBUG=1`` for tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from e2ediff import guards
from e2ediff.runlock import run_lock


def _training_parser(sub, name: str, help: str, presets: list[str]) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--preset", default="tiny", choices=presets, help="named defaults (tiny: CPU, base: one GPU)")
    p.add_argument("--config", type=Path, help="YAML file with overrides of the preset")
    p.add_argument("--run-dir", type=Path, required=True, help="run folder: config, checkpoints, logs, model file")
    p.add_argument("--data-dir", type=Path, help="Fashion-MNIST IDX files (.gz or raw), or the image folder "
                   "(same as data.data_dir=...)")
    p.add_argument("--skip-bad-files", action="store_true", help="skip unreadable images with a counted warning "
                   "(same as data.skip_bad_files=true)")
    p.add_argument("--allow-changed", action="store_true", help="resume with changed hyper-parameters: apply them "
                   "and record the change in RUN/config_changes.jsonl (without it such a resume is refused)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, e.g. train.steps=100")
    return p


def build_parser() -> argparse.ArgumentParser:
    from e2ediff import autoencoder_training, pretrain

    parser = argparse.ArgumentParser(prog="e2ediff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("encode-prompts", help="encode captions with MiniLM into a safetensors cache")
    p.add_argument("--captions", type=Path, help="text file, one caption per line (default: Fashion-MNIST captions)")
    p.add_argument("--output", type=Path, help="cache file (default: the cache the training commands look for)")
    p.add_argument("--dataset", choices=["fashion-mnist", "fashion-scenes"], default="fashion-mnist",
                   help="fashion-scenes: the int8 clause cache of the scenes caption grammar (data/scenes.py)")

    _training_parser(sub, "train-autoencoder", "train the latent KL autoencoder", list(autoencoder_training.PRESETS))
    _training_parser(sub, "pretrain", "train the diffusion teacher (paper Eq. 6)", list(pretrain.PRESETS))
    for name, help in (("distill", "latent consistency distillation: the few-step LCM student"),
                       ("finetune", "end-to-end fine-tuning through the unrolled sampler (paper Algorithm 1)")):
        try:
            module = __import__(f"e2ediff.{'distill' if name == 'distill' else 'e2e'}", fromlist=["PRESETS"])
            _training_parser(sub, name, help, list(module.PRESETS))
        except ImportError:
            pass
    from e2ediff.pretrained import add_finetune_args
    add_finetune_args(sub.choices["finetune"])

    p = sub.add_parser("sample", help="sample images from a model file; writes a PNG grid and samples.npz")
    p.add_argument("--checkpoint", type=Path, help="model.safetensors (or its run folder)")
    p.add_argument("--pretrained", help="instead of --checkpoint: a diffusers pipeline folder / hub id or an "
                   "e2ediff export (pipeline/, lora/); writes PNGs and latents.safetensors")
    p.add_argument("--output", type=Path, required=True, help="output folder")
    p.add_argument("--num-samples", type=int, default=100, help="balanced over the 10 classes unless --prompt")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: one per Fashion-MNIST class")
    _sampler_args(p)
    p.add_argument("--grid-columns", type=int, default=10, help="samples per row of the PNG grid")
    from e2ediff.adapters.speed import ATTENTION_BACKENDS, COMPILE_MODES

    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="--pretrained: the pipeline's weights dtype (default float32; bfloat16 as "
                   "from_pretrained(torch_dtype=torch.bfloat16))")
    p.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                   help="--pretrained: torch.compile the transformer / UNet (PixArt: each transformer block, the "
                   "blocks sharing their graphs); MODE one of %(choices)s (default: default)")
    p.add_argument("--fuse-qkv", action="store_true", help="--pretrained: fused q/k/v projections (diffusers' "
                   "fuse_qkv_projections; LoRA adapters are merged first)")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, default="default",
                   help="--pretrained: the attention kernel scaled_dot_product_attention tries first (cudnn: the "
                   "Hopper kernel; default: torch's order)")
    p.add_argument("--fp8", action="store_true",
                   help="--pretrained: FP8 (e4m3) matmuls in the transformer blocks' linear layers, weights per "
                   "channel and activations per token (adapters.speed.float8_linear). Costs quantization error "
                   "(a few %% per matmul, so samples differ slightly from the unquantized ones); faster only on a "
                   "GPU with FP8 tensor cores (Hopper, Ada) and with --dtype bfloat16 --compile; on other devices "
                   "(CPU) it runs, not faster. LoRA adapters are merged first")

    p = sub.add_parser("evaluate", help="FD, KID, alignment and diversity of a model file or a samples.npz")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="model file to sample from (balanced over the 10 classes)")
    src.add_argument("--samples", type=Path, help="a samples.npz from any tool (images uint8 [N,28,28], labels)")
    p.add_argument("--classifier", type=Path, default=DEFAULT_CLASSIFIER,
                   help="evaluation classifier folder (train-classifier); default: the shipped one")
    p.add_argument("--num-samples", type=int, default=10000)
    p.add_argument("--split", choices=["test", "val"], default="test", help="real images to compare with")
    p.add_argument("--output", type=Path, help="write the metrics as JSON here")
    p.add_argument("--save-samples", type=Path, help="also write samples.npz and grid.png into this folder")
    p.add_argument("--data-dir", type=Path, help="Fashion-MNIST IDX files (.gz or raw)")
    p.add_argument("--fp8", action="store_true", help="--checkpoint: sample with FP8 (e4m3) matmuls in the network's "
                   "blocks (adapters.speed.float8_linear), to score what the quantization error costs")
    _sampler_args(p)

    p = sub.add_parser("convert", help="rewrite a model file with its floating-point weights in another dtype",
                       description="Rewrite a model file (pipeline, autoencoder) with every floating-point tensor cast "
                                   "to --dtype; metadata is kept and the checksum recomputed. Shipped files are "
                                   "float16; models load them into float32 modules.")
    p.add_argument("input", type=Path, help="model file (model.safetensors or its run folder)")
    p.add_argument("output", type=Path, help="file to write (atomically); may not be the input")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    p.add_argument("--share-autoencoder", type=Path, metavar="FILE",
                   help="an autoencoder file beside OUTPUT that holds this pipeline's autoencoder (equal at --dtype): "
                        "OUTPUT keeps a checked reference to it instead of a copy (the shipped files share one)")
    p.add_argument("--w", type=float, help="set OUTPUT's default guidance input w of its LCM sampler (the dial "
                   "`sample` and `evaluate` use without --w; e.g. the one chosen on validation)")
    p.add_argument("--gamma", type=float, help="set OUTPUT's default renoise_gamma of its LCM sampler, in [0, 1]")

    p = sub.add_parser("demo", help="the Fashion-MNIST miniature on a CPU: fine-tune, evaluate, write a report")
    p.add_argument("--output", type=Path, default=Path("runs/demo"), help="report folder")
    p.add_argument("--from-scratch", action="store_true", help="train every tiny model here first (~1 h on 2 cores)")
    p.add_argument("--finetune-steps", type=int, default=20)
    p.add_argument("--num-samples", type=int, default=1000, help="samples per row (every row: 1, 2 and 4 steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, help="Fashion-MNIST IDX files (.gz or raw)")

    _network_parser(sub, "train-classifier", "train the evaluation classifier (a supervised ResNet)",
                    "output folder (model.safetensors + config.json)", steps=4000, seed=1234)
    _network_parser(sub, "train-lpips", "train the LPIPS feature network for the miniature (SimCLR, VGG-like)",
                    "output file (.safetensors)", steps=3000, seed=7)
    return parser


DEFAULT_CLASSIFIER = Path(__file__).resolve().parents[2] / "checkpoints" / "classifier"


def _network_parser(sub, name: str, help: str, output_help: str, steps: int, seed: int) -> None:
    """The evaluation classifier and the LPIPS network: different networks, objectives and seeds, same options."""
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--output", type=Path, required=True, help=output_help)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", type=Path, help="Fashion-MNIST IDX files (.gz or raw)")


def _sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", choices=["ddim", "lcm"], help="default: the one the model file names")
    p.add_argument("--steps", type=int, help="number of sampling steps (default: the model file's)")
    p.add_argument("--timesteps", help="explicit comma-separated timestep list, e.g. 999,759,499,259")
    p.add_argument("--renoise", choices=["vp", "ve"], help="LCM re-noise form")
    p.add_argument("--gamma", type=float, help="LCM (vp): the fresh noise's share of each re-noise, in [0, 1]; the "
                   "rest is the noise the step implies (0: deterministic; default: the model file's, else 1)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (DDIM)")
    p.add_argument("--guidance-interval", metavar="LO,HI",
                   help="DDIM: apply the guidance only at timesteps LO <= t <= HI, e.g. 0,600 (Kynkäänniemi et al. 2024)")
    p.add_argument("--w", type=float, help="guidance-scale embedding input of an LCM student")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="auto")
    p.add_argument("--prompt-cache", type=Path, help="caption-feature cache to read instead of running MiniLM")


def _device(name: str) -> torch.device:
    from e2ediff.trainer import resolve_device

    return resolve_device(name)


def cmd_encode_prompts(args) -> None:
    from e2ediff.assets import default_prompt_cache_path
    from e2ediff.data.fashion_mnist import class_captions
    from e2ediff.models.text import PromptCache

    if args.dataset == "fashion-scenes":
        from e2ediff.data.scenes import SceneTextCache, default_scene_cache_path

        if args.captions is not None:
            raise ValueError("--captions cannot be combined with --dataset fashion-scenes (the grammar fixes them)")
        path = args.output or default_scene_cache_path()
        cache = SceneTextCache.build()
        cache.save(path)
        print(f"{len(cache.clauses)} scene clauses encoded -> {path} ({path.stat().st_size / 1e6:.2f} MB)")
        return
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
    from e2ediff.config import resolve, to_dict

    if getattr(args, "data_dir", None) is not None:
        args.overrides = [f"data.data_dir={args.data_dir}", *args.overrides]
    if getattr(args, "skip_bad_files", False):
        args.overrides = ["data.skip_bad_files=true", *args.overrides]

    cfg = resolve(presets[args.preset], args.config, args.overrides)
    guards.check_run(to_dict(cfg), args.run_dir, args.config)
    # Module initialisation (a fresh DiT, the GAN discriminator) draws from torch's global RNG: seed it (and the
    # Python / NumPy RNGs a checkpoint also saves), so that a run killed before its first checkpoint restarts exactly.
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    return cfg


def cmd_train(args) -> None:
    from e2ediff.trainer import train

    if args.command == "train-autoencoder":
        from e2ediff.autoencoder_training import PRESETS, AutoencoderTask, reconstruction_psnr

        cfg = _resolve_run(args, PRESETS)
        device = _device(cfg.train.device)
        task = AutoencoderTask(cfg, device)
        train(task, cfg.train, args.run_dir, cfg, args.command, allow_changed=args.allow_changed)
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
    elif getattr(args, "pretrained", None) is not None:
        from e2ediff.pretrained import finetune_command

        return finetune_command(args, _resolve_run, _device)
    elif args.command == "distill":
        from e2ediff.distill import PRESETS, DistillTask

        cfg = _resolve_run(args, PRESETS)
        task = DistillTask(cfg, _device(cfg.train.device))
    else:
        from e2ediff.e2e import PRESETS, FinetuneTask

        cfg = _resolve_run(args, PRESETS)
        task = FinetuneTask(cfg, _device(cfg.train.device))
    train(task, cfg.train, args.run_dir, cfg, args.command, allow_changed=args.allow_changed)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{args.command}: model -> {args.run_dir / 'model.safetensors'}")


def cmd_sample(args) -> None:
    from e2ediff.assets import load_pipeline
    from e2ediff.data.fashion_mnist import default_prompts, from_model_images
    from e2ediff.generate import balanced_labels, generate, save_grid, save_samples_npz, text_features

    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    device = _device(args.device)
    if args.pretrained is not None:
        from e2ediff.pretrained import sample_images

        if not args.prompt:
            raise ValueError("--pretrained needs at least one --prompt")
        prompts = [args.prompt[i % len(args.prompt)] for i in range(max(args.num_samples, len(args.prompt)))]
        timesteps = [int(t) for t in args.timesteps.split(",")] if args.timesteps else None
        out = sample_images(args.pretrained, prompts, args.output, steps=args.steps, timesteps=timesteps, w=args.w,
                            seed=args.seed, device=device, dtype=args.dtype or "float32", fuse_qkv=args.fuse_qkv,
                            compile=args.compile, attention=args.attention, fp8=args.fp8)
        print(f"{len(prompts)} samples -> {out}")
        return
    if args.checkpoint is None:
        raise ValueError("sample needs --checkpoint (a model file) or --pretrained (a diffusers pipeline)")
    pipe = load_pipeline(args.checkpoint, device)
    spec = _sampler_spec(args, pipe.meta)
    from e2ediff.data.scenes import is_scenes_pipeline

    if is_scenes_pipeline(pipe.meta):
        return _sample_scenes(args, pipe, spec, device)
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
    save_grid(uint8[grid_idx], rows, args.output / "grid.png")
    ts = spec.resolved_timesteps()
    print(f"{len(uint8)} samples ({spec.name}, timesteps {ts}, NFE {spec.nfe}) -> "
          f"{args.output / 'samples.npz'}, {args.output / 'grid.png'}")


def _sample_scenes(args, pipe, spec, device) -> None:
    """`sample` on a scenes model: prompts from --prompt (parsed to layouts) or the test scenes' captions."""
    from e2ediff.data.scenes import parse_caption
    from e2ediff.evaluate_scenes import sample_scenes, save_scene_samples, scene_prompts
    from e2ediff.generate import save_grid

    if args.prompt:
        captions = [args.prompt[i % len(args.prompt)] for i in range(args.num_samples)]
        captions = sorted(captions, key=args.prompt.index)
        layouts = np.array([parse_caption(c) for c in captions], dtype=np.int64)
        rows = len(args.prompt)
    else:
        layouts, captions = scene_prompts(args.num_samples, "test")
        rows = max(1, -(-len(captions) // args.grid_columns))
    images = sample_scenes(pipe, captions, spec, args.seed, args.batch_size, device, args.prompt_cache)
    args.output.mkdir(parents=True, exist_ok=True)
    save_scene_samples(args.output / "samples.npz", images, layouts, captions)
    save_grid(images, rows, args.output / "grid.png", scale=1)
    print(f"{len(images)} scenes ({spec.name}, timesteps {spec.resolved_timesteps()}, NFE {spec.nfe}) -> "
          f"{args.output / 'samples.npz'}, {args.output / 'grid.png'}")


def _sampler_spec(args, meta: dict):
    from e2ediff.generate import SamplerSpec

    spec = SamplerSpec.from_meta(meta)
    if args.sampler:
        spec.name = args.sampler
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        spec = spec.with_steps(args.steps)
    if args.timesteps:
        spec.timesteps = guards.parse_timesteps("--timesteps", args.timesteps)
    if args.renoise:
        spec.renoise = args.renoise
    if getattr(args, "gamma", None) is not None:   # its range: guards.check_command
        spec.gamma = args.gamma
    if args.guidance is not None:
        spec.guidance = args.guidance
    if getattr(args, "guidance_interval", None):
        from e2ediff.denoiser import check_guidance_interval

        spec.guidance_interval = check_guidance_interval(args.guidance_interval.split(","), "--guidance-interval")
    if args.w is not None:
        spec.w = args.w
    return spec


def cmd_evaluate(args) -> None:
    from e2ediff.evaluate import evaluate_model, score_images, write_json
    from e2ediff.generate import save_grid, save_samples_npz

    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if not (args.classifier / "model.safetensors").is_file():
        raise FileNotFoundError(f"evaluation classifier not found in {args.classifier} "
                                f"(train one with `e2ediff train-classifier --output DIR`)")
    device = _device(args.device)
    from e2ediff.data.scenes import is_scenes_pipeline
    from e2ediff.evaluate_scenes import is_scene_samples

    if args.samples is not None and args.samples.is_file() and is_scene_samples(args.samples):
        from e2ediff.evaluate_scenes import load_scene_samples
        from e2ediff.metrics.scenes import score_scenes

        images, layouts, _ = load_scene_samples(args.samples)
        result = score_scenes(images, layouts, args.classifier, args.split, device=device, seed=args.seed)
        result["samples"] = str(args.samples)
    elif args.checkpoint is not None and is_scenes_pipeline(_model_meta(args.checkpoint)):
        from e2ediff.evaluate_scenes import evaluate_scene_model, save_scene_samples
        from e2ediff.generate import save_grid

        path = args.checkpoint / "model.safetensors" if args.checkpoint.is_dir() else args.checkpoint
        spec = _sampler_spec(args, _model_meta(path))
        result, images, layouts, captions = evaluate_scene_model(path, spec, args.classifier, args.num_samples,
                                                                 args.seed, args.split, device, args.batch_size,
                                                                 args.prompt_cache, fp8=args.fp8)
        if args.save_samples is not None:
            save_scene_samples(args.save_samples / "samples.npz", images, layouts, captions)
            save_grid(images[:40], max(1, min(4, len(images) // 10)), args.save_samples / "grid.png", scale=1)
    elif args.samples is not None:
        from e2ediff.metrics.report import load_samples_npz

        images, labels, _ = load_samples_npz(args.samples)
        result = score_images(images, labels, args.classifier, args.split, device=device, seed=args.seed)
        result["samples"] = str(args.samples)
    else:
        from e2ediff.checkpoint import read_model_meta

        path = args.checkpoint / "model.safetensors" if args.checkpoint.is_dir() else args.checkpoint
        spec = _sampler_spec(args, read_model_meta(path))
        result, images, labels = evaluate_model(path, spec, args.classifier, args.num_samples, args.seed,
                                                args.split, device, args.batch_size, args.prompt_cache, fp8=args.fp8)
        if args.save_samples is not None:
            from e2ediff.data.fashion_mnist import default_prompts

            save_samples_npz(args.save_samples / "samples.npz", images, labels,
                             [default_prompts()[c] for c in labels])
            per = len(images) // 10
            pick = np.concatenate([np.arange(c * per, c * per + min(per, 10)) for c in range(10)]) if per else \
                np.arange(len(images))
            save_grid(images[pick], 10 if per else 1, args.save_samples / "grid.png")
    if args.output is not None:
        write_json(args.output, result)
    keys = [k for k in ("fd", "kid_mean", "alignment", "all_four", "diversity_rel", "nfe", "n") if k in result]
    print(" ".join(f"{k}={result[k]:.4g}" if isinstance(result[k], float) else f"{k}={result[k]}" for k in keys))


def _model_meta(path: Path) -> dict:
    """A model file's metadata, or {} when it cannot be read (the caller's loader then reports why)."""
    from e2ediff.checkpoint import read_model_meta

    try:
        return read_model_meta(path / "model.safetensors" if path.is_dir() else path)
    except Exception:
        return {}


def cmd_train_classifier(args) -> None:
    from e2ediff.data.fashion_mnist import load_fashion_mnist
    from e2ediff.metrics.classifier import accuracy, save_classifier, train_classifier

    device = _device(args.device)
    images, labels = load_fashion_mnist("train")
    model = train_classifier(images, labels, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, device=device)
    test_images, test_labels = load_fashion_mnist("test")
    acc = accuracy(model, test_images, test_labels)
    save_classifier(model, args.output)
    from e2ediff.checkpoint import atomic_write_text

    atomic_write_text(args.output / "eval.json", json.dumps({"test_accuracy": acc, "steps": args.steps,
                                                             "seed": args.seed}) + "\n")
    print(f"classifier: test accuracy {acc:.4f} -> {args.output}")


def cmd_train_lpips(args) -> None:
    from e2ediff.data.fashion_mnist import load_fashion_mnist
    from e2ediff.losses.perceptual import train_feature_net

    device = _device(args.device)
    images, _ = load_fashion_mnist("train")
    net = train_feature_net(torch.as_tensor(images), steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            seed=args.seed, device=device)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    net.save(args.output)
    print(f"LPIPS feature network (SimCLR, VGG-like; not the evaluation classifier) -> {args.output}")


def cmd_convert(args) -> None:
    from e2ediff.assets import with_autoencoder
    from e2ediff.checkpoint import load_model_file, read_data_checksum, save_model_file, split_prefix

    source = args.input / "model.safetensors" if args.input.is_dir() else args.input
    if source.resolve() == args.output.resolve():
        raise ValueError(f"convert: output {args.output} is the input file; write to another path")
    tensors, meta = load_model_file(source)
    if args.w is not None or args.gamma is not None:   # the file's default sampling dials
        sampler = meta.get("sampler")
        if not sampler or sampler.get("name") != "lcm":
            raise ValueError(f"convert: --w / --gamma set an LCM sampler's defaults; {source}'s sampler is "
                             f"{(sampler or {}).get('name')!r}")
        if args.w is not None and args.w <= 0:
            raise ValueError(f"convert: --w must be > 0, got {args.w}")
        if sampler.get("renoise", "vp") != "vp" and args.gamma is not None:
            raise ValueError(f"convert: --gamma needs the vp re-noise; {source}'s is {sampler.get('renoise')!r}")
        meta["sampler"] = sampler = dict(sampler)
        for key in ("w", "gamma"):
            if getattr(args, key) is not None:
                sampler[key] = getattr(args, key)
    tensors = with_autoencoder(source, tensors, meta)   # a shared autoencoder is copied in unless shared again
    meta.pop("autoencoder_file", None)
    dtype = getattr(torch, args.dtype)
    if args.share_autoencoder is not None:
        shared = args.share_autoencoder
        if shared.resolve().parent != args.output.resolve().parent:
            raise ValueError(f"convert: --share-autoencoder {shared} must sit in the folder of the output "
                             f"{args.output} (the reference is a file name)")
        ae_tensors, ae_meta = load_model_file(shared)
        own, theirs = split_prefix(tensors, "autoencoder"), split_prefix(ae_tensors, "autoencoder")
        if (own.keys() != theirs.keys() or ae_meta.get("autoencoder") != meta.get("autoencoder")
                or any(not torch.equal(v.to(dtype), theirs[k].to(dtype)) for k, v in own.items())):
            raise ValueError(f"convert: {source}'s autoencoder is not the one in {shared} (at {args.dtype}); "
                             f"cannot share it")
        tensors = {k: v for k, v in tensors.items() if not k.startswith("autoencoder/")}
        meta["autoencoder_file"] = {"file": shared.name, "sha256": read_data_checksum(shared)}
    save_model_file(args.output, tensors, meta, dtype=dtype)
    print(f"{source} ({source.stat().st_size / 1e6:.2f} MB) -> {args.output} "
          f"({args.output.stat().st_size / 1e6:.2f} MB, {args.dtype})")


def cmd_demo(args) -> None:
    from e2ediff.demo import run_demo

    if args.finetune_steps < 1 or args.num_samples < 10:
        raise ValueError("--finetune-steps must be >= 1 and --num-samples >= 10")
    report = run_demo(args.output, args.from_scratch, args.finetune_steps, args.num_samples, args.seed)
    print(f"demo report: {report.resolve()}")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:   # Ctrl-C anywhere, start-up included: one line, status 130
        print("error: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("evaluate", "train-classifier", "train-lpips", "demo") and args.data_dir is not None:
        os.environ["E2EDIFF_DATA_DIR"] = str(args.data_dir)
    handlers = {"encode-prompts": cmd_encode_prompts, "sample": cmd_sample, "evaluate": cmd_evaluate,
                "train-classifier": cmd_train_classifier, "demo": cmd_demo, "convert": cmd_convert,
                "train-lpips": cmd_train_lpips}
    try:
        guards.check_command(args)   # every flag of every command, before any work or write
        if args.command in handlers:
            handlers[args.command](args)
        else:
            with run_lock(args.run_dir):   # one writer per run folder, for the run's lifetime
                cmd_train(args)
    except Exception as e:
        from e2ediff.checkpoint import CheckpointError
        from e2ediff.config import ConfigError
        from e2ediff.runlock import RunLocked
        from e2ediff.trainer import TrainingStopped

        user_errors = (ConfigError, CheckpointError, OSError, ValueError, ImportError, TrainingStopped, RunLocked)
        if os.environ.get("E2EDIFF_DEBUG") or not isinstance(e, user_errors):
            raise
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.filename is not None:
            message = f"{e.filename}: {e.strerror or e}"   # a full disk, a read-only folder: name the file
        else:   # one line, even for messages that span several (a YAML parser's error with its context marks)
            message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: {guards.clip(message)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
