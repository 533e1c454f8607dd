"""Markdown table of `scripts/gpu/quality_probe.sh`'s rows: FD / alignment / diversity at K = 1, 2, 4 for each row,
and each FD as a ratio to the student's at the same K (the issue-#9 bar: ≤ 0.7 at K = 2 and 4).

    python scripts/results_probe.py docs/results/gpu-2026-12-06/quality-round1
    python scripts/results_probe.py runs/gpu-quality --plain        # fixed-width, as the probe prints it
    python scripts/results_probe.py DIR --split test                 # the rows scored on test (default: val)
    python scripts/results_probe.py DIR --best ROW [ROW ...]         # each row's best export on val (NAME@STEP)
    python scripts/results_probe.py DIR --best-per-family            # the best export of each family of rows
    python scripts/results_probe.py DIR --best ROW --bar             # ... ranked by the issue's bar first (round 8)
    python scripts/results_probe.py DIR --best ROW --bar --margin    # ... then by the widest margin (round 16)
    python scripts/results_probe.py DIR [DIR ...] --group FAMILY --bar --margin   # one dial for a recipe's seeds

A row NAME@STEP is the export of row NAME at that training step; they follow their row's name in step order. NAME@STEPwW
or NAME@STEPwWgGAMMA is that export sampled at guidance input W (and renoise_gamma GAMMA): `--best` chooses among
them too.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _order(name: str) -> tuple[str, int, str]:
    base, _, step = name.partition("@")
    digits = step.split("w")[0].split("g")[0]                  # NAME@STEP[wW][gGAMMA]: the dial after the step
    dial = step[len(digits):]
    # a row's exports in step order (each step's sampling dials after its default), then its last model
    return base, int(digits) if digits.isdigit() else 1 << 62, dial


def row_ks(name: str) -> tuple[int, ...]:
    """The Ks a row is chosen by: K = 2 alone for a two-step model (``k2*``), K = 4 alone for a four-step one
    (``k4*``), else 2 and 4."""
    return (2,) if name.startswith("k2") else (4,) if name.startswith("k4") else (2, 4)


def load(folder: Path, split: str = "val") -> dict[str, dict[int, dict]]:
    rows: dict[str, dict[int, dict]] = {}
    for path in folder.glob(f"eval_*_k*_{split}.json"):
        r = json.loads(path.read_text())
        name = path.name[len("eval_"):].rsplit("_k", 1)[0]
        rows.setdefault(name, {})[r["nfe"]] = r
    rows = {name: rows[name] for name in sorted(rows, key=_order)}
    if "student" in rows:                                   # the reference row first
        rows = {"student": rows.pop("student"), **rows}
    return rows


def val_score(rows: dict[str, dict[int, dict]], name: str) -> float:
    """Sum of the val FD ratios to the student at the row's Ks (``row_ks``); KeyError if a needed row is missing."""
    ks = row_ks(name)
    return sum(rows[name][k]["fd"] / rows["student"][k]["fd"] for k in ks)


def bar_margins(rows: dict[str, dict[int, dict]], name: str) -> list[float]:
    """The export's margins to the issue-#9 bar on val, at each K its score uses (``row_ks``): 0.7 − FD / the student's
    FD, alignment − the student's, diversity − 0.9 and 1.1 − diversity; a negative margin is a missed condition.
    KeyError if a needed row is missing."""
    margins = []
    for k in row_ks(name):
        r, s = rows[name][k], rows["student"][k]
        margins += [0.7 - r["fd"] / s["fd"], r["alignment"] - s["alignment"], r["diversity_rel"] - 0.9,
                    1.1 - r["diversity_rel"]]
    return margins


def bar_misses(rows: dict[str, dict[int, dict]], name: str) -> int:
    """How many of the bar's conditions the export misses on val (FD ≤ 0.7× the student's, alignment ≥ the
    student's, diversity in [0.9, 1.1], at each K of ``row_ks``): its negative margins (``bar_margins``)."""
    return sum(m < 0 for m in bar_margins(rows, name))


def bar_margin(rows: dict[str, dict[int, dict]], name: str) -> float:
    """The export's smallest margin to the bar on val (``bar_margins``). Round 15: test diversity ran 0.004–0.008
    under val at the same dial, so a pick that passes val by 0.002 fails test; the widest margin is the pick most
    likely to hold on test."""
    return min(bar_margins(rows, name))


def choice_key(rows: dict[str, dict[int, dict]], name: str, bar: bool = False,
               margin: bool = False) -> tuple[int, float]:
    """How the choice on val ranks an export, lowest first: its missed bar conditions (``bar``, else 0), then the
    negated smallest margin (``bar`` and ``margin``) or the val score. KeyError if a needed row is missing."""
    return (bar_misses(rows, name) if bar else 0, -bar_margin(rows, name) if bar and margin else val_score(rows, name))


def best_exports(folder: Path, names: list[str] | None = None, per_family: bool = False,
                 bar: bool = False, margin: bool = False) -> list[str]:
    """The export NAME@STEP of each row (``names``, default every row with scored exports) with the lowest val score;
    ``per_family``: only the best of each family (the row name without its ``_sSEED``); ``bar``: the fewest missed
    bar conditions first (``bar_misses``), the val score among those; ``margin`` (with ``bar``): among those, the
    widest smallest margin to the bar (``bar_margin``) instead of the lowest val score."""
    rows = load(folder, "val")
    best: dict[str, tuple[tuple[int, float], str]] = {}
    for export in rows:
        row = export.partition("@")[0]
        if "@" not in export or (names and row not in names):
            continue
        try:
            score = choice_key(rows, export, bar, margin)
        except KeyError:
            continue
        key = row.rsplit("_s", 1)[0] if per_family else row
        if key not in best or score < best[key][0]:
            best[key] = (score, export)
    ranked = sorted(best.values(), key=lambda item: (item[0][0], item[0][1] if bar and margin
                                                     else item[0][1] / len(row_ks(item[1]))))
    return [export for _, export in ranked]   # best first: fewest bar misses, then the mean FD ratio (or margin)


def group_choice(folders: list[Path], family: str, bar: bool = False,
                 margin: bool = False) -> list[tuple[str, int, dict[int, dict[str, float]], int, float]]:
    """One export step and sampling dial for every seed of a recipe together (round 17), chosen on val: the rows of
    ``family`` (the row name without its ``_sSEED``) from every folder (the student's row from the first that has
    one), grouped by what follows the ``@`` (STEP[wW][gGAMMA]); each group that has every seed is scored by the mean
    of the seeds' FD, alignment and diversity and ranked as ``best_exports`` ranks one row's exports. Returns, best
    first, (``@STEP...``, seeds, mean row per K, bar misses, smallest margin)."""
    rows: dict[str, dict[int, dict]] = {}
    for folder in folders:
        for name, by_k in load(folder, "val").items():
            if name != "student" or "student" not in rows:
                rows.setdefault(name, by_k)
    if "student" not in rows:
        raise ValueError(f"no student val row in {', '.join(map(str, folders))}")
    groups: dict[str, dict[str, dict[int, dict]]] = {}
    for export, by_k in rows.items():
        row, _, at = export.partition("@")
        if at and row.rsplit("_s", 1)[0] == family:
            groups.setdefault(at, {})[row] = by_k
    if not groups:
        raise ValueError(f"no exports of family {family!r} in {', '.join(map(str, folders))}")
    seeds = max(len(g) for g in groups.values())
    ks = row_ks(family)
    ranked = []
    for at, members in groups.items():
        if len(members) < seeds or any(k not in by_k for by_k in members.values() for k in ks):
            continue                                        # a dial not scored for every seed is not a candidate
        mean = {k: {m: statistics.fmean(by_k[k][m] for by_k in members.values())
                    for m in ("fd", "alignment", "diversity_rel")} for k in ks}
        name = f"{family}@{at}"
        scored = {"student": rows["student"], name: mean}
        ranked.append((choice_key(scored, name, bar, margin),
                       (at, len(members), mean, bar_misses(scored, name), bar_margin(scored, name))))
    return [item for _, item in sorted(ranked, key=lambda pair: pair[0])]


def main(folder: Path, plain: bool = False, split: str = "val") -> None:
    rows = load(folder, split)
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
    args = sys.argv[2:]
    if "--group" in args:   # the dial for a recipe's seeds together, best first, one line each
        folders = [Path(sys.argv[1])] + [Path(a) for a in args[:args.index("--group")]]
        for at, n, mean, misses, smallest in group_choice(folders, args[args.index("--group") + 1], "--bar" in args,
                                                          "--margin" in args):
            cells = "  ".join(f"K={k}: {r['fd']:.3f} / {r['alignment']:.4f} / {r['diversity_rel']:.3f}"
                              for k, r in mean.items())
            print(f"@{at}  {n} seeds  mean {cells}  misses {misses}  margin {smallest:+.4f}")
        sys.exit(0)
    if "--best" in args or "--best-per-family" in args:   # one NAME@STEP a line (quality_probe.sh's selection on val)
        flag = "--best" if "--best" in args else "--best-per-family"
        names = [a for a in args[args.index(flag) + 1:] if not a.startswith("--")]
        print("\n".join(best_exports(Path(sys.argv[1]), names, flag == "--best-per-family", "--bar" in args,
                                     "--margin" in args)))
        sys.exit(0)
    main(Path(sys.argv[1]), plain="--plain" in args, split=args[args.index("--split") + 1] if "--split" in args else "val")
