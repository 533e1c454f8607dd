"""Figures for docs/results.md from the evaluation JSON files and training logs of a results folder.

    python scripts/plot_results.py docs/results/tiny-2026-11-25 --output docs/figures
    python scripts/plot_results.py docs/results/base-2026-11-26 --output docs/figures --tag base \
        --family "teacher (DDIM)=teacher_ddim" --family "LCM student=lcm" \
        --family "E2E, best on val per K=e1_pixlpips10_lr3e-6,e2_lpips10_lr1e-6,e4_lpips10_lr1e-6" \
        --family "E2E, latent ES, lr 2e-5=energy1,energy2,energy4" \
        --curves energy4,l2_4,l1_4,lpips4,l2lpipsgan4,e4_lpips10_lr1e-6,paper_l2lpips4_lr1e-6

Writes fd_vs_nfe.png (FD and diversity against the number of function evaluations, one line per model family) and
training_curves.png (E2E training loss and output spread per run; the spread falls toward 0 when samples collapse).
--family LABEL=run1,run2 (repeatable) draws one line from several runs (e.g. the best run per K); --curves limits the
training curves to the named runs; --tag prefixes the file names.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_rows(folder: Path, split: str) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for f in sorted(folder.glob("eval_*.json")):
        m = re.fullmatch(rf"eval_(.+)_k\d+_{split}\.json", f.name) or re.fullmatch(r"eval_(teacher)_ddim\d+\.json", f.name)
        if m:
            rows.setdefault(m.group(1), []).append(json.loads(f.read_text()))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--output", type=Path, default=Path("docs/figures"))
    p.add_argument("--split", default="test")
    p.add_argument("--family", action="append", default=[], metavar="LABEL=run1,run2",
                   help="one line from these runs (default: one line per run name)")
    p.add_argument("--curves", help="comma-separated run names for the training curves (default: all E2E runs)")
    p.add_argument("--tag", default="", help="file-name prefix, e.g. base -> base_fd_vs_nfe.png")
    args = p.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    rows = load_rows(args.folder, args.split)
    if args.family:
        families = {}
        for spec in args.family:
            label, sep, names = spec.partition("=")
            if not sep or not names:
                raise SystemExit(f"--family {spec!r}: expected LABEL=run1,run2")
            missing = [n for n in names.split(",") if n not in rows]
            if missing:
                raise SystemExit(f"--family {label!r}: no {args.split}-split evaluation for {missing} in {args.folder}")
            families[label] = [r for n in names.split(",") for r in rows[n]]
        rows = families
    prefix = f"{args.tag}_" if args.tag else ""
    curves = set(args.curves.split(",")) if args.curves else None

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, rs in sorted(rows.items()):
        rs = sorted(rs, key=lambda r: r["nfe"])
        style = "o-" if len(rs) > 1 else "s"
        for ax, key in zip(axes, ("fd", "diversity_rel")):
            ax.plot([r["nfe"] for r in rs], [r[key] for r in rs], style, label=name)
    for ax, label in zip(axes, ("FD (classifier features) ↓", "diversity relative to real ↑")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE")
        ax.set_ylabel(label)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{args.folder.name}: {args.split} split, 10,000 samples per point", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.output / f"{prefix}fd_vs_nfe.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for f in sorted(args.folder.glob("metrics_*.jsonl")):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if not lines or "output_std" not in lines[0]:
            continue
        name = f.stem.removeprefix("metrics_")
        if curves is not None and name not in curves:
            continue
        trained = [x for x in lines if "loss/net" in x]      # steps of a disc_warmup log no network loss
        axes[0].plot([x["step"] for x in trained], [x["loss/net"] for x in trained], label=name)
        axes[1].plot([x["step"] for x in lines], [x["output_std"] for x in lines], label=name)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("training loss (per run's own loss)")
    axes[1].set_ylabel("spread of outputs (std over the batch)")
    for ax in axes:
        ax.set_xlabel("E2E step")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.output / f"{prefix}training_curves.png", dpi=110)
    plt.close(fig)
    print(f"wrote {args.output / f'{prefix}fd_vs_nfe.png'} and {args.output / f'{prefix}training_curves.png'}")


if __name__ == "__main__":
    main()
