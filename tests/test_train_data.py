"""Training data: determinism, ground truth consistent with the pixels, the MegaDepth-style reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from romav2_plugin.train.data import HomographyPairs, ImageFolder, MegaDepthPairs, MixedPairs, RenderedPairs
from romav2_plugin.train.ground_truth import warp_from_depth
from romav2_plugin.train.scenes import Camera, Rect, Scene, relative_pose


def _noise_texture(seed: int, size: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tex = torch.zeros(3, size, size)
    for cells, w in ((4, 0.5), (12, 0.3), (32, 0.2)):
        tex += w * F.interpolate(torch.rand(1, 3, cells, cells, generator=g), size=(size, size), mode="bicubic",
                                 align_corners=False)[0]
    return tex.clamp(0, 1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    for i in range(2):
        arr = (_noise_texture(i, 128).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"p{i}.png")
    return folder


def _photometric_error(s) -> tuple[float, float]:
    warped = F.grid_sample(s["image_B"][None], s["warp_AB"][None], align_corners=False)[0]
    diff = (warped - s["image_A"]).abs().mean(0)
    m = s["covis_AB"]
    return float(diff[m].mean()), float(diff[~m].mean()) if (~m).any() else float("nan")


def test_homography_pairs_are_deterministic_and_consistent(photos):
    ds = HomographyPairs(ImageFolder(photos), (64, 64), seed=1, photometric_strength=0.0)
    a, b, c = ds.sample(5), ds.sample(5), ds.sample(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["image_A"], c["image_A"])
    assert a["warp_AB"].shape == (64, 64, 2) and a["covis_AB"].dtype == torch.bool
    err, _ = _photometric_error(a)
    assert a["covis_AB"].float().mean() > 0.3 and err < 0.02


def test_rendered_pairs_have_occlusions_and_consistent_ground_truth(photos):
    ds = RenderedPairs(ImageFolder(photos), (64, 80), seed=0, photometric_strength=0.0, texture_size=64)
    s = ds.sample(0)
    covis_err, other_err = _photometric_error(s)
    assert covis_err < 0.03, covis_err
    assert 0.2 < s["covis_AB"].float().mean() < 1.0  # some pixels are not seen by B
    assert torch.equal(ds.sample(0)["warp_AB"], s["warp_AB"])


def test_ray_cast_matches_a_ray_by_ray_reference():
    """Scene.cast (all rays and faces at once, as (N, F) products) against a plain float64 loop over rays
    and faces that forms each hit point and solves for (a, b) by least squares."""
    from romav2_plugin.train.scenes import random_camera_pair, random_scene

    g = torch.Generator().manual_seed(3)
    scene = random_scene(g, [_noise_texture(i, 16) for i in range(3)])
    cam, _ = random_camera_pair(g, (40, 50))
    px = torch.rand(300, 2, generator=g, dtype=torch.float64) * torch.tensor([50.0, 40.0])
    dirs = scene.rays(cam, px)
    t, face, ab = scene.cast(cam.C, dirs)
    assert (face >= 0).sum() > 200  # most rays hit something (the room is closed but for one side)
    for i in range(len(dirs)):
        best = (float("inf"), -1, None)
        for f, r in enumerate(scene.rects):
            o, u, v = (torch.tensor(x, dtype=torch.float64) for x in (r.origin, r.u, r.v))
            n = torch.linalg.cross(u, v)
            den = float(dirs[i] @ n)
            if abs(den) < 1e-12:
                continue
            ti = float((o - cam.C) @ n) / den
            P = cam.C + ti * dirs[i]
            sol = torch.linalg.lstsq(torch.stack((u, v), 1), (P - o)[:, None]).solution[:, 0]
            if ti > 1e-6 and bool(((sol >= -1e-9) & (sol <= 1 + 1e-9)).all()) and ti < best[0]:
                best = (ti, f, sol)
        assert int(face[i]) == best[1], i
        if best[1] >= 0:
            assert abs(float(t[i]) - best[0]) < 1e-9 * max(1.0, best[0])
            torch.testing.assert_close(ab[i], best[2], atol=1e-9, rtol=0)


def test_mixed_pairs_draw_from_every_source(photos):
    imgs = ImageFolder(photos)
    a = HomographyPairs(imgs, (32, 32), seed=0, photometric_strength=0.0)
    b = HomographyPairs(imgs, (32, 32), seed=9, photometric_strength=0.0, max_rotation_deg=0.0)
    mix = MixedPairs([a, b], [1.0, 1.0], seed=0)
    assert torch.equal(mix.sample(3)["image_A"], mix.sample(3)["image_A"])
    with pytest.raises(ValueError, match="same image size"):
        MixedPairs([a, HomographyPairs(imgs, (48, 48))], [1, 1])


def _write_scene(root: Path, H: int = 48, W: int = 64) -> tuple[Scene, list[Camera]]:
    from PIL import Image

    rects = [
        Rect((-4.0, -4.0, 0.0), (8.0, 0, 0), (0, 8.0, 0), _noise_texture(0), tile=4.0),
        Rect((-4.0, 3.0, 0.0), (8.0, 0, 0), (0, 0, 4.0), _noise_texture(1), tile=4.0),
        Rect((-0.5, -0.5, 0.0), (1.0, 0, 0), (0, 0, 1.5), _noise_texture(2), tile=4.0),  # a panel in front
    ]
    scene = Scene(rects)
    cams = [Camera.look_at((x, -3.5, 1.8), (0, 1.0, 0.6), 50.0, H, W) for x in (-0.8, 0.0, 0.9)]
    (root / "images").mkdir(parents=True)
    (root / "depths").mkdir()
    cameras = {}
    for i, cam in enumerate(cams):
        img, depth = scene.render(cam)
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(root / "images" / f"v{i}.png")
        np.save(root / "depths" / f"v{i}.npy", depth.numpy())
        cameras[f"v{i}.png"] = {"K": cam.K.tolist(), "R": cam.R.tolist(), "t": cam.t.tolist()}
    (root / "cameras.json").write_text(json.dumps(cameras))
    (root / "pairs.txt").write_text("# name_A name_B overlap\nv0.png v1.png 0.6\nv1.png v2.png 0.5\nv0.png v2.png 0.05\n")
    return scene, cams


def test_megadepth_reader_on_a_written_scene(tmp_path):
    scene, cams = _write_scene(tmp_path)
    ds = MegaDepthPairs(tmp_path, (48, 64), seed=0, min_overlap=0.1)
    assert len(ds) == 2  # the 0.05-overlap pair is skipped
    seen = set()
    for i in range(2):
        s = ds.sample(i)
        a, b = next(p for p in ds.pairs if torch.equal(s["image_A"], ds._view(p[0])[0])
                     and torch.equal(s["image_B"], ds._view(p[1])[0]))
        seen.add((a, b))
        ia, ib = int(a[1]), int(b[1])
        # the same ground truth as computed directly from the renderer's depth and poses
        _, d_A = scene.render(cams[ia])
        _, d_B = scene.render(cams[ib])
        T = relative_pose(cams[ia], cams[ib])
        w, c = warp_from_depth(d_A[None], d_B[None], cams[ia].K[None], cams[ib].K[None], T[None])
        assert torch.allclose(s["warp_AB"], w[0], atol=1e-5) and torch.equal(s["covis_AB"], c[0])
        err, other = _photometric_error(s)
        assert err < 0.05 and 0.2 < s["covis_AB"].float().mean() < 1.0
    assert seen == {("v0.png", "v1.png"), ("v1.png", "v2.png")}
    # resized: K scales with the image, the ground truth stays consistent with the pixels
    small = MegaDepthPairs(tmp_path, (32, 48), seed=0).sample(0)
    assert _photometric_error(small)[0] < 0.08


def test_megadepth_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing cameras.json"):
        MegaDepthPairs(tmp_path)
    _write_scene(tmp_path)
    (tmp_path / "pairs.txt").write_text("v0.png v9.png 0.5\n")
    with pytest.raises(ValueError, match=r"pairs.txt:1: v9.png has no entry in cameras.json"):
        MegaDepthPairs(tmp_path)
    (tmp_path / "pairs.txt").write_text("v0.png v1.png\n")
    with pytest.raises(ValueError, match=r"pairs.txt:1: expected"):
        MegaDepthPairs(tmp_path)
    (tmp_path / "pairs.txt").write_text("v0.png v1.png 0.9\n")
    np.save(tmp_path / "depths" / "v0.npy", np.zeros((10, 10), np.float32))
    with pytest.raises(ValueError, match="depth map"):
        MegaDepthPairs(tmp_path, (48, 64)).sample(0)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    with pytest.raises(ValueError, match="No images"):
        ImageFolder(tmp_path)
