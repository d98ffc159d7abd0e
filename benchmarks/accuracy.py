"""Accuracy of dense matchers: the standard protocols, and a synthetic benchmark that always runs.

Protocols (``--benchmark``):

* ``synthetic`` (default; needs only scikit-image): image pairs made from public-domain/CC0 photos shipped
  inside scikit-image, warped by random homographies with photometric changes, so the ground truth is
  exact. Reports homography AUC@3/5/10 px (mean corner error of a RANSAC homography) and match precision
  (fraction of matches within 3 px of the ground truth).
* ``megadepth1500`` / ``scannet1500``: relative pose, the usual 1500 pairs (LoFTR scene lists and npz
  files), 5000 balanced samples, essential-matrix RANSAC (OpenCV, else pycolmap), AUC@5/10/20 degrees
  of ``max(rotation error, translation angle error)``, five RANSAC draws per pair as the RoMa protocols.
* ``hpatches``: HPatches sequences, image 1 against 2..6, homography RANSAC, mean corner error
  normalised to a 480-pixel short side, AUC@3/5/10 px (LoFTR's eight sequences excluded).
* ``wxbs``: through the ``wxbs-benchmark`` package (dense transfer of its ground-truth points).

Every matcher plugs in through :class:`Matcher`: ``match_pair(img_A, img_B) -> (kpts_A (N, 2),
kpts_B (N, 2), scores (N,))``, pixel coordinates in the OpenCV convention (top-left pixel centre at
``(0, 0)``) of the images as given. Adapters: ``ours`` (romav2_plugin), ``official`` (romav2==2.0.1,
assembled offline, see ``_official.py``), ``roma`` (romatch), ``loftr`` (kornia), and the ground-truth test
doubles ``double`` / ``double-shift<t>`` (synthetic only: exact matches, or shifted by ``t`` px).

Examples::

    python benchmarks/accuracy.py                                  # synthetic: double, ours (random weights)
    python benchmarks/accuracy.py --benchmark megadepth1500 --data-root data/megadepth \\
        --matchers ours --weights romav2.0.1.pt --device cuda
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    RESULTS,
    SKIMAGE_IMAGES,
    command_line,
    load_rgb,
    machine_info,
    now_utc,
    provenance_markdown,
    skimage_image,
)

OFFICIAL_WEIGHTS_URL = "https://github.com/Parskatt/RoMaV2/releases/download/v2.0.1/romav2.0.1.pt"
ROMA_WEIGHTS_URL = "https://github.com/Parskatt/storage/releases/download/roma/roma_outdoor.pth"
DINOV2_WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"

MEGADEPTH_SCENES = ("0015_0.1_0.3.npz", "0015_0.3_0.5.npz", "0022_0.1_0.3.npz", "0022_0.3_0.5.npz", "0022_0.5_0.7.npz")
HPATCHES_IGNORE = frozenset({"i_contruction", "i_crownnight", "i_dc", "i_pencils", "i_whitebuilding",
                             "v_artisans", "v_astronautis", "v_talent"})
PAPER = {  # RoMa v2 paper (arXiv 2511.15706), AUC@5/10/20
    "megadepth1500": (62.8, 77.0, 86.6),
    "scannet1500": (33.6, 56.2, 73.8),
}

DATA_HELP = {
    "megadepth1500": (
        "MegaDepth-1500 expects, under --data-root:\n"
        "  {scenes}  (LoFTR's megadepth_test_1500_scene_info npz files)\n"
        "  and the images they reference (paths relative to --data-root, e.g. Undistorted_SfM/0015/images/*.jpg).\n"
        "Get them from the test-data section of https://github.com/zju3dv/LoFTR (README, 'megadepth_test_1500'\n"
        "and 'megadepth_test_1500_scene_info'), or follow the RoMa / RoMa v2 READMEs (data/megadepth layout)."
    ),
    "scannet1500": (
        "ScanNet-1500 expects, under --data-root:\n"
        "  test.npz  (LoFTR's scannet_test_1500 pair list: 'name' = (scene, sub-scene, stem A, stem B), 'rel_pose')\n"
        "  scans_test/scene0XXX_00/color/<stem>.jpg and scans_test/scene0XXX_00/intrinsic/intrinsic_color.txt\n"
        "Get them from the test-data section of https://github.com/zju3dv/LoFTR ('scannet_test_1500'); ScanNet's\n"
        "terms of use apply (http://www.scan-net.org/)."
    ),
    "hpatches": (
        "HPatches expects --data-root/hpatches-sequences-release/<sequence>/{1..6}.ppm and H_1_<k>.\n"
        "Download https://huggingface.co/datasets/vbalnt/hpatches/resolve/main/hpatches-sequences-release.zip\n"
        "(or the original link in https://github.com/hpatches/hpatches-dataset) and unzip it into --data-root."
    ),
    "wxbs": (
        "WxBS needs the wxbs-benchmark package (pip install wxbs-benchmark) and its dataset under --data-root\n"
        "(the package downloads it with download=True when the machine is online)."
    ),
}


class DataMissingError(FileNotFoundError):
    """Benchmark data is not where it should be; the message says what to download and where to put it."""


class WeightsMissingError(FileNotFoundError):
    """A standard protocol was asked for with random weights."""


# ====================================================================== the matcher interface
@runtime_checkable
class Matcher(Protocol):
    """What a matcher needs to provide to be benchmarked.

    ``match_pair`` returns keypoints in pixel coordinates of the images as given (OpenCV convention:
    top-left pixel centre at ``(0, 0)``) and one score per match. Optionally ``resample()`` returns a
    fresh draw of matches from the last dense prediction (used for the five RANSAC draws of the pose
    protocols; without it the same matches are reshuffled).
    """

    name: str

    def match_pair(self, img_A: np.ndarray, img_B: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def _np(x) -> np.ndarray:
    return x.detach().double().cpu().numpy()


class RoMaV2Matcher:
    """Adapter for ``romav2_plugin.RoMaV2`` and anything with its API (the ground-truth doubles)."""

    def __init__(self, model, *, num: int = 5000, seed: int = 0, name: str = "ours") -> None:
        import torch

        self.model, self.num, self.name = model, num, name
        self.gen = torch.Generator(device=model.device).manual_seed(seed)
        self._last = None

    def match_pair(self, img_A, img_B):
        self._last = (self.model.match(img_A, img_B), img_A.shape[:2], img_B.shape[:2])
        return self.resample()

    def resample(self):
        preds, (hA, wA), (hB, wB) = self._last
        matches, conf, _, _ = self.model.sample(preds, self.num, generator=self.gen)
        kA, kB = self.model.to_pixel_coordinates(matches, hA, wA, hB, wB, pixel_center=0.0)
        return _np(kA), _np(kB), _np(conf)

    def transfer(self, img_A, img_B, pts_A, pts_B):
        """Dense transfer of given points (WxBS): A points into B and B points into A, pixels."""
        import torch

        from romav2_plugin.geometry import bhwc_grid_sample, to_normalized, to_pixel

        preds = self.model.match(img_A, img_B)
        (hA, wA), (hB, wB) = img_A.shape[:2], img_B.shape[:2]
        dev = preds["warp_AB"].device
        nA = to_normalized(torch.as_tensor(pts_A, dtype=torch.float32, device=dev), hA, wA, pixel_center=0.0)
        nB = to_normalized(torch.as_tensor(pts_B, dtype=torch.float32, device=dev), hB, wB, pixel_center=0.0)
        to_B = bhwc_grid_sample(preds["warp_AB"], nA[None, None])[0, 0]
        if preds["warp_BA"] is None:
            raise ValueError("WxBS needs a bidirectional setting (e.g. --setting wxbs)")
        to_A = bhwc_grid_sample(preds["warp_BA"], nB[None, None])[0, 0]
        return _np(to_pixel(to_B, hB, wB, pixel_center=0.0)), _np(to_pixel(to_A, hA, wA, pixel_center=0.0))


class OfficialMatcher(RoMaV2Matcher):
    """Adapter for the official ``romav2.RoMaV2`` (its ``match``/``sample``, its 0.5-centre pixels)."""

    def __init__(self, model, *, num: int = 5000, seed: int = 0, fp32: bool = True) -> None:
        self.model, self.num, self.name, self.fp32, self.seed = model, num, "official", fp32, seed
        self._last = None

    def _ctx(self):
        import contextlib

        from benchmarks._official import no_autocast

        return no_autocast() if self.fp32 else contextlib.nullcontext()

    def match_pair(self, img_A, img_B):
        import torch

        torch.manual_seed(self.seed)  # the official sampler draws from the global generator
        with self._ctx():
            preds = self.model.match(img_A, img_B)
        self._last = (preds, img_A.shape[:2], img_B.shape[:2])
        return self.resample()

    def resample(self):
        preds, (hA, wA), (hB, wB) = self._last
        out = self.model.sample(preds, self.num)
        matches, conf = out[0], out[1]
        kA, kB = self.model.to_pixel_coordinates(matches, hA, wA, hB, wB)
        return _np(kA) - 0.5, _np(kB) - 0.5, _np(conf)


class RomaMatcher:
    """Adapter for RoMa (``romatch``)."""

    def __init__(self, model, *, num: int = 5000, seed: int = 0) -> None:
        self.model, self.num, self.name, self.seed = model, num, "roma", seed
        self._last = None

    def match_pair(self, img_A, img_B):
        import torch
        from PIL import Image

        torch.manual_seed(self.seed)
        warp, cert = self.model.match(Image.fromarray(img_A), Image.fromarray(img_B), device=self.model.device
                                      if hasattr(self.model, "device") else None)
        self._last = (warp, cert, img_A.shape[:2], img_B.shape[:2])
        return self.resample()

    def resample(self):
        warp, cert, (hA, wA), (hB, wB) = self._last
        matches, conf = self.model.sample(warp, cert, num=self.num)
        kA, kB = self.model.to_pixel_coordinates(matches, hA, wA, hB, wB)
        return _np(kA) - 0.5, _np(kB) - 0.5, _np(conf)


class LoFTRMatcher:
    """Adapter for ``kornia.feature.LoFTR`` (grayscale, both images resized to ``size`` x ``size``)."""

    def __init__(self, model, *, size: int = 640, device="cpu") -> None:
        self.model, self.size, self.name, self.device = model, size, "loftr", device

    def match_pair(self, img_A, img_B):
        import torch
        import torch.nn.functional as F
        from kornia.color import rgb_to_grayscale

        def prep(img):
            x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255).to(self.device)
            return rgb_to_grayscale(F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True))

        with torch.inference_mode():
            out = self.model({"image0": prep(img_A), "image1": prep(img_B)})
        k0, k1 = _np(out["keypoints0"]), _np(out["keypoints1"])
        sA = np.array([img_A.shape[1], img_A.shape[0]]) / self.size
        sB = np.array([img_B.shape[1], img_B.shape[0]]) / self.size
        return (k0 + 0.5) * sA - 0.5, (k1 + 0.5) * sB - 0.5, _np(out["confidence"])


# ====================================================================== metrics
def pose_auc(errors, thresholds) -> list[float]:
    """Area under the recall-vs-error curve up to each threshold, normalised to [0, 1] (the SuperGlue /
    LoFTR / RoMa definition: recall is piecewise linear between the sorted errors, starting at (0, 0))."""
    errors = np.sort(np.asarray(errors, dtype=np.float64))
    recall = (np.arange(len(errors)) + 1) / max(len(errors), 1)
    errors = np.r_[0.0, errors]
    recall = np.r_[0.0, recall]
    aucs = []
    for t in thresholds:
        last = int(np.searchsorted(errors, t))
        r = np.r_[recall[:last], recall[last - 1]]
        e = np.r_[errors[:last], t]
        aucs.append(float(np.sum((r[1:] + r[:-1]) * np.diff(e)) / 2 / t))
    return aucs


def angle_error_mat(R1: np.ndarray, R2: np.ndarray) -> float:
    """Angle (degrees) of the rotation ``R1^T R2``."""
    cos = np.clip((np.trace(R1.T @ R2) - 1) / 2, -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)))


def angle_error_vec(v1: np.ndarray, v2: np.ndarray) -> float:
    n = np.linalg.norm(v1) * np.linalg.norm(v2)
    return float(np.degrees(np.arccos(np.clip(np.dot(v1, v2) / n, -1.0, 1.0))))


def relative_pose_error(R_gt, t_gt, R, t) -> tuple[float, float]:
    """``(translation angle error, rotation error)`` in degrees; the translation sign is ambiguous."""
    e_t = angle_error_vec(np.ravel(t), np.ravel(t_gt))
    return min(e_t, 180.0 - e_t), angle_error_mat(R, R_gt)


def estimate_pose(kA, kB, K_A, K_B, norm_thresh: float, conf: float = 0.99999):
    """Essential-matrix RANSAC on calibrated points; ``(R, t, inlier mask)`` or ``None``.

    OpenCV (``findEssentialMat`` + ``recoverPose``, best of the returned solutions) when installed,
    else pycolmap's LO-RANSAC.
    """
    if len(kA) < 5:
        return None
    xA = (kA - K_A[None, :2, 2]) @ np.linalg.inv(K_A[:2, :2]).T
    xB = (kB - K_B[None, :2, 2]) @ np.linalg.inv(K_B[:2, :2]).T
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        E, mask = cv2.findEssentialMat(xA, xB, np.eye(3), threshold=norm_thresh, prob=conf, method=cv2.RANSAC)
        if E is None:
            return None
        best, ret = 0, None
        for E_i in np.split(E, len(E) // 3):
            n, R, t, _ = cv2.recoverPose(E_i, xA, xB, np.eye(3), 1e9, mask=mask.copy())
            if n > best:
                best, ret = n, (R, t.ravel(), mask.ravel() > 0)
        return ret
    import pycolmap

    cam = pycolmap.Camera(model="PINHOLE", width=2, height=2, params=[1.0, 1.0, 0.0, 0.0])
    opts = pycolmap.RANSACOptions()
    opts.max_error = norm_thresh
    opts.confidence = conf
    res = pycolmap.estimate_essential_matrix(xA, xB, cam, cam, opts)
    if res is None:
        return None
    rig = res["cam2_from_cam1"]
    return rig.rotation.matrix(), np.asarray(rig.translation), np.asarray(res["inlier_mask"])


def apply_homography(H: np.ndarray, pts: np.ndarray) -> np.ndarray:
    p = np.c_[pts, np.ones(len(pts))] @ np.asarray(H, dtype=np.float64).T
    return p[:, :2] / p[:, 2:]


def corners(w: int, h: int) -> np.ndarray:
    """Pixel centres of the four corner pixels (OpenCV convention)."""
    return np.array([[0, 0], [0, h - 1], [w - 1, 0], [w - 1, h - 1]], dtype=np.float64)


def homography_corner_error(H_est: np.ndarray | None, H_gt: np.ndarray, w: int, h: int) -> float:
    """Mean distance (px) between the four corners of a ``w`` x ``h`` image mapped by ``H_est`` and by
    ``H_gt``; ``inf`` when there is no estimate."""
    if H_est is None or not np.all(np.isfinite(H_est)):
        return float("inf")
    c = corners(w, h)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.linalg.norm(apply_homography(H_est, c) - apply_homography(H_gt, c), axis=1)
    return float(np.mean(d)) if np.all(np.isfinite(d)) else float("inf")


def match_precision(kA: np.ndarray, kB: np.ndarray, H_gt: np.ndarray, thresh: float = 3.0) -> float:
    """Fraction of matches whose B keypoint lies within ``thresh`` px of ``H_gt`` applied to the A keypoint
    (0 for no matches)."""
    if len(kA) == 0:
        return 0.0
    return float(np.mean(np.linalg.norm(apply_homography(H_gt, kA) - kB, axis=1) <= thresh))


def _normalize_points(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hartley normalisation (batched over leading dims): returns normalised points and the 3x3 transforms."""
    c = p.mean(axis=-2, keepdims=True)
    s = np.sqrt(2) / np.maximum(np.linalg.norm(p - c, axis=-1).mean(axis=-1, keepdims=True), 1e-12)
    T = np.zeros(p.shape[:-2] + (3, 3))
    T[..., 0, 0] = T[..., 1, 1] = s[..., 0]
    T[..., :2, 2] = -s * c[..., 0, :]
    T[..., 2, 2] = 1
    return (p - c) * s[..., None], T


def dlt_homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Normalised DLT, batched: ``src``, ``dst`` ``(..., N, 2)`` with ``N >= 4`` -> ``H (..., 3, 3)``
    with ``dst ~ H src`` (least squares for ``N > 4``)."""
    ps, Ts = _normalize_points(np.asarray(src, dtype=np.float64))
    pd, Td = _normalize_points(np.asarray(dst, dtype=np.float64))
    x, y, u, v = ps[..., 0], ps[..., 1], pd[..., 0], pd[..., 1]
    o, z = np.ones_like(x), np.zeros_like(x)
    r1 = np.stack([x, y, o, z, z, z, -u * x, -u * y, -u], axis=-1)
    r2 = np.stack([z, z, z, x, y, o, -v * x, -v * y, -v], axis=-1)
    A = np.concatenate([r1, r2], axis=-2)
    _, _, Vt = np.linalg.svd(A, full_matrices=A.shape[-2] < 9)  # (2N, 9): thin SVD keeps all 9 rows of Vt
    Hn = Vt[..., -1, :].reshape(A.shape[:-2] + (3, 3))
    H = np.linalg.inv(Td) @ Hn @ Ts
    return H / H[..., 2:3, 2:3]


def estimate_homography(kA: np.ndarray, kB: np.ndarray, thresh: float = 3.0, *, iters: int = 2000,
                        seed: int = 0, refine: int = 3) -> tuple[np.ndarray | None, np.ndarray]:
    """RANSAC over 4-point DLT hypotheses (vectorised), then least-squares refits on the inliers.

    Deterministic for a given ``seed``. Returns ``(H or None, inlier mask)``.
    """
    n = len(kA)
    if n < 4:
        return None, np.zeros(n, dtype=bool)
    rng = np.random.default_rng(seed)
    if n == 4:
        idx = np.arange(4)[None]
    else:  # 4 distinct indices per hypothesis: draw, then redraw the rows with a repeat
        idx = rng.integers(0, n, size=(iters, 4))
        while True:
            s = np.sort(idx, axis=1)
            bad = (s[:, 1:] == s[:, :-1]).any(axis=1)
            if not bad.any():
                break
            idx[bad] = rng.integers(0, n, size=(int(bad.sum()), 4))
    with np.errstate(all="ignore"):
        Hs = dlt_homography(kA[idx], kB[idx])
        best, best_inl = -1, None
        for chunk in range(0, len(Hs), 256):  # bounded memory: 256 hypotheses x N points at a time
            Hc = Hs[chunk : chunk + 256]
            p = np.einsum("kij,nj->kni", Hc, np.c_[kA, np.ones(n)])
            err = np.linalg.norm(p[..., :2] / p[..., 2:] - kB[None], axis=-1)
            inl = np.nan_to_num(err, nan=np.inf) <= thresh
            cnt = inl.sum(axis=1)
            k = int(np.argmax(cnt))
            if cnt[k] > best:
                best, best_inl = int(cnt[k]), inl[k]
        if best < 4:
            return None, np.zeros(n, dtype=bool)
        H = dlt_homography(kA[best_inl], kB[best_inl])
        for _ in range(refine):
            err = np.linalg.norm(apply_homography(H, kA) - kB, axis=1)
            inl = np.nan_to_num(err, nan=np.inf) <= thresh
            if inl.sum() < 4:
                break
            H, best_inl = dlt_homography(kA[inl], kB[inl]), inl
    return (H if np.all(np.isfinite(H)) else None), best_inl


# ====================================================================== synthetic benchmark
@dataclass
class SyntheticPair:
    name: str
    img_A: np.ndarray
    img_B: np.ndarray
    H: np.ndarray  # A pixels -> B pixels, OpenCV convention


def random_homography(rng: np.random.Generator, w: int, h: int, *, max_rot_deg: float = 20.0,
                      scale_range=(0.8, 1.2), max_corner_shift: float = 0.1) -> np.ndarray:
    """A random homography mapping a ``w`` x ``h`` image into a same-sized one: rotation about the centre,
    scale, and an independent shift of each corner by up to ``max_corner_shift`` of the image size."""
    src = corners(w, h)
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    a = np.radians(rng.uniform(-max_rot_deg, max_rot_deg))
    s = rng.uniform(*scale_range)
    R = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    dst = (src - c) @ R.T + c + rng.uniform(-max_corner_shift, max_corner_shift, size=(4, 2)) * [w, h]
    return dlt_homography(src, dst)


def warp_image(img: np.ndarray, H: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """``B(p) = A(H^-1 p)``, bilinear, zero outside; float in [0, 1]."""
    from skimage.transform import ProjectiveTransform, warp

    inv = ProjectiveTransform(matrix=np.linalg.inv(H))
    return warp(img.astype(np.float64) / 255.0, inv, output_shape=out_hw, order=1, mode="constant", cval=0.0)


def photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma, contrast, brightness, per-channel gain and Gaussian noise; float [0, 1] -> uint8."""
    x = img ** rng.uniform(0.7, 1.4)
    x = x * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)
    x = x * rng.uniform(0.9, 1.1, size=3) + rng.normal(0, 3 / 255, size=x.shape)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def _resize_long(img: np.ndarray, long_side: int) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    s = long_side / max(h, w)
    if s >= 1:
        return img
    return np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s)), Image.BICUBIC))


def synthetic_pairs(n: int = 10, seed: int = 0, long_side: int = 640, images=tuple(SKIMAGE_IMAGES)) -> list[SyntheticPair]:
    """``n`` pairs cycling over scikit-image's bundled photos: A is the photo, B its warp by a random
    homography plus a photometric change. Deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        name = images[i % len(images)]
        A = _resize_long(skimage_image(name), long_side)
        h, w = A.shape[:2]
        H = random_homography(rng, w, h)
        B = photometric(warp_image(A, H, (h, w)), rng)
        pairs.append(SyntheticPair(f"{name}-{i}", A, B, H))
    return pairs


def evaluate_synthetic(matcher: Matcher, pairs: list[SyntheticPair], *, px_thresh: float = 3.0,
                       ransac_thresh: float = 3.0, thresholds=(3, 5, 10)) -> dict:
    """Homography AUC (mean corner error of a RANSAC homography from the matches) and match precision."""
    errs, precs, nums, per_pair = [], [], [], []
    t0 = time.perf_counter()
    for i, p in enumerate(pairs):
        kA, kB, _ = matcher.match_pair(p.img_A, p.img_B)
        H_est, inl = estimate_homography(kA, kB, ransac_thresh, seed=i)
        h, w = p.img_A.shape[:2]
        e = homography_corner_error(H_est, p.H, w, h)
        pr = match_precision(kA, kB, p.H, px_thresh)
        errs.append(e)
        precs.append(pr)
        nums.append(len(kA))
        per_pair.append({"pair": p.name, "n_matches": len(kA), "precision": pr,
                         "corner_error_px": e if np.isfinite(e) else None,  # None: no homography found
                         "inliers": int(inl.sum())})
    auc = pose_auc(errs, thresholds)
    return {
        "matcher": matcher.name,
        **{f"auc@{t}px": a for t, a in zip(thresholds, auc)},
        f"precision@{px_thresh:g}px": float(np.mean(precs)),
        "median_corner_error_px": float(np.median(errs)),
        "mean_matches": float(np.mean(nums)),
        "pairs": len(pairs),
        "seconds": time.perf_counter() - t0,
        "per_pair": per_pair,
    }


class ShiftedHomographyDouble:
    """Builds the ground-truth double of a pair with its homography composed with a translation of
    ``shift`` px along x: every match is then exactly ``shift`` px off (for harness checks)."""

    def __init__(self, shift: float = 0.0, setting: str = "turbo", num: int = 2000, seed: int = 0) -> None:
        self.shift, self.setting, self.num, self.seed = shift, setting, num, seed
        self.name = "double" if shift == 0 else f"double-shift{shift:g}"
        self.H: np.ndarray | None = None

    def set_pair(self, H: np.ndarray) -> None:
        self.H = H

    def match_pair(self, img_A, img_B):
        from romav2_plugin.testing import HomographyWarpDouble

        T = np.array([[1, 0, self.shift], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
        model = HomographyWarpDouble(T @ self.H, setting=self.setting)
        return RoMaV2Matcher(model, num=self.num, seed=self.seed, name=self.name).match_pair(img_A, img_B)


class _PairAware:
    """Feeds each synthetic pair's ground truth to a double before matching it."""

    def __init__(self, double: ShiftedHomographyDouble, pairs: list[SyntheticPair]) -> None:
        self.double, self.name = double, double.name
        self._H = {id(p.img_A): p.H for p in pairs}

    def match_pair(self, img_A, img_B):
        self.double.set_pair(self._H[id(img_A)])
        return self.double.match_pair(img_A, img_B)


def run_synthetic(matchers: dict[str, Matcher], pairs: list[SyntheticPair], **kw) -> list[dict]:
    out = []
    for name, m in matchers.items():
        if isinstance(m, ShiftedHomographyDouble):
            m = _PairAware(m, pairs)
        print(f"[accuracy] synthetic: {name} on {len(pairs)} pairs ...", file=sys.stderr, flush=True)
        r = evaluate_synthetic(m, pairs, **kw)
        r["matcher"] = name
        out.append(r)
    return out


# ====================================================================== standard protocols
@dataclass
class PosePair:
    path_A: Path
    path_B: Path
    K_A: np.ndarray
    K_B: np.ndarray
    R: np.ndarray  # A -> B
    t: np.ndarray


def _missing(bench: str, root: Path, what: list[str]) -> DataMissingError:
    shown = "\n  ".join(what[:5]) + (f"\n  ... and {len(what) - 5} more" if len(what) > 5 else "")
    msg = DATA_HELP[bench].replace("{scenes}", ", ".join(MEGADEPTH_SCENES))
    return DataMissingError(f"{bench}: data not found under --data-root {root}. Missing:\n  {shown}\n\n{msg}")


def megadepth1500_pairs(root: str | Path) -> list[PosePair]:
    root = Path(root)
    missing = [str(root / s) for s in MEGADEPTH_SCENES if not (root / s).is_file()]
    if missing:
        raise _missing("megadepth1500", root, missing)
    pairs = []
    for s in MEGADEPTH_SCENES:
        d = np.load(root / s, allow_pickle=True)
        for info in d["pair_infos"]:
            i, j = info[0]
            T_A, T_B = d["poses"][i], d["poses"][j]
            R = T_B[:3, :3] @ T_A[:3, :3].T
            t = -R @ T_A[:3, 3] + T_B[:3, 3]
            pairs.append(PosePair(root / str(d["image_paths"][i]), root / str(d["image_paths"][j]),
                                  d["intrinsics"][i].astype(np.float64), d["intrinsics"][j].astype(np.float64), R, t))
    absent = [str(p) for pp in pairs for p in (pp.path_A, pp.path_B) if not p.is_file()]
    if absent:
        raise _missing("megadepth1500", root, sorted(set(absent)))
    return pairs


def scannet1500_pairs(root: str | Path) -> list[PosePair]:
    root = Path(root)
    if not (root / "test.npz").is_file():
        raise _missing("scannet1500", root, [str(root / "test.npz")])
    d = np.load(root / "test.npz")
    pairs, absent = [], []
    for name, rel in zip(d["name"], d["rel_pose"]):
        scene = root / "scans_test" / f"scene{int(name[0]):04d}_{int(name[1]):02d}"
        kfile = scene / "intrinsic" / "intrinsic_color.txt"
        pa, pb = scene / "color" / f"{int(name[2])}.jpg", scene / "color" / f"{int(name[3])}.jpg"
        absent += [str(p) for p in (kfile, pa, pb) if not p.is_file()]
        if absent:
            continue
        K = np.loadtxt(kfile)[:3, :3]
        T = np.asarray(rel, dtype=np.float64).reshape(-1, 4)
        pairs.append(PosePair(pa, pb, K.copy(), K.copy(), T[:3, :3], T[:3, 3]))
    if absent:
        raise _missing("scannet1500", root, sorted(set(absent)))
    return pairs


def _resample(matcher, kA, kB, draw: int, rng):
    if draw > 0 and hasattr(matcher, "resample"):
        kA, kB, _ = matcher.resample()
    perm = rng.permutation(len(kA))
    return kA[perm], kB[perm]


def evaluate_pose(matcher: Matcher, pairs: list[PosePair], *, resize: str, draws: int = 5,
                  thresholds=(5, 10, 20), seed: int = 0, limit: int | None = None) -> dict:
    """Relative pose AUC. ``resize``: ``"max1200"`` (MegaDepth: intrinsics and keypoints at a 1200-pixel
    long side) or ``"min480"`` (ScanNet: 480-pixel short side), as the RoMa / RoMa v2 protocols. Keypoints
    are used with a 0.5 pixel-centre offset, as there."""
    rng = np.random.default_rng(seed)
    errs = []
    for pp in pairs[:limit]:
        A, B = load_rgb(pp.path_A), load_rgb(pp.path_B)
        kA, kB, _ = matcher.match_pair(A, B)
        sA = 1200 / max(A.shape[:2]) if resize == "max1200" else 480 / min(A.shape[:2])
        sB = 1200 / max(B.shape[:2]) if resize == "max1200" else 480 / min(B.shape[:2])
        K_A, K_B = pp.K_A.copy(), pp.K_B.copy()
        K_A[:2] *= sA
        K_B[:2] *= sB
        norm_thresh = 0.5 / (np.mean(np.abs(K_A[:2, :2])) + np.mean(np.abs(K_B[:2, :2])))
        for d in range(draws):
            a, b = _resample(matcher, kA, kB, d, rng)
            try:
                res = estimate_pose((a + 0.5) * sA, (b + 0.5) * sB, K_A, K_B, norm_thresh)
            except Exception:  # degenerate input: counted as a failure, as in the reference protocols
                res = None
            if res is None:
                errs.append(90.0)
                continue
            e_t, e_R = relative_pose_error(pp.R, pp.t, res[0], res[1])
            errs.append(max(e_t, e_R))
    auc = pose_auc(errs, thresholds)
    return {"matcher": matcher.name, **{f"auc@{t}": a for t, a in zip(thresholds, auc)},
            "pairs": len(errs) // draws, "draws": draws}


def hpatches_pairs(root: str | Path) -> Iterator[tuple[str, Path, Path, np.ndarray]]:
    seqs = Path(root) / "hpatches-sequences-release"
    if not seqs.is_dir():
        raise _missing("hpatches", Path(root), [str(seqs)])
    for seq in sorted(p for p in seqs.iterdir() if p.is_dir() and p.name not in HPATCHES_IGNORE):
        for k in range(2, 7):
            yield seq.name, seq / "1.ppm", seq / f"{k}.ppm", np.loadtxt(seq / f"H_1_{k}")


def evaluate_hpatches(matcher: Matcher, root, thresholds=(3, 5, 10), limit: int | None = None) -> dict:
    try:
        import cv2
    except ImportError:
        cv2 = None
    errs = []
    for n, (_, pa, pb, H) in enumerate(hpatches_pairs(root)):
        if limit is not None and n >= limit:
            break
        A, B = load_rgb(pa), load_rgb(pb)
        kA, kB, _ = matcher.match_pair(A, B)
        (h1, w1), (h2, w2) = A.shape[:2], B.shape[:2]
        thr = 3 * min(w2, h2) / 480
        if cv2 is not None and len(kA) >= 4:
            H_est, _ = cv2.findHomography(kA, kB, method=cv2.RANSAC, confidence=0.99999, ransacReprojThreshold=thr)
        else:
            H_est, _ = estimate_homography(kA, kB, thr)
        errs.append(homography_corner_error(H_est, H, w1, h1) / (min(w2, h2) / 480))
    auc = pose_auc(errs, thresholds)
    return {"matcher": matcher.name, **{f"auc@{t}px": a for t, a in zip(thresholds, auc)}, "pairs": len(errs)}


def evaluate_wxbs(matcher, root, subset: str = "test") -> dict:
    try:
        from wxbs_benchmark.dataset import WxBSDataset
        from wxbs_benchmark.evaluation import evaluate_corrs
    except ImportError as e:
        raise DataMissingError(f"wxbs: {e}.\n{DATA_HELP['wxbs']}") from e
    if not hasattr(matcher, "transfer"):
        raise ValueError(f"wxbs: {matcher.name} has no dense transfer (only the RoMa v2 adapters do)")
    try:
        ds = WxBSDataset(str(root), subset=subset, download=False)
    except Exception as e:
        raise DataMissingError(f"wxbs: cannot open the dataset under {root}: {e}\n{DATA_HELP['wxbs']}") from e
    right, left = [], []
    for item in ds:
        to_B, to_A = matcher.transfer(item["img1"], item["img2"], item["pts"][:, :2], item["pts"][:, 2:4])
        right.append(to_B)
        left.append(to_A)
    result, thresholds = evaluate_corrs(right, left, subset)
    return {"matcher": matcher.name, "result": result, "thresholds": list(map(float, thresholds))}


# ====================================================================== matcher construction
def _load_state_dict(path):
    import torch

    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def build_matcher(name: str, args, *, random_ok: bool):
    """Matcher adapters from the command-line options. ``random_ok=False`` refuses random weights."""
    import torch

    device = torch.device(args.device)
    amp = args.dtype == "bf16"

    def need(flag, url):
        if not random_ok:
            raise WeightsMissingError(
                f"{name}: the standard protocols need the released weights; pass {flag} PATH (download: {url}), "
                "or --allow-random-weights to check the plumbing only."
            )

    if name in ("ours", "official"):
        if args.weights is None:
            need("--weights", OFFICIAL_WEIGHTS_URL)
            from romav2_plugin.testing import make_random_official_state_dict

            sd = make_random_official_state_dict(0)
        else:
            sd = _load_state_dict(args.weights)
        if name == "ours":
            from romav2_plugin import RoMaV2

            model = RoMaV2.from_pretrained(sd, setting=args.setting, device=device, amp=amp)
            return RoMaV2Matcher(model, num=args.num, seed=args.seed)
        from benchmarks._official import build_official

        return OfficialMatcher(build_official(sd, args.setting, amp=amp, device=device), num=args.num,
                               seed=args.seed, fp32=not amp)
    if name == "roma":
        from unittest import mock

        import romatch
        from romatch.models.matcher import RegressionMatcher
        from romatch.models.transformer import vit_large

        if args.roma_weights is None or args.dinov2_weights is None:
            need("--roma-weights and --dinov2-weights", f"{ROMA_WEIGHTS_URL} and {DINOV2_WEIGHTS_URL}")
            dino = vit_large(img_size=518, patch_size=14, init_values=1.0, ffn_layer="mlp", block_chunks=0).state_dict()
            with mock.patch.object(RegressionMatcher, "load_state_dict", lambda self, *a, **k: None):
                model = romatch.roma_outdoor(device, weights={}, dinov2_weights=dino, use_custom_corr=False)
        else:
            model = romatch.roma_outdoor(device, weights=_load_state_dict(args.roma_weights),
                                         dinov2_weights=_load_state_dict(args.dinov2_weights), use_custom_corr=False)
        return RomaMatcher(model, num=args.num, seed=args.seed)
    if name == "loftr":
        import kornia.feature as KF

        model = KF.LoFTR(pretrained=None)
        if args.loftr_weights is None:
            need("--loftr-weights", "kornia.feature.LoFTR(pretrained='outdoor') downloads them")
        else:
            sd = _load_state_dict(args.loftr_weights)
            model.load_state_dict(sd.get("state_dict", sd))
        return LoFTRMatcher(model.eval().to(device), device=device)
    m = re.fullmatch(r"double(?:-shift([0-9.]+))?", name)
    if m:
        return ShiftedHomographyDouble(float(m.group(1) or 0), num=args.num_double, seed=args.seed)
    raise SystemExit(f"unknown matcher {name!r}")


# ====================================================================== reporting
def write_report(bench: str, rows: list[dict], args, out_dir: Path, tag: str, extra_md: list[str]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"accuracy_{bench}_{tag}"
    paths = {k: out_dir / f"{stem}.{k}" for k in ("md", "json", "csv")}
    meta = {"machine": machine_info(args.device), "command": command_line(), "date": now_utc()}
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "benchmark": bench, "rows": rows}, f, indent=1, default=float)
    keys = [k for k in rows[0] if k not in ("per_pair", "result")] if rows else []
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in rows:
            w.writerow([f"{r[k]:.4f}" if isinstance(r[k], float) else r[k] for k in keys])
    md = [f"# Accuracy: {bench} ({args.device}, {args.dtype})", "",
          provenance_markdown(meta["machine"], meta["command"], meta["date"]), *extra_md, "",
          "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        md.append("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    md.append("")
    paths["md"].write_text("\n".join(md))
    return paths


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", default="synthetic",
                   choices=("synthetic", "megadepth1500", "scannet1500", "hpatches", "wxbs"))
    p.add_argument("--matchers", default="double,double-shift2,ours",
                   help="comma list: ours, official, roma, loftr, double, double-shift<t>")
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--setting", default=None, help="RoMa v2 setting (default: turbo for synthetic, mega1500, "
                   "scannet1500, precise for hpatches, wxbs)")
    p.add_argument("--weights", default=None, help="official-layout RoMa v2 checkpoint (ours and official)")
    p.add_argument("--roma-weights", default=None)
    p.add_argument("--dinov2-weights", default=None)
    p.add_argument("--loftr-weights", default=None)
    p.add_argument("--allow-random-weights", action="store_true", help="standard protocols with random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None)
    p.add_argument("--num", type=int, default=5000, help="matches sampled per pair")
    p.add_argument("--num-double", type=int, default=2000, help="matches sampled per pair by the test doubles")
    p.add_argument("--pairs", type=int, default=10, help="synthetic pairs")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N pairs (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    args.matchers = [m.strip() for m in args.matchers.split(",") if m.strip()]
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.setting = args.setting or {"synthetic": "turbo", "megadepth1500": "mega1500", "scannet1500": "scannet1500",
                                    "hpatches": "precise", "wxbs": "wxbs"}[args.benchmark]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")
    bench = args.benchmark
    tag = args.tag or args.device.split(":")[0]
    if bench != "synthetic":
        if args.data_root is None:
            raise DataMissingError(f"{bench}: pass --data-root.\n" + DATA_HELP[bench].replace("{scenes}", ", ".join(MEGADEPTH_SCENES)))
        loader = {"megadepth1500": megadepth1500_pairs, "scannet1500": scannet1500_pairs}.get(bench)
        pose_pairs = loader(args.data_root) if loader else None  # fail early, before building models
        if bench == "hpatches":
            next(hpatches_pairs(args.data_root))
    random_ok = bench == "synthetic" or args.allow_random_weights
    matchers = {m: build_matcher(m, args, random_ok=random_ok) for m in args.matchers}
    if bench == "synthetic":
        pairs = synthetic_pairs(args.pairs, seed=args.seed)
        rows = run_synthetic(matchers, pairs)
        extra = [
            f"- Pairs: {len(pairs)} from scikit-image's bundled photos ({', '.join(f'{k}: {v}' for k, v in SKIMAGE_IMAGES.items())}), "
            "long side 640, B = A warped by a random homography (rotation <= 20 deg, scale 0.8-1.2, corner shifts <= 10%) "
            "with gamma/contrast/brightness/colour gain and noise; seed " + str(args.seed) + ".",
            "- Metrics: AUC of the mean corner error of a RANSAC homography (numpy 4-point DLT, 3 px, 2000 iterations, "
            "least-squares refit) at 3/5/10 px; precision = fraction of matches within 3 px of the ground truth.",
            f"- RoMa v2 setting `{args.setting}`, {args.num} sampled matches ({args.num_double} for the doubles). "
            "`double` = ground-truth test double (exact warp): the metrics must be perfect; `double-shift<t>` = the "
            "same composed with a t-px translation: precision 1 if t <= 3 else 0, corner error exactly t, so "
            "AUC@T = (T - t + t/(2n))/T for t < T with n pairs.",
            "- Weights: " + ("random (seeded): the numbers of real matchers measure nothing but the plumbing; "
                             "run with --weights for meaningful accuracy." if args.weights is None else args.weights),
        ]
    elif bench in ("megadepth1500", "scannet1500"):
        rows = [evaluate_pose(m, pose_pairs, resize="max1200" if bench == "megadepth1500" else "min480",
                              limit=args.limit) for m in matchers.values()]
        ref = PAPER[bench]
        extra = [f"- Paper (RoMa v2): AUC@5/10/20 = {ref[0]}/{ref[1]}/{ref[2]}; setting `{args.setting}`, {args.num} samples."]
    elif bench == "hpatches":
        rows = [evaluate_hpatches(m, args.data_root, limit=args.limit) for m in matchers.values()]
        extra = [f"- Setting `{args.setting}`; AUC of the corner error normalised to a 480-px short side."]
    else:
        rows = [evaluate_wxbs(m, args.data_root) for m in matchers.values()]
        extra = []
    paths = write_report(bench, rows, args, args.out, tag, extra)
    print(paths["md"].read_text())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (DataMissingError, WeightsMissingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
