"""How fast does a scenes teacher learn to follow layouts? Small teachers side by side on the CPU, scored on alignment.

Each variant (dotted overrides of the `scenes` pretrain preset, on a smaller DiT: hidden 128, depth 4, batch 32) runs
in its own process, all at once, one thread each, so they share the machine alike. They train through the real
`PretrainTask` and training loop on latents of the real train scenes; at each check (a step count) the EMA weights
sample `--eval-n` test layouts (DDIM, trailing spacing, CFG at the preset's guidance) and the scenes classifier scores
them (`metrics.scenes.cell_agreement`: alignment, all_four, class_alignment, empty_right; caption-blind floor 0.141,
real scenes 0.953).

The latents come from the shipped 32 × 32 `base` autoencoder applied to each 32 × 32 cell (16 × 16 × 4, the scenes
latent geometry), so no scenes autoencoder has to be trained on the CPU; its reconstructions of 1,000 real test scenes
score alignment 0.934 (real: 0.941). `--oracle` replaces the MiniLM caption features by 4 tokens that name each cell's
content directly (one-hot cell + one-hot label): a text path that is trivial to bind, to tell text-side from
diffusion-side slowness.

    python benchmarks/scenes_teacher_probe.py --prompt-cache .gpu/scenes-text.safetensors \\
        --variant "before:prediction=eps optim.lr=3e-4 optim.warmup_steps=300" --variant "after:"
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=128", "model.depth=4", "train.batch_size=32"]


class CellAutoencoder(torch.nn.Module):
    """64 × 64 × 1 <-> 16 × 16 × 4: a 32 × 32 → 8 × 8 × 4 autoencoder applied to each of the 4 cells."""

    def __init__(self, ae):
        super().__init__()
        self.ae = ae

    def encode_latents(self, x):
        b = len(x)
        cells = x.view(b, 1, 2, 32, 2, 32).permute(0, 2, 4, 1, 3, 5).reshape(b * 4, 1, 32, 32)
        z = torch.cat([self.ae.encode_latents(c) for c in cells.split(2048)])
        return z.view(b, 2, 2, 4, 8, 8).permute(0, 3, 1, 4, 2, 5).reshape(b, 4, 16, 16)

    def decode_latents(self, z):
        b = len(z)
        cells = z.view(b, 4, 2, 8, 2, 8).permute(0, 2, 4, 1, 3, 5).reshape(b * 4, 4, 8, 8)
        x = torch.cat([self.ae.decode_latents(c) for c in cells.split(2048)])
        return x.view(b, 2, 2, 1, 32, 32).permute(0, 3, 1, 4, 2, 5).reshape(b, 1, 64, 64)


class Precomputed(torch.nn.Module):
    """The task's autoencoder when the data's images already are latents."""

    def encode_latents(self, x):
        return x


def oracle_cond(layouts):
    """Caption features that name the layout directly: token c = 6·(e_c + e_{4 + label + 1}) (MiniLM tokens have norm
    ~8), 4 tokens, pooled = their normalised sum."""
    from e2ediff.conditioning import TextCond

    layouts = torch.as_tensor(layouts)
    b = len(layouts)
    tokens = torch.zeros(b, 4, 384)
    tokens[:, torch.arange(4), torch.arange(4)] = 6.0
    tokens.scatter_(2, (4 + layouts + 1)[..., None], 6.0)
    return TextCond(tokens, torch.ones(b, 4, dtype=torch.bool), torch.nn.functional.normalize(tokens.sum(1), dim=-1))


class LatentScenes:
    """SceneTrainingData whose images are cell-autoencoder latents (computed once, cached in --work)."""

    def __init__(self, n, cache, cell_ae, work: Path, oracle: bool):
        from e2ediff.config import DataConfig
        from e2ediff.data.scenes import SceneTrainingData

        self.data = SceneTrainingData(DataConfig(dataset="fashion-scenes", num_scenes=n, prompt_cache=cache), "train")
        path = work / f"latents_train_{n}.pt"
        if not path.exists():
            with torch.no_grad():
                z = torch.cat([cell_ae.encode_latents(x) for x in self.data.images.split(1000)])
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(z, tmp)
            os.replace(tmp, path)
        self.data.images = torch.load(path, weights_only=True)
        self.oracle = oracle

    def __len__(self):
        return len(self.data)

    def __getattr__(self, name):
        return getattr(self.data, name)

    def batch(self, idx, generator):
        latents, cond, labels, caps = self.data.batch(idx, generator)
        return latents, oracle_cond(self.data.layouts[idx]) if self.oracle else cond, labels, caps


@torch.no_grad()
def score(task, weights, cell_ae, classifier, n, steps, cache, oracle):
    from e2ediff.denoiser import Denoiser
    from e2ediff.evaluate_scenes import scene_cond, scene_prompts, to_uint8
    from e2ediff.metrics.scenes import cell_agreement, cell_labels
    from e2ediff.models.dit import DiT
    from e2ediff.samplers import ddim
    from e2ediff.schedules import ddim_timesteps

    net = DiT(task.cfg.model).eval()
    net.load_state_dict(weights)
    layouts, captions = scene_prompts(n, "test")
    cond = oracle_cond(layouts) if oracle else scene_cond(captions, cache)
    noise = torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    z = ddim(Denoiser(net, task.schedule, task.cfg.prediction), noise, ddim_timesteps(steps, spacing="trailing"), cond,
             guidance=task.cfg.guidance)
    return cell_agreement(cell_labels(classifier, to_uint8(cell_ae.decode_latents(z).clamp(-1, 1))), layouts)


def run_variant(args, name: str, overrides: list[str]) -> None:
    from e2ediff.assets import load_autoencoder
    from e2ediff.config import merge, parse_overrides
    from e2ediff.metrics.classifier import load_classifier
    from e2ediff.pretrain import PRESETS, PretrainTask
    from e2ediff.trainer import train

    class Probe(PretrainTask):
        def export(self, weights):   # keep the EMA weights in memory; no pipeline file (no scenes autoencoder here)
            self.ema = {k: v.clone() for k, v in weights["net"].items()}
            return None

    torch.set_num_threads(args.threads)
    cell_ae = CellAutoencoder(load_autoencoder(args.autoencoder))
    classifier = load_classifier(Path(args.classifier), "cpu")
    base = merge(PRESETS["scenes"], parse_overrides(
        ["autoencoder=cells", *SMALL, "train.device=cpu", "train.progress=false", "train.log_every=50",
         f"data.prompt_cache={args.prompt_cache}", f"data.num_scenes={args.scenes}", *overrides]))
    data = LatentScenes(args.scenes, args.prompt_cache, cell_ae, args.work, args.oracle)
    run_dir = args.work / "runs" / name
    trained = 0.0
    for check in args.checks:
        cfg = merge(base, {"train": {"steps": check, "checkpoint_every": 10**9}})
        task = Probe(cfg, torch.device("cpu"), data=data, autoencoder=Precomputed())
        t0 = time.perf_counter()
        train(task, cfg.train, run_dir, cfg, "pretrain")
        trained += time.perf_counter() - t0
        r = score(task, task.ema, cell_ae, classifier, args.eval_n, args.eval_steps, args.prompt_cache, args.oracle)
        print(json.dumps({"variant": name, "step": check, "train_s": round(trained),
                          **{k: round(v, 4) for k, v in r.items()}}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", default=[],
                    help='"NAME:key=value key=value" (overrides of the scenes preset); repeat for side-by-side runs')
    ap.add_argument("--checks", default="300,600,900", help="steps at which to score (comma-separated)")
    ap.add_argument("--scenes", type=int, default=20000, help="train scenes (their latents are cached in --work)")
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--eval-steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    ap.add_argument("--oracle", action="store_true", help="layout tokens instead of the MiniLM caption features")
    ap.add_argument("--prompt-cache", default=".gpu/scenes-text.safetensors")
    ap.add_argument("--autoencoder", default=str(ROOT / "checkpoints" / "base" / "autoencoder.safetensors"))
    ap.add_argument("--classifier", default=str(ROOT / "checkpoints" / "classifier"))
    ap.add_argument("--work", type=Path, default=Path("runs/scenes-probe"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.checks = [int(c) for c in args.checks.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    variants = [v.split(":", 1) for v in args.variant] or [["preset", ""]]
    if args.child is not None:
        name, overrides = variants[int(args.child)]
        run_variant(args, name, overrides.split())
        return
    if len(variants) > 1:   # the latents once, before the variants start together
        from e2ediff.assets import load_autoencoder

        LatentScenes(args.scenes, args.prompt_cache, CellAutoencoder(load_autoencoder(args.autoencoder)), args.work,
                     False)
    print(json.dumps({"variants": dict(variants), "checks": args.checks, "scenes": args.scenes,
                      "eval_n": args.eval_n, "eval_steps": args.eval_steps, "small": SMALL, "oracle": args.oracle,
                      "torch": torch.__version__}), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    procs = [subprocess.Popen([sys.executable, *sys.argv, "--child", str(i)], env=env, stdout=subprocess.PIPE,
                              text=True) for i in range(len(variants))]
    rows = []
    for p in procs:
        for line in p.stdout:
            print(line, end="", flush=True)
            rows.append(json.loads(line))
        p.wait()
    print("\n| variant | step | train s | alignment | all_four | class_alignment | empty_right |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["variant"], r["step"])):
        print(f"| {r['variant']} | {r['step']} | {r['train_s']} | {r['alignment']:.3f} | {r['all_four']:.3f} | "
              f"{r['class_alignment']:.3f} | {r['empty_right']:.3f} |")


if __name__ == "__main__":
    main()
