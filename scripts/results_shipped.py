"""Markdown table of `scripts/eval_shipped.sh`'s JSON files: each shipped model at K = 1, 2, 4.

    python scripts/results_shipped.py docs/results/shipped-test-10k-2026-12-06
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

NAMES = {"lcm": "LCM student (`base/lcm`)",
         "e2e_old": "E2E energy + LPIPS, K = 4 (`base/e2e` until 2026-12-06)",
         "e2e": "E2E, K ∈ {1, 2, 4} (`base/e2e`)",
         "e2e_2step": "E2E two-step, anchored, K = 2 (`base/e2e_2step`)",
         "e2e_1step": "E2E one-step, shipped (`base/e2e_1step`)"}


def main(folder: Path) -> None:
    print("| model | K | FD ↓ | KID ↓ | alignment ↑ | diversity (rel.) |\n|---|---|---|---|---|---|")
    for name, label in NAMES.items():
        for path in sorted(folder.glob(f"eval_{name}_k*_*.json")):
            r = json.loads(path.read_text())
            if name == "e2e":   # which shipped file: the adversarial one (step 811) or the anchored one (step 1343)
                label = {811: "E2E adversarial, K ∈ {1, 2, 4} (`base/e2e`, 2026-12-06 second session)",
                         1343: "E2E anchored, K ∈ {1, 2, 4} (`base/e2e` from 2026-12-06 third session)"
                         }.get(r.get("model_step"), NAMES[name])
            print(f"| {label} | {r['nfe']} | {r['fd']:.2f} | {r['kid_mean']:.3f} | {r['alignment']:.3f} | "
                  f"{r['diversity_rel']:.3f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
