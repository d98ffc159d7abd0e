"""The labelled pairs of ``benchmarks/geometry_check.py``, all made by code (no download), split into a
validation part and a held-out test part BEFORE any run.

The split is by source: :data:`SPLIT_SEED` permutes the source photos (scikit-image's bundled photos and
the package's demo image) into two disjoint groups; every pair of a split is made from its group's photos
only, and everything random in it (homographies, scenes, noise, crops) is drawn with that split's own seed.
The three scikit-image textures (brick, grass, gravel) are shared, with crops at other places per split.

Per split (``validation`` / ``test``):

covisible by construction (their final label also depends on the known geometry, see geometry_check.py):

* ``homography mild`` / ``homography strong``: each photo of the group and a random homography warp of it
  with a photometric change (mild: rotation <= 20 deg, scale 0.8-1.2, corner shifts <= 10%; strong: <= 45 deg,
  0.6-1.5, 18%), 384 px long side;
* ``rendered 10/25/45 deg``: 6 rendered 3-D pairs each of training's scene generator at three baselines
  (``max_angle_deg``), textured with the group's photos, 288x384;
* ``demo pair``: the shipped demo pair, in the split whose group holds ``demo``.

unrelated by construction (wrong):

* ``noise``: two independent uniform-noise images (4 pairs; kornia's item);
* ``smooth noise``: two independent blurred Gaussian-noise images (4);
* ``unrelated photos``: a photo against a warp of another photo of the group (8);
* ``flat``: textureless images: two constant colours, two gradients, constant against a photo, gradient
  against a photo (4);
* ``disjoint crops``: two non-overlapping crops of one photo (left and right thirds; 5);
* ``texture crops``: two non-overlapping crops of one repeated texture (brick, grass, gravel; 3): similar
  looking, not the same place;
* ``shuffled tiles``: a photo against its 4x4 tiles in a random order (3): locally right, but no single
  two-view geometry.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks._common import REPO, skimage_image

ASSETS = REPO / "romav2_plugin" / "assets"
#: Fixed before any run: the split of the sources and the seeds of each split.
SPLIT_SEED = 20261206
SPLITS = ("validation", "test")
#: Source photos (scikit-image's bundled photos, grey ones made RGB) and ``demo`` (the demo pair's A).
PHOTOS = ("astronaut", "camera", "chelsea", "clock", "coffee", "coins", "hubble_deep_field",
          "immunohistochemistry", "moon", "retina", "rocket", "cell", "demo")  # fmt: skip
TEXTURES = ("brick", "grass", "gravel")


@dataclass
class LabelledPair:
    split: str
    category: str
    covisible: bool  # by construction
    name: str
    img_A: np.ndarray  # (H, W, 3) uint8
    img_B: np.ndarray
    truth: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None  # (kA, kB) -> errors in px


def photo_groups() -> dict[str, list[str]]:
    """The two disjoint photo groups (fixed by :data:`SPLIT_SEED`)."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(PHOTOS))
    half = (len(PHOTOS) + 1) // 2
    return {"validation": sorted(PHOTOS[i] for i in perm[:half]), "test": sorted(PHOTOS[i] for i in perm[half:])}


def _resize_long(img: np.ndarray, long_side: int) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    s = long_side / max(h, w)
    return np.asarray(Image.fromarray(img).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC))


def photo(name: str, long_side: int = 384) -> np.ndarray:
    from PIL import Image

    if name == "demo":
        img = np.asarray(Image.open(ASSETS / "demo_A.jpg").convert("RGB"))
    else:
        img = skimage_image(name)
    return _resize_long(img, long_side)


def _truth_H(H: np.ndarray):
    from romav2_plugin.app.summary import reprojection_errors

    return lambda kA, kB: reprojection_errors(H, kA, kB)


def _truth_rendered(p):
    """A's depth (nearest pixel) and the relative pose give where a point of A lands in B; intrinsics in
    COLMAP's convention (pixel centre at +0.5), keypoints in OpenCV's. Occlusion in B is not modelled."""

    def errors(kA: np.ndarray, kB: np.ndarray) -> np.ndarray:
        h, w = p.depth_A.shape
        ij = np.clip(np.rint(kA[:, ::-1]).astype(int), 0, [h - 1, w - 1])
        z = p.depth_A[ij[:, 0], ij[:, 1]].astype(np.float64)
        x = np.concatenate((kA.astype(np.float64) + 0.5, np.ones((len(kA), 1))), axis=1)
        X = (x @ np.linalg.inv(p.K_A).T) * z[:, None]
        q = (X @ p.R.T + p.t) @ p.K_B.T
        proj = q[:, :2] / q[:, 2:] - 0.5
        e = np.linalg.norm(proj - kB.astype(np.float64), axis=1)
        return np.where(z > 0, e, np.nan)

    return errors


def _warp(img: np.ndarray, rng: np.random.Generator, strong: bool) -> tuple[np.ndarray, np.ndarray]:
    from benchmarks.accuracy.data import photometric, random_homography, warp_image

    h, w = img.shape[:2]
    kw = dict(max_rot_deg=45.0, scale_range=(0.6, 1.5), max_corner_shift=0.18) if strong else {}
    H = random_homography(rng, w, h, **kw)
    return photometric(warp_image(img, H, (h, w)), rng), H


def _smooth_noise(rng: np.random.Generator, hw=(288, 384)) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    x = gaussian_filter(rng.normal(size=(*hw, 3)), sigma=(4, 4, 0))
    x = (x - x.mean()) / (x.std() + 1e-9)
    return (np.clip(0.5 + 0.18 * x, 0, 1) * 255 + 0.5).astype(np.uint8)


def _flat(kind: str, rng: np.random.Generator, hw=(288, 384)) -> np.ndarray:
    h, w = hw
    if kind == "constant":
        return np.broadcast_to(rng.integers(30, 226, 3, dtype=np.uint8), (h, w, 3)).copy()
    a = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    t = (np.cos(a) * xx + np.sin(a) * yy)
    t = (t - t.min()) / (np.ptp(t) + 1e-9)
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    return ((c0 + t[..., None] * (c1 - c0)) * 255 + 0.5).astype(np.uint8)


def _shuffled_tiles(img: np.ndarray, rng: np.random.Generator, k: int = 4) -> np.ndarray:
    h, w = (img.shape[0] // k) * k, (img.shape[1] // k) * k
    th, tw = h // k, w // k
    tiles = [img[i * th:(i + 1) * th, j * tw:(j + 1) * tw] for i in range(k) for j in range(k)]
    order = rng.permutation(k * k)
    while (order == np.arange(k * k)).any():  # no tile at its own place
        order = rng.permutation(k * k)
    rows = [np.concatenate([tiles[order[i * k + j]] for j in range(k)], axis=1) for i in range(k)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def labelled_pairs(split: str, *, rendered_per_baseline: int = 6) -> list[LabelledPair]:
    """Every pair of ``split`` (deterministic)."""
    import tempfile

    from PIL import Image

    from benchmarks.accuracy.data import rendered_pairs

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    s = SPLITS.index(split)
    rng = np.random.default_rng([SPLIT_SEED, s])
    group = photo_groups()[split]
    photos = {k: photo(k) for k in group}
    out: list[LabelledPair] = []

    def add(cat, cov, name, A, B, truth=None):
        out.append(LabelledPair(split, cat, cov, f"{split}/{cat}/{name}", A, B, truth))

    # ------------------------------------------------------------------ covisible by construction
    for strong in (False, True):
        for k in group:
            if k == "demo":
                continue
            B, H = _warp(photos[k], rng, strong)
            add("homography " + ("strong" if strong else "mild"), True, k, photos[k], B, _truth_H(H))
    with tempfile.TemporaryDirectory() as tmp:
        for k in group:
            Image.fromarray(photo(k, 1024)).save(Path(tmp) / f"{k}.png")
        for j, angle in enumerate((10.0, 25.0, 45.0)):
            ren = rendered_pairs(rendered_per_baseline, folder=tmp, size=(288, 384), seed=1000 * (s + 1) + 10 * j,
                                 max_angle_deg=angle)
            for p in ren:
                add(f"rendered {angle:.0f} deg", True, p.name, p.img_A, p.img_B, _truth_rendered(p))
    if "demo" in group:
        demo_B = np.asarray(Image.open(ASSETS / "demo_B.jpg").convert("RGB"))
        H = np.asarray(json.loads((ASSETS / "demo_pair.json").read_text())["homography_A_to_B"])
        demo_A = np.asarray(Image.open(ASSETS / "demo_A.jpg").convert("RGB"))
        add("demo pair", True, "demo", demo_A, demo_B, _truth_H(H))

    # ------------------------------------------------------------------ unrelated by construction
    for i in range(4):
        hw = [(288, 384), (384, 384), (240, 320), (300, 400)][i]
        add("noise", False, str(i), rng.integers(0, 256, (*hw, 3), dtype=np.uint8),
            rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
    for i in range(4):
        add("smooth noise", False, str(i), _smooth_noise(rng), _smooth_noise(rng))
    names = [k for k in group]
    for i in range(8):
        a, b = rng.choice(len(names), 2, replace=False)
        B, _ = _warp(photos[names[b]], rng, False)
        add("unrelated photos", False, f"{names[a]}-{names[b]}-{i}", photos[names[a]], B)
    some = [photos[names[i]] for i in rng.choice(len(names), 2, replace=False)]
    add("flat", False, "constant-constant", _flat("constant", rng), _flat("constant", rng))
    add("flat", False, "gradient-gradient", _flat("gradient", rng), _flat("gradient", rng))
    add("flat", False, "constant-photo", _flat("constant", rng), some[0])
    add("flat", False, "gradient-photo", _flat("gradient", rng), some[1])
    for i, k in enumerate(rng.choice(len(names), 5, replace=len(names) < 5)):
        big = photo(names[k], 768)
        w = big.shape[1]
        A, B = big[:, : w // 3], big[:, w - w // 3:]
        add("disjoint crops", False, f"{names[k]}-{i}", np.ascontiguousarray(A), np.ascontiguousarray(B))
    for t in TEXTURES:
        tex = skimage_image(t)  # 512 x 512
        c = 224
        y0, y1 = rng.integers(0, 512 - c, 2)
        A = tex[y0:y0 + c, :c] if s == 0 else tex[y0:y0 + c, 512 - c:]
        B = tex[y1:y1 + c, 512 - c:] if s == 0 else tex[y1:y1 + c, :c]
        add("texture crops", False, t, np.ascontiguousarray(A), np.ascontiguousarray(B))
    for k in rng.choice(len(names), 3, replace=False):
        add("shuffled tiles", False, names[k], photos[names[k]], _shuffled_tiles(photos[names[k]], rng))
    return out
