"""benchmarks/geometry_check.py and geometry_pairs.py: the split (disjoint by photo, fixed by its seed), the
pre-stated rule (threshold, labels, rates) on hand-made rows, the wrong-pair generators, and the results file
the shipped threshold comes from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks import geometry_check as gc
from benchmarks import geometry_pairs as gp

REPO = Path(__file__).resolve().parents[2]


def test_split_is_disjoint_by_photo_and_fixed():
    g = gp.photo_groups()
    assert set(g["validation"]).isdisjoint(g["test"])
    assert set(g["validation"]) | set(g["test"]) == set(gp.PHOTOS)
    assert gp.photo_groups() == g  # fixed by SPLIT_SEED, not by anything run-dependent


def test_threshold_is_the_largest_with_at_most_5_percent_of_correct_pairs_below():
    correct = [0.9] * 19 + [0.3]  # 1 of 20 = 5% may be flagged: the threshold rises to the next value, 0.9
    assert gc.choose_threshold(correct) == 0.9
    correct = [0.9] * 18 + [0.3, 0.5]  # 2 of 20 = 10%: only the lower one may be flagged
    assert gc.choose_threshold(correct) == 0.5
    assert gc.choose_threshold([0.8] * 10 + [float("nan")]) == 0.0  # NaN counts as 0: 1 of 11 > 5%
    assert gc.choose_threshold([0.8] * 40 + [float("nan")]) == 0.8  # 1 of 41 <= 5%


def test_labels_follow_construction_and_known_geometry():
    assert gc.label({"covisible": False, "truth_within_3px": None}) == "wrong"
    assert gc.label({"covisible": True, "truth_within_3px": 0.5}) == "correct"
    assert gc.label({"covisible": True, "truth_within_3px": 0.49}) == "wrong"  # covisible, matches mostly wrong
    assert gc.label({"covisible": True, "truth_within_3px": None}) == "wrong"  # no drawn match


def _row(name, covisible, ratio, within=None, category="c"):
    return {"name": name, "category": category, "covisible": covisible, "inlier_ratio": ratio,
            "truth_within_3px": within, "time_pair_s": 10.0, "time_check_s": 0.1}  # fmt: skip


def test_summary_counts_false_alarms_and_detections():
    rows = [_row("a", True, 0.9, 0.95), _row("b", True, 0.4, 0.9), _row("c", True, 0.2, 0.1),
            _row("d", False, 0.3), _row("e", False, None), _row("f", False, 0.7), _row("x", True, 0.1, None, "extra")]
    s = gc.summarise(rows, 0.5)
    assert (s["correct"], s["correct_flagged"], s["wrong"], s["wrong_flagged"]) == (2, 1, 4, 3)
    assert s["false_alarm_rate"] == 0.5 and s["detection_rate"] == 0.75
    assert rows[-1]["label"] == "extra" and rows[-1]["flagged"]  # reported, not counted
    lo, hi = s["detection_ci95"]
    assert lo < 0.75 < hi


def test_wilson_interval_hand_computed():
    lo, hi = gc.wilson(0, 30)
    assert lo == 0.0 and hi == pytest.approx(0.1135, abs=1e-4)
    lo, hi = gc.wilson(15, 30)
    assert lo == pytest.approx(1 - hi) and hi == pytest.approx(0.6685, abs=1e-4)  # 0.5 + 1.96 * sqrt(0.25/30 + 1.96**2/3600) / (1 + 1.96**2/30)
    assert all(math.isnan(x) for x in gc.wilson(0, 0))


def test_wrong_pair_generators():
    rng = np.random.default_rng(0)
    img = (np.arange(64 * 96 * 3) % 251).astype(np.uint8).reshape(64, 96, 3)
    sh = gp._shuffled_tiles(img, rng)
    assert sh.shape == img.shape and sorted(sh.ravel().tolist()) == sorted(img.ravel().tolist())
    tiles = [img[i * 16:(i + 1) * 16, j * 24:(j + 1) * 24] for i in range(4) for j in range(4)]
    for i in range(4):
        for j in range(4):  # every tile moved
            assert not np.array_equal(sh[i * 16:(i + 1) * 16, j * 24:(j + 1) * 24], tiles[4 * i + j])
    flat = gp._flat("constant", rng)
    assert flat.shape == (288, 384, 3) and (flat == flat[0, 0]).all()
    grad = gp._flat("gradient", rng)
    assert grad.dtype == np.uint8 and grad.std() > 10
    sn = gp._smooth_noise(rng)
    assert sn.shape == (288, 384, 3) and sn.dtype == np.uint8


def test_shipped_threshold_comes_from_the_validation_split():
    """The results file holds the pre-stated rule, the threshold chosen on validation, which romav2-match
    ships, and the test split evaluated with that same threshold."""
    from romav2_plugin import verify

    rec = json.loads((REPO / "benchmarks" / "results" / gc.OUT_JSON).read_text())
    assert rec["rule"] == gc.RULE
    val = [r for r in rec["validation"]["pairs"] if r["category"] != "extra"]
    assert gc.choose_threshold([gc._ratio0(r) for r in val if gc.label(r) == "correct"]) == rec["threshold_inlier_ratio"]
    assert verify.MIN_INLIER_RATIO == rec["threshold_inlier_ratio"]
    assert rec["test"]["summary"]["threshold"] == rec["threshold_inlier_ratio"]
    names = {r["name"].split("/")[0] for r in rec["test"]["pairs"]} - {"extra"}
    assert names == {"test"}
