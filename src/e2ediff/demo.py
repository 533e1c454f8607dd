"""The README's main job: the Fashion-MNIST miniature of the paper on a CPU, in minutes.

Default: load the shipped `tiny` LCM student, E2E-fine-tune it briefly (the paper's Algorithm 1 with our default
energy-score loss), then evaluate the student, that fine-tune and the shipped `tiny` E2E model at 4 steps on the same
seeds, and write a report folder (markdown table, sample grids, a plot). ``--from-scratch`` trains every `tiny`
model itself first (autoencoder, evaluation classifier, teacher, LCM student; about an hour on two cores).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "checkpoints"


def _run(argv: list[str]) -> None:
    from e2ediff.cli import main

    print("$ e2ediff " + " ".join(argv), file=sys.stderr)
    rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"`e2ediff {' '.join(argv)}` failed with exit code {rc}")


def from_scratch(out: Path) -> dict[str, Path]:
    """Train the whole tiny pipeline on this machine (resumable: rerun continues each stage)."""
    runs = out / "runs"
    _run(["train-classifier", "--output", str(runs / "classifier"), "--steps", "1500", "--batch-size", "128"])
    _run(["train-autoencoder", "--run-dir", str(runs / "autoencoder"), "train.steps=1500", "train.batch_size=64"])
    _run(["pretrain", "--run-dir", str(runs / "teacher"), f"autoencoder={runs / 'autoencoder' / 'model.safetensors'}",
          "train.steps=2000", "train.batch_size=64"])
    _run(["distill", "--run-dir", str(runs / "lcm"), f"teacher={runs / 'teacher' / 'model.safetensors'}",
          "train.steps=600", "train.batch_size=64"])
    return {"lcm": runs / "lcm" / "model.safetensors", "classifier": runs / "classifier", "e2e": None}


def run_demo(out: Path, scratch: bool = False, finetune_steps: int = 40, num_samples: int = 2000,
             seed: int = 0) -> Path:
    from e2ediff.evaluate import evaluate_model, write_json
    from e2ediff.generate import SamplerSpec, save_grid
    from e2ediff.checkpoint import read_model_meta

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if scratch:
        models = from_scratch(out)
    else:
        models = {"lcm": SHIPPED / "tiny" / "lcm.safetensors", "e2e": SHIPPED / "tiny" / "e2e.safetensors",
                  "classifier": SHIPPED / "classifier"}
        for name, path in models.items():
            if not Path(path).exists():
                raise FileNotFoundError(f"shipped {name} checkpoint missing: {path} (run from a full clone, or use "
                                        f"--from-scratch)")
    finetune_dir = out / "finetune"
    _run(["finetune", "--run-dir", str(finetune_dir), f"init={models['lcm']}", f"train.steps={finetune_steps}",
          "train.batch_size=16", "samples_per_caption=4", "optim.lr=2e-5", "train.checkpoint_every=10",
          "train.log_every=5", "train.device=cpu"])
    rows = [("LCM student (shipped)" if not scratch else "LCM student", models["lcm"]),
            (f"+ E2E fine-tune, {finetune_steps} steps here (energy score)", finetune_dir / "model.safetensors")]
    if models.get("e2e") is not None:
        rows.append(("E2E model (shipped)", models["e2e"]))
    results = []
    for i, (name, path) in enumerate(rows):
        spec = SamplerSpec.from_meta(read_model_meta(path))
        spec.steps, spec.timesteps = 4, None
        print(f"evaluating {name}: {num_samples} samples, 4 steps", file=sys.stderr)
        result, images, labels = evaluate_model(path, spec, models["classifier"], num_samples, seed, "test", "cpu",
                                                batch_size=500)
        result["name"] = name
        per = num_samples // 10
        pick = np.concatenate([np.arange(c * per, c * per + min(per, 8)) for c in range(10)])
        save_grid(images[pick], 10, out / f"grid_{i}.png")
        results.append(result)
    write_json(out / "results.json", {"rows": results})
    _plot(out, results, finetune_dir / "metrics.jsonl")
    minutes = (time.perf_counter() - t0) / 60
    _write_report(out, results, finetune_steps, num_samples, seed, minutes, scratch)
    return out / "report.md"


def _plot(out: Path, results: list[dict], metrics: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [r["name"].split(",")[0] for r in results]
    axes[0].bar(range(len(results)), [r["fd"] for r in results], color=["#888", "#36c", "#c63"][:len(results)])
    axes[0].set_xticks(range(len(results)), names, rotation=12, fontsize=7)
    axes[0].set_ylabel("FD (classifier features, lower is better)")
    axes[0].set_title("4 steps, test split")
    if metrics.exists():
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        axes[1].plot([x["step"] for x in lines], [x["loss/net"] for x in lines], label="energy score")
        axes[1].set_xlabel("fine-tune step")
        axes[1].set_ylabel("training loss")
        axes[1].set_title("E2E fine-tune (this run)")
    fig.tight_layout()
    fig.savefig(out / "plot.png", dpi=110)
    plt.close(fig)


def _write_report(out: Path, results: list[dict], steps: int, n: int, seed: int, minutes: float,
                  scratch: bool) -> None:
    lines = ["# e2ediff demo: the Fashion-MNIST miniature", "",
             f"{time.strftime('%Y-%m-%d %H:%M')} · CPU ({torch.get_num_threads()} threads) · seed {seed} · "
             f"{n} samples per row balanced over the 10 class prompts · 4 sampler steps (LCM, timesteps 999/759/499/259) "
             f"· {minutes:.1f} min in all", "",
             "FD and KID use the features of the project's evaluation classifier (a supervised ResNet, shipped in "
             "checkpoints/classifier); it is not the network any loss uses. Alignment: that classifier's accuracy on "
             "the class each prompt asked for. Diversity: within-class feature spread relative to real test images "
             "(1.0 = as diverse as the data; collapse drives it to 0).", "",
             "| model | NFE | FD ↓ | KID ↓ | alignment ↑ | diversity (rel.) |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['nfe']} | {r['fd']:.2f} | {r['kid_mean']:.3f} | {r['alignment']:.3f} | "
                     f"{r['diversity_rel']:.3f} |")
    lines += ["", f"A {steps}-step fine-tune on a CPU is a demonstration of the method's mechanics, not of its effect: "
              "the shipped E2E model was fine-tuned on a GPU (see docs/results.md).", "",
              "![plot](plot.png)", ""]
    for i, r in enumerate(results):
        lines += [f"**{r['name']}** (a row per class)", "", f"![{r['name']}](grid_{i}.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
