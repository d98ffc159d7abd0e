"""The benchmark harness itself: metric functions against hand-computed values, the synthetic and rendered
3D benchmarks with ground-truth test doubles (perfect, and perturbed by a known amount), SIFT and
romav2-tiny rows end to end, the speed script's dry run, and the error messages for missing data and
weights. The benchmarks are a package run with ``python -m benchmarks.<name>`` from the repository root
(pyproject's pytest ``pythonpath`` puts the root on the import path)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import benchmarks.accuracy as acc
import benchmarks.speed as speed
from benchmarks._common import SKIMAGE_IMAGES, gpu_label

REPO = Path(__file__).resolve().parents[2]

SKI = ("astronaut", "coffee", "chelsea")  # scikit-image's bundled photos: the tests do not depend on .tiny-data


# ---------------------------------------------------------------- metrics vs hand-computed values
def test_pose_auc_hand_computed():
    # sorted errors 1, 2, 3, 10 -> recall 1/4 .. 1; up to 5: trapezoids 0.125 + 0.375 + 0.625 + 0.75 * 2 = 2.625
    assert acc.pose_auc([10, 2, 1, 3], [5]) == pytest.approx([2.625 / 5])
    # up to 20: 2.625 - 1.5 + (0.75 + 1) / 2 * 7 + 1 * 10 = 17.25
    assert acc.pose_auc([1, 2, 3, 10], [20]) == pytest.approx([17.25 / 20])
    assert acc.pose_auc([0.0, 0.0], [5, 10]) == pytest.approx([1.0, 1.0])
    assert acc.pose_auc([90.0, 90.0], [5, 10, 20]) == pytest.approx([0.0, 0.0, 0.0])


def test_corner_error_hand_computed():
    H_gt = np.eye(3)
    T = np.array([[1, 0, 3], [0, 1, 4], [0, 0, 1.0]])
    assert acc.homography_corner_error(T, H_gt, 100, 50) == pytest.approx(5.0)
    # scaling by 2 about the origin, 11x11 image: corners (0,0) (0,10) (10,0) (10,10) move 0, 10, 10, 10*sqrt(2)
    S = np.diag([2.0, 2.0, 1.0])
    assert acc.homography_corner_error(S, H_gt, 11, 11) == pytest.approx((20 + 10 * np.sqrt(2)) / 4)
    assert acc.homography_corner_error(None, H_gt, 11, 11) == float("inf")


def test_match_precision_hand_computed():
    kA = np.array([[0, 0], [1, 1], [2, 2], [3, 3]], dtype=float)
    kB = kA + np.array([[0, 0], [0, 2.9], [3.1, 0], [10, 10]])
    assert acc.match_precision(kA, kB, np.eye(3), 3.0) == 0.5
    assert acc.match_precision(kA, kB, np.eye(3), 3.2) == 0.75
    assert acc.match_precision(np.zeros((0, 2)), np.zeros((0, 2)), np.eye(3)) == 0.0


def test_relative_pose_error_hand_computed():
    a = np.radians(10)
    Rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    t = np.array([1.0, 0, 0])
    e_t, e_R = acc.relative_pose_error(np.eye(3), t, Rz, -2 * t)  # sign and scale of t are unobservable
    assert e_t == pytest.approx(0.0, abs=1e-6) and e_R == pytest.approx(10.0)
    e_t, _ = acc.relative_pose_error(np.eye(3), t, np.eye(3), np.array([1.0, 1.0, 0]))
    assert e_t == pytest.approx(45.0)


def test_homography_ransac_recovers_h_with_outliers():
    rng = np.random.default_rng(0)
    H = np.array([[1.1, 0.1, 5], [0.05, 0.9, 3], [1e-4, 2e-4, 1]])
    kA = rng.uniform(0, 500, (400, 2))
    kB = acc.apply_homography(H, kA)
    kB[:100] += rng.uniform(20, 60, (100, 2))  # 25 % gross outliers
    H_est, inl = acc.estimate_homography(kA, kB, 3.0, iters=300)
    assert inl.sum() == 300 and not inl[:100].any()
    assert acc.homography_corner_error(H_est, H, 500, 500) < 1e-6


def test_essential_ransac_recovers_pose():
    rng = np.random.default_rng(1)
    a = np.radians(8)
    R = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    t = np.array([0.5, 0.1, 0.05])
    X = np.c_[rng.uniform(-2, 2, (300, 2)), rng.uniform(4, 8, 300)]
    K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])

    def proj(P):
        p = P @ K.T
        return p[:, :2] / p[:, 2:]

    res = acc.estimate_pose(proj(X), proj(X @ R.T + t), K, K, norm_thresh=0.5 / 1000)
    e_t, e_R = acc.relative_pose_error(R, t, res[0], res[1])
    assert e_t < 0.1 and e_R < 0.1


def test_warp_image_uses_the_opencv_pixel_convention():
    img = (np.arange(40 * 30 * 3) % 251).reshape(30, 40, 3).astype(np.uint8)
    T = np.array([[1, 0, 3], [0, 1, 5], [0, 0, 1.0]])  # A pixel (x, y) -> B pixel (x + 3, y + 5)
    B = acc.warp_image(img, T, (30, 40))
    np.testing.assert_allclose(B[5:, 3:] * 255, img[:-5, :-3], atol=1e-6)
    assert np.all(B[:5] == 0) and np.all(B[:, :3] == 0)


def test_synthetic_pairs_are_deterministic():
    p1 = acc.synthetic_pairs(2, seed=3, images=SKI)
    p2 = acc.synthetic_pairs(2, seed=3, images=SKI)
    for a, b in zip(p1, p2):
        assert np.array_equal(a.img_B, b.img_B) and np.array_equal(a.H, b.H)
        assert a.img_A.shape == a.img_B.shape and max(a.img_A.shape[:2]) == 512  # astronaut 512, coffee 600 -> 512


def _photo_folder(path: Path, names=("coffee", "chelsea")) -> Path:
    from PIL import Image

    from benchmarks._common import skimage_image

    path.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.fromarray(skimage_image(n)).save(path / f"{n}.png")
    return path


def test_synthetic_images_prefer_the_held_out_folder(tmp_path, monkeypatch):
    """Default source: the held-out folder when it holds photos, else scikit-image's photos, and the
    description says which; an explicit folder wins; an empty explicit folder is an error."""
    import benchmarks.accuracy.data as data

    held = _photo_folder(tmp_path / "heldout")
    monkeypatch.setattr(data, "HELDOUT", held)
    photos, text = acc.synthetic_images()
    assert [n for n, _ in photos] == ["chelsea", "coffee"] and "held-out" in text
    assert max(photos[1][1](512).shape[:2]) == 512  # coffee 400x600 -> 341x512
    pairs = acc.synthetic_pairs(3, long_side=300)
    assert [p.name for p in pairs] == ["chelsea-0", "coffee-1", "chelsea-2"] and max(pairs[1].img_A.shape) == 300
    monkeypatch.setattr(data, "HELDOUT", tmp_path / "absent")
    photos, text = acc.synthetic_images()
    assert [n for n, _ in photos] == list(SKIMAGE_IMAGES)
    assert "scikit-image" in text and "no held-out folder" in text
    assert [n for n, _ in acc.synthetic_images(held)[0]] == ["chelsea", "coffee"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(acc.DataMissingError, match="no .* images"):
        acc.synthetic_images(tmp_path / "empty")


# ---------------------------------------------------------------- harness with ground-truth doubles
@pytest.fixture(scope="module")
def two_pairs():
    return acc.synthetic_pairs(2, seed=0, images=SKI)


def _run(shift, pairs):
    double = acc.ShiftedHomographyDouble(shift, num=300)
    return acc.run_synthetic({double.name: double}, pairs)[0]


def test_ground_truth_double_gives_perfect_metrics(two_pairs):
    r = _run(0.0, two_pairs)
    assert r["precision@3px"] == 1.0
    assert r["median_corner_error_px"] < 1e-3
    for t in (3, 5, 10):
        assert r[f"auc@{t}px"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("shift", [2.0, 4.0])
def test_shifted_double_degrades_by_the_expected_amount(two_pairs, shift):
    """Every match is exactly ``shift`` px off along x: precision@3 is 1 below 3 px and 0 above, the
    fitted homography is the shifted one (corner error ``shift``), and with n pairs of equal error t the
    piecewise-linear recall gives AUC@T = (T - t + t / (2n)) / T for t < T, 0 otherwise."""
    r = _run(shift, two_pairs)
    n = len(two_pairs)
    assert r["precision@3px"] == (1.0 if shift < 3 else 0.0)
    assert r["median_corner_error_px"] == pytest.approx(shift, abs=1e-3)
    for T in (3, 5, 10):
        expected = (T - shift + shift / (2 * n)) / T if shift < T else 0.0
        assert r[f"auc@{T}px"] == pytest.approx(expected, abs=1e-3)


def test_romav2_adapter_returns_opencv_pixels():
    """The adapter's keypoints of the exact double satisfy B = H(A) in the OpenCV convention."""
    from romav2_plugin.testing import HomographyWarpDouble

    H = np.array([[0.9, 0.05, 12.0], [-0.03, 1.1, -4.0], [1e-4, -5e-5, 1.0]])
    A = np.zeros((96, 128, 3), np.uint8)
    B = np.zeros((80, 112, 3), np.uint8)
    m = acc.RoMaV2Matcher(HomographyWarpDouble(H), num=200)
    assert isinstance(m, acc.Matcher)
    kA, kB, s = m.match_pair(A, B)
    assert len(kA) > 50 and kA.shape == kB.shape and s.shape == (len(kA),)
    np.testing.assert_allclose(acc.apply_homography(H, kA), kB, atol=2e-3)
    kA2, _, _ = m.resample()
    assert kA2.shape[1] == 2


def test_pose_errors_of_exact_and_degenerate_matches():
    """Exact correspondences give ~0 degrees in every draw; fewer than 5 matches are failures (90 degrees),
    and AUC then follows pose_auc's definition (hand-computed: half the draws at 0, half failed)."""
    rng = np.random.default_rng(2)
    a = np.radians(12)
    R = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    t = np.array([-0.8, 0.1, 0.2])
    K = np.array([[300.0, 0, 64], [0, 300, 48], [0, 0, 1]])  # COLMAP convention: pixel centres at +0.5
    X = np.c_[rng.uniform(-2, 2, (200, 2)), rng.uniform(4, 9, 200)]

    def proj(P):
        p = P @ K.T
        return p[:, :2] / p[:, 2:] - 0.5  # OpenCV pixels, as matchers return them

    kA, kB = proj(X), proj(X @ R.T + t)
    errs = acc.pose_errors(None, kA, kB, K, K, R, t, draws=3, rng=rng)
    assert len(errs) == 3 and max(errs) < 0.05
    assert acc.pose_errors(None, kA[:4], kB[:4], K, K, R, t, draws=2, rng=rng) == [90.0, 90.0]
    assert acc.pose_auc([0.0, 0.0, 90.0, 90.0], [5, 10, 20]) == pytest.approx([0.5, 0.5, 0.5])
    assert acc.pose_threshold(K, K) == pytest.approx(0.5 / 300)  # 0.5 / (mean|K[:2,:2]| * 2)


def test_sift_row_on_synthetic_pairs(two_pairs):
    """OpenCV SIFT + ratio test 0.8 through the same homography RANSAC: photos with a mild homography are
    SIFT's home ground, so the homography must come out within a few pixels and most matches be right."""
    pytest.importorskip("cv2")
    sift = acc.SIFTMatcher()
    assert isinstance(sift, acc.Matcher)
    (r,) = acc.run_synthetic({"sift": sift}, two_pairs)
    assert r["matcher"] == "sift" and r["mean_matches"] > 100
    assert 0.6 < r["precision@3px"] <= 1.0 and r["median_corner_error_px"] < 3.0
    assert 0.3 < r["auc@10px"] <= 1.0
    kA, kB, s = sift.match_pair(np.zeros((64, 64, 3), np.uint8), two_pairs[0].img_B)  # a blank image: no matches
    assert kA.shape == kB.shape == (0, 2) and s.shape == (0,)


def _tiny_checkpoint(path: Path) -> Path:
    """A randomly initialised romav2-tiny in the layout romav2-train --export writes (weights + card)."""
    import torch

    from romav2_plugin import RoMaV2
    from romav2_plugin.config import tiny_config
    from romav2_plugin.train.checkpoint import export_weights

    torch.manual_seed(0)
    return export_weights(path, RoMaV2(tiny_config()))


@pytest.mark.slow  # romav2-tiny end to end
def test_tiny_row_loads_weights_and_runs_end_to_end(tmp_path, two_pairs):
    """--tiny-weights PATH: the tiny row is romav2-tiny's architecture and setting (from the card), and
    the synthetic benchmark runs through it (random weights: only the plumbing is checked here)."""
    ckpt = _tiny_checkpoint(tmp_path / "tiny" / "model.pt")
    args = acc.parse_args(["--tiny-weights", str(ckpt), "--num", "500"])
    assert args.matchers == ["double", "double-shift2", "sift", "tiny", "ours"]
    m = acc.build_matcher("tiny", args, random_ok=True)
    assert m.name == "tiny" and m.model.setting == "tiny" and m.model.f.num_blocks == 6
    (r,) = acc.run_synthetic({"tiny": m}, two_pairs[:1])
    assert r["matcher"] == "tiny" and r["pairs"] == 1 and 0 < r["mean_matches"] <= 500
    assert 0.0 <= r["precision@3px"] <= 1.0 and 0.0 <= r["auc@10px"] <= 1.0


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    folder = _photo_folder(tmp_path_factory.mktemp("heldout"))
    return folder, acc.rendered_pairs(2, folder=folder, size=(120, 160))


def test_rendered_pairs_are_deterministic_and_consistent(rendered):
    """Same seed, same pairs; the pose, intrinsics and depths agree: a pixel of A with depth, moved by the
    pose, lands where B's depth map sees the same distance (for most co-visible pixels)."""
    folder, pairs = rendered
    again = acc.rendered_pairs(1, folder=folder, size=(120, 160))
    assert np.array_equal(again[0].img_A, pairs[0].img_A) and np.allclose(again[0].R, pairs[0].R)
    other = acc.rendered_pairs(1, folder=folder, size=(120, 160), seed=1)
    assert not np.array_equal(other[0].img_A, pairs[0].img_A)
    for p in pairs:
        assert p.img_A.shape == p.img_B.shape == (120, 160, 3) and p.img_A.dtype == np.uint8
        assert p.covisible >= 0.2 and np.allclose(p.R @ p.R.T, np.eye(3), atol=1e-9)
        ys, xs = np.nonzero(p.depth_A > 0)
        z = p.depth_A[ys, xs]
        X = np.c_[xs + 0.5, ys + 0.5, np.ones_like(z)] @ np.linalg.inv(p.K_A).T * z[:, None]
        Xb = X @ p.R.T + p.t
        q = Xb @ p.K_B.T
        u, v = q[:, 0] / q[:, 2], q[:, 1] / q[:, 2]
        inside = (Xb[:, 2] > 0) & (u >= 0) & (u < 160) & (v >= 0) & (v < 120)
        seen = p.depth_B[v[inside].astype(int), u[inside].astype(int)]
        agree = np.abs(seen - Xb[inside, 2]) < 0.05 * Xb[inside, 2]
        assert agree.mean() > 0.5


def test_rendered_double_gives_perfect_pose_and_sift_a_valid_row(rendered):
    """The exact depth-warp double through the real sampling, pixel conversion and essential-matrix RANSAC:
    pose AUC ~1. SIFT on the same pairs gives a well-formed row (values in range) and its measured quality:
    on these two 120x160 renders it keeps 56 and 69 matches, and scene0 fails both draws (opencv 5.0)."""
    pytest.importorskip("cv2")
    _, pairs = rendered
    rows = acc.run_rendered3d({"double": acc.RenderedDouble(num=1000), "sift": acc.SIFTMatcher()}, pairs, draws=2)
    double, sift = rows
    assert double["matcher"] == "double" and double["pairs"] == 2 and double["failures"] == 0
    assert double["auc@5"] > 0.97 and double["median_pose_error_deg"] < 0.2
    assert double["mean_matches"] > 200
    for k in ("auc@5", "auc@10", "auc@20"):
        assert 0.0 <= sift[k] <= 1.0
    assert sift["auc@5"] <= sift["auc@10"] <= sift["auc@20"]
    assert sift["pairs"] == 2 and sift["draws"] == 2 and len(sift["per_pair"]) == 2
    assert sift["failures"] <= 2, sift  # measured: 2 of 4 draws
    assert sift["mean_matches"] >= 30 and min(r["n_matches"] for r in sift["per_pair"]) >= 20, sift  # 62.5: 56, 69


def test_rendered3d_command_end_to_end(rendered, tmp_path):
    """python -m benchmarks.accuracy --benchmark rendered3d (in-process): rows, provenance, the texture folder."""
    folder, _ = rendered
    out = tmp_path / "res"
    assert acc.run(["--benchmark", "rendered3d", "--matchers", "double", "--images", str(folder), "--pairs", "2",
                    "--size", "120", "160", "--draws", "1", "--num-double", "500", "--out", str(out), "--tag", "t"]) == 0
    md = (out / "accuracy_rendered3d_t.md").read_text()
    assert "| double |" in md and str(folder) in md and "Command: `" in md
    assert "- Sampling KDE: the doubles as their setting, turbo: half precision." in md
    row = json.loads((out / "accuracy_rendered3d_t.json").read_text())["rows"][0]
    assert row["pairs"] == 2 and row["draws"] == 1 and len(row["per_pair"]) == 2 and row["auc@5"] > 0.97


# ---------------------------------------------------------------- missing data and weights
def test_missing_data_errors_say_what_to_download(tmp_path):
    with pytest.raises(acc.DataMissingError, match="0015_0.1_0.3.npz") as e:
        acc.megadepth1500_pairs(tmp_path)
    assert "LoFTR" in str(e.value)
    with pytest.raises(acc.DataMissingError, match="test.npz"):
        acc.scannet1500_pairs(tmp_path)
    with pytest.raises(acc.DataMissingError, match="hpatches-sequences-release"):
        next(acc.hpatches_pairs(tmp_path))


def test_missing_images_are_listed(tmp_path):
    np.savez(tmp_path / "0015_0.1_0.3.npz", pair_infos=np.array([[(0, 1), 0.2, None]], dtype=object),
             intrinsics=np.stack([np.eye(3)] * 2), poses=np.stack([np.eye(4)] * 2),
             image_paths=np.array(["imgs/a.jpg", "imgs/b.jpg"]))
    for s in acc.MEGADEPTH_SCENES[1:]:
        (tmp_path / s).write_bytes((tmp_path / "0015_0.1_0.3.npz").read_bytes())
    with pytest.raises(acc.DataMissingError, match="imgs/a.jpg"):
        acc.megadepth1500_pairs(tmp_path)


@pytest.mark.slow  # subprocesses
def test_cli_reports_missing_data_and_weights(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.accuracy"]
    r = subprocess.run(cmd + ["--benchmark", "megadepth1500", "--data-root", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "megadepth_test_1500_scene_info" in r.stderr
    args = acc.parse_args(["--benchmark", "hpatches", "--data-root", str(tmp_path)])
    with pytest.raises(acc.WeightsMissingError, match="romav2.0.1.pt"):
        acc.build_matcher("ours", args, random_ok=False)
    # rendered3d without held-out photos, and a tiny row without its weights: exit code 2 and what to do
    r = subprocess.run(cmd + ["--benchmark", "rendered3d", "--images", str(tmp_path / "none"), "--matchers", "sift"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "benchmarks.tiny.fetch_images" in r.stderr, r.stderr[-2000:]
    assert acc.run(["--matchers", "tiny", "--tiny-weights", str(tmp_path / "no.pt"), "--pairs", "1",
                    "--images", str(_photo_folder(tmp_path / "photos")), "--out", str(tmp_path)]) == 2
    args = acc.parse_args(["--tiny-weights", str(tmp_path / "no.pt")])
    assert "tiny" not in args.matchers and args.matchers[:3] == ["double", "double-shift2", "sift"]


# ---------------------------------------------------------------- speed harness
@pytest.mark.slow  # a subprocess
def test_speed_dry_run_writes_table_csv_and_chart(tmp_path):
    from PIL import Image

    pair = []
    for i, size in enumerate(((64, 48), (80, 60))):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, np.uint8)).save(p)
        pair.append(str(p))
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--dry-run", "--repeats", "2",
                        "--out", str(out), "--pair", *pair], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (out / "speed_dry.md").read_text()
    assert "| double | turbo |" in md and "Command: `python -m benchmarks.speed --dry-run" in md and "Machine:" in md
    rows = json.loads((out / "speed_dry.json").read_text())["rows"]
    assert [len(x["times_s"]) for x in rows] == [2, 2]
    assert all(x["peak_delta_mb"] is not None and x["baseline_mb"] > 0 for x in rows)
    assert (out / "speed_dry.csv").read_text().count("\n") == 4  # provenance, header, two rows
    assert (out / "speed_dry.png").stat().st_size > 1000


def test_speed_ratios_and_goals():
    rows = [
        {"matcher": "ours", "setting": "precise", "median_s": 100.0, "peak_delta_mb": 4000.0},
        {"matcher": "official", "setting": "precise", "median_s": 200.0, "peak_delta_mb": 10000.0},
        {"matcher": "ours", "setting": "turbo", "median_s": 9.0, "peak_delta_mb": 600.0},
        {"matcher": "official", "setting": "turbo", "median_s": 8.0, "peak_delta_mb": 500.0},
    ]
    rat = speed.ratios(rows)
    assert rat["precise"]["time"] == 0.5 and rat["precise"]["memory"] == 0.4
    text = "\n".join(speed.goals(rows, {"device": "cpu", "batch": 1}))
    assert "time 0.500x the official (goal <= 0.8x: met)" in text and "0.400x (goal <= 0.5x: met)" in text
    rows[0]["peak_delta_mb"] = 6000.0
    assert "goal <= 0.5x: NOT met" in "\n".join(speed.goals(rows, {"device": "cpu", "batch": 1}))


def test_speed_several_precisions_one_group_each_and_ratios_per_precision():
    args = speed.parse_args(["--matchers", "ours,official,tiny", "--settings", "base", "--dtype", "default,fp32"])
    cfgs = speed.build_configs(args)
    assert [c.name for c in cfgs] == [
        "ours:base:default", "official:base:default", "ours:base:fp32", "official:base:fp32",
        "tiny:match:default", "tiny:match+sample5000:default", "tiny:match:fp32", "tiny:match+sample5000:fp32"]
    assert [c.group for c in cfgs[:4]] == ["base/default", "base/default", "base/fp32", "base/fp32"]
    assert speed.parse_args([]).dtype == "default,fp32"  # CPU: as released and fp32
    assert speed.build_configs(speed.parse_args(["--matchers", "ours", "--settings", "base", "--dtype", "fp32"]))[0].name == "ours:base"
    with pytest.raises(SystemExit):
        speed.parse_args(["--dtype", "fp16"])
    rows = [
        {"matcher": "ours", "setting": "base", "dtype": "default", "median_s": 4.0, "peak_delta_mb": 100.0},
        {"matcher": "official", "setting": "base", "dtype": "default", "median_s": 10.0, "peak_delta_mb": 400.0},
        {"matcher": "ours", "setting": "base", "dtype": "fp32", "median_s": 8.0, "peak_delta_mb": 200.0},
        {"matcher": "official", "setting": "base", "dtype": "fp32", "median_s": 12.0, "peak_delta_mb": 300.0},
    ]
    rat = speed.ratios(rows)
    assert rat["base/default"]["time"] == 0.4 and rat["base/fp32"]["time"] == 8.0 / 12.0
    text = "\n".join(speed.goals(rows, {"device": "cpu", "batch": 1}))
    assert "`base`, default vs default: time 0.400x the official (target <= 0.5x: met)" in text
    assert "ours `base`: default / fp32 time 0.50x" in text and "official `base`: default / fp32 time 0.83x" in text


# ---------------------------------------------------------------- the official reference of the speed benchmark
@pytest.mark.slow
def test_official_standin_computes_the_same_warps_as_ours(random_checkpoint, random_model):
    """The benchmark's "official" pipeline (official code, unpruned 24-block timm DINOv3) gives the same
    dense warps as ours on the same weights: the cost comparison is between identical maths."""
    import torch

    pytest.importorskip("romav2")
    from benchmarks._official import build_official, no_autocast

    sd = torch.load(random_checkpoint, map_location="cpu", mmap=True, weights_only=True)
    off = build_official(sd, "turbo", amp=False)
    assert len(off.f.vit.blocks) == 24
    g = torch.Generator().manual_seed(0)
    A, B = torch.rand(1, 3, 96, 128, generator=g), torch.rand(1, 3, 80, 112, generator=g)
    try:
        for m in (off, random_model):
            m.H_lr = m.W_lr = 64
        with no_autocast():
            p_off = off.match(A, B)
        p_ours = random_model.match(A, B)
    finally:
        random_model.apply_setting("turbo")  # session fixture: leave it as found
    for k in ("warp_AB", "overlap_AB", "precision_AB"):
        torch.testing.assert_close(p_ours[k], p_off[k], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_onnx_speed_benchmark_runs_and_records(tmp_path, random_checkpoint):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    cmd = [sys.executable, "-m", "benchmarks.onnx_speed", "--settings", "turbo", "--repeats", "1"]
    cmd += ["--weights", str(random_checkpoint), "--out", str(tmp_path), "--tag", "t"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "onnx_speed_t.json").read_text())
    (row,) = data["rows"]
    assert row["setting"] == "turbo" and row["eager_median_s"] > 0 and row["onnxruntime_median_s"] > 0
    assert max(row["max_abs_diff"].values()) < 1e-4
    md = (tmp_path / "onnx_speed_t.md").read_text()
    assert "| turbo |" in md and "Command: `" in md and "Machine:" in md


def test_ship_counts_paused_log_rows_at_the_stage_median():
    """The model card's training hours exclude a pause (a process stopped while a CI check had the machine):
    a log row far slower than its stage's median is counted at that median, ordinary variation is kept."""
    from types import SimpleNamespace

    from benchmarks.tiny.ship import _seconds_and_steps

    cfg = SimpleNamespace(stages=[SimpleNamespace(name="matcher", batch_size=4, steps=40),
                                  SimpleNamespace(name="refiners", batch_size=2, steps=10)])
    rates = [2.0, 1.0, 0.02, 2.0]  # 10 steps each; the third row spans a pause, the second is just slow
    rows = [{"stage": "matcher", "step": str(10 * (i + 1)), "pairs_per_s": str(r)} for i, r in enumerate(rates)]
    rows.append({"stage": "refiners", "step": "10", "pairs_per_s": "0.5"})
    seconds, steps, paused = _seconds_and_steps(rows, cfg)
    median = 1.5  # of 0.02, 1, 2, 2
    assert paused == 1
    assert steps == {"matcher": 40, "refiners": 10}
    assert seconds == pytest.approx(40 / 2.0 + 40 / 1.0 + 40 / median + 40 / 2.0 + 20 / 0.5)


def test_ship_continues_the_shipped_history_once(tmp_path, monkeypatch):
    """A part trained from ``weights = "tiny"`` continues the shipped card's parts and log rows; shipping it a
    second time drops its own earlier entry (and later ones), and a results CSV that lacks a part is refused."""
    from benchmarks.tiny import ship

    card = {"parts": [{"part": 1, "run": "a"}, {"part": 2, "run": "b"}]}
    (tmp_path / "romav2_tiny.json").write_text(json.dumps(card))
    csv_path = tmp_path / ship.TRAINING_LOG
    csv_path.write_text("part,global_step,stage,step\n1,10,matcher,10\n1,20,matcher,20\n2,30,matcher,30\n")
    monkeypatch.setattr(ship, "ASSETS", tmp_path)
    monkeypatch.setattr(ship, "RESULTS", tmp_path)
    parts, rows = ship._shipped_history("c")
    assert [p["run"] for p in parts] == ["a", "b"] and [r["global_step"] for r in rows] == ["10", "20", "30"]
    parts, rows = ship._shipped_history("b")  # "b" shipped before: its own entry goes
    assert [p["run"] for p in parts] == ["a"] and [r["part"] for r in rows] == ["1", "1"]
    csv_path.write_text("part,global_step,stage,step\n1,10,matcher,10\n")
    with pytest.raises(SystemExit, match="does not hold the log"):
        ship._shipped_history("c")


def test_settings_study_refuses_the_held_out_photographs(capsys):
    """The inference-resolution study validates on training photographs only (no tuning on held-out figures)."""
    from benchmarks.tiny.settings_study import main

    assert main(["--images", ".tiny-data/heldout"]) == 2
    assert "never the held-out ones" in capsys.readouterr().err


def test_settings_study_candidates_parse_and_bad_ones_are_named():
    import argparse

    from benchmarks.tiny.settings_study import _candidates

    assert _candidates("256, 256+384") == [(256, None, False), (256, 384, False)]
    assert _candidates("256:both,256+384:both") == [(256, None, True), (256, 384, True)]
    with pytest.raises(argparse.ArgumentTypeError, match="'256x512'.*256\\+512"):
        _candidates("256,256x512")
    with pytest.raises(argparse.ArgumentTypeError, match="'256\\+384:bi'.*:both"):
        _candidates("256+384:bi")


def test_sampling_study_candidates_set_the_shipped_options():
    """``keepQ`` is the setting's ``precise_fraction`` (the option as it ships), ``unbalanced`` turns the KDE
    balancing off, ``powK`` multiplies the overlap by ``sigma ** -K``."""
    import torch

    from benchmarks.tiny.sampling_study import apply_candidate, reweight
    from romav2_plugin.geometry import largest_sigma

    class M:
        precise_fraction, balanced_sampling = 1.0, True

    m = M()
    apply_candidate(m, "keep0.3")
    assert (m.precise_fraction, m.balanced_sampling) == (0.3, True)
    apply_candidate(m, "unbalanced")
    assert (m.precise_fraction, m.balanced_sampling) == (1.0, False)
    apply_candidate(m, "overlap")
    assert (m.precise_fraction, m.balanced_sampling) == (1.0, True)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(1, 4, 4, 2, 2, generator=g, dtype=torch.float64)
    prec = A @ A.transpose(-1, -2) + 0.1 * torch.eye(2, dtype=torch.float64)
    prec[0, 0, 0] = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # not positive definite: weight 0
    overlap = torch.rand(1, 4, 4, 1, generator=g, dtype=torch.float64)
    w = reweight(overlap, prec, "pow4")
    assert w[0, 0, 0, 0] == 0
    torch.testing.assert_close(w[0, 1:], (overlap * largest_sigma(prec)[..., None] ** -4)[0, 1:])
    assert reweight(overlap, prec, "keep0.3") is overlap and reweight(overlap, prec, "unbalanced") is overlap


def test_sampling_study_refuses_held_out_photographs_and_names_bad_candidates(capsys):
    import argparse

    from benchmarks.tiny.sampling_study import _candidates, main

    assert main(["--images", ".tiny-data/heldout"]) == 2
    assert "never the held-out ones" in capsys.readouterr().err
    assert _candidates("overlap, keep0.3,pow8,unbalanced") == ["overlap", "keep0.3", "pow8", "unbalanced"]
    for bad in ("keep1.5", "keep0", "power8", "top0.3"):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(bad))):
            _candidates(f"overlap,{bad}")


def test_validation_studies_write_provenance_and_the_table(tmp_path, capsys):
    """``write_study`` (both studies): JSON with command, date, machine and rows; markdown with the table."""
    import argparse

    from benchmarks.tiny.settings_study import write_study

    args = argparse.Namespace(weights="tiny", images=".tiny-data/train", threads=2, out=str(tmp_path), tag="x")
    rows = [{"candidate": "keep0.3", "p": 0.5}]
    write_study(args, ["--tag", "x"], "sampling_study", "romav2-tiny sampling weights", [0] * 3, [0] * 2,
                {"draws": 2}, "a note", rows, "| weights | p |", ["| keep0.3 | 0.500 |"])
    res = json.loads((tmp_path / "tiny_sampling_study_x.json").read_text())
    assert res["command"] == "python -m benchmarks.tiny.sampling_study --tag x" and res["rows"] == rows
    assert res["pairs"] == {"synthetic": 3, "rendered": 2, "draws": 2, "seed": 7} and res["machine"]["cpu"]
    md = (tmp_path / "tiny_sampling_study_x.md").read_text().splitlines()
    assert md[0] == "# romav2-tiny sampling weights, validated on training photographs"
    assert "3 synthetic pairs at 512 px and 2 rendered pairs at 384x512 (2 draws)" in md[2] and "a note." in md[2]
    assert md[-3:] == ["| weights | p |", "|---|---|", "| keep0.3 | 0.500 |"]
    assert "| keep0.3 | 0.500 |" in capsys.readouterr().out


@pytest.mark.slow  # timed model runs
def test_sampling_speed_times_sample_against_match_in_turns(tmp_path):
    """``benchmarks.sampling_speed``: match() and sample() timed in turns, the sampler shipped before timed in
    the same run, ratios and provenance written; ``--merge`` keeps another setting's row with its command."""
    from benchmarks.sampling_speed import main

    assert main(["--settings", "tiny", "--runs", "2", "--num", "300", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "sampling_speed_cpu.json").read_text())
    row = res["settings"]["tiny"]
    assert len(row["seconds"]["match"]) == len(row["seconds"]["sample"]) == 2
    assert len(row["seconds"]["sample_before"]) == 1 and row["sampler"] == "grid density (float32)"
    assert row["ratio_sample_over_match"] == pytest.approx(row["median"]["sample"] / row["median"]["match"])
    md = (tmp_path / "sampling_speed_cpu.md").read_text()
    assert "Command: `" in md and "| tiny | grid density (float32) |" in md and "Contended" in md
    res["settings"]["other"] = row
    (tmp_path / "sampling_speed_cpu.json").write_text(json.dumps(res))
    assert main(["--settings", "tiny", "--runs", "1", "--before-runs", "0", "--num", "300", "--merge",
                 "--out", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "sampling_speed_cpu.json").read_text())
    assert set(merged["settings"]) == {"tiny", "other"} and merged["earlier_runs"][0]["settings"] == ["other"]
    assert "Rows other from another run" in (tmp_path / "sampling_speed_cpu.md").read_text()


@pytest.mark.slow  # timed model runs
def test_tiny_speed_times_a_second_pass_against_the_default(tmp_path):
    """``benchmarks.tiny.speed --second-pass``: each variant timed in turns with the default, ratios to it."""
    from benchmarks.tiny.speed import main

    assert main(["--runs", "2", "--second-pass", "320", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "tiny_speed_second_pass_cpu.json").read_text())
    assert set(res["seconds"]) == {"None", "320"} and all(len(v) == 2 for v in res["seconds"].values())
    md = (tmp_path / "tiny_speed_second_pass_cpu.md").read_text()
    assert "| - |" in md and "| 320x320 |" in md and "| 1.00 |" in md
    assert not (tmp_path / "tiny_speed_cpu.json").exists()  # the default figure's file is left alone


def test_tiny_recipe_reproduces_every_shipped_part_and_chains():
    """The recipe (two files + --set overrides, benchmarks/tiny/recipe.py): each part's command parses to the
    config the shipped card records for that part; each part starts from the previous part's exported weights
    (or from the shipped model, ``"tiny"``, when that is the previous part as the card records it), no part
    reads the held-out pictures, seeds differ; besides the recipe's two files the tiny folder holds only the v2
    candidate's config (no per-part files), which does not read the held-out pictures either."""
    from benchmarks.tiny import recipe
    from romav2_plugin.train.config import load_config

    assert recipe.check() == []
    tiny = REPO / "benchmarks" / "tiny"
    assert sorted(p.name for p in tiny.glob("*.toml")) == ["romav2_tiny.toml", "romav2_tiny_continue.toml",
                                                           "romav2_tiny_v2.toml"]
    heldout = (REPO / ".tiny-data" / "heldout").resolve()
    for src in load_config(tiny / "romav2_tiny_v2.toml").data.sources:
        assert all(heldout not in Path(d).resolve().parents and Path(d).resolve() != heldout for d in src.path)
    cfgs = [recipe.load(i) for i in sorted(recipe.PARTS)]
    runs = REPO / "runs"
    assert Path(cfgs[0].out_dir) == runs / "romav2_tiny" and cfgs[0].model.weights is None
    shipped = [p["run"] for p in json.loads((REPO / "romav2_plugin/assets/romav2_tiny.json").read_text())["parts"]]
    for i, (prev, cfg) in enumerate(zip(cfgs, cfgs[1:]), 2):
        assert Path(cfg.out_dir) == runs / f"romav2_tiny_part{i}", i
        if cfg.model.weights == "tiny":
            assert shipped[i - 2:i - 1] == [Path(prev.out_dir).name], (i, shipped)
        else:
            assert Path(cfg.model.weights) == Path(prev.out_dir) / "model.pt", i
    heldout = (REPO / ".tiny-data" / "heldout").resolve()
    for i, cfg in enumerate(cfgs, 1):
        for src in cfg.data.sources:
            assert all(heldout not in Path(d).resolve().parents and Path(d).resolve() != heldout
                       for d in src.path), i
    assert len({c.seed for c in cfgs}) == len(cfgs)


def test_gpu_labels_name_the_model():
    assert gpu_label("NVIDIA H200") == "h200"
    assert gpu_label("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_label("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert gpu_label("NVIDIA A100-SXM4-80GB") == "a100"


def test_sampling_speed_merge_keeps_each_row_with_the_run_that_measured_it(tmp_path, monkeypatch):
    """Three ``--merge`` runs: each kept row names the command that measured it, not the last one's."""
    import benchmarks.sampling_speed as ss
    import romav2_plugin

    class _Model:
        grid_kde, half_precision_kde = False, True

        def apply_setting(self, name):
            pass

    def fake_measure(model, A, B, *, num, runs, before_runs):
        return {"median": {"match": 1.0, "sample": 0.1, "sample_before": 0.5}, "ratio_sample_over_match": 0.1,
                "seconds": {"match": [1.0], "sample": [0.1], "sample_before": [0.5]}, "sampler": "x",
                "same_draws_as_before": True, "ratio_before_over_match": 0.5, "speedup_sample": 5.0}

    monkeypatch.setattr(ss, "measure", fake_measure)
    monkeypatch.setattr(ss, "benchmark_pair", lambda pair: (None, None, "a pair"))
    monkeypatch.setattr(ss, "tiny_on_demo_pair", lambda: (_Model(), None, None))
    monkeypatch.setattr(romav2_plugin.RoMaV2, "from_pretrained", classmethod(lambda cls, *a, **k: _Model()))
    monkeypatch.setattr("benchmarks.speed._load_weights", lambda w: None)
    for settings in ("turbo,fast", "base", "tiny,turbo"):
        monkeypatch.setattr(sys, "argv", ["sampling_speed", "--settings", settings, "--merge"])  # the command
        ss.main(["--settings", settings, "--merge", "--out", str(tmp_path)])
    rec = json.loads((tmp_path / "sampling_speed_cpu.json").read_text())
    assert sorted(rec["settings"]) == ["base", "fast", "tiny", "turbo"]
    owners = {s: r["command"] for r in rec["earlier_runs"] for s in r["settings"]}
    assert "--settings turbo,fast" in owners["fast"] and "--settings base" in owners["base"]
    assert "turbo" not in owners and "tiny" not in owners  # measured by the last run (its own command)
    assert sum(len(r["settings"]) for r in rec["earlier_runs"]) == 2
