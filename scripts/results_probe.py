"""Markdown table of `scripts/gpu/quality_probe.sh`'s rows: FD / alignment / diversity at K = 1, 2, 4 for each row,
and each FD as a ratio to the student's at the same K (the issue-#9 bar: ≤ 0.7 at K = 2 and 4).

    python scripts/results_probe.py docs/results/gpu-2026-12-06/quality-round1
    python scripts/results_probe.py runs/gpu-quality --plain        # fixed-width, as the probe prints it
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load(folder: Path) -> dict[str, dict[int, dict]]:
    rows: dict[str, dict[int, dict]] = {}
    for path in sorted(folder.glob("eval_*_k*_*.json")):
        r = json.loads(path.read_text())
        name = path.name[len("eval_"):].rsplit("_k", 1)[0]
        rows.setdefault(name, {})[r["nfe"]] = r
    if "student" in rows:                                   # the reference row first
        rows = {"student": rows.pop("student"), **rows}
    return rows


def main(folder: Path, plain: bool = False) -> None:
    rows = load(folder)
    ref = rows.get("student", {})
    ks = (1, 2, 4)

    def cell(name: str, k: int) -> str:
        r = rows[name].get(k)
        if r is None:
            return "–"
        ratio = f" ({r['fd'] / ref[k]['fd']:.2f}×)" if k in ref and name != "student" else ""
        return f"{r['fd']:.3f}{ratio} / {r['alignment']:.3f} / {r['diversity_rel']:.3f}"

    if plain:
        print(f"{'row':28s} " + " ".join(f"K={k}: FD (vs student) / align / div".ljust(40) for k in ks))
        for name in rows:
            print(f"{name:28s} " + " ".join(cell(name, k).ljust(40) for k in ks))
        return
    print("| row | " + " | ".join(f"K = {k}: FD (× student) / align. / div." for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for name in rows:
        print(f"| {name} | " + " | ".join(cell(name, k) for k in ks) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), plain="--plain" in sys.argv[2:])
