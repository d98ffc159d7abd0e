"""A cheap geometric check of drawn matches: do they agree with one rigid two-view geometry?

Dense matchers always return matches, also for two unrelated images (two noise images, a wide-baseline pair
the model cannot handle): the overlap the network predicts can be high while the matches are plainly wrong.
Correct matches between two views of a rigid scene satisfy an epipolar geometry (a fundamental matrix ``F``)
or, for a planar scene or a pure rotation, a homography ``H``; wrong matches agree with no such model.

:func:`check_matches` fits both robustly (RANSAC with a fixed seeded generator: normalised 8-point for ``F``,
scored by the Sampson distance; normalised 4-point DLT for ``H``, scored by the transfer error in B; a bounded
number of hypotheses, evaluated all at once in numpy; the best few refined by least-squares fits on their
inliers, LO-RANSAC style) and returns the better inlier ratio of the two (:class:`GeometryCheck`).
:func:`confident_share` is the share of the network's grid whose overlap exceeds a threshold.
:func:`unreliable_reason` turns both into a warning with the thresholds :data:`MIN_INLIER_RATIO` and
:data:`MIN_CONFIDENT_SHARE`, chosen on validation pairs by ``benchmarks/geometry_check.py`` (see
``docs/cli.md``, "Unreliable pairs").

numpy only (torch tensors are accepted as inputs); no OpenCV, no kornia.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "GeometryCheck",
    "check_matches",
    "confident_share",
    "unreliable_reason",
    "default_threshold_px",
    "MIN_INLIER_RATIO",
    "MIN_CONFIDENT_SHARE",
    "ITERATIONS",
    "SCORE_POINTS",
]

#: A pair whose best inlier ratio is below this is reported as unreliable: the one threshold of the warning
#: of ``romav2-match`` and of ``covisible`` in the kornia adapter. Chosen with romav2-tiny on the validation
#: split of ``benchmarks/geometry_check.py`` by a rule stated before the run (the largest threshold flagging at
#: most 5% of the validation pairs whose matches are right), then measured once on a held-out test split;
#: see ``docs/cli.md`` ("Unreliable pairs") and ``benchmarks/results/geometry_check_cpu.md``.
MIN_INLIER_RATIO = 0.58
#: A pair whose confident share of the grid is below this is reported as unreliable (0: not used; the rule
#: of ``benchmarks/geometry_check.py`` records the share but decides on the inlier ratio alone).
MIN_CONFIDENT_SHARE = 0.0
#: RANSAC hypotheses per model (fundamental matrix, homography).
ITERATIONS = 512
#: Local optimisation: the best hypotheses refined, and the refinement steps of each.
LO_STARTS, LO_STEPS = 3, 4
#: Hypotheses are scored on at most this many matches (a fixed seeded subset); the best one on all of them.
SCORE_POINTS = 500


@dataclass(frozen=True)
class GeometryCheck:
    """The result of :func:`check_matches`.

    ``inlier_ratio``: inliers / valid matches of the better model (NaN when undefined, see ``reason``);
    ``inliers``: their count; ``matches``: finite matches checked; ``model``: ``"fundamental"``,
    ``"homography"`` or ``"none"``; ``threshold_px``: the inlier threshold in pixels; ``ratio_F``,
    ``ratio_H``: each model's ratio; ``reason``: why the check is undefined (``""`` when it is defined).
    """

    inlier_ratio: float
    inliers: int
    matches: int
    model: str
    threshold_px: float
    ratio_F: float = float("nan")
    ratio_H: float = float("nan")
    reason: str = ""

    @property
    def defined(self) -> bool:
        return not self.reason


def _as_points(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"keypoints must have shape (N, 2), got {a.shape}")
    return a


def default_threshold_px(hw_A: tuple[int, int], hw_B: tuple[int, int]) -> float:
    """The inlier threshold for images of these sizes: 1 px up to 1024 px long side, growing in proportion
    beyond (1 px per 1024 px of the longer side of the larger image), since matches are made at a working
    resolution of a few hundred pixels whatever the image size."""
    return max(1.0, max(max(hw_A), max(hw_B)) / 1024.0)


def _normalise(p: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Hartley normalisation: centroid at 0, mean distance sqrt(2). ``None`` when the points coincide."""
    c = p.mean(axis=0)
    d = np.sqrt(((p - c) ** 2).sum(axis=1)).mean()
    if not np.isfinite(d) or d < 1e-9 * max(1.0, float(np.abs(c).max())):
        return None
    s = math.sqrt(2.0) / d
    T = np.array([[s, 0.0, -s * c[0]], [0.0, s, -s * c[1]], [0.0, 0.0, 1.0]])
    return (p - c) * s, T


def _null_vectors(A: np.ndarray) -> np.ndarray:
    """The right singular vector of the smallest singular value of each ``(..., m, 9)`` system."""
    # the eigenvector of A^T A of the smallest eigenvalue: cheaper than an SVD of each (m, 9) system
    M = np.swapaxes(A, -1, -2) @ A
    _, V = np.linalg.eigh(M)
    return V[..., :, 0]


def _fit_F(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Normalised 8-point (``a``, ``b``: ``(..., m, 2)`` normalised points, m >= 8): ``(..., 3, 3)`` rank 2."""
    x1, y1, x2, y2 = a[..., 0], a[..., 1], b[..., 0], b[..., 1]
    one = np.ones_like(x1)
    A = np.stack((x2 * x1, x2 * y1, x2, y2 * x1, y2 * y1, y2, x1, y1, one), axis=-1)
    F = _null_vectors(A).reshape(*A.shape[:-2], 3, 3)
    U, S, Vt = np.linalg.svd(F)
    S[..., 2] = 0.0
    return U @ (S[..., :, None] * Vt)


def _fit_H(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Normalised DLT (``(..., m, 2)``, m >= 4): ``(..., 3, 3)`` mapping ``a`` to ``b``."""
    x, y, u, v = a[..., 0], a[..., 1], b[..., 0], b[..., 1]
    z, one = np.zeros_like(x), np.ones_like(x)
    r1 = np.stack((x, y, one, z, z, z, -u * x, -u * y, -u), axis=-1)
    r2 = np.stack((z, z, z, x, y, one, -v * x, -v * y, -v), axis=-1)
    A = np.concatenate((r1, r2), axis=-2)
    return _null_vectors(A).reshape(*A.shape[:-2], 3, 3)


def _sampson_px(F: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """Sampson distances ``(..., N)`` in pixels of pixel-space ``F`` ``(..., 3, 3)`` at homogeneous points."""
    Fx1 = pa @ np.swapaxes(F, -1, -2)  # (..., N, 3): F x1
    Ftx2 = pb @ F  # F^T x2
    num = (pb * Fx1).sum(-1)
    den = Fx1[..., 0] ** 2 + Fx1[..., 1] ** 2 + Ftx2[..., 0] ** 2 + Ftx2[..., 1] ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.abs(num) / np.sqrt(den)
    return np.where(np.isfinite(d), d, np.inf)


def _transfer_px(H: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """``|H x_a - x_b|`` ``(..., N)`` in pixels of B."""
    q = pa @ np.swapaxes(H, -1, -2)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.hypot(q[..., 0] / q[..., 2] - pb[..., 0], q[..., 1] / q[..., 2] - pb[..., 1])
    return np.where(np.isfinite(d), d, np.inf)


def _ransac(kind: str, na: np.ndarray, nb: np.ndarray, Ta: np.ndarray, Tb: np.ndarray, pa: np.ndarray,
            pb: np.ndarray, thr: float, rng: np.random.Generator, iterations: int) -> np.ndarray:
    """Inlier mask (N,) of the best ``kind`` model (``"F"`` or ``"H"``) after one least-squares refinement."""
    n = len(na)
    m = 8 if kind == "F" else 4
    fit, dist = (_fit_F, _sampson_px) if kind == "F" else (_fit_H, _transfer_px)

    def to_px(M):  # a model of normalised points -> pixels
        return np.swapaxes(Tb, -1, -2) @ M @ Ta if kind == "F" else np.linalg.inv(Tb) @ M @ Ta

    # m distinct indices per hypothesis: argsort of uniform keys (vectorised, no replacement)
    # (with replacement for many matches: a rare repeated index only makes one hypothesis score badly)
    idx = np.argsort(rng.random((iterations, n)), axis=1)[:, :m] if n <= 256 else rng.integers(0, n, (iterations, m))
    with np.errstate(all="ignore"):
        models = to_px(fit(na[idx], nb[idx]))
        sub = rng.choice(n, size=SCORE_POINTS, replace=False) if n > SCORE_POINTS else slice(None)
        counts = (dist(models, pa[sub], pb[sub]) < thr).sum(axis=1)
        best_inl = np.zeros(n, dtype=bool)
        # local optimisation of the best few: refit on the inliers (at twice the threshold), rescore, repeat
        for k in np.argsort(-counts, kind="stable")[:LO_STARTS]:
            d = dist(models[k], pa, pb)  # the current model's distances, reused for its wider inlier set
            inl = d < thr
            for step in range(LO_STEPS):
                wide = d < 2 * thr if step else inl
                if wide.sum() < m:
                    break
                ref = to_px(fit(na[wide], nb[wide]))
                d_ref = dist(ref, pa, pb)
                inl2 = d_ref < thr
                if inl2.sum() <= inl.sum():
                    break
                models[k], inl, d = ref, inl2, d_ref
            if inl.sum() > best_inl.sum():
                best_inl = inl
    return best_inl


def check_matches(kpts_A: Any, kpts_B: Any, *, threshold_px: float = 1.0, iterations: int = ITERATIONS,
                  seed: int = 0, homography: bool = True) -> GeometryCheck:
    """Fit a fundamental matrix (and a homography when ``homography``) to the matches ``kpts_A[i] <->
    kpts_B[i]`` (pixels, ``(N, 2)`` arrays or tensors) and report the better inlier ratio.

    Deterministic for a given ``seed``. Matches with a NaN or infinite coordinate are left out (and not
    counted). Fewer than 8 finite matches, or points that all coincide in A or in B, give ``inlier_ratio =
    NaN`` and ``reason`` saying why; nothing raises for such inputs.
    """
    pa_all, pb_all = _as_points(kpts_A), _as_points(kpts_B)
    if len(pa_all) != len(pb_all):
        raise ValueError(f"kpts_A and kpts_B differ in length ({len(pa_all)} vs {len(pb_all)})")
    if not (threshold_px > 0 and math.isfinite(threshold_px)):
        raise ValueError(f"threshold_px must be a positive number of pixels, got {threshold_px}")
    ok = np.isfinite(pa_all).all(axis=1) & np.isfinite(pb_all).all(axis=1)
    a, b = pa_all[ok], pb_all[ok]
    n = len(a)
    nan = float("nan")

    def undefined(reason: str) -> GeometryCheck:
        return GeometryCheck(nan, 0, n, "none", float(threshold_px), reason=reason)

    if n < 8:
        dropped = f" ({len(pa_all) - n} with NaN/inf coordinates left out)" if n < len(pa_all) else ""
        return undefined(f"{n} finite matches{dropped}: at least 8 are needed for a fundamental matrix")
    normA, normB = _normalise(a), _normalise(b)
    if normA is None or normB is None:
        return undefined(f"the matched points of image {'A' if normA is None else 'B'} all coincide")
    (na, Ta), (nb, Tb) = normA, normB
    pa = np.concatenate((a, np.ones((n, 1))), axis=1)
    pb = np.concatenate((b, np.ones((n, 1))), axis=1)
    rng = np.random.default_rng(seed)
    inl_F = _ransac("F", na, nb, Ta, Tb, pa, pb, threshold_px, rng, iterations)
    rF = float(inl_F.mean())
    rH = nan
    best, count, model = rF, int(inl_F.sum()), "fundamental"
    if homography:
        inl_H = _ransac("H", na, nb, Ta, Tb, pa, pb, threshold_px, rng, iterations)
        rH = float(inl_H.mean())
        if rH > rF:
            best, count, model = rH, int(inl_H.sum()), "homography"
    return GeometryCheck(best, count, n, model, float(threshold_px), ratio_F=rF, ratio_H=rH)


def confident_share(*overlaps: Any, threshold: float) -> float:
    """The share of grid cells (of all the overlap maps given, e.g. A->B and B->A) whose overlap exceeds
    ``threshold``; NaN when no finite value is given."""
    vals = []
    for o in overlaps:
        if o is None:
            continue
        if hasattr(o, "detach"):
            o = o.detach().float().cpu().numpy()
        o = np.asarray(o, dtype=np.float64).ravel()
        vals.append(o[np.isfinite(o)])
    v = np.concatenate(vals) if vals else np.zeros(0)
    return float((v > threshold).mean()) if len(v) else float("nan")


def unreliable_reason(inlier_ratio: float, share: float, *, min_inlier_ratio: float = MIN_INLIER_RATIO,
                      min_confident_share: float = MIN_CONFIDENT_SHARE) -> str | None:
    """Why a pair looks unreliable (a sentence for a warning), or ``None`` when it passes. An undefined
    ratio (too few matches) is reported too."""
    why = []
    if not math.isfinite(inlier_ratio):
        why.append("the geometric check is undefined (too few or degenerate matches)")
    elif inlier_ratio < min_inlier_ratio:
        why.append(
            f"only {100 * inlier_ratio:.0f}% of the matches fit one two-view geometry (fundamental matrix or "
            f"homography; the threshold is {100 * min_inlier_ratio:.0f}%)"
        )
    if math.isfinite(share) and share < min_confident_share:
        why.append(f"only {100 * share:.0f}% of the grid is confidently covisible (< {100 * min_confident_share:.0f}%)")
    return "; ".join(why) if why else None
