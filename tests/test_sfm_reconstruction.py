"""romav2-sfm on the rendered multi-view scene with romav2-tiny, against hloc's dense route on the same scene
and weights (hloc's ``match_dense`` with our ``romav2_tiny`` conf, then ``hloc.reconstruction``).

The scene is tests/synthetic_scene.py's (5 views, 320x240); the network is the real romav2-tiny, so these
are the numbers a user gets, not a double's. benchmarks/colmap_keypoints.py measures the same route for several
cell sizes and max errors (benchmarks/results/colmap_keypoints_cpu.md).
"""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.slow

pycolmap = pytest.importorskip("pycolmap")
N_VIEWS = 5


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from benchmarks.colmap_keypoints import render_scene

    root = tmp_path_factory.mktemp("sfm_scene")
    _, cameras, _, names = render_scene(root / "images", N_VIEWS)
    return root, cameras, names


@pytest.fixture(scope="module")
def ours(scene):
    from romav2_plugin.app import sfm

    root, _, _ = scene
    assert sfm.main([str(root / "images"), str(root / "out"), "--weights", "tiny", "--no-progress"]) == 0
    return json.loads((root / "out" / "summary.json").read_text())


def test_romav2_sfm_registers_every_camera(scene, ours):
    from benchmarks.colmap_keypoints import camera_errors

    root, cameras, names = scene
    with pycolmap.Database.open(root / "out" / "database.db") as db:  # the database opens in pycolmap
        assert db.num_images() == N_VIEWS
        assert db.num_verified_image_pairs() == N_VIEWS * (N_VIEWS - 1) // 2
    rec = pycolmap.Reconstruction(root / "out" / "sparse" / "0")  # the model, COLMAP binary
    assert ours["registered_images"] == rec.num_reg_images() == N_VIEWS
    assert ours["mean_track_length"] > 2
    assert math.isfinite(ours["mean_reprojection_error_px"]) and 0 < ours["mean_reprojection_error_px"] < 2
    centre, rot = camera_errors(rec, names, cameras)
    print(f"ours: {ours}; centre error {centre:.4f}, rotation error {rot:.3f} deg")
    assert centre < 0.05 and rot < 2.0
    assert (root / "out" / "reconstruction.png").stat().st_size > 10_000


def test_at_least_as_good_as_hlocs_route(scene, ours, hloc, tmp_path):
    import itertools

    from benchmarks.colmap_keypoints import hloc_route
    from romav2_plugin.app.sfm import model_summary

    root, _, names = scene
    _, rec = hloc_route(root / "images", names, list(itertools.combinations(names, 2)), tmp_path)
    theirs = model_summary(rec)
    print(f"hloc: {theirs}")
    assert ours["registered_images"] >= theirs["registered_images"]
    assert ours["points3D"] >= theirs["points3D"]
    assert 0.5 <= ours["mean_track_length"] / theirs["mean_track_length"] <= 2.0  # the same order


def test_global_mapper_on_the_same_database(scene, ours, tmp_path):
    """--mapper global (GLOMAP inside pycolmap; 4.2.1 has it) on romav2-sfm's database."""
    from romav2_plugin.app.sfm import map_database, model_summary

    if not hasattr(pycolmap, "global_mapping"):
        pytest.skip(f"pycolmap {pycolmap.__version__} has no global_mapping")
    root, _, _ = scene
    recs = map_database(root / "out" / "database.db", root / "images", tmp_path / "sparse", mapper="global")
    s = model_summary(recs[0])
    print(f"global: {s}")
    assert s["registered_images"] == N_VIEWS and s["mean_track_length"] > 2
