"""Matching post-processing shared by the model, the test doubles and the export path.

Everything after the network: resizing an input to a working resolution, turning raw confidences into
overlap and precision, enumerating the grid matches of a prediction, KDE-balanced sampling of them and
threshold selection. :class:`~romav2_plugin.RoMaV2`'s ``sample`` / ``grid_matches`` call these; a runtime
(ONNX) or a network double that produces ``match()``-style predictions can call them directly.

Predictions (``preds``) are dicts as returned by :meth:`RoMaV2.match`: ``warp_AB (B, H, W, 2)`` normalized
``[-1, 1]``, ``overlap_AB (B, H, W, 1)``, ``precision_AB (B, H, W, 2, 2)`` (optional) and the ``_BA`` ones
(``None`` in one-directional settings).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from romav2_plugin.geometry import bhwc_grid_sample, largest_sigma, normalized_grid, precision_matrix
from romav2_plugin.sampling import balanced_sample, resolve_generator

__all__ = ["resize_image", "map_confidence", "candidates", "sample_matches", "precise_candidates", "grid_matches"]


def resize_image(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """``(B, 3, h, w)`` -> ``(B, 3, H, W)``: bicubic, antialiased, ``align_corners=False`` (as the official code)."""
    return F.interpolate(x, size=(H, W), mode="bicubic", align_corners=False, antialias=True)


def map_confidence(confidence: torch.Tensor, threshold: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, H, W, 4)`` raw confidence -> overlap ``(B, H, W, 1)`` in ``[0, 1]`` and precision ``(B, H, W, 2, 2)``.

    ``threshold``: overlaps above it are set to 1 (the benchmark settings), ``None``: kept as they are.
    """
    overlap = confidence[..., :1].sigmoid()
    if threshold is not None:
        overlap = torch.where(overlap > threshold, torch.ones_like(overlap), overlap)
    return overlap, precision_matrix(confidence[..., 1:4])


def candidates(preds: Mapping[str, Any], batch_index: int = 0):
    """All grid matches of one batch element.

    Returns:
        matches ``(N, 4)`` normalized ``(x_A, y_A, x_B, y_B)``, their overlap ``(N,)``, precisions
        ``(N, 2, 2, 2)`` (A side, B side; NaN where not predicted) or ``None``, and the grid height ``H``.
        Bidirectional predictions give both grids (A's, then B's).
    """
    warp = preds["warp_AB"][batch_index]
    H, W, _ = warp.shape
    overlap_AB = preds["overlap_AB"][batch_index].reshape(-1)
    prec_AB = preds.get("precision_AB")
    prec_AB = prec_AB[batch_index] if prec_AB is not None else None
    grid = normalized_grid(1, H, W, device=warp.device)[0]
    matches = torch.cat((grid, warp), dim=-1).reshape(-1, 4)
    warp_BA = preds.get("warp_BA")
    if warp_BA is None:
        precision = None
        if prec_AB is not None:
            # A-side precision is not predicted in one direction: NaN marks it unknown.
            precision = torch.stack((torch.full_like(prec_AB, float("nan")), prec_AB), dim=-3).reshape(-1, 2, 2, 2)
        return matches, overlap_AB, precision, H
    warp_BA = warp_BA[batch_index]
    if warp_BA.shape != warp.shape:
        raise ValueError("warp_AB and warp_BA must have the same shape")
    overlap_BA = preds["overlap_BA"][batch_index].reshape(-1)
    prec_BA = preds.get("precision_BA")
    precision = None
    if prec_AB is not None and prec_BA is not None:
        prec_BA = prec_BA[batch_index]
        prec_A = bhwc_grid_sample(prec_BA.reshape(1, H, W, 4), warp[None]).reshape(H, W, 2, 2)
        prec_B = bhwc_grid_sample(prec_AB.reshape(1, H, W, 4), warp_BA[None]).reshape(H, W, 2, 2)
        fwd = torch.stack((prec_A, prec_AB), dim=-3).reshape(-1, 2, 2, 2)
        bwd = torch.stack((prec_BA, prec_B), dim=-3).reshape(-1, 2, 2, 2)
        precision = torch.cat((fwd, bwd))
    matches = torch.cat((matches, torch.cat((warp_BA, grid), dim=-1).reshape(-1, 4)))
    return matches, torch.cat((overlap_AB, overlap_BA)), precision, H


def sample_matches(
    preds: Mapping[str, Any],
    num: int,
    *,
    batch_index: int = 0,
    generator: torch.Generator | int | None = None,
    min_overlap: float | None = None,
    balanced: bool = True,
    half_precision_kde: bool = True,
    precise_fraction: float = 1.0,
    grid_kde: bool = False,
):
    """Sample up to ``num`` matches (see :meth:`romav2_plugin.RoMaV2.sample`, which this implements).

    ``precise_fraction < 1`` draws only from that fraction of the grid's candidates with the smallest
    predicted uncertainty (:func:`precise_candidates`); ``grid_kde`` approximates the density on a grid
    (:func:`romav2_plugin.sampling.kde_density_grid`).

    Returns:
        matches ``(N, 4)``, overlap ``(N,)``, A-side and B-side precision ``(N, 2, 2)`` (``None`` when absent).
    """
    if not 0.0 < precise_fraction <= 1.0:
        raise ValueError(f"precise_fraction must be in (0, 1], got {precise_fraction}")
    matches, confidence, precision, H = candidates(preds, batch_index)
    confidence = confidence * matches.abs().amax(dim=-1).le(1 - 1 / H).float()
    if precise_fraction < 1.0:
        confidence = confidence * precise_candidates(precision, precise_fraction).to(confidence.dtype)
    if min_overlap is not None:
        confidence = torch.where(confidence > min_overlap, confidence, torch.zeros_like(confidence))
    g = resolve_generator(generator, confidence.device)
    m, c, p = balanced_sample(
        matches, confidence, num, extras=precision, balanced=balanced, half_precision_kde=half_precision_kde,
        grid_kde=grid_kde, generator=g,
    )
    if p is None:
        return m, c, None, None
    return m, c, p[:, 0], p[:, 1]


def precise_candidates(precision: torch.Tensor | None, fraction: float) -> torch.Tensor:
    """Which candidates are in the ``fraction`` with the smallest predicted uncertainty.

    A candidate's uncertainty is :func:`~romav2_plugin.geometry.largest_sigma` of its predicted precision
    (the larger of its two sides where both are predicted; NaN sides are unknown and left out). The cut is
    the ``ceil(fraction * n)``-th smallest of the ``n`` finite values; ties at the cut are kept.

    Args:
        precision: ``(N, 2, 2, 2)`` (A side, B side) from :func:`candidates`.
        fraction: in ``(0, 1]``.

    Returns:
        ``(N,)`` bool.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"precise_fraction must be in (0, 1], got {fraction}")
    if precision is None:
        raise ValueError(
            "precise_fraction < 1 needs the predicted precisions (precision_AB in the predictions), which "
            "these predictions lack; set model.precise_fraction = 1.0 to sample by overlap alone")
    # (N,): the larger side (fmax skips a NaN side); both sides unknown -> inf
    side = largest_sigma(precision)
    sigma = torch.fmax(side[:, 0], side[:, 1]).nan_to_num(nan=float("inf"), posinf=float("inf"))
    finite = sigma[torch.isfinite(sigma)]
    if finite.numel() == 0:
        return torch.zeros_like(sigma, dtype=torch.bool)
    k = max(1, min(finite.numel(), math.ceil(fraction * finite.numel())))
    cut = finite.kthvalue(k).values
    return sigma <= cut


def grid_matches(preds: Mapping[str, Any], threshold: float, *, batch_index: int = 0):
    """Every grid match whose overlap exceeds ``threshold``; same returns as :func:`sample_matches`."""
    matches, confidence, precision, H = candidates(preds, batch_index)
    inside = matches.abs().amax(dim=-1).le(1 - 1 / H)
    keep = (confidence > threshold) & inside
    if precision is None:
        return matches[keep], confidence[keep], None, None
    return matches[keep], confidence[keep], precision[keep][:, 0], precision[keep][:, 1]
