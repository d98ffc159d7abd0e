"""Metric functions of the accuracy benchmarks: pose AUC, angular pose errors, essential-matrix and
homography RANSAC, homography corner error and match precision. numpy (and OpenCV where stated) only."""

from __future__ import annotations

import numpy as np

__all__ = [
    "pose_auc", "angle_error_mat", "angle_error_vec", "relative_pose_error", "estimate_pose", "pose_threshold",
    "apply_homography", "corners", "homography_corner_error", "match_precision", "dlt_homography",
    "estimate_homography",
]


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


def pose_threshold(K_A: np.ndarray, K_B: np.ndarray, px: float = 0.5) -> float:
    """RANSAC threshold of :func:`estimate_pose` in normalised image coordinates for about ``px`` pixels
    (the RoMa / LoFTR protocols' ``0.5 / (mean|K_A[:2, :2]| + mean|K_B[:2, :2]|)`` for ``px = 0.5``)."""
    return px / (np.mean(np.abs(K_A[:2, :2])) + np.mean(np.abs(K_B[:2, :2])))


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
    """Fraction of the *matches* of one pair whose B keypoint lies within ``thresh`` px of ``H_gt`` applied to
    the A keypoint (0 for no matches). The benchmark's ``precision@3px`` is the mean of this over the pairs."""
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

