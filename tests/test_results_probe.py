"""scripts/results_probe.py: the choice on val that quality_probe.sh makes (export and sampling dial), on rows written
as the evaluator writes them."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "results_probe.py"
spec = importlib.util.spec_from_file_location("results_probe", SCRIPT)
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)

# round 16's K = 2 val rows (docs/results.md): the student, and one export at five dials (FD, alignment, diversity)
STUDENT = (3.132, 0.9116, 0.822)
ROWS = {"k2x_s0@1528w1.5": (1.551, 0.9126, 0.917), "k2x_s0@1528w1.75": (1.456, 0.9178, 0.909),
        "k2x_s0@1528w1.75g0.4": (1.454, 0.9180, 0.913), "k2x_s0@1528w2.0": (1.398, 0.9210, 0.902),
        "k2x_s0@1528w2.0g0.4": (1.394, 0.9220, 0.905), "k2x_s0@1350w1.75g0.4": (1.445, 0.9176, 0.912),
        "k2x_s0@900w2.0": (1.200, 0.9300, 0.890)}   # made up: the lowest FD, misses diversity


def write(folder: Path, name: str, k: int, row: tuple[float, float, float], split: str = "val") -> None:
    fd, alignment, diversity = row
    (folder / f"eval_{name}_k{k}_{split}.json").write_text(
        json.dumps({"fd": fd, "alignment": alignment, "diversity_rel": diversity, "nfe": k}))


@pytest.fixture
def folder(tmp_path):
    write(tmp_path, "student", 2, STUDENT)
    for name, row in ROWS.items():
        write(tmp_path, name, 2, row)
    return tmp_path


def test_bar_margin_is_the_smallest_margin_to_the_bar(folder):
    rows = probe.load(folder)
    fd, alignment, diversity = ROWS["k2x_s0@1528w2.0"]
    expected = min(0.7 - fd / STUDENT[0], alignment - STUDENT[1], diversity - 0.9, 1.1 - diversity)
    assert probe.bar_margin(rows, "k2x_s0@1528w2.0") == pytest.approx(expected)
    assert expected == pytest.approx(0.002)                         # diversity: 0.902 against 0.9
    assert probe.bar_margin(rows, "k2x_s0@900w2.0") < 0 and probe.bar_misses(rows, "k2x_s0@900w2.0") == 1


def test_choice_on_val_by_fd_or_by_margin(folder):
    # the bar first, then the lowest FD: w 2, gamma 0.4 (diversity 0.005 inside the window); among round 16's GPU
    # dials alone (w 1.75, w 2, w 1.75 gamma 0.4) w 2, 0.002 inside, which on test fell to 0.896
    assert probe.best_exports(folder, ["k2x_s0"], bar=True) == ["k2x_s0@1528w2.0g0.4"]
    # the bar first, then the widest margin: w 1.75, gamma 0.4 (alignment +0.0064, diversity +0.013)
    assert probe.best_exports(folder, ["k2x_s0"], bar=True, margin=True) == ["k2x_s0@1528w1.75g0.4"]
    # without the bar, the lowest FD whatever it misses
    assert probe.best_exports(folder, ["k2x_s0"]) == ["k2x_s0@900w2.0"]
    # what quality_probe.sh runs (BAR=margin)
    out = subprocess.run([sys.executable, str(SCRIPT), str(folder), "--best", "k2x_s0", "--bar", "--margin"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["k2x_s0@1528w1.75g0.4"]


def test_a_row_that_misses_ranks_after_one_that_passes(folder):
    write(folder, "k2y_s0@1000", 2, (2.0, 0.95, 0.95))     # FD 0.64x: passes every condition, margin 0.038
    write(folder, "k2z_s0@1000", 2, (1.0, 0.90, 0.95))     # alignment under the student's: one miss
    assert probe.best_exports(folder, ["k2y_s0", "k2z_s0", "k2x_s0"], bar=True, margin=True) == [
        "k2y_s0@1000", "k2x_s0@1528w1.75g0.4", "k2z_s0@1000"]


# round 17's K = 2 val rows of the recipe's three seeds at step 1528 (docs/results.md), seed 0 in another folder
SEEDS = {"1.5": [(1.551, 0.9126, 0.917), (1.493, 0.9102, 0.922), (1.464, 0.9140, 0.916)],
         "1.75": [(1.456, 0.9178, 0.909), (1.337, 0.9194, 0.908), (1.403, 0.9210, 0.905)],
         "2.0": [(1.398, 0.9210, 0.902), (1.309, 0.9206, 0.904), (1.332, 0.9260, 0.898)],
         "1.75g0.4": [(1.454, 0.9180, 0.913), (1.330, 0.9184, 0.911), (1.396, 0.9208, 0.908)],
         "2.0g0.4": [(1.394, 0.9220, 0.905), (1.298, 0.9194, 0.907), (1.322, 0.9256, 0.901)]}


@pytest.fixture
def seed_folders(tmp_path):
    first, second = tmp_path / "seed0", tmp_path / "seeds12"
    first.mkdir(), second.mkdir()
    write(second, "student", 2, STUDENT)
    for dial, rows in SEEDS.items():
        tag = "" if dial == "1.5" else f"w{dial}"
        for seed, row in enumerate(rows):
            write(first if seed == 0 else second, f"k2x_s{seed}@1528{tag}", 2, row)
    write(second, "k2x_s1@1528w3.0", 2, (1.0, 0.95, 0.95))   # one seed only: never a candidate
    write(second, "k2y_s1@1528w2.0", 2, (1.0, 0.95, 0.95))   # another recipe
    return first, second


def test_group_choice_scores_each_dial_by_the_mean_of_every_seed(seed_folders):
    ranked = probe.group_choice(list(seed_folders), "k2x", bar=True, margin=True)
    assert [at for at, *_ in ranked] == ["1528w1.75g0.4", "1528w1.75", "1528w2.0g0.4", "1528w2.0", "1528"]
    at, seeds, mean, misses, smallest = ranked[0]
    rows = SEEDS["1.75g0.4"]
    assert seeds == 3 and misses == 0
    assert mean[2]["fd"] == pytest.approx(sum(r[0] for r in rows) / 3)
    assert mean[2]["alignment"] == pytest.approx(sum(r[1] for r in rows) / 3)
    expected = min(0.7 - mean[2]["fd"] / STUDENT[0], mean[2]["alignment"] - STUDENT[1],
                   mean[2]["diversity_rel"] - 0.9, 1.1 - mean[2]["diversity_rel"])
    assert smallest == pytest.approx(expected) and smallest == pytest.approx(0.0075, abs=5e-5)
    # by the lowest mean FD among dials that pass, w 2 with gamma 0.4
    assert probe.group_choice(list(seed_folders), "k2x", bar=True)[0][0] == "1528w2.0g0.4"
    out = subprocess.run([sys.executable, str(SCRIPT), *map(str, seed_folders), "--group", "k2x", "--bar", "--margin"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("@1528w1.75g0.4  3 seeds") and len(out) == 5


def test_group_choice_names_what_is_missing(tmp_path):
    write(tmp_path, "k2x_s0@1528", 2, SEEDS["1.5"][0])
    with pytest.raises(ValueError, match="no student val row"):
        probe.group_choice([tmp_path], "k2x")
    write(tmp_path, "student", 2, STUDENT)
    with pytest.raises(ValueError, match="no exports of family 'k2z'"):
        probe.group_choice([tmp_path], "k2z")
