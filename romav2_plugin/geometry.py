"""Coordinate grids, conversions and precision matrices.

Conventions (used everywhere in this package):

* Warps and matches are in **normalized coordinates** ``[-1, 1]``, ``(x, y)`` order, with
  ``align_corners=False`` semantics: ``-1`` is the left edge of the left-most pixel, ``+1`` the right
  edge of the right-most one, so the centre of pixel column ``j`` of a width-``W`` image is at
  ``(2 j + 1) / W - 1``.
* Pixel coordinates carry an explicit ``pixel_center``: ``0.5`` (the official RoMa v2 / COLMAP
  convention: the top-left pixel spans ``[0, 1)`` and its centre is ``(0.5, 0.5)``) or ``0.0`` (the
  OpenCV / kornia / hloc convention: the top-left pixel's centre is ``(0, 0)``). The two differ by
  exactly half a pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "normalized_grid",
    "to_pixel",
    "to_normalized",
    "bhwc_grid_sample",
    "bhwc_interpolate",
    "precision_matrix",
    "largest_sigma",
]


def normalized_grid(
    B: int, H: int, W: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Pixel-centre grid in normalized coordinates.

    Returns:
        ``(B, H, W, 2)`` with ``[..., 0] = x`` and ``[..., 1] = y`` in ``[-1 + 1/W, 1 - 1/W]`` resp.
        ``[-1 + 1/H, 1 - 1/H]``.
    """
    ys = torch.linspace(-1 + 1 / H, 1 - 1 / H, H, device=device, dtype=dtype)
    xs = torch.linspace(-1 + 1 / W, 1 - 1 / W, W, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1)[None].expand(B, H, W, 2)


def to_pixel(x: torch.Tensor, H: int, W: int, *, pixel_center: float = 0.5) -> torch.Tensor:
    """Normalized ``(..., 2)`` coordinates to pixels of a ``H x W`` image.

    ``pixel_center=0.5`` gives the official RoMa v2 convention, ``0.0`` the OpenCV/kornia one.
    """
    return torch.stack(
        ((x[..., 0] + 1) / 2 * W - 0.5 + pixel_center, (x[..., 1] + 1) / 2 * H - 0.5 + pixel_center), dim=-1
    )


def to_normalized(x: torch.Tensor, H: int, W: int, *, pixel_center: float = 0.5) -> torch.Tensor:
    """Inverse of :func:`to_pixel`: pixels ``(..., 2)`` of a ``H x W`` image to normalized coordinates."""
    return torch.stack(
        (2 * (x[..., 0] + 0.5 - pixel_center) / W - 1, 2 * (x[..., 1] + 0.5 - pixel_center) / H - 1), dim=-1
    )


def bhwc_grid_sample(
    x: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", align_corners: bool = False
) -> torch.Tensor:
    """``grid_sample`` for channels-last maps: ``x (B, H, W, C)``, ``grid (B, h, w, 2)`` -> ``(B, h, w, C)``."""
    return F.grid_sample(x.permute(0, 3, 1, 2), grid, mode=mode, align_corners=align_corners).permute(0, 2, 3, 1)


def bhwc_interpolate(
    x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear", align_corners: bool | None = False
) -> torch.Tensor:
    """``interpolate`` for channels-last maps: ``(B, H, W, C)`` -> ``(B, *size, C)``."""
    return F.interpolate(x.permute(0, 3, 1, 2), size=size, mode=mode, align_corners=align_corners).permute(
        0, 2, 3, 1
    )


def precision_matrix(p: torch.Tensor) -> torch.Tensor:
    """Symmetric 2x2 precision matrices from their three parameters.

    Args:
        p: ``(..., 3)`` holding ``(P00, P10, P11)``.

    Returns:
        ``(..., 2, 2)``.
    """
    row0 = torch.stack((p[..., 0], p[..., 1]), dim=-1)
    row1 = torch.stack((p[..., 1], p[..., 2]), dim=-1)
    return torch.stack((row0, row1), dim=-2)


def largest_sigma(precision: torch.Tensor) -> torch.Tensor:
    """Standard deviation along the least certain direction of symmetric 2x2 precision matrices.

    ``1 / sqrt(smallest eigenvalue)``, in the units of the precision (pixels of the prediction grid for
    RoMa v2's refiners); ``inf`` where the matrix is not positive definite, NaN where it is NaN.

    Args:
        precision: ``(..., 2, 2)``.

    Returns:
        ``(...)``, the input's dtype (computed in float64).
    """
    a, b, c = (precision[..., i, j].double() for i, j in ((0, 0), (0, 1), (1, 1)))
    lam_min = (a + c) / 2 - torch.sqrt(((a - c) / 2) ** 2 + b * b)
    sigma = torch.where(lam_min > 0, lam_min.clamp_min(1e-300).rsqrt(), torch.full_like(lam_min, float("inf")))
    return sigma.where(~lam_min.isnan(), lam_min).to(precision.dtype)


def similarity_fit(src, dst):
    """Least-squares similarity ``dst ~ s R src + t`` of two ``(N, 3)`` point sets (Umeyama 1991): ``(s, R, t)``
    as a float, a ``(3, 3)`` rotation and a ``(3,)`` translation, NumPy. Aligns a reconstruction, whose frame and
    scale are arbitrary, to known camera centres before comparing them."""
    import numpy as np

    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    U, S, Vt = np.linalg.svd(b.T @ a / len(src))
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    R = U @ D @ Vt
    s = float(np.trace(np.diag(S) @ D) / (a**2).sum(1).mean())
    return s, R, mu_d - s * R @ mu_s
