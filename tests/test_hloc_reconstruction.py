"""hloc end to end: ``match_dense`` with our conf, then ``hloc.reconstruction`` and ``hloc.triangulation``.

The scene is synthetic (tests/synthetic_scene.py) and the network is :class:`SceneWarpDouble`, whose dense
warp is exact, so everything the pipeline recovers can be compared with the truth: every stage after the
network (our sampling and pixel conventions, hloc's rescaling, quantisation into tracks, COLMAP's database,
verification, mapping, bundle adjustment and triangulation) is the real code.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from synthetic_scene import SceneWarpDouble, default_cameras, default_scene

from romav2_plugin.adapters import hloc as adapter
from romav2_plugin.geometry import similarity_fit

pytestmark = pytest.mark.slow

N_VIEWS = 5


@pytest.fixture(scope="module")
def world():
    scene = default_scene()
    cameras = default_cameras(N_VIEWS)
    return scene, cameras, [scene.render(c) for c in cameras]


def _match_scene(world, tmp, conf_name: str):
    """Images on disk, exhaustive pairs, and hloc's features/matches files from one of our confs."""
    import cv2
    from hloc import pairs_from_exhaustive

    scene, cameras, renders = world
    match_dense = adapter.ensure_registered()
    images = tmp / "images"
    images.mkdir()
    names = [f"view{i}.png" for i in range(N_VIEWS)]
    for name, im in zip(names, renders):
        cv2.imwrite(str(images / name), im[..., ::-1])
    pairs = tmp / "pairs.txt"
    pairs_from_exhaustive.main(pairs, image_list=names)

    conf = copy.deepcopy(match_dense.confs[conf_name])
    real_load = adapter._load_core
    adapter._load_core = lambda model_conf: SceneWarpDouble(
        scene, cameras, renders, setting=model_conf["setting"]
    )
    try:
        (tmp / "out").mkdir()
        features, matches = match_dense.main(conf, pairs, images, export_dir=tmp / "out")
    finally:
        adapter._load_core = real_load
    return tmp, images, names, pairs, features, matches


@pytest.fixture(scope="module")
def matched(world, tmp_path_factory, hloc):
    """``romav2`` conf: precise, both directions, 1280 x 1280 grid."""
    return _match_scene(world, tmp_path_factory.mktemp("sfm"), "romav2")


@pytest.fixture(scope="module")
def matched_fast(world, tmp_path_factory, hloc):
    """``romav2_fast`` conf: base, one direction (the core's A side on its 640 x 640 grid)."""
    return _match_scene(world, tmp_path_factory.mktemp("sfm_fast"), "romav2_fast")


def test_raw_matches_follow_the_scene_geometry(matched, world):
    """Before quantisation, every match of every pair is the exact scene correspondence (original pixels)."""
    import h5py

    scene, cameras, _ = world
    tmp, images, names, pairs, features, matches = matched
    n = 0
    with h5py.File(matches, "r") as fd:
        for a in fd:
            for b in fd[a]:
                k0 = torch.from_numpy(fd[a][b]["keypoints0"][()]).double()
                k1 = torch.from_numpy(fd[a][b]["keypoints1"][()]).double()
                ca, cb = cameras[names.index(a)], cameras[names.index(b)]
                pa = k0 + 0.5  # OpenCV (centre at 0) -> COLMAP (corner at 0)
                rays = scene.rays(ca, pa)
                t, face, _ = scene.cast(torch.from_numpy(ca.C), rays)
                assert (face >= 0).all()
                pb, _ = scene.project(cb, torch.from_numpy(ca.C) + t[:, None] * rays)
                err = (pb - 0.5 - k1).norm(dim=-1)
                assert err.max() < 0.05, (a, b, err.max())
                n += len(k0)
    assert n > 10 * 4000, n  # 10 pairs, up to 5000 matches each



def _rotation_angle_deg(R: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1))))


def test_reconstruction_recovers_the_cameras(matched, world):
    import pycolmap
    from hloc import reconstruction

    scene, cameras, _ = world
    tmp, images, names, pairs, features, matches = matched
    rec = reconstruction.main(
        tmp / "sfm", images, pairs, features, matches, camera_mode=pycolmap.CameraMode.SINGLE
    )
    assert rec is not None, "hloc could not reconstruct the scene"
    assert rec.num_reg_images() == N_VIEWS
    assert rec.num_points3D() > 2000, rec.summary()
    assert rec.compute_mean_reprojection_error() < 0.5, rec.summary()

    by_name = {im.name: im for im in rec.images.values()}
    est_C = np.stack([by_name[n].projection_center() for n in names])
    true_C = np.stack([c.C for c in cameras])
    s, R, t = similarity_fit(est_C, true_C)  # the reconstruction's frame and scale are arbitrary
    extent = np.linalg.norm(true_C - true_C.mean(0), axis=1).max()
    centre_err = np.linalg.norm((s * (R @ est_C.T)).T + t - true_C, axis=1).max() / extent
    rot_err = max(
        _rotation_angle_deg(by_name[n].cam_from_world().rotation.matrix() @ R.T @ cam.R.T)
        for n, cam in zip(names, cameras)
    )
    # The focal length is unknown to COLMAP (no EXIF: prior 1.2 * 320 = 384 px) and must be recovered.
    (camera,) = rec.cameras.values()
    focal_err = abs(camera.mean_focal_length() - cameras[0].f) / cameras[0].f
    # The 3D points lie on the scene's surfaces (in the true frame).
    X = np.stack([p.xyz for p in rec.points3D.values()])
    d = scene.surface_distance((s * (R @ X.T)).T + t) / extent
    print(
        f"centre error {centre_err:.2e}, rotation error {rot_err:.3f} deg, focal error {focal_err:.2e}, "
        f"surface distance median {np.median(d):.2e} / 95% {np.quantile(d, 0.95):.2e} (of the extent), "
        f"{rec.num_points3D()} points, reprojection error {rec.compute_mean_reprojection_error():.3f} px"
    )
    print(
        "romav2:",
        ", ".join(
            f"{k} {v:.4g}" for k, v in _sfm_summary(rec, features, matches, pairs, names, cameras).items()
        ),
    )
    # Measured (2026-11-29): 6.5e-4, 0.13 deg, 2.0e-3, median 4.6e-3, 95% 1.9e-2, 0.43 px.
    assert centre_err < 0.01 and rot_err < 0.5 and focal_err < 0.01
    assert np.median(d) < 0.008 and np.quantile(d, 0.95) < 0.03


def test_triangulation_with_known_poses_lands_on_the_surfaces(matched, world):
    import pycolmap
    from hloc import triangulation

    scene, cameras, _ = world
    tmp, images, names, pairs, features, matches = matched
    # The reference model: the true cameras in COLMAP's convention (pixel corner at 0, centre at 0.5).
    ref = pycolmap.Reconstruction()
    c0 = cameras[0]
    camera = pycolmap.Camera(
        model="PINHOLE", width=c0.width, height=c0.height, params=[c0.f, c0.f, c0.cx, c0.cy], camera_id=1
    )
    ref.add_camera_with_trivial_rig(camera)
    for i, (name, cam) in enumerate(zip(names, cameras), start=1):
        image = pycolmap.Image(name=name, camera_id=1, image_id=i)
        ref.add_image_with_trivial_frame(image, pycolmap.Rigid3d(pycolmap.Rotation3d(cam.R), cam.t))
    (tmp / "ref").mkdir()
    ref.write(tmp / "ref")

    # hloc's known-pose verification (the default) writes TwoViewGeometry objects without a configuration,
    # which pycolmap >= 4 skips as UNDEFINED ("written by an outdated producer"): every match would be
    # dropped. Its RANSAC verification writes complete ones.
    rec = triangulation.main(
        tmp / "tri", tmp / "ref", images, pairs, features, matches, estimate_two_view_geometries=True
    )
    assert rec.num_reg_images() == N_VIEWS
    assert rec.num_points3D() > 2000, rec.summary()
    assert rec.compute_mean_reprojection_error() < 0.5, rec.summary()
    print(f"{rec.num_points3D()} points, reprojection error {rec.compute_mean_reprojection_error():.3f} px")
    X = np.stack([p.xyz for p in rec.points3D.values()])
    d = scene.surface_distance(X)
    # Keypoints carry <= max_error (1 px) of hloc's quantisation noise, ~2.5 cm at f = 280 px and ~7 m. Measured
    # (2026-11-29): median 0.0069, 95% 0.042. With every keypoint shifted by half a pixel (a pixel-centre
    # convention error) the median grows to 0.0126 (0.0089 for a quarter pixel).
    print(f"surface distance median {np.median(d):.4f}, 95% {np.quantile(d, 0.95):.4f}")
    assert np.median(d) < 0.0095 and np.quantile(d, 0.95) < 0.06, np.quantile(d, [0.5, 0.95])


def _camera_errors(rec, names, cameras) -> tuple[float, float]:
    """Largest camera-centre error (fraction of the camera spread) and rotation error (degrees)."""
    by_name = {im.name: im for im in rec.images.values()}
    est_C = np.stack([by_name[n].projection_center() for n in names])
    true_C = np.stack([c.C for c in cameras])
    s, R, t = similarity_fit(est_C, true_C)  # the reconstruction's frame and scale are arbitrary
    extent = np.linalg.norm(true_C - true_C.mean(0), axis=1).max()
    centre_err = np.linalg.norm((s * (R @ est_C.T)).T + t - true_C, axis=1).max() / extent
    rot_err = max(
        _rotation_angle_deg(by_name[n].cam_from_world().rotation.matrix() @ R.T @ cam.R.T)
        for n, cam in zip(names, cameras)
    )
    return centre_err, rot_err


def _sfm_summary(rec, features, matches, pairs, names, cameras) -> dict[str, float]:
    """What hloc's aggregation and COLMAP made of the matches: keypoints per image, tracks, reprojection."""
    from hloc.utils.io import get_keypoints, get_matches
    from hloc.utils.parsers import parse_retrieval

    centre_err, rot_err = _camera_errors(rec, names, cameras)
    pair_list = [(a, b) for a, bs in parse_retrieval(pairs).items() for b in bs]
    return {
        "centre_error": centre_err,
        "rotation_error_deg": rot_err,
        # hloc's match_dense.main keeps at most max_kps = 8192 keypoints per image
        "keypoints_per_image": float(np.mean([len(get_keypoints(features, n)) for n in names])),
        "matches_per_pair": float(np.mean([len(get_matches(matches, a, b)[0]) for a, b in pair_list])),
        "points3D": rec.num_points3D(),
        "mean_track_length": rec.compute_mean_track_length(),
        "observations_per_image": rec.compute_mean_observations_per_reg_image(),
        "reprojection_error_px": rec.compute_mean_reprojection_error(),
    }


def test_one_direction_conf_refines_image0_and_keeps_image1_on_the_grid(matched_fast, world):
    """hloc's dense-matcher convention (its LoFTR adapter: "we refine kpts in image0"): in one-direction
    settings image1 is the grid side, so an image's keypoints are the same grid points in every pair where it
    is image1, and image0's are the refined (warped) ones. Then the whole chain, as for ``romav2``."""
    import h5py
    import pycolmap
    from hloc import reconstruction

    from romav2_plugin.config import SETTINGS

    tmp, images, names, pairs, features, matches = matched_fast
    _, cameras, _ = world
    s = SETTINGS["base"]
    assert not s.bidirectional
    rec = reconstruction.main(
        tmp / "sfm", images, pairs, features, matches, camera_mode=pycolmap.CameraMode.SINGLE
    )
    assert rec is not None and rec.num_reg_images() == N_VIEWS
    summary = _sfm_summary(rec, features, matches, pairs, names, cameras)
    print("romav2_fast:", ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
    with h5py.File(matches, "r") as fd:
        for a in fd:
            for b in fd[a]:
                k0, k1 = fd[a][b]["keypoints0"][()], fd[a][b]["keypoints1"][()]
                cb = cameras[names.index(b)]  # 320 x 240, below resize_max: hloc does not resize
                grid1 = (k1 + 0.5) * np.array([s.W_lr / cb.width, s.H_lr / cb.height]) - 0.5
                assert np.abs(grid1 - grid1.round()).max() < 1e-3, (a, b)  # image1: grid points
                ca = cameras[names.index(a)]
                grid0 = (k0 + 0.5) * np.array([s.W_lr / ca.width, s.H_lr / ca.height]) - 0.5
                assert np.abs(grid0 - grid0.round()).max() > 0.1, (a, b)  # image0: refined, off the grid
    assert summary["points3D"] > 2000 and summary["reprojection_error_px"] < 0.5, summary
