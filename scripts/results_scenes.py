"""Tables 1 and 2 of the paper on fashion-scenes, from the eval JSONs of scripts/gpu/scenes_pipeline.sh.

    python scripts/results_scenes.py runs/scenes            # a folder of eval_*.json, or the scenes_results.tgz
    python scripts/results_scenes.py scenes_results.tgz --markdown
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import tarfile
from pathlib import Path

import numpy as np

ROWS = [  # (file stem, table, method, loss)
    ("eval_teacher_k32", 1, "teacher DDIM", "-"), ("eval_teacher_k4", 1, "teacher DDIM", "-"),
    ("eval_lcm_k1", 1, "LCM student", "-"), ("eval_lcm_k2", 1, "LCM student", "-"), ("eval_lcm_k4", 1, "LCM student", "-"),
    ("eval_e2e_k1_k1", 1, "E2E", "energy score (m=4)"), ("eval_e2e_k2_k2", 1, "E2E", "energy score (m=4)"),
    ("eval_e2e_k4_k4", 1, "E2E", "energy score (m=4)"),
    ("eval_l1_k4_k4", 2, "E2E", "L1"), ("eval_l2_k4_k4", 2, "E2E", "L2"), ("eval_lpips_k4_k4", 2, "E2E", "LPIPS"),
    ("eval_l2lpips_k4_k4", 2, "E2E", "L2 + LPIPS"), ("eval_l2lpipsgan_k4_k4", 2, "E2E", "L2 + LPIPS + GAN"),
    # the two-call pipeline: issue #9's adversarial recipe per seed (one model for every K), the paper's losses at K = 4
    *[(f"eval_{r}_s{s}_k{k}", 1, "E2E", f"{r}, seed {s}") for r in ("anchored", "anchored_grid2", "adversarial") for k in (1, 2, 4)
      for s in range(3)],
    ("eval_l1_k4", 2, "E2E", "L1"), ("eval_l2_k4", 2, "E2E", "L2"), ("eval_lpips_k4", 2, "E2E", "LPIPS"),
    ("eval_l2lpips_k4", 2, "E2E", "L2 + LPIPS"), ("eval_l2lpipsgan_k4", 2, "E2E", "L2 + LPIPS + GAN"),
]
SEEDED = re.compile(r"eval_(anchored|anchored_grid2|adversarial)_s\d+_k(\d+)$")
COLUMNS = ("alignment", "all_four", "class_alignment", "empty_right", "fd", "kid_mean", "diversity_rel")


def read_rows(source: Path) -> dict[str, dict]:
    found = {}
    if source.is_dir():
        for p in source.glob("eval_*.json"):
            found[p.stem] = json.loads(p.read_text())
    else:
        with tarfile.open(source) as tar:
            for m in tar.getmembers():
                if re.search(r"eval_.*\.json$", m.name):
                    found[Path(m.name).stem] = json.loads(tar.extractfile(m).read())
    return found


def table(rows: dict[str, dict], markdown: bool) -> str:
    head = ["table", "method", "loss", "K / steps", "NFE", "step"] + list(COLUMNS)
    lines = []
    for stem, t, method, loss in ROWS:
        r = rows.get(stem)
        if r is None:
            continue
        steps = len(r.get("timesteps", [])) or "?"
        cells = [str(t), method, loss, str(steps), str(r.get("nfe", "?")), str(r.get("model_step", "?"))]
        cells += [f"{r[c]:.4f}" if isinstance(r.get(c), float) else "-" for c in COLUMNS]
        lines.append(cells)
    for recipe, k in itertools.product(("anchored", "anchored_grid2", "adversarial"), (1, 2, 4)):   # seeds: mean ± sample sd
        seeded = [r for stem, r in sorted(rows.items())
                  if (m := SEEDED.match(stem)) and m.group(1) == recipe and int(m.group(2)) == k]
        if len(seeded) < 2:
            continue
        r = seeded[0]
        cells = ["1", "E2E", f"{recipe}, mean ± sd of {len(seeded)} seeds", str(k), str(r.get("nfe", "?")),
                 "/".join(str(x.get("model_step", "?")) for x in seeded)]
        for c in COLUMNS:
            v = np.array([x[c] for x in seeded if isinstance(x.get(c), float)])
            cells.append(f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else "-")
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c) + " |" for c in lines]
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *lines)]
        out = ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in [head, *lines]]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="run folder with eval_*.json, or scenes_results.tgz")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows = read_rows(args.source)
    if not rows:
        raise SystemExit(f"no eval_*.json in {args.source}")
    print(table(rows, args.markdown))
    any_row = next(iter(rows.values()))
    print(f"\n{any_row.get('n')} scenes per row, split {any_row.get('split')}; features: "
          f"{any_row.get('feature_extractor')}; empty cell: {any_row.get('empty_rule')}")


if __name__ == "__main__":
    main()
