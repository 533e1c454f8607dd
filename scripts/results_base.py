"""docs/results.md's Table 1 and Table 2 (the `base` preset) from the evaluation JSON files of one results folder.

    python scripts/results_base.py docs/results/base-2026-11-26

Each row names its evaluation files eval_<name>_k<K>_<split>.json (written by scripts/gpu/base_pipeline.sh). Rows with
several names (training seeds, or sampling seeds for the LCM student) print mean ± std (population std over the
runs). FD is printed on the test split (reporting) and on the validation split (held out of the training split; every
choice of lr, loss and λ was made on it). "steps" is the training step of the evaluated model file.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# (label, [run names], K): Table 1 — the paper's Table 1 analog, best E2E row per K chosen on the validation split.
TABLE1 = [
    ("Teacher, DDIM", ["teacher_ddim"], 32),
    ("Teacher, DDIM", ["teacher_ddim"], 4),
    ("LCM student", ["lcm"], 1),
    ("LCM student", ["lcm"], 2),
    ("LCM student (3 sampling seeds)", ["lcm", "lcm_seed1", "lcm_seed2"], 4),
    ("E2E: pixel ES + 10·LPIPS, lr 3e-6 (best on val, 3 seeds)",
     ["e1_pixlpips10_lr3e-6", "e1_pixlpips10_lr3e-6_seed1", "e1_pixlpips10_lr3e-6_seed2"], 1),
    ("E2E: the same, 1,500 steps (shipped as base/e2e_1step)", ["long_e1"], 1),
    ("E2E: latent ES + 10·LPIPS, lr 1e-6 (best on val)", ["e2_lpips10_lr1e-6"], 2),
    ("E2E: latent ES + 10·LPIPS, lr 1e-6 (best on val, 3 seeds)",
     ["e4_lpips10_lr1e-6", "e4_lpips10_lr1e-6_seed1", "e4_lpips10_lr1e-6_seed2"], 4),
]

# Table 2 — losses at K = 4: the paper's, then ours; first pass at lr 2e-5 (the tiny sweep's choice), then lr 1e-6.
TABLE2 = [
    ("— first pass, lr 2e-5, 300 steps (or the time limit) —", None, None),
    ("L1 (paper)", ["l1_4"], 4),
    ("L2 (paper)", ["l2_4"], 4),
    ("LPIPS (paper)", ["lpips4"], 4),
    ("L2 + LPIPS (paper)", ["l2lpips4"], 4),
    ("L2 + LPIPS + 0.1·GAN (paper)", ["l2lpipsgan4"], 4),
    ("L2 + LPIPS, minibatch-OT coupling (ours)", ["l2lpipsot4"], 4),
    ("energy score, latent (ours; 3 seeds)", ["energy4", "energy4_seed1", "energy4_seed2"], 4),
    ("energy score, pixels (ours)", ["energypix4"], 4),
    ("energy + LPIPS (ours)", ["energylpips4"], 4),
    ("energy + 10·LPIPS (ours)", ["energylpips10_4"], 4),
    ("energy + 0.1·GAN (ours)", ["energygan4"], 4),
    ("— second pass, 300–400 steps, lower lr —", None, None),
    ("L2 + LPIPS (paper), lr 1e-6", ["paper_l2lpips4_lr1e-6"], 4),
    ("energy, latent, lr 1e-5", ["e4_lr1e-5"], 4),
    ("energy, latent, lr 3e-6", ["e4_lr3e-6"], 4),
    ("energy, latent, lr 1e-6", ["e4_lr1e-6"], 4),
    ("energy, pixels, lr 1e-6", ["e4_pix_lr1e-6"], 4),
    ("energy, pixels + 10·LPIPS, lr 1e-6", ["e4_pixlpips10_lr1e-6"], 4),
    ("energy, latent + 10·LPIPS, lr 1e-6 (3 seeds)",
     ["e4_lpips10_lr1e-6", "e4_lpips10_lr1e-6_seed1", "e4_lpips10_lr1e-6_seed2"], 4),
    ("energy, latent + 10·LPIPS, lr 1e-6, 1,200 steps", ["long_e4"], 4),
]

# The K = 1 and K = 2 sweeps behind Table 1's choices.
SWEEP = [
    ("K=2 energy, latent, lr 2e-5", ["energy2"], 2), ("K=2 energy, latent, lr 1e-5", ["e2_lr1e-5"], 2),
    ("K=2 energy, latent, lr 3e-6", ["e2_lr3e-6"], 2), ("K=2 energy, latent, lr 1e-6", ["e2_lr1e-6"], 2),
    ("K=2 energy, pixels, lr 1e-6", ["e2_pix_lr1e-6"], 2),
    ("K=2 energy, pixels + 10·LPIPS, lr 1e-6", ["e2_pixlpips10_lr1e-6"], 2),
    ("K=2 energy, latent + 10·LPIPS, lr 1e-6", ["e2_lpips10_lr1e-6"], 2),
    ("K=2 energy, latent + 10·LPIPS, lr 1e-6, 1,200 steps", ["long_e2"], 2),
    ("K=1 energy, latent, lr 2e-5", ["energy1"], 1), ("K=1 energy, latent, lr 1e-6", ["e1_lat_lr1e-6"], 1),
    ("K=1 energy, latent + 10·LPIPS, lr 1e-6", ["e1_lpips10_lr1e-6"], 1),
    ("K=1 energy, pixels, lr 1e-5", ["e1_pix_lr1e-5"], 1), ("K=1 energy, pixels, lr 3e-6", ["e1_pix_lr3e-6"], 1),
    ("K=1 energy, pixels, lr 1e-6", ["e1_pix_lr1e-6"], 1),
    ("K=1 energy, pixels + 10·LPIPS, lr 3e-6 (3 seeds)",
     ["e1_pixlpips10_lr3e-6", "e1_pixlpips10_lr3e-6_seed1", "e1_pixlpips10_lr3e-6_seed2"], 1),
    ("K=1 energy, pixels + 10·LPIPS, lr 3e-6, 1,500 steps", ["long_e1"], 1),
    ("K=1 energy, pixels + 10·LPIPS, lr 1e-6, 800 steps", ["e1_pixlpips10_lr1e-6_800"], 1),
    ("K=1 energy, pixels + 10·LPIPS, lr 1e-6 (3 seeds)",
     ["e1_pixlpips10_lr1e-6", "e1_pixlpips10_lr1e-6_seed1", "e1_pixlpips10_lr1e-6_seed2"], 1),
]


# E2E on a student distilled for only 400 steps (STAGE=weak), latent energy score + 10·LPIPS, 400 steps.
WEAK = [
    ("student distilled 400 steps", ["weak_lcm"], 1), ("student distilled 400 steps", ["weak_lcm"], 2),
    ("student distilled 400 steps", ["weak_lcm"], 4),
    ("E2E on it, lr 1e-6", ["weak_e2_lr1e-6"], 2), ("E2E on it, lr 3e-6", ["weak_e2_lr3e-6"], 2),
    ("E2E on it, lr 1e-6", ["weak_e4_lr1e-6"], 4), ("E2E on it, lr 3e-6", ["weak_e4_lr3e-6"], 4),
]


def load(folder: Path, name: str, k: int, split: str) -> dict | None:
    path = folder / f"eval_{name}_k{k}_{split}.json"
    return json.loads(path.read_text()) if path.exists() else None


def stat(values: list[float], digits: int) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def table(folder: Path, rows) -> str:
    out = ["| row | params | NFE | FD test ↓ | FD val ↓ | KID test ↓ | alignment ↑ | diversity (rel.) | steps |",
           "|---|---|---|---|---|---|---|---|---|"]
    for label, names, k in rows:
        if names is None:
            out.append(f"| *{label}* | | | | | | | | |")
            continue
        test = [r for n in names if (r := load(folder, n, k, "test"))]
        val = [r for n in names if (r := load(folder, n, k, "val"))]
        if not test:
            raise SystemExit(f"no test-split evaluation for row {label!r} ({names}, K={k}) in {folder}")
        params = f"{test[0]['params'] / 1e6:.2f}M"
        steps = "/".join(sorted({str(r.get("model_step", "")) for r in test}))
        out.append(f"| {label} | {params} | {k} | {stat([r['fd'] for r in test], 2)} | {stat([r['fd'] for r in val], 2)} "
                   f"| {stat([r['kid_mean'] for r in test], 3)} | {stat([r['alignment'] for r in test], 3)} "
                   f"| {stat([r['diversity_rel'] for r in test], 3)} | {steps} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    args = p.parse_args()
    for title, rows in (("Table 1", TABLE1), ("Table 2 (K = 4)", TABLE2), ("K = 1 / K = 2 sweeps", SWEEP),
                        ("A briefly distilled student", WEAK)):
        print(f"### {title}\n\n{table(args.folder, rows)}\n")


if __name__ == "__main__":
    main()
