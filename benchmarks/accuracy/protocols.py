"""The evaluation loops of the accuracy benchmarks: synthetic homographies, rendered 3D pairs, relative pose
(MegaDepth-1500 / ScanNet-1500), HPatches and WxBS. Each returns one result row (a dict) per matcher."""

from __future__ import annotations

import sys
import time

import numpy as np

from benchmarks._common import load_rgb
from benchmarks.accuracy.data import (
    DATA_HELP,
    DataMissingError,
    PosePair,
    RenderedPair,
    SyntheticPair,
    hpatches_pairs,
)
from benchmarks.accuracy.matchers import Matcher
from benchmarks.accuracy.metrics import (
    estimate_homography,
    estimate_pose,
    homography_corner_error,
    match_precision,
    pose_auc,
    pose_threshold,
    relative_pose_error,
)

__all__ = ["evaluate_synthetic", "run_synthetic", "evaluate_rendered3d", "run_rendered3d", "evaluate_pose",
           "pose_errors", "evaluate_hpatches", "evaluate_wxbs"]


def _match(matcher, pair):
    """Match one benchmark pair; ground-truth doubles are told the pair first."""
    if hasattr(matcher, "set_pair"):
        matcher.set_pair(pair)
    return matcher.match_pair(pair.img_A, pair.img_B)


# ====================================================================== synthetic homographies
def evaluate_synthetic(matcher: Matcher, pairs: list[SyntheticPair], *, px_thresh: float = 3.0,
                       ransac_thresh: float = 3.0, thresholds=(3, 5, 10)) -> dict:
    """Homography AUC of the mean corner error of a RANSAC homography from the matches (numpy 4-point DLT,
    :func:`~benchmarks.accuracy.metrics.estimate_homography`, ``ransac_thresh`` px), its median, and
    ``precision@3px``: the fraction of a pair's *matches* within ``px_thresh`` px of the ground truth,
    averaged over the pairs."""
    errs, precs, nums, per_pair = [], [], [], []
    t0 = time.perf_counter()
    for i, p in enumerate(pairs):
        kA, kB, _ = _match(matcher, p)
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


def run_synthetic(matchers: dict[str, Matcher], pairs: list[SyntheticPair], **kw) -> list[dict]:
    out = []
    for name, m in matchers.items():
        print(f"[accuracy] synthetic: {name} on {len(pairs)} pairs ...", file=sys.stderr, flush=True)
        r = evaluate_synthetic(m, pairs, **kw)
        r["matcher"] = name
        out.append(r)
    return out


# ====================================================================== relative pose
def _resample(matcher, kA, kB, draw: int, rng):
    if draw > 0 and hasattr(matcher, "resample"):
        kA, kB, _ = matcher.resample()
    perm = rng.permutation(len(kA))
    return kA[perm], kB[perm]


def pose_errors(matcher, kA, kB, K_A, K_B, R, t, *, draws: int, rng, scale_A: float = 1.0,
                scale_B: float = 1.0) -> list[float]:
    """``max(rotation error, translation angle error)`` in degrees for ``draws`` RANSAC runs on the matches
    (OpenCV pixels; used at ``(k + 0.5) * scale`` with ``K`` in COLMAP's convention); 90 for a failure.
    Draws after the first use a fresh sample of the matcher's last prediction when it has ``resample()``,
    else the same matches in another order."""
    thresh = pose_threshold(K_A, K_B)
    errs = []
    for d in range(draws):
        a, b = _resample(matcher, kA, kB, d, rng)
        try:
            res = estimate_pose((a + 0.5) * scale_A, (b + 0.5) * scale_B, K_A, K_B, thresh)
        except Exception:  # degenerate input: counted as a failure, as in the reference protocols
            res = None
        if res is None:
            errs.append(90.0)
            continue
        e_t, e_R = relative_pose_error(R, t, res[0], res[1])
        errs.append(max(e_t, e_R))
    return errs


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
        errs += pose_errors(matcher, kA, kB, K_A, K_B, pp.R, pp.t, draws=draws, rng=rng, scale_A=sA, scale_B=sB)
    auc = pose_auc(errs, thresholds)
    return {"matcher": matcher.name, **{f"auc@{t}": a for t, a in zip(thresholds, auc)},
            "pairs": len(errs) // draws, "draws": draws}


# ====================================================================== rendered 3D pairs
def evaluate_rendered3d(matcher: Matcher, pairs: list[RenderedPair], *, draws: int = 5,
                        thresholds=(5, 10, 20), seed: int = 0) -> dict:
    """Relative pose AUC@5/10/20 degrees on rendered pairs, as MegaDepth-1500 reports it: essential-matrix
    RANSAC (``cv2.findEssentialMat`` + ``recoverPose``, the known intrinsics, 0.5 px threshold), error
    ``max(rotation, translation direction)`` per draw, failures counted as 90 degrees."""
    rng = np.random.default_rng(seed)
    errs, nums, per_pair = [], [], []
    t0 = time.perf_counter()
    for p in pairs:
        kA, kB, _ = _match(matcher, p)
        e = pose_errors(matcher, kA, kB, p.K_A, p.K_B, p.R, p.t, draws=draws, rng=rng)
        errs += e
        nums.append(len(kA))
        per_pair.append({"pair": p.name, "n_matches": len(kA), "pose_error_deg": float(np.median(e)),
                         "covisible": p.covisible})
    auc = pose_auc(errs, thresholds)
    return {
        "matcher": matcher.name,
        **{f"auc@{t}": a for t, a in zip(thresholds, auc)},
        "median_pose_error_deg": float(np.median(errs)),
        "failures": int(sum(x >= 90.0 for x in errs)),
        "mean_matches": float(np.mean(nums)),
        "pairs": len(pairs),
        "draws": draws,
        "seconds": time.perf_counter() - t0,
        "per_pair": per_pair,
    }


def run_rendered3d(matchers: dict[str, Matcher], pairs: list[RenderedPair], **kw) -> list[dict]:
    out = []
    for name, m in matchers.items():
        print(f"[accuracy] rendered3d: {name} on {len(pairs)} pairs ...", file=sys.stderr, flush=True)
        r = evaluate_rendered3d(m, pairs, **kw)
        r["matcher"] = name
        out.append(r)
    return out


# ====================================================================== HPatches, WxBS
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

