"""Markdown tables from the evaluation JSON files that `e2ediff evaluate --output` writes.

    python scripts/results_table.py docs/results/tiny-2026-11-25 [--split test]

Rows are the files eval_<name>_k<K>_<split>.json (and eval_teacher_ddim<N>.json / eval_lcm<K>.json from the
pipeline script), with the run's last logged training step read from metrics_<name>.jsonl when present (a run stopped by its time
limit exports the model of its last checkpoint at or before that step).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def last_step(folder: Path, name: str) -> str:
    path = folder / f"metrics_{name}.jsonl"
    if not path.exists():
        return ""
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return str(lines[-1]["step"]) if lines else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--split", default="test", choices=["test", "val"])
    args = p.parse_args()
    rows = []
    for f in sorted(args.folder.glob("eval_*.json")):
        m = re.fullmatch(rf"eval_(.+)_k(\d+)_{args.split}\.json", f.name)
        legacy = re.fullmatch(r"eval_(teacher_ddim|lcm)(\d+)\.json", f.name)
        if m:
            name = m.group(1)
        elif legacy and args.split == "test":
            name = legacy.group(1).replace("_ddim", " (DDIM)") + ("" if "teacher" in legacy.group(1) else "")
        else:
            continue
        r = json.loads(f.read_text())
        rows.append((name, r, last_step(args.folder, name.split(" ")[0])))
    print("| row | params | sampler | NFE | FD ↓ | KID ↓ | alignment ↑ | diversity (rel.) ↑ | steps run | split |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r, step in rows:
        print(f"| {name} | {r['params'] / 1e6:.2f}M | {r['sampler']} {r['timesteps'] if len(r['timesteps']) <= 4 else len(r['timesteps'])} "
              f"| {r['nfe']} | {r['fd']:.2f} | {r['kid_mean']:.3f} ± {r['kid_std']:.3f} | {r['alignment']:.3f} | "
              f"{r['diversity_rel']:.3f} | {step} | {r['split']} (n={r['n']}, seed {r['seed']}) |")


if __name__ == "__main__":
    main()
