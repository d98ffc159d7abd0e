"""romav2-tiny, the model shipped in the package: real matching offline, through every entry point.

These tests use the shipped weights (romav2_plugin/assets/romav2_tiny.pt) and no network. Targets are the
ones of the issue that introduced the model; the held-out images are the ones listed in the model card.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from romav2_plugin import pretrained

ASSETS = Path(pretrained.__file__).parent / "assets"


def test_card_and_weights_ship_in_the_package():
    path = pretrained.named_path("tiny")
    card = json.loads(path.with_suffix(".json").read_text())
    assert path.stat().st_size <= 25 * 10**6
    assert "demo model trained on synthetic data; not the paper's accuracy" in card["note"]
    assert card["config"]["backbone"]["embed_dim"] == 192
    assert card["training_data"]["packages_and_licences"] and card["training_data"]["held_out_files"]
    sd = torch.load(path, weights_only=True)
    assert {v.dtype for v in sd.values() if v.is_floating_point()} <= {torch.float16, torch.bfloat16}


def test_from_pretrained_tiny_loads_without_warnings():
    import warnings

    from romav2_plugin import RoMaV2

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = RoMaV2.from_pretrained("tiny")
    assert model.setting == "tiny" and model.cfg.backbone.depth == 6
    assert all(p.dtype == torch.float32 for p in model.parameters())


def _demo_median_error(model) -> float:
    """Median reprojection error (px) of 5000 sampled matches of the shipped demo pair vs its homography."""
    from PIL import Image

    from romav2_plugin.summary import reprojection_errors

    meta = json.loads((ASSETS / "demo_pair.json").read_text())
    A, B = Image.open(ASSETS / "demo_A.jpg"), Image.open(ASSETS / "demo_B.jpg")
    preds = model.match(A, B)
    m, _, _, _ = model.sample(preds, 5000, generator=0)
    ka, kb = model.to_pixel_coordinates(m, A.height, A.width, B.height, B.width, pixel_center=0.0)
    return float(np.median(reprojection_errors(np.array(meta["homography_A_to_B"]), ka.double().numpy(),
                                               kb.double().numpy())))


#: romav2-tiny as shipped (two training parts): median 17.0 px on the demo pair (21.9 px after part 1; the
#: issue's target, 3 px, is not reached; see the README). The bound below is what the shipped model must keep;
#: an untrained model of the same architecture scores about 190 px.
DEMO_BOUND_PX = 20.0


def test_demo_offline_matches_the_pair(tmp_path):
    """`romav2-match --demo` on a machine without the official weights uses romav2-tiny, matches the shipped
    pair offline and writes the pictures; its median reprojection error is far below an untrained model's."""
    from romav2_plugin import RoMaV2
    from romav2_plugin.config import tiny_config

    env = {"ROMAV2_PLUGIN_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "romav2_plugin.cli", "--demo", "--out", str(tmp_path / "out"),
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "uses the small shipped model 'tiny'" in out
    m = re.search(r"reprojection error against the known homography: median ([0-9.]+) px", out)
    assert m, out
    trained = float(m.group(1))
    assert trained <= DEMO_BOUND_PX, out
    assert (tmp_path / "out" / "matches.png").is_file() and (tmp_path / "out" / "warp.png").is_file()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = _demo_median_error(RoMaV2(tiny_config(), amp=False))
    assert trained < 0.25 * untrained, (trained, untrained)


def _heldout_pair(seed: int):
    """A synthetic homography pair of the coffee photo (held out of training: the demo derives from it)."""
    import skimage.data

    from romav2_plugin.train.augment import random_homography

    img = torch.from_numpy(skimage.data.coffee()).permute(2, 0, 1).float() / 255
    h, w = img.shape[-2:]
    g = torch.Generator().manual_seed(seed)
    Hm = random_homography(g, (h, w), max_rotation_deg=10, scale_range=(0.85, 1.15), max_translation=0.05,
                           max_perspective=0.05)
    from romav2_plugin.train.data import _sample_image

    img_B, _ = _sample_image(img, torch.linalg.inv(Hm), (h, w))  # B shows A through Hm (pixel centres at +0.5)
    return img, img_B, Hm


def _kornia_corner_error(matcher, img_A, img_B, Hm) -> float:
    from kornia.geometry.ransac import RANSAC

    out = matcher({"image0": img_A[None], "image1": img_B[None]})
    if len(out["keypoints0"]) < 4:
        return float("inf")
    H_est, _ = RANSAC("homography", inl_th=3.0, max_iter=20, seed=0)(out["keypoints0"], out["keypoints1"])
    h, w = img_A.shape[-2:]
    corners = torch.tensor([[0.0, 0, 1], [w - 1, 0, 1], [w - 1, h - 1, 1], [0, h - 1, 1]], dtype=torch.float64)
    # kornia keypoints: pixel centre at 0; Hm acts on centre-at-0.5 pixels
    shift = torch.tensor([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]], dtype=torch.float64)
    H_true = torch.linalg.inv(shift) @ Hm @ shift

    def proj(Hx):
        p = corners @ Hx.T
        return p[:, :2] / p[:, 2:]

    return float((proj(H_est.double()) - proj(H_true)).norm(dim=-1).mean())


#: romav2-tiny as shipped: 8.5 px mean corner error on this 400x600 pair (24.7 px after part 1; the issue's
#: "a few pixels" is not reached); an untrained model of the same architecture is far off.
KORNIA_BOUND_PX = 12.0


def test_kornia_tiny_with_ransac_recovers_a_heldout_homography():
    kornia = pytest.importorskip("kornia")
    import romav2_plugin  # noqa: F401  registers KF.RoMaV2
    from romav2_plugin import RoMaV2
    from romav2_plugin.config import tiny_config

    img_A, img_B, Hm = _heldout_pair(0)
    trained = _kornia_corner_error(kornia.feature.RoMaV2(weights="tiny", num_samples=2000, seed=0), img_A, img_B, Hm)
    assert trained < KORNIA_BOUND_PX, f"mean corner error {trained:.2f} px"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        core = RoMaV2(tiny_config(), amp=False)
    untrained = _kornia_corner_error(kornia.feature.RoMaV2(model=core, num_samples=2000, seed=0), img_A, img_B, Hm)
    assert trained < 0.25 * untrained, (trained, untrained)


@pytest.mark.slow
def test_hloc_tiny_registers_every_camera_of_the_rendered_scene(tmp_path, hloc):
    """match_dense with the ``romav2_tiny`` conf (the network itself, not an exact-warp double) and
    reconstruction.main on the rendered five-view scene of the hloc tests register every camera.

    With the shipped model COLMAP registers all 5 cameras (4680 points; after training part 1 it was 2 of 5
    with 67 points), from the network's own matches, run through hloc's whole chain."""
    import copy

    import cv2
    from hloc import pairs_from_exhaustive, reconstruction
    from synthetic_scene import default_cameras, default_scene

    from romav2_plugin.adapters import hloc as adapter

    scene = default_scene()
    cameras = default_cameras(5)
    images = tmp_path / "images"
    images.mkdir()
    names = [f"view{i}.png" for i in range(5)]
    for name, cam in zip(names, cameras):
        cv2.imwrite(str(images / name), scene.render(cam)[..., ::-1])
    pairs = tmp_path / "pairs.txt"
    pairs_from_exhaustive.main(pairs, image_list=names)
    match_dense = adapter.ensure_registered()
    conf = copy.deepcopy(match_dense.confs["romav2_tiny"])
    (tmp_path / "out").mkdir()
    features, matches = match_dense.main(conf, pairs, images, export_dir=tmp_path / "out")
    rec = reconstruction.main(tmp_path / "sfm", images, pairs, features, matches)
    assert rec is not None, "no reconstruction"
    assert rec.num_reg_images() == 5 and rec.num_points3D() >= 1000, rec.summary()
