#!/usr/bin/env python
"""SIGKILL a CPU fine-tuning run at random moments, resume it, and check that it ends bit-identical to a run that
was never interrupted.

    python scripts/kill_resume_check.py                 # 20 trials, seed 0, temp files removed afterwards
    python scripts/kill_resume_check.py --trials 5 --seed 3 --keep

Setup (in a temp folder, nothing outside it is touched): fake Fashion-MNIST IDX files (128 train / 32 test images of
class patterns), a prompt cache with random features for the exact caption list (written where
``e2ediff.assets.default_prompt_cache_path`` says, with E2EDIFF_CACHE and E2EDIFF_DATA_DIR pointed into the temp
folder), then a tiny autoencoder, teacher and LCM student made with the real commands.

Reference: one uninterrupted ``e2ediff finetune`` (deterministic, a checkpoint after every step, energy + GAN loss so
the discriminator and its optimizer are in the checkpoint). Each trial starts the same command in a fresh run folder,
SIGKILLs it after a delay drawn from a seeded RNG, re-runs the command until it exits 0, and compares the final
checkpoint (model, EMA, both optimizers, discriminator, RNG state: every tensor, bit for bit, plus state.json) and the
exported model file with the reference. Kill delays are drawn from a seeded RNG, stratified so that they cover the
whole run: a quarter of the trials in [0, start of training) (imports, data, model loading), a tenth after the last
export (exit), the rest in between, where a checkpoint is written after every step. A delay is a fraction of the
shortest uninterrupted run seen so far (the machine is shared and run times drift); a run that finishes before its
kill is repeated with the shorter estimate. After each kill the run folder is searched for leftovers of an
interrupted write (``.step_*.tmp-*`` folders, ``.latest.tmp-*``, ``.model.safetensors.tmp-*``): the line shows them as
"torn write".

Prints one line per trial and finally "k/N identical". Exit status 0 only when every trial is identical.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STEPS = 12
TINY_NET = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2"]
COMMON = ["train.device=cpu", "train.progress=false", "data.val_size=16"]


# ----------------------------------------------------------------------------------------------------------------------
# Setup


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (magic 0x0803 for 3 dims, 0x0801 for 1 dim)."""
    header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def class_pattern_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, 28, 28] images: class c is a bright bar at row/column band c, plus noise; labels i % 10."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 40, size=(n, 28, 28))
    for i, c in enumerate(labels):
        band = slice(2 + 2 * c, 6 + 2 * c)
        images[i, band, 4:24] = 200 + rng.integers(0, 55)
        if c % 2:
            images[i, 4:24, band] = 255
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_fake_fashion_mnist(directory: Path, n_train: int = 128, n_test: int = 32) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = class_pattern_images(n, seed)
        write_idx(directory / f"{split}-images-idx3-ubyte", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte", labels)


def write_random_prompt_cache(seed: int = 0) -> Path:
    """Random caption features for the Fashion-MNIST caption list, where the commands look for them."""
    import torch

    from e2ediff.assets import default_prompt_cache_path
    from e2ediff.data.fashion_mnist import class_captions
    from e2ediff.models.text import EMBED_DIM, ENCODER_NAME, PromptCache

    captions, _ = class_captions()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(len(captions), 16, EMBED_DIM, generator=g)
    mask = torch.zeros(len(captions), 16, dtype=torch.bool)
    mask[:, :6] = True
    tokens[~mask] = 0
    pooled = torch.nn.functional.normalize(torch.randn(len(captions), EMBED_DIM, generator=g), dim=1)
    return PromptCache(captions, ENCODER_NAME, 16, tokens, mask, pooled).save(default_prompt_cache_path(captions))


def environment(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(E2EDIFF_CACHE=str(root / "cache"), E2EDIFF_DATA_DIR=str(root / "data"), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("E2EDIFF_DEBUG", None)
    return env


def e2ediff(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, "-m", "e2ediff", *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"setup command failed: e2ediff {' '.join(args)}\n{result.stderr[-3000:]}")


def build_setup(root: Path) -> tuple[dict[str, str], Path]:
    """Fake data, prompt cache, tiny autoencoder -> teacher -> LCM student. Returns (env, student file)."""
    env = environment(root)
    write_fake_fashion_mnist(root / "data")
    os.environ["E2EDIFF_CACHE"] = env["E2EDIFF_CACHE"]          # default_prompt_cache_path reads it
    write_random_prompt_cache()
    models = root / "models"
    steps = ["train.steps=2", "train.batch_size=16", *COMMON]
    e2ediff(["train-autoencoder", "--run-dir", str(models / "ae"), "model.channels=[8,8,8]",
             "scale_samples=64", *steps], env)
    e2ediff(["pretrain", "--run-dir", str(models / "teacher"), f"autoencoder={models / 'ae' / 'model.safetensors'}",
             *TINY_NET, "sample_steps=2", *steps], env)
    e2ediff(["distill", "--run-dir", str(models / "student"), f"teacher={models / 'teacher' / 'model.safetensors'}",
             "solver_steps=10", *steps], env)
    return env, models / "student" / "model.safetensors"


def finetune_command(run_dir: Path, init: Path) -> list[str]:
    return [sys.executable, "-m", "e2ediff", "finetune", "--run-dir", str(run_dir), f"init={init}",
            f"train.steps={STEPS}", "train.batch_size=4", "samples_per_caption=2", "loss.gan=0.1",
            "train.deterministic=true", "train.checkpoint_every=1", "train.log_every=1", *COMMON]


# ----------------------------------------------------------------------------------------------------------------------
# Runs and comparison


def run_to_completion(cmd: list[str], env: dict[str, str], attempts: int = 3) -> tuple[str, list[str]]:
    """Run ``cmd`` until it exits 0. Returns (step it resumed from, stderr of failed attempts)."""
    failures = []
    for _ in range(attempts):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode == 0:
            found = re.search(r"resumed from \S+ at step (\d+)", result.stderr)
            return (found.group(1) if found else "0 (no checkpoint)"), failures
        failures.append(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"rc {result.returncode}")
    raise RuntimeError(f"resume did not complete in {attempts} attempts: {failures}")


def torn_writes(run_dir: Path) -> list[str]:
    """Leftovers of a write that the kill interrupted."""
    names = [p.name for p in run_dir.rglob(".*tmp*")]
    return sorted(re.sub(r"tmp-\d+", "tmp-PID", n) for n in names)


def read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def final_state(run_dir: Path) -> dict:
    """Everything the run ends with: the latest checkpoint's tensors and state.json, the model file's tensors and
    metadata. (Whole-file bytes are not compared: safetensors writes its metadata keys in a per-process hash order.)"""
    root = run_dir / "checkpoints"
    name = (root / "latest").read_text().strip()
    tensors, _ = read_safetensors(root / name / "tensors.safetensors")
    state = json.loads((root / name / "state.json").read_text())
    state.pop("tensors_sha256")   # sha256 of the whole file, header included (see above)
    model, model_meta = read_safetensors(run_dir / "model.safetensors")
    return {"latest": name, "checkpoint": tensors, "state": state, "model": model, "model_meta": model_meta}


def _same_bytes(a, b) -> bool:
    import torch

    if a is None or b is None or a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def differences(reference: dict, other: dict) -> list[str]:
    """Names of whatever differs, bit for bit: tensors (raw bytes), state.json keys, model file tensors and metadata."""
    diffs = [] if other["latest"] == reference["latest"] else [f"latest {other['latest']} vs {reference['latest']}"]
    for part in ("checkpoint", "model"):
        a, b = reference[part], other[part]
        diffs += [f"{part}:{k}" for k in sorted(set(a) | set(b)) if not _same_bytes(a.get(k), b.get(k))]
    for part in ("state", "model_meta"):
        a, b = reference[part], other[part]
        diffs += [f"{part}:{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return diffs


def kill_fractions(trials: int, start: float, end: float, rng: random.Random) -> list[float]:
    """Stratified kill points as fractions of a full run: a quarter of the trials over [0, start) (before training),
    a tenth over [end, 1) (after the last checkpoint: export, exit), the rest over [start, end) (training, with a
    checkpoint after every step); each stratum one draw, in random order."""
    early = trials // 4
    tail = trials // 10
    middle = trials - early - tail
    points = []
    for n, lo, hi in ((early, 0.0, start), (middle, start, end), (tail, end, 1.0)):
        points += [lo + (hi - lo) * (i + rng.random()) / n for i in range(n)]
    rng.shuffle(points)
    return points


def start_and_kill(cmd: list[str], env: dict[str, str], delay: float) -> float | None:
    """Start ``cmd``; SIGKILL it ``delay`` s after the start. None if killed, else the time it took to finish."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    launched = time.perf_counter()
    while time.perf_counter() - launched < delay:
        if proc.poll() is not None:
            return time.perf_counter() - launched
        time.sleep(0.005)
    if proc.poll() is not None:
        return time.perf_counter() - launched
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="kill-and-resume trials (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays (default 0)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder and print its path")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error(f"--trials must be >= 1, got {args.trials}")

    root = Path(tempfile.mkdtemp(prefix="e2ediff-kill-"))
    try:
        t0 = time.perf_counter()
        env, init = build_setup(root)
        print(f"setup: tiny autoencoder, teacher, LCM student in {time.perf_counter() - t0:.1f} s", flush=True)

        # The reference, then a second uninterrupted run: it must match too (else nothing can); the shorter of the two
        # is the first estimate of a run's duration.
        timings = []
        for name in ("reference", "control"):
            run_dir = root / name
            wall0, start = time.time(), time.perf_counter()
            subprocess.run(finetune_command(run_dir, init), env=env, capture_output=True, text=True, check=True)
            total = time.perf_counter() - start
            training = (run_dir / "config.yaml").stat().st_mtime - wall0     # written when the training loop starts
            exported = (run_dir / "model.safetensors").stat().st_mtime - wall0   # the last export, after step 12
            timings.append((total, training, exported))
        reference = final_state(root / "reference")
        control = differences(reference, final_state(root / "control"))
        total, startup, end = min(timings)
        print(f"reference: {STEPS} steps, final {reference['latest']}; uninterrupted runs took "
              f"{', '.join(f'{t:.2f} s (training {s:.2f}-{e:.2f} s)' for t, s, e in timings)}; second run identical: "
              f"{'yes' if not control else f'no {control[:6]}'}", flush=True)

        # The machine is shared, so run times drift: the kill delay is a fraction of the shortest full run seen so
        # far; a trial whose run finished before its kill is repeated (fresh folder) against the updated estimate.
        rng = random.Random(args.seed)
        identical = 0
        for trial, fraction in enumerate(kill_fractions(args.trials, startup / total, end / total, rng), start=1):
            run_dir = root / f"trial_{trial:02d}"
            cmd = finetune_command(run_dir, init)
            for _ in range(4):
                shutil.rmtree(run_dir, ignore_errors=True)
                delay = fraction * total
                finished = start_and_kill(cmd, env, delay)
                if finished is None:
                    break
                total = min(total, finished)
            what = f"killed at {delay:5.2f} s ({fraction:4.0%} of a run)" if finished is None else \
                f"finished before {delay:5.2f} s"
            torn = torn_writes(run_dir) if run_dir.exists() else []
            latest = run_dir / "checkpoints" / "latest"
            on_disk = latest.read_text().strip() if latest.is_file() else "none"
            resumed, failures = run_to_completion(cmd, env)
            diffs = differences(reference, final_state(run_dir))
            identical += not diffs
            line = (f"trial {trial:2d}: {what}, latest on disk {on_disk}, resumed from step {resumed}, "
                    f"identical {'yes' if not diffs else 'no'}")
            if torn:
                line += f", torn write: {', '.join(torn)}"
            if failures:
                line += f", failed resumes: {failures}"
            if diffs:
                line += f", differs: {diffs[:6]}"
            print(line, flush=True)
            if not args.keep:
                shutil.rmtree(run_dir, ignore_errors=True)
        print(f"{identical}/{args.trials} identical")
        return 0 if identical == args.trials else 1
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
