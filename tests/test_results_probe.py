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
