"""romav2-match's geometric check of every pair: written per pair (npz, HDF5 attributes), shown in the
summaries, and a warning naming the pair when its matches fit no two-view geometry. In-process, with the
network replaced by test doubles: the exact demo homography (a correct pair) and a scrambled warp (confident
matches between unrelated images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from romav2_plugin.app import cli, matching
from romav2_plugin.app.results import pair_key
from romav2_plugin.app.summary import pairs_summary
from romav2_plugin.testing import HomographyWarpDouble, ScrambledWarpDouble
from romav2_plugin.verify import MIN_INLIER_RATIO

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "romav2_plugin" / "assets"
DEMO_H = np.asarray(json.loads((ASSETS / "demo_pair.json").read_text())["homography_A_to_B"])
CHECK_KEYS = ("geometry_inlier_ratio", "geometry_inliers", "confident_share")


@pytest.fixture
def use_double(monkeypatch):
    """``use_double("homography" | "scrambled")``: the network replaced by that double."""

    def use(kind: str):
        def fake_load_model(weights, setting, device, amp):
            st = setting or "turbo"
            model = HomographyWarpDouble(DEMO_H, setting=st) if kind == "homography" else ScrambledWarpDouble(setting=st)
            return model, {"weights": "double.pt", "weights_sha256": "0123456789abcdef"}

        monkeypatch.setattr(matching, "load_model", fake_load_model)

    return use


def _pairs_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for n in ("a.jpg", "b.jpg"):
        (d / n).write_bytes((ASSETS / f"demo_{n[0].upper()}.jpg").read_bytes())
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg b.jpg\nb.jpg a.jpg\n")
    return d, pairs


def test_correct_pair_npz_carries_the_check_and_no_warning(use_double, tmp_path, capsys):
    use_double("homography")
    rc = cli.main(["--demo", "--setting", "turbo", "--out", str(tmp_path), "--num-samples", "600", "--no-pictures"])
    assert rc == 0
    out = capsys.readouterr().out
    d = np.load(tmp_path / "matches.npz")
    assert float(d["geometry_inlier_ratio"]) > 0.99  # exact homography matches
    assert int(d["geometry_inliers"]) == round(float(d["geometry_inlier_ratio"]) * len(d["confidence"]))
    assert str(d["geometry_model"]) in ("fundamental", "homography")
    assert 0.5 < float(d["confident_share"]) <= 1.0  # the part of A that the homography maps into B
    assert "  geometry   " in out and "of 600 matches fit one" in out
    assert "WARNING" not in out


def test_scrambled_pair_h5_attributes_and_warning_naming_what_to_do(use_double, tmp_path, capsys):
    pytest.importorskip("h5py")
    import h5py

    use_double("scrambled")
    A, B = ASSETS / "demo_A.jpg", ASSETS / "demo_B.jpg"
    out = tmp_path / "r.h5"
    rc = cli.main([str(A), str(B), "--setting", "turbo", "--out", str(out), "--num-samples", "600", "--no-pictures"])
    assert rc == 0  # a warning, not a failure: the matches are written
    text = capsys.readouterr().out
    with h5py.File(out, "r") as f:
        g = f[pair_key(str(A), str(B))]
        assert all(k in g.attrs for k in CHECK_KEYS)
        assert float(g.attrs["geometry_inlier_ratio"]) < MIN_INLIER_RATIO
        assert float(g.attrs["confident_share"]) == 1.0  # the double is confident everywhere
    assert "WARNING    this pair looks unreliable" in text and "look at the matches picture" in text.lower()


def test_pairs_run_writes_the_check_per_pair_and_names_unreliable_pairs(use_double, tmp_path, capsys):
    pytest.importorskip("h5py")
    import h5py

    d, pairs = _pairs_dir(tmp_path)
    base = ["--pairs", str(pairs), "--image-dir", str(d), "--setting", "turbo", "--num-samples", "400"]
    use_double("homography")
    assert cli.main([*base, "--out", str(tmp_path / "good.h5")]) == 0
    good = capsys.readouterr().out
    assert "look unreliable" not in good
    use_double("scrambled")
    assert cli.main([*base, "--out", str(tmp_path / "bad.h5")]) == 0
    bad = capsys.readouterr().out
    assert "WARNING    2 of 2 pairs look unreliable" in bad
    assert "a.jpg b.jpg: only" in bad and "b.jpg a.jpg: only" in bad
    for name, low in (("good.h5", False), ("bad.h5", True)):
        with h5py.File(tmp_path / name, "r") as f:
            for a, b in (("a.jpg", "b.jpg"), ("b.jpg", "a.jpg")):
                attrs = f[pair_key(a, b)].attrs
                assert all(k in attrs for k in CHECK_KEYS)
                assert (float(attrs["geometry_inlier_ratio"]) < MIN_INLIER_RATIO) == low


def test_results_file_without_the_check_still_resumes(use_double, tmp_path, capsys):
    """A file written before the check existed (no check attributes): its pairs are skipped, new pairs get
    the check."""
    pytest.importorskip("h5py")
    import h5py

    use_double("homography")
    d, pairs = _pairs_dir(tmp_path)
    out = tmp_path / "r.h5"
    base = ["--pairs", str(pairs), "--image-dir", str(d), "--out", str(out), "--setting", "turbo", "--num-samples", "300"]
    assert cli.main(base) == 0
    with h5py.File(out, "a") as f:
        for a, b in (("a.jpg", "b.jpg"), ("b.jpg", "a.jpg")):
            for k in (*CHECK_KEYS, "geometry_model", "geometry_threshold_px"):
                del f[pair_key(a, b)].attrs[k]
    capsys.readouterr()
    pairs.write_text("a.jpg b.jpg\nb.jpg a.jpg\na.jpg a.jpg\n")
    assert cli.main(base) == 0
    assert "1 matched now, 2 already done" in capsys.readouterr().out
    with h5py.File(out, "r") as f:
        assert "geometry_inlier_ratio" not in f[pair_key("a.jpg", "b.jpg")].attrs
        assert float(f[pair_key("a.jpg", "a.jpg")].attrs["geometry_inlier_ratio"]) > 0.99


def test_ray_worker_function_returns_the_check(use_double, tmp_path):
    """The per-pair function the Ray workers call returns the check in the pair metadata."""
    from romav2_plugin.app.pairs import match_listed_pair

    d, _ = _pairs_dir(tmp_path)
    model = ScrambledWarpDouble(setting="turbo")
    arrays, pmeta, problem = match_listed_pair(model, d, "a.jpg", "b.jpg", num_samples=300, seed=0, min_overlap=0.5)
    assert problem is None and all(k in pmeta for k in CHECK_KEYS)
    assert pmeta["geometry_inlier_ratio"] < MIN_INLIER_RATIO and pmeta["confident_share"] == 1.0


def test_pairs_summary_lists_at_most_twenty_unreliable_pairs():
    bad = [(f"a{i}.jpg", f"b{i}.jpg", "only 3% of the matches fit") for i in range(25)]
    text = pairs_summary(
        n_listed=25, n_done=25, n_skipped=0, failures=[], setting="tiny", device="cpu", weights="tiny",
        weights_sha256="", elapsed=1.0, total_matches=100, num_samples=4, n_meaningless=0, out=Path("r.h5"),
        out_exists=True, unreliable=bad,
    )  # fmt: skip
    assert "25 of 25 pairs look unreliable" in text
    assert "a19.jpg b19.jpg" in text and "a20.jpg" not in text and "... and 5 more" in text


TORONTO = (REPO.parent / "shared" / "data" / "toronto_A.jpg", REPO.parent / "shared" / "data" / "toronto_B.jpg")


@pytest.mark.slow
def test_tiny_on_the_toronto_pair_is_flagged_and_the_demo_pair_is_not(tmp_path, capsys):
    """The real wide-baseline pair on which romav2-tiny draws confident but wrong matches gets the warning;
    the demo pair (same model, same setting) does not. Real network (romav2-tiny), no doubles."""
    if not all(p.is_file() for p in TORONTO):
        pytest.skip(f"the shared toronto pair is absent ({TORONTO[0].parent})")
    ratios = {}
    for name, (A, B) in {"toronto": TORONTO, "demo": (ASSETS / "demo_A.jpg", ASSETS / "demo_B.jpg")}.items():
        out = tmp_path / name
        rc = cli.main([str(A), str(B), "--weights", "tiny", "--out", str(out), "--no-pictures", "--seed", "0"])
        assert rc == 0
        text = capsys.readouterr().out
        ratios[name] = (float(np.load(out / "matches.npz")["geometry_inlier_ratio"]), "WARNING" in text)
    assert ratios["toronto"][0] < MIN_INLIER_RATIO and ratios["toronto"][1], ratios
    assert ratios["demo"][0] >= MIN_INLIER_RATIO and not ratios["demo"][1], ratios
