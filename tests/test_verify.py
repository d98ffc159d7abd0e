"""verify: the geometric check of drawn matches (robust fundamental matrix / homography inlier ratio), the
confident share of the grid and the unreliable-pair rule. Synthetic float64 scenes with exact geometry."""

import math

import numpy as np
import pytest
import torch

from romav2_plugin.verify import (
    MIN_INLIER_RATIO,
    check_matches,
    confident_share,
    default_threshold_px,
    unreliable_reason,
)

K = np.array([[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]])


def _rot_y(deg: float) -> np.ndarray:
    t = math.radians(deg)
    return np.array([[math.cos(t), 0.0, math.sin(t)], [0.0, 1.0, 0.0], [-math.sin(t), 0.0, math.cos(t)]])


def _project(X: np.ndarray) -> np.ndarray:
    x = X @ K.T
    return x[:, :2] / x[:, 2:]


def two_views(n: int, seed: int = 0, planar: bool = False):
    """Exact correspondences of ``n`` random 3-D points (a plane z = 5 when ``planar``) in two cameras."""
    rng = np.random.default_rng(seed)
    z = np.full(n, 5.0) if planar else rng.uniform(4.0, 8.0, n)
    X = np.stack((rng.uniform(-2, 2, n), rng.uniform(-1.5, 1.5, n), z), axis=1)
    R, t = _rot_y(15.0), np.array([-1.0, 0.1, 0.2])
    return _project(X), _project(X @ R.T + t)


def with_outliers(a, b, fraction: float, seed: int = 1):
    rng = np.random.default_rng(seed)
    b = b.copy()
    k = rng.permutation(len(b))[: int(round(fraction * len(b)))]
    b[k] = rng.uniform((0.0, 0.0), (640.0, 480.0), (len(k), 2))
    return a, b


def test_exact_correspondences_are_all_inliers():
    a, b = two_views(2000)
    r = check_matches(a, b)
    assert r.defined and r.reason == ""
    assert r.inlier_ratio > 0.99 and r.inliers == round(r.inlier_ratio * 2000)
    assert r.matches == 2000 and r.model in ("fundamental", "homography")
    assert r.ratio_F > 0.99  # a general 3-D scene: the epipolar model explains it, a homography cannot
    assert r.ratio_H < 0.5


def test_half_outliers_give_about_half():
    a, b = with_outliers(*two_views(2000), 0.5)
    r = check_matches(a, b)
    assert abs(r.inlier_ratio - 0.5) < 0.05, r


def test_random_matches_give_a_low_ratio():
    rng = np.random.default_rng(3)
    a = rng.uniform((0, 0), (640, 480), (3000, 2))
    b = rng.uniform((0, 0), (640, 480), (3000, 2))
    r = check_matches(a, b)
    assert r.defined
    assert r.inlier_ratio < 0.05
    assert unreliable_reason(r.inlier_ratio, 0.5) is not None


def test_planar_scene_is_explained_by_the_homography():
    a, b = two_views(1500, planar=True)
    r = check_matches(a, b)
    assert r.ratio_H > 0.99 and r.inlier_ratio > 0.99
    assert math.isnan(check_matches(a, b, homography=False).ratio_H)  # not fitted


def test_threshold_is_in_pixels():
    a, b = two_views(1000)
    rng = np.random.default_rng(5)
    noisy = b + rng.normal(0.0, 2.0, b.shape)  # 2 px noise on B: few inliers at 0.25 px, most at 8 px
    assert check_matches(a, noisy, threshold_px=0.25).inlier_ratio < 0.3
    assert check_matches(a, noisy, threshold_px=8.0).inlier_ratio > 0.9


def test_deterministic_for_a_seed_and_accepts_tensors():
    a, b = with_outliers(*two_views(800), 0.3)
    r1 = check_matches(a, b, seed=7)
    r2 = check_matches(torch.from_numpy(a).float(), torch.from_numpy(b).float(), seed=7)
    assert r1 == check_matches(a, b, seed=7)
    assert abs(r1.inlier_ratio - r2.inlier_ratio) < 0.01


@pytest.mark.parametrize(
    "case, reason",
    [
        ("seven", "at least 8"),
        ("empty", "at least 8"),
        ("identical_A", "image A all coincide"),
        ("identical_B", "image B all coincide"),
        ("all_nan", "NaN/inf"),
    ],
)
def test_degenerate_inputs_give_nan_with_a_reason(case, reason):
    a, b = two_views(50)
    if case == "seven":
        a, b = a[:7], b[:7]
    elif case == "empty":
        a, b = a[:0], b[:0]
    elif case == "identical_A":
        a = np.tile([[10.0, 20.0]], (50, 1))
    elif case == "identical_B":
        b = np.tile([[10.0, 20.0]], (50, 1))
    else:
        a = np.full_like(a, np.nan)
    r = check_matches(a, b)
    assert math.isnan(r.inlier_ratio) and r.inliers == 0 and not r.defined
    assert reason in r.reason
    assert unreliable_reason(r.inlier_ratio, 0.9) is not None


def test_some_nan_matches_are_left_out_not_counted():
    a, b = two_views(500)
    a = a.copy()
    a[:100] = np.nan
    r = check_matches(a, b)
    assert r.matches == 400 and r.inlier_ratio > 0.99


def test_bad_arguments_are_refused():
    a, b = two_views(20)
    with pytest.raises(ValueError, match="differ in length"):
        check_matches(a, b[:10])
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        check_matches(a[:, :1], b)
    with pytest.raises(ValueError, match="threshold_px"):
        check_matches(a, b, threshold_px=float("nan"))


def test_confident_share_counts_both_grids():
    ab = torch.tensor([[0.9, 0.1], [0.6, 0.5]])  # 2 of 4 above 0.5 (0.5 itself is not)
    ba = np.array([0.7, 0.8, 0.2, float("nan")])  # 2 of 3 finite
    assert confident_share(ab, threshold=0.5) == 0.5
    assert confident_share(ab, ba, threshold=0.5) == pytest.approx(4 / 7)
    assert confident_share(ab, None, threshold=0.5) == 0.5
    assert math.isnan(confident_share(threshold=0.5))


def test_unreliable_reason_rule():
    assert unreliable_reason(0.9, 0.8) is None
    low = unreliable_reason(MIN_INLIER_RATIO / 2, 0.8)
    assert low is not None and "fit one two-view geometry" in low
    assert unreliable_reason(0.9, 0.01, min_confident_share=0.05) is not None
    assert unreliable_reason(0.9, float("nan")) is None  # no grid given: only the ratio decides


def test_default_threshold_grows_with_image_size():
    assert default_threshold_px((480, 640), (400, 600)) == 1.0
    assert default_threshold_px((1530, 2040), (480, 640)) == pytest.approx(2040 / 1024)


def test_thresholds_are_those_the_validation_benchmark_chose():
    """The shipped thresholds equal the ones benchmarks/geometry_check.py chose and recorded."""
    import json
    from pathlib import Path

    from romav2_plugin import verify

    rec = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "geometry_check_cpu.json").read_text())
    assert verify.MIN_INLIER_RATIO == rec["threshold_inlier_ratio"]
    assert verify.MIN_CONFIDENT_SHARE == rec["threshold_confident_share"]


def test_batched_products_equal_the_matmul():
    from romav2_plugin.verify import _rows_times

    rng = np.random.default_rng(11)
    p = np.concatenate((rng.normal(size=(37, 2)), np.ones((37, 1))), axis=1)
    M = rng.normal(size=(5, 3, 3))
    np.testing.assert_allclose(_rows_times(p, M), p @ M, rtol=0, atol=1e-12)
    np.testing.assert_allclose(_rows_times(p, M[2]), p @ M[2], rtol=0, atol=1e-12)


def test_minimal_samples_are_distinct_and_solved_like_the_eigenvector():
    from romav2_plugin.verify import _distinct_samples, _null_vectors

    rng = np.random.default_rng(12)
    for n in (9, 300, 5000):  # the argsort path and the redraw path
        idx = _distinct_samples(rng, n, 8, 400)
        assert idx.shape == (400, 8) and idx.min() >= 0 and idx.max() < n
        assert all(len(set(r)) == 8 for r in idx.tolist())
    A = rng.normal(size=(50, 8, 9))
    v = _null_vectors(A)  # solved with the last entry fixed
    _, V = np.linalg.eigh(np.swapaxes(A, -1, -2) @ A)
    ref = V[..., :, 0]
    np.testing.assert_allclose(np.abs((v * ref).sum(-1)), 1.0, atol=1e-8)  # the same line, up to sign
    np.testing.assert_allclose(np.abs(A @ v[..., None]).max(), 0.0, atol=1e-9)
    A[3, 1, :8] = 0.0  # an exactly singular 8x8 block: solve raises, the whole batch falls back to eigh
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.solve(A[..., :8], -A[..., 8:9])
    v = _null_vectors(A)
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, atol=1e-12)
    assert np.abs(A[4] @ v[4]).max() < 1e-9
