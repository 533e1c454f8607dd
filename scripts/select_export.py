"""Validation early stopping for a fine-tune run trained with `train.keep_exports=true`.

    python scripts/select_export.py runs/e2e --steps 1 2 4 --num-samples 5000 --output runs/e2e/model_best.safetensors

Scores every `exports/model_step_*.safetensors` of the run (and, with --baseline, a reference model such as the
student) on the **validation** split at each sampler step count, prints a table, writes it as JSON beside the run
(`select_export.json`), and copies the export with the lowest mean log-FD over the step counts to --output. The test
split is never read here: report the chosen file on test afterwards with `e2ediff evaluate --split test`.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from e2ediff.checkpoint import read_model_meta
from e2ediff.cli import DEFAULT_CLASSIFIER
from e2ediff.evaluate import evaluate_model, write_json
from e2ediff.generate import SamplerSpec


def score(path: Path, steps: list[int], n: int, seed: int, device: str, classifier: Path) -> dict[int, dict]:
    rows = {}
    for k in steps:
        spec = SamplerSpec.from_meta(read_model_meta(path)).with_steps(k)
        result, _, _ = evaluate_model(path, spec, classifier, n, seed, "val", device)
        rows[k] = {key: result[key] for key in ("fd", "kid_mean", "alignment", "diversity_rel")}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--classifier", type=Path, default=DEFAULT_CLASSIFIER)
    p.add_argument("--baseline", type=Path, help="also score this model (e.g. the student) in the same run")
    p.add_argument("--output", type=Path, help="copy the chosen export here")
    args = p.parse_args()

    exports = sorted((args.run_dir / "exports").glob("model_step_*.safetensors"))
    if not exports:
        raise SystemExit(f"error: {args.run_dir / 'exports'} holds no model_step_*.safetensors "
                         f"(train with train.keep_exports=true)")
    candidates = ([("baseline", args.baseline)] if args.baseline else []) + [(e.stem, e) for e in exports]
    table = {}
    for name, path in candidates:
        table[name] = {"path": str(path), "rows": score(path, args.steps, args.num_samples, args.seed, args.device,
                                                         args.classifier)}
        table[name]["mean_log_fd"] = sum(math.log(r["fd"]) for r in table[name]["rows"].values()) / len(args.steps)
        print(f"{name:24s} " + "  ".join(f"K={k}: FD {r['fd']:.3f} align {r['alignment']:.3f} div "
                                         f"{r['diversity_rel']:.3f}" for k, r in table[name]["rows"].items()),
              flush=True)
    best = min((n for n, _ in candidates if n != "baseline"), key=lambda n: table[n]["mean_log_fd"])
    print(f"chosen on val (lowest mean log FD over K = {args.steps}): {best}")
    write_json(args.run_dir / "select_export.json", {"split": "val", "num_samples": args.num_samples,
                                                      "seed": args.seed, "chosen": best, "table": table})
    if args.output:
        shutil.copyfile(table[best]["path"], args.output)
        print(f"-> {args.output}")


if __name__ == "__main__":
    main()
