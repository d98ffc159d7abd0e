"""Ground-truth warps and co-visibility, in the model's conventions.

All warps are ``(B, H, W, 2)`` in normalized ``[-1, 1]`` coordinates with ``align_corners=False``
semantics, sampled at the pixel centres of image A (:func:`romav2_plugin.geometry.normalized_grid`), and
point into image B. Co-visibility is ``(B, H, W)`` bool: the A pixel's scene point is seen by B (inside
its frame, in front of it and, for depth maps, not occluded).

Pixel coordinates inside this module follow the official / COLMAP convention (``pixel_center=0.5``: the
top-left pixel spans ``[0, 1)``); homographies and intrinsics are expressed in it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from romav2_plugin.geometry import normalized_grid, to_normalized, to_pixel

__all__ = ["warp_from_homography", "warp_from_depth", "resample_ground_truth"]


def _inside(x: torch.Tensor) -> torch.Tensor:
    return (x.abs() < 1).all(dim=-1)


def warp_from_homography(
    H_AB: torch.Tensor, hw_A: tuple[int, int], hw_B: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp of a plane seen through a homography.

    Args:
        H_AB: ``(B, 3, 3)`` mapping pixels of A to pixels of B (``pixel_center=0.5`` convention).
        hw_A, hw_B: ``(H, W)`` of A and of B.

    Returns:
        warp ``(B, H_A, W_A, 2)`` normalized, and co-visibility ``(B, H_A, W_A)``: the point lands inside B
        and in front of it (positive homogeneous scale).
    """
    Bn = H_AB.shape[0]
    (h, w), (hB, wB) = hw_A, hw_B
    dt = torch.float64
    x = to_pixel(normalized_grid(Bn, h, w, device=H_AB.device, dtype=dt), h, w, pixel_center=0.5)
    xh = torch.cat((x, torch.ones_like(x[..., :1])), dim=-1)  # (B, h, w, 3)
    y = torch.einsum("bij,bhwj->bhwi", H_AB.to(dt), xh)
    z = y[..., 2]
    front = z > 1e-12
    px = y[..., :2] / torch.where(front, z, torch.ones_like(z))[..., None]
    warp = to_normalized(px, hB, wB, pixel_center=0.5)
    return warp.float(), front & _inside(warp)


def warp_from_depth(
    depth_A: torch.Tensor,
    depth_B: torch.Tensor,
    K_A: torch.Tensor,
    K_B: torch.Tensor,
    T_AB: torch.Tensor,
    *,
    rel_depth_tol: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp from depth maps, intrinsics and the relative pose, with a depth-consistency occlusion check.

    Each pixel centre of A is lifted with its depth, moved into B's camera frame and projected. It is
    co-visible when A's depth is valid (``> 0``), the point is in front of B and inside its frame, and B's
    depth map at the landing pixel (nearest) agrees with the point's depth in B up to ``rel_depth_tol``
    (relative): otherwise something nearer occludes it in B, or B's depth is missing.

    Args:
        depth_A: ``(B, H_A, W_A)`` z-depth of A (``0``: unknown).
        depth_B: ``(B, H_B, W_B)`` z-depth of B.
        K_A, K_B: ``(B, 3, 3)`` intrinsics in pixels (``pixel_center=0.5``).
        T_AB: ``(B, 4, 4)`` rigid transform from A's camera frame to B's (``X_B = R X_A + t``).

    Returns:
        warp ``(B, H_A, W_A, 2)`` normalized, co-visibility ``(B, H_A, W_A)``.
    """
    Bn, h, w = depth_A.shape
    hB, wB = depth_B.shape[-2:]
    dt = torch.float64
    x = to_pixel(normalized_grid(Bn, h, w, device=depth_A.device, dtype=dt), h, w, pixel_center=0.5)
    xh = torch.cat((x, torch.ones_like(x[..., :1])), dim=-1)
    rays = torch.einsum("bij,bhwj->bhwi", torch.linalg.inv(K_A.to(dt)), xh)
    X_A = rays * depth_A.to(dt)[..., None]
    T = T_AB.to(dt)
    X_B = torch.einsum("bij,bhwj->bhwi", T[:, :3, :3], X_A) + T[:, None, None, :3, 3]
    z = X_B[..., 2]
    front = z > 1e-9
    proj = torch.einsum("bij,bhwj->bhwi", K_B.to(dt), X_B)
    px = proj[..., :2] / torch.where(front, z, torch.ones_like(z))[..., None]
    warp = to_normalized(px, hB, wB, pixel_center=0.5)
    inside = _inside(warp)
    # B's depth at the landing pixel (nearest pixel, no blending across depth edges)
    col = ((warp[..., 0] + 1) / 2 * wB).floor().long().clamp(0, wB - 1)
    row = ((warp[..., 1] + 1) / 2 * hB).floor().long().clamp(0, hB - 1)
    d_B = depth_B.to(dt).reshape(Bn, -1).gather(1, (row * wB + col).reshape(Bn, -1)).reshape(Bn, h, w)
    consistent = (d_B > 0) & ((d_B - z).abs() <= rel_depth_tol * d_B)
    covis = (depth_A > 0) & front & inside & consistent
    return warp.float(), covis


def resample_ground_truth(
    warp: torch.Tensor, covis: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth at another resolution of A, at that resolution's own pixel centres.

    The warp is interpolated bilinearly (``align_corners=False``), so a coarse pixel gets the match of its
    centre, not of a neighbouring fine pixel (which would bias coarse targets by half a fine pixel); a coarse
    pixel is co-visible only when every fine pixel the interpolation reads is, so warps are never blended
    across an occlusion boundary.

    Args:
        warp: ``(B, H, W, 2)``; covis: ``(B, H, W)``; size: ``(h, w)``.

    Returns:
        ``(B, h, w, 2)`` and ``(B, h, w)``.
    """
    Bn, H, W, _ = warp.shape
    h, w = size
    if (h, w) == (H, W):
        return warp, covis
    g = normalized_grid(Bn, h, w, device=warp.device, dtype=warp.dtype)
    wp = F.grid_sample(warp.permute(0, 3, 1, 2), g, mode="bilinear", align_corners=False, padding_mode="border")
    # every fine pixel touched by the bilinear footprint must be co-visible
    c = F.grid_sample(covis[:, None].to(warp.dtype), g, mode="bilinear", align_corners=False, padding_mode="border")
    inv = (~covis)[:, None].to(warp.dtype)
    touched_bad = F.grid_sample(inv, g, mode="bilinear", align_corners=False, padding_mode="border") > 0
    cv = (c[:, 0] > 0) & ~touched_bad[:, 0]
    return wp.permute(0, 2, 3, 1), cv
