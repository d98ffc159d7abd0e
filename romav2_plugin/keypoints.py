"""Keypoints shared across an image's pairs, from dense matches: the step that turns pairwise matches into tracks.

A dense matcher samples new positions in every pair, so the same 3D point seen in images A, B and C shows up as
three unrelated pixels of A (one per pair): written as they are, no track spans more than two images and a
COLMAP/GLOMAP mapper registers little. Here each image gets one set of keypoints that all its pairs share: a
match lands on an existing keypoint of the image when one lies within ``max_error`` pixels, else it creates a
new keypoint, at most one per cell of a ``cell_size`` pixel grid (hloc's ``match_dense`` quantises the same
way; this is a separate implementation with incremental, append-only keypoints, so that a database written pair
by pair can be resumed: keypoint ids never change once written).

Conventions:

* Coordinates are **COLMAP pixels**: the top-left pixel's *corner* is ``(0, 0)`` and its centre ``(0.5, 0.5)``.
  ``romav2-match`` writes OpenCV pixels (centre at ``(0, 0)``): :func:`opencv_to_colmap` adds 0.5.
* Cell ``(i, j)`` covers ``[i s, (i + 1) s) x [j s, (j + 1) s)`` (``s = cell_size``), so with ``s = 1`` a
  cell is exactly one pixel.
* ``max_error <= cell_size``: a point within ``max_error`` of a keypoint is then in the keypoint's cell or one
  of its 8 neighbours, which is all that is searched.

Within one pair the points are taken in order of decreasing confidence (ties: input order), so the most
confident match of a cell places its keypoint. A point whose own cell already holds a keypoint farther than
``max_error`` is left unassigned (``-1``), as hloc drops it: one keypoint per cell.

:func:`unique_matches` then keeps, for one pair, only one-to-one matches (the most confident where several
matches share a keypoint on either side), which COLMAP expects.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

__all__ = [
    "DEFAULT_CELL_SIZE",
    "DEFAULT_MAX_ERROR",
    "opencv_to_colmap",
    "ImageKeypoints",
    "unique_matches",
]

#: Defaults measured on the rendered multi-view scene (benchmarks/results/colmap_keypoints_cpu.md).
DEFAULT_CELL_SIZE = 1.0
DEFAULT_MAX_ERROR = 1.0

_NEIGHBOURS = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]


def opencv_to_colmap(xy: np.ndarray) -> np.ndarray:
    """``(N, 2)`` OpenCV pixel coordinates (pixel centre at 0) -> COLMAP's (centre at 0.5), float64."""
    return np.asarray(xy, dtype=np.float64) + 0.5


class ImageKeypoints:
    """The keypoints of one image, grown pair by pair (ids are stable: new keypoints are appended).

    Args:
        cell_size: side of a grid cell in pixels (> 0); at most one keypoint per cell.
        max_error: largest distance in pixels (>= 0, <= ``cell_size``) from a match to the keypoint it is
            assigned to.
        keypoints: ``(M, 2)`` keypoints already written for this image (COLMAP pixels), e.g. read back from a
            database on resume; keypoints that share a cell keep their ids, the first one owns the cell.
    """

    def __init__(self, cell_size: float, max_error: float, keypoints: np.ndarray | None = None) -> None:
        if not (math.isfinite(cell_size) and cell_size > 0):
            raise ValueError(f"cell_size must be a positive number of pixels, got {cell_size}")
        if not (math.isfinite(max_error) and 0 <= max_error <= cell_size):
            raise ValueError(
                f"max_error must lie in [0, cell_size] = [0, {cell_size:g}] pixels, got {max_error}: a larger "
                "error would reach past the neighbouring cells. Raise cell_size or lower max_error."
            )
        self.cell_size = float(cell_size)
        self.max_error = float(max_error)
        self._xy: list[tuple[float, float]] = []
        self._cells: dict[tuple[int, int], int] = {}
        if keypoints is not None:
            for x, y in np.asarray(keypoints, dtype=np.float64).reshape(-1, 2):
                kid = len(self._xy)
                self._xy.append((float(x), float(y)))
                self._cells.setdefault(self._cell(x, y), kid)

    def _cell(self, x: float, y: float) -> tuple[int, int]:
        return (math.floor(x / self.cell_size), math.floor(y / self.cell_size))

    def __len__(self) -> int:
        return len(self._xy)

    @property
    def xy(self) -> np.ndarray:
        """``(M, 2)`` float64 keypoints, COLMAP pixels, in id order."""
        return np.array(self._xy, dtype=np.float64).reshape(-1, 2)

    def _assign_one(self, x: float, y: float, *, create: bool) -> int:
        cells, xy = self._cells, self._xy
        cx, cy = self._cell(x, y)
        best, best_d2 = -1, math.inf
        for dx, dy in _NEIGHBOURS:
            k = cells.get((cx + dx, cy + dy))
            if k is not None:
                kx, ky = xy[k]
                d2 = (kx - x) ** 2 + (ky - y) ** 2
                if d2 < best_d2:
                    best, best_d2 = k, d2
        if best >= 0 and best_d2 <= self.max_error**2:
            return best
        if create and (cx, cy) not in cells:
            cells[(cx, cy)] = len(xy)
            xy.append((x, y))
            return len(xy) - 1
        return -1

    def assign(self, points: np.ndarray, confidence: np.ndarray | None = None) -> np.ndarray:
        """Keypoint ids ``(N,)`` int64 of ``points (N, 2)`` (COLMAP pixels), ``-1`` where unassigned; new
        keypoints are appended. ``confidence (N,)`` orders the points (highest first); ``None``: input order. A point left
        unassigned is tried once more against the keypoints this call placed after it."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(pts).all():
            raise ValueError("points must be finite")
        order: Iterable[int]
        if confidence is None:
            order = range(len(pts))
        else:
            conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
            if len(conf) != len(pts):
                raise ValueError(f"confidence has {len(conf)} entries for {len(pts)} points")
            order = np.argsort(-conf, kind="stable").tolist()
        ids = np.full(len(pts), -1, dtype=np.int64)
        for i in order:
            ids[i] = self._assign_one(float(pts[i, 0]), float(pts[i, 1]), create=True)
        for i in np.flatnonzero(ids < 0).tolist():  # a keypoint placed later in this pair may be near enough
            ids[i] = self._assign_one(float(pts[i, 0]), float(pts[i, 1]), create=False)
        return ids


def unique_matches(ids_A: np.ndarray, ids_B: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """One-to-one matches ``(K, 2)`` uint32 from keypoint ids ``(N,)`` of both images (``-1``: unassigned).

    A match is kept when it is the most confident one of its keypoint in A *and* of its keypoint in B (ties:
    the earlier match); rows are sorted by (id in A, id in B).
    """
    ids_A = np.asarray(ids_A, dtype=np.int64).reshape(-1)
    ids_B = np.asarray(ids_B, dtype=np.int64).reshape(-1)
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    if not len(ids_A) == len(ids_B) == len(conf):
        raise ValueError(f"ids_A, ids_B, confidence have {len(ids_A)}, {len(ids_B)}, {len(conf)} entries")
    valid = np.flatnonzero((ids_A >= 0) & (ids_B >= 0))
    order = valid[np.argsort(-conf[valid], kind="stable")]  # most confident first
    _, first_A = np.unique(ids_A[order], return_index=True)
    _, first_B = np.unique(ids_B[order], return_index=True)
    keep = np.intersect1d(order[first_A], order[first_B])
    out = np.stack([ids_A[keep], ids_B[keep]], axis=1) if len(keep) else np.zeros((0, 2), np.int64)
    out = out[np.lexsort((out[:, 1], out[:, 0]))]
    return out.astype(np.uint32)
