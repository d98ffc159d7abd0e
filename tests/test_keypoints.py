"""romav2_plugin.keypoints: keypoints shared across an image's pairs (cell grid + max error), one-to-one matches."""

from __future__ import annotations

import numpy as np
import pytest

from romav2_plugin.keypoints import ImageKeypoints, opencv_to_colmap, unique_matches


def test_pixel_centre_convention():
    """OpenCV's centre of the top-left pixel (0, 0) is COLMAP's (0.5, 0.5); with cell 1 a cell is a pixel."""
    np.testing.assert_array_equal(opencv_to_colmap(np.array([[0.0, 0.0], [2.0, 1.0]])), [[0.5, 0.5], [2.5, 1.5]])
    kp = ImageKeypoints(cell_size=1, max_error=0.5)
    ids = kp.assign(opencv_to_colmap(np.array([[0.0, 0.0], [0.3, 0.0], [0.6, 0.0]])))
    np.testing.assert_array_equal(kp.xy, [[0.5, 0.5], [1.1, 0.5]])  # the third point is in pixel (1, 0)
    np.testing.assert_array_equal(ids, [0, 0, 1])


def test_invariants_against_brute_force():
    """Every assigned point lies within max_error of its keypoint; at most one keypoint per cell; a point is
    unassigned only if its cell is taken by a keypoint farther than max_error and no keypoint is near enough."""
    g = np.random.default_rng(0)
    for cell, err in [(1.0, 1.0), (2.0, 1.0), (4.0, 2.0), (3.0, 0.0)]:
        kp = ImageKeypoints(cell, err)
        for _ in range(3):  # three "pairs"
            pts = g.uniform(0, 20, size=(400, 2))
            ids = kp.assign(pts, g.uniform(size=400))
            xy = kp.xy
            ok = ids >= 0
            d = np.linalg.norm(pts[ok] - xy[ids[ok]], axis=1)
            assert (d <= err + 1e-12).all()
            cells = np.floor(xy / cell).astype(np.int64)
            assert len(np.unique(cells, axis=0)) == len(xy)
            for p in pts[~ok]:
                dist = np.linalg.norm(xy - p, axis=1)
                assert dist.min() > err
                assert (np.floor(p / cell) == cells).all(axis=1).any()


def test_tracks_span_more_than_two_images():
    """The same 3D point matched in pairs (A, B) and (A, C) with sub-pixel noise gets one keypoint of A."""
    g = np.random.default_rng(1)
    base = g.uniform(0, 100, size=(50, 2))
    kp = ImageKeypoints(cell_size=2, max_error=2)
    ids_AB = kp.assign(base + g.normal(0, 0.1, size=base.shape), np.ones(50))
    ids_AC = kp.assign(base + g.normal(0, 0.1, size=base.shape), np.ones(50))
    both = (ids_AB >= 0) & (ids_AC >= 0)
    assert both.mean() > 0.8
    assert (ids_AB[both] == ids_AC[both]).mean() > 0.9


def test_most_confident_point_places_the_keypoint():
    kp = ImageKeypoints(cell_size=4, max_error=1)
    ids = kp.assign(np.array([[1.0, 1.0], [3.5, 3.5], [1.2, 1.1]]), np.array([0.2, 0.9, 0.5]))
    np.testing.assert_array_equal(kp.xy, [[3.5, 3.5]])
    np.testing.assert_array_equal(ids, [-1, 0, -1])  # same cell, farther than 1 px: dropped


def test_resume_from_written_keypoints_gives_the_same_ids():
    """Rebuilding from the keypoints read back (a resumed run) continues exactly like the run that went on."""
    g = np.random.default_rng(2)
    batches = [(g.uniform(0, 30, size=(200, 2)), g.uniform(size=200)) for _ in range(4)]
    live = ImageKeypoints(2, 1.5)
    ids_live = [live.assign(p, c) for p, c in batches]
    resumed = ImageKeypoints(2, 1.5)
    for p, c in batches[:2]:
        resumed.assign(p, c)
    resumed = ImageKeypoints(2, 1.5, resumed.xy.astype(np.float32).astype(np.float64))  # as stored (float32)
    ids_resumed = [resumed.assign(p, c) for p, c in batches[2:]]
    for a, b in zip(ids_live[2:], ids_resumed):
        assert (a == b).mean() > 0.99  # float32 storage may move a point across a max_error boundary
    assert len(resumed) == pytest.approx(len(live), rel=0.01)


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="cell_size"):
        ImageKeypoints(0, 0)
    with pytest.raises(ValueError, match="Raise cell_size"):
        ImageKeypoints(1, 2)
    with pytest.raises(ValueError, match="finite"):
        ImageKeypoints(1, 1).assign(np.array([[np.nan, 0.0]]))
    with pytest.raises(ValueError, match="confidence"):
        ImageKeypoints(1, 1).assign(np.zeros((2, 2)), np.ones(3))


def _unique_reference(a, b, c):
    keep = []
    for i in range(len(a)):
        if a[i] < 0 or b[i] < 0:
            continue
        rivals_a = [j for j in range(len(a)) if a[j] == a[i] and b[j] >= 0]
        rivals_b = [j for j in range(len(a)) if b[j] == b[i] and a[j] >= 0]
        if min(rivals_a, key=lambda j: (-c[j], j)) == i and min(rivals_b, key=lambda j: (-c[j], j)) == i:
            keep.append((a[i], b[i]))
    return sorted(keep)


def test_unique_matches_against_brute_force():
    g = np.random.default_rng(3)
    for _ in range(20):
        n = 60
        a, b = g.integers(-1, 15, n), g.integers(-1, 15, n)
        c = g.choice([0.1, 0.5, 0.9], n)  # ties included
        got = unique_matches(a, b, c)
        assert got.dtype == np.uint32
        assert [tuple(r) for r in got.tolist()] == [tuple(r) for r in _unique_reference(a, b, c)]
    assert unique_matches(np.array([-1]), np.array([0]), np.array([1.0])).shape == (0, 2)
