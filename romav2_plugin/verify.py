"""A cheap geometric check of drawn matches: do they agree with one rigid two-view geometry?

Dense matchers always return matches, also for two unrelated images (two noise images, a wide-baseline pair
the model cannot handle): the overlap the network predicts can be high while the matches are plainly wrong.
Correct matches between two views of a rigid scene satisfy an epipolar geometry (a fundamental matrix ``F``)
or, for a planar scene or a pure rotation, a homography ``H``; wrong matches agree with no such model.

:func:`check_matches` fits both robustly (RANSAC with a fixed seeded generator: normalised 8-point for ``F``,
scored by the Sampson distance; normalised 4-point DLT for ``H``, scored by the transfer error in B) on a
seeded subset of at most :data:`FIT_POINTS` matches: :data:`ITERATIONS` minimal-sample hypotheses per model,
solved all at once in numpy, each scored on :data:`PRESCORE_POINTS` matches, the best :data:`PRESCORE_KEEP`
rescored on :data:`SCORE_POINTS`, the best :data:`LO_STARTS` refined by least-squares fits on their inliers
(LO-RANSAC); the inlier ratio of each final model is then counted on all the matches, and the better of the
two is returned (:class:`GeometryCheck`). About 12 ms for 5000 matches on this project's 2-core CPU.
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
    "FIT_POINTS",
    "PRESCORE_POINTS",
    "PRESCORE_KEEP",
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
#: RANSAC hypotheses of the fundamental matrix (the homography, whose 4-point samples are all-inlier far more
#: often, draws a third as many).
ITERATIONS = 768
#: Local optimisation: the best hypotheses refined, and the refinement steps of each.
LO_STARTS, LO_STEPS = 5, 4
#: Every hypothesis is first scored on at most this many matches (a fixed seeded subset), and the best
#: ``PRESCORE_KEEP`` of them on at most ``SCORE_POINTS``.
PRESCORE_POINTS, PRESCORE_KEEP = 100, 64
SCORE_POINTS = 300
#: Models are fitted (sampled, scored and refined) on a fixed seeded subset of at most this many matches;
#: the inlier ratio reported is that of the final model on all the matches.
FIT_POINTS = 600


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
    if A.ndim == 3 and A.shape[-2] == 8:
        # minimal samples (8 equations): fix the last entry at 1 and solve, ~10x cheaper than eigh in a batch;
        # a singular system anywhere in the batch (a repeated index) falls back to eigh for the whole batch
        try:
            x = np.linalg.solve(A[..., :8], -A[..., 8:9])[..., 0]
        except np.linalg.LinAlgError:
            pass
        else:
            v = np.concatenate((x, np.ones_like(x[..., :1])), axis=-1)
            return v / np.linalg.norm(v, axis=-1, keepdims=True)
    # the eigenvector of A^T A of the smallest eigenvalue: cheaper than an SVD of each (m, 9) system
    M = np.swapaxes(A, -1, -2) @ A
    _, V = np.linalg.eigh(M)
    return V[..., :, 0]


def _rank2(F: np.ndarray) -> np.ndarray:
    """The nearest rank-2 matrices (Frobenius) of ``(..., 3, 3)``."""
    U, S, Vt = np.linalg.svd(F)
    S[..., 2] = 0.0
    return U @ (S[..., :, None] * Vt)


def _fit_F(a: np.ndarray, b: np.ndarray, rank2: bool = True) -> np.ndarray:
    """Normalised 8-point (``a``, ``b``: ``(..., m, 2)`` normalised points, m >= 8): ``(..., 3, 3)``, rank 2
    unless ``rank2`` is false."""
    x1, y1, x2, y2 = a[..., 0], a[..., 1], b[..., 0], b[..., 1]
    one = np.ones_like(x1)
    A = np.stack((x2 * x1, x2 * y1, x2, y2 * x1, y2 * y1, y2, x1, y1, one), axis=-1)
    F = _null_vectors(A).reshape(*A.shape[:-2], 3, 3)
    return _rank2(F) if rank2 else F


def _fit_H(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Normalised DLT (``(..., m, 2)``, m >= 4): ``(..., 3, 3)`` mapping ``a`` to ``b``."""
    x, y, u, v = a[..., 0], a[..., 1], b[..., 0], b[..., 1]
    z, one = np.zeros_like(x), np.ones_like(x)
    r1 = np.stack((x, y, one, z, z, z, -u * x, -u * y, -u), axis=-1)
    r2 = np.stack((z, z, z, x, y, one, -v * x, -v * y, -v), axis=-1)
    A = np.concatenate((r1, r2), axis=-2)
    return _null_vectors(A).reshape(*A.shape[:-2], 3, 3)


def _rows_times(p: np.ndarray, M: np.ndarray) -> np.ndarray:
    """``p @ M`` for homogeneous points ``p`` ``(N, 3)`` (last column 1) and one ``(3, 3)`` or ``K``
    ``(K, 3, 3)`` matrices: ``(N, 3)`` or ``(K, N, 3)`` (a view).

    The batched case is written as broadcast multiply-adds over ``(N, 3K)``, not as a BLAS product: OpenBLAS
    runs a product that large on all its threads, whose idle spinning competes with torch's threads (in the
    matching pipeline the check took 13 ms with one BLAS thread against 15-32 ms with two). One matrix stays
    a BLAS product (small enough for one thread)."""
    if M.ndim == 2:
        return p @ M
    K = M.shape[0]
    cols = M.transpose(1, 0, 2).reshape(3, 3 * K)
    out = p[:, 0:1] * cols[0]
    out += p[:, 1:2] * cols[1]
    out += cols[2]  # p[:, 2] == 1
    return out.reshape(len(p), K, 3).transpose(1, 0, 2)


def _sampson_sq(F: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """Squared Sampson distances ``(..., N)`` in pixels² of pixel-space ``F`` ``(..., 3, 3)`` at homogeneous
    points (NaN or inf where undefined: never below a threshold)."""
    Fx1 = _rows_times(pa, np.swapaxes(F, -1, -2))  # (..., N, 3): F x1
    Ftx2 = _rows_times(pb, F)  # F^T x2
    num = pb[:, 0] * Fx1[..., 0] + pb[:, 1] * Fx1[..., 1] + Fx1[..., 2]  # x2^T F x1 (x2 homogeneous, w = 1)
    den = Fx1[..., 0] ** 2 + Fx1[..., 1] ** 2 + Ftx2[..., 0] ** 2 + Ftx2[..., 1] ** 2
    return num * num / den


def _transfer_sq(H: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """``|H x_a - x_b|²`` ``(..., N)`` in pixels² of B (NaN or inf where undefined)."""
    q = _rows_times(pa, np.swapaxes(H, -1, -2))
    w2 = q[..., 2] * q[..., 2]
    return ((q[..., 0] - pb[:, 0] * q[..., 2]) ** 2 + (q[..., 1] - pb[:, 1] * q[..., 2]) ** 2) / w2


def _distinct_samples(rng: np.random.Generator, n: int, m: int, count: int) -> np.ndarray:
    """``(count, m)`` indices in ``[0, n)``, distinct within each row."""
    if n <= 256:  # argsort of uniform keys: vectorised sampling without replacement
        return np.argsort(rng.random((count, n)), axis=1)[:, :m]
    idx = rng.integers(0, n, (count, m))
    while True:  # redraw the (few) rows with a repeated index
        s = np.sort(idx, axis=1)
        bad = (s[:, 1:] == s[:, :-1]).any(axis=1)
        if not bad.any():
            return idx
        idx[bad] = rng.integers(0, n, (int(bad.sum()), m))


def _ransac(kind: str, na: np.ndarray, nb: np.ndarray, Ta: np.ndarray, Tb: np.ndarray, pa: np.ndarray,
            pb: np.ndarray, thr: float, rng: np.random.Generator, iterations: int) -> np.ndarray | None:
    """The best ``kind`` model (``"F"`` or ``"H"``, pixels, ``(3, 3)``) after local optimisation, or ``None``."""
    n = len(na)
    m = 8 if kind == "F" else 4
    fit, dist = (_fit_F, _sampson_sq) if kind == "F" else (_fit_H, _transfer_sq)
    thr2 = thr * thr  # distances are compared squared

    def to_px(M):  # a model of normalised points -> pixels
        return np.swapaxes(Tb, -1, -2) @ M @ Ta if kind == "F" else np.linalg.inv(Tb) @ M @ Ta

    if kind == "H":  # 4-point samples are all-inlier far more often than 8-point ones: fewer suffice
        iterations = max(1, iterations // 3)
    idx = _distinct_samples(rng, n, m, iterations)
    with np.errstate(all="ignore"):
        # preemptive scoring: every hypothesis on a few matches, the most promising on more (F hypotheses
        # are scored before their rank-2 projection, which is applied to the ones kept)
        models_n = _fit_F(na[idx], nb[idx], rank2=False) if kind == "F" else fit(na[idx], nb[idx])
        pre = rng.choice(n, size=PRESCORE_POINTS, replace=False) if n > PRESCORE_POINTS else slice(None)
        counts = (dist(to_px(models_n), pa[pre], pb[pre]) < thr2).sum(axis=1)
        models_n = models_n[np.argsort(-counts, kind="stable")[:PRESCORE_KEEP]]
        models = to_px(_rank2(models_n) if kind == "F" else models_n)
        sub = rng.choice(n, size=SCORE_POINTS, replace=False) if n > SCORE_POINTS else slice(None)
        counts = (dist(models, pa[sub], pb[sub]) < thr2).sum(axis=1)
        best_inl, best = np.zeros(n, dtype=bool), None
        # local optimisation of the best few: refit on the inliers (at twice the threshold), rescore, repeat
        for k in np.argsort(-counts, kind="stable")[:LO_STARTS]:
            d = dist(models[k], pa, pb)  # the current model's distances, reused for its wider inlier set
            inl = d < thr2
            for step in range(LO_STEPS):
                wide = d < 4 * thr2 if step else inl
                if wide.sum() < m:
                    break
                ref = to_px(fit(na[wide], nb[wide]))
                d_ref = dist(ref, pa, pb)
                inl2 = d_ref < thr2
                if inl2.sum() <= inl.sum():
                    break
                models[k], inl, d = ref, inl2, d_ref
            if inl.sum() > best_inl.sum():
                best_inl, best = inl, models[k]
    return best


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
    # fit on a seeded subset (the ratio of a model barely changes with more matches; the cost does), then
    # count each final model's inliers among all the matches
    fit = np.sort(rng.choice(n, size=FIT_POINTS, replace=False)) if n > FIT_POINTS else slice(None)
    fit_args = (na[fit], nb[fit], Ta, Tb, pa[fit], pb[fit], threshold_px, rng, iterations)
    ratios, counts = {}, {}
    for kind in ("F", "H") if homography else ("F",):
        M = _ransac(kind, *fit_args)
        inl = np.zeros(n, dtype=bool) if M is None else (_sampson_sq if kind == "F" else _transfer_sq)(M, pa, pb) < threshold_px**2
        ratios[kind], counts[kind] = float(inl.mean()), int(inl.sum())
    rF, rH = ratios["F"], ratios.get("H", nan)
    best, count, model = rF, counts["F"], "fundamental"
    if homography and rH > rF:
        best, count, model = rH, counts["H"], "homography"
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
