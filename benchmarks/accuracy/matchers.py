"""Matchers of the accuracy benchmarks: the :class:`Matcher` interface, adapters (ours, romav2-tiny, the
official RoMa v2, RoMa, LoFTR, OpenCV SIFT; the learned sparse peers are in :mod:`benchmarks.accuracy.peers`), the ground-truth test doubles, and :func:`build_matcher`,
which builds them from the command-line options."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from benchmarks.accuracy.data import WeightsMissingError
from benchmarks.accuracy.peers import PEERS, build_peer

__all__ = [
    "Matcher", "RoMaV2Matcher", "OfficialMatcher", "RomaMatcher", "LoFTRMatcher", "SIFTMatcher",
    "ShiftedHomographyDouble", "RenderedDouble", "DepthWarpDouble", "build_matcher",
    "OFFICIAL_WEIGHTS_URL", "ROMA_WEIGHTS_URL", "DINOV2_WEIGHTS_URL", "tiny_weights_available",
]

OFFICIAL_WEIGHTS_URL = "https://github.com/Parskatt/RoMaV2/releases/download/v2.0.1/romav2.0.1.pt"
ROMA_WEIGHTS_URL = "https://github.com/Parskatt/storage/releases/download/roma/roma_outdoor.pth"
DINOV2_WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"


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

class SIFTMatcher:
    """OpenCV SIFT (default detector parameters, all keypoints) on the grayscale images at the size given,
    brute-force L2 nearest neighbours and Lowe's ratio test; score = ``1 - d1 / d2``. A baseline that needs
    no weights."""

    def __init__(self, *, ratio: float = 0.8, max_features: int = 0, name: str = "sift") -> None:
        import cv2

        self.cv2, self.ratio, self.name = cv2, ratio, name
        self.sift = cv2.SIFT_create(nfeatures=max_features)

    def match_pair(self, img_A, img_B):
        cv2 = self.cv2
        kp_A, d_A = self.sift.detectAndCompute(cv2.cvtColor(np.ascontiguousarray(img_A), cv2.COLOR_RGB2GRAY), None)
        kp_B, d_B = self.sift.detectAndCompute(cv2.cvtColor(np.ascontiguousarray(img_B), cv2.COLOR_RGB2GRAY), None)
        empty = np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0)
        if d_A is None or d_B is None or len(kp_A) < 2 or len(kp_B) < 2:
            return empty
        good = [(m, n) for m, n in (k for k in cv2.BFMatcher(cv2.NORM_L2).knnMatch(d_A, d_B, k=2) if len(k) == 2)
                if m.distance < self.ratio * n.distance]
        if not good:
            return empty
        kA = np.array([kp_A[m.queryIdx].pt for m, _ in good], dtype=np.float64)
        kB = np.array([kp_B[m.trainIdx].pt for m, _ in good], dtype=np.float64)
        score = np.array([1 - m.distance / max(n.distance, 1e-12) for m, n in good], dtype=np.float64)
        return kA, kB, score


# ====================================================================== ground-truth test doubles
class _GroundTruthDouble:
    """A matcher that is given each pair's ground truth (``set_pair``) before matching it: the real
    RoMa v2 sampling and pixel conversion run on an exact dense warp (``romav2_plugin.testing``)."""

    name: str
    num: int
    seed: int

    def set_pair(self, pair) -> None:
        self.pair = pair

    def _model(self):
        raise NotImplementedError

    def match_pair(self, img_A, img_B):
        self._inner = RoMaV2Matcher(self._model(), num=self.num, seed=self.seed, name=self.name)
        return self._inner.match_pair(img_A, img_B)

    def resample(self):
        return self._inner.resample()


class ShiftedHomographyDouble(_GroundTruthDouble):
    """The ground-truth double of a synthetic pair with its homography composed with a translation of
    ``shift`` px along x: every match is then exactly ``shift`` px off (for harness checks)."""

    def __init__(self, shift: float = 0.0, setting: str = "turbo", num: int = 2000, seed: int = 0) -> None:
        self.shift, self.setting, self.num, self.seed = shift, setting, num, seed
        self.name = "double" if shift == 0 else f"double-shift{shift:g}"
        self.pair = None

    def _model(self):
        from romav2_plugin.testing import HomographyWarpDouble

        T = np.array([[1, 0, self.shift], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
        return HomographyWarpDouble(T @ self.pair.H, setting=self.setting)


def _inverse_depth(depth):
    import torch

    d = torch.as_tensor(depth, dtype=torch.float64)
    return torch.where(d > 0, 1 / d.clamp_min(1e-12), torch.zeros_like(d))


class DepthWarpDouble:
    """The exact warp of a rendered pair from its depth maps, intrinsics and pose, as a
    :class:`romav2_plugin.testing.WarpDouble` (``make(pair, setting)``).

    Inverse depth is interpolated bilinearly (exact inside a plane, where it is affine in the pixel
    coordinates); points whose four neighbours disagree with the interpolated value (depth edges), that land
    outside B, behind B's camera or on a surface nearer to B (occlusion) are invalid.
    """

    @staticmethod
    def make(pair, setting: str = "turbo", rel_tol: float = 0.01):
        import torch
        import torch.nn.functional as F

        from romav2_plugin.geometry import to_normalized
        from romav2_plugin.testing import WarpDouble

        T = np.eye(4)
        T[:3, :3], T[:3, 3] = pair.R, pair.t
        views = {False: (pair.depth_A, pair.K_A, pair.depth_B, pair.K_B, T),
                 True: (pair.depth_B, pair.K_B, pair.depth_A, pair.K_A, np.linalg.inv(T))}

        def sample(inv_d, pix, mode):
            H, W = inv_d.shape
            g = to_normalized(pix, H, W, pixel_center=0.0)[None]
            return F.grid_sample(inv_d[None, None], g, mode=mode, align_corners=False, padding_mode="zeros")[0, 0]

        class _Double(WarpDouble):
            def pixel_warp(self, pix, x_from, x_to, reverse):
                d_from, K_from, d_to, K_to, T_ft = views[reverse]
                iz = _inverse_depth(d_from)
                lin, near = sample(iz, pix, "bilinear"), sample(iz, pix, "nearest")
                ok = (lin > 0) & ((lin - near).abs() <= rel_tol * lin)
                z = 1 / lin.clamp_min(1e-12)
                K_f, K_t = torch.as_tensor(K_from), torch.as_tensor(K_to)
                Tt = torch.as_tensor(T_ft)
                x = torch.cat((pix + 0.5, torch.ones_like(pix[..., :1])), -1) @ torch.linalg.inv(K_f).T
                X = (x * z[..., None]) @ Tt[:3, :3].T + Tt[:3, 3]
                p = X @ K_t.T
                z_to = p[..., 2]
                pix_to = p[..., :2] / z_to.clamp_min(1e-12)[..., None] - 0.5
                seen = sample(_inverse_depth(d_to), pix_to, "bilinear")
                ok &= (z_to > 1e-6) & ((seen * z_to - 1).abs() <= 5 * rel_tol)
                return pix_to, ok

        return _Double(setting)


class RenderedDouble(_GroundTruthDouble):
    """Ground-truth double of the rendered benchmark (exact depth warp, see :class:`DepthWarpDouble`)."""

    def __init__(self, setting: str = "turbo", num: int = 2000, seed: int = 0, name: str = "double") -> None:
        self.setting, self.num, self.seed, self.name = setting, num, seed, name
        self.pair = None

    def _model(self):
        return DepthWarpDouble.make(self.pair, self.setting)


# ====================================================================== construction from the options
def _load_state_dict(path):
    import torch

    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def tiny_weights_available(weights: str) -> bool:
    """Whether ``--tiny-weights`` can be loaded without a download: the shipped file, or a local file."""
    import romav2_plugin.weights.named as named

    if named.is_named(weights):
        try:
            named.named_path(weights)
        except FileNotFoundError:
            return False
        return True
    return Path(weights).expanduser().is_file()


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

    if name == "tiny":
        from romav2_plugin import RoMaV2

        if not tiny_weights_available(args.tiny_weights):
            raise WeightsMissingError(
                f"tiny: weights {args.tiny_weights!r} not found (the shipped romav2_plugin/assets/romav2_tiny.pt, "
                "or a file written by romav2-train --export). Pass --tiny-weights PATH."
            )
        model = RoMaV2.from_pretrained(args.tiny_weights, setting=args.tiny_setting, device=device, amp=amp)
        return RoMaV2Matcher(model, num=args.num, seed=args.seed, name="tiny")
    if name == "sift":
        return SIFTMatcher(ratio=args.sift_ratio)
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
    if name in PEERS:  # the learned sparse peers (the [peers] extra); PeersMissingError names it
        return build_peer(name, device=device)
    m = re.fullmatch(r"double(?:-shift([0-9.]+))?", name)
    if m and getattr(args, "benchmark", "synthetic") == "synthetic":
        return ShiftedHomographyDouble(float(m.group(1) or 0), num=args.num_double, seed=args.seed)
    if name == "double" and args.benchmark == "rendered3d":
        return RenderedDouble(num=args.num_double, seed=args.seed)
    if m:
        raise SystemExit(f"{name}: the ground-truth doubles exist for the synthetic and rendered3d benchmarks only")
    raise SystemExit(f"unknown matcher {name!r}")

