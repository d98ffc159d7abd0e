"""The torch implementations of the local correlation (CPU, and the CUDA fallback): forward by whole-pixel
gathers (:func:`_use_gathers`) or by ``grid_sample``, backward by the ``grid_sample`` adjoint,
rows in chunks under a temporaries budget. The maths and the public API: :mod:`romav2_plugin.ops.local_corr`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GATHER_MIN_RADIUS", "GATHER_R1_MIN_CHANNELS"]


def _window(radius: int, H: int, W: int, device, dtype) -> Tensor:
    """``(K, 2)`` normalized (x, y) window offsets, built exactly like the official code (float32
    ``linspace``; ``k = i * (2r + 1) + j``, x offset from ``j``, y offset from ``i``)."""
    r = radius
    ys = torch.linspace(-2 * r / H, 2 * r / H, 2 * r + 1, device=device)
    xs = torch.linspace(-2 * r / W, 2 * r / W, 2 * r + 1, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1).reshape(-1, 2).to(dtype)


def _compute_dtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _rows_per_chunk(C: int, W: int, K: int, elem: int, chunk_bytes: int) -> int:
    # per row: sampled window (C, W, K) + its product with f_A (C, W, K) + coordinates (W, K, 2)
    per_row = (2 * C + 2) * W * K * elem
    return max(1, int(chunk_bytes) // per_row)


#: smallest radius whose CPU forward always uses whole-pixel gathers (the stride-4 refiner's 3)
GATHER_MIN_RADIUS = 2
#: at radius 1 the gathers are used from this many channels on (the official stride-2 refiner's 48; tiny's 16
#: keeps grid_sample). Measured on a 2-core AMD EPYC, one thread beside a training run, gathers / grid_sample
#: at 192-400 px: C = 8 1.4-1.8x, 16 0.8-1.4x, 24 0.9-1.1x, 32 0.74x, 48 0.52-0.54x (640x640 C=48: 0.42 s vs
#: 1.45 s); at radius 3 0.3-0.9x for every C
GATHER_R1_MIN_CHANNELS = 32


def _use_gathers(radius: int, C: int) -> bool:
    return radius >= GATHER_MIN_RADIUS or (radius == 1 and C >= GATHER_R1_MIN_CHANNELS)

#: pixels whose gathered neighbours are held at once on a CPU (cache-sized: 64 x 64 x 192 x 4 bytes = 3 MiB;
#: measured on a 2-core AMD EPYC, one thread beside a training run, 320x320 C=192 r=3: 32 -> 0.71 s,
#: 64 -> 0.56 s, 128 -> 0.60 s)
_GATHER_BLOCK = 64


def _local_corr_torch(f_A: Tensor, f_B: Tensor, warp: Tensor, radius: int, chunk_bytes: int) -> Tensor:
    if _use_gathers(radius, f_A.shape[1]):
        return _local_corr_gather(f_A, f_B, warp, radius, chunk_bytes)
    return _local_corr_grid(f_A, f_B, warp, radius, chunk_bytes)


def _local_corr_grid(f_A: Tensor, f_B: Tensor, warp: Tensor, radius: int, chunk_bytes: int) -> Tensor:
    """The official ``grid_sample`` formulation, rows in chunks (the ``grid_sample`` window of a band of rows
    is its only large temporary)."""
    B, C, H, W = f_A.shape
    K = (2 * radius + 1) ** 2
    dt = _compute_dtype(f_A, f_B, warp)
    window = _window(radius, H, W, f_A.device, dt)
    out = torch.empty((B, K, H, W), device=f_A.device, dtype=dt)
    rows = _rows_per_chunk(C, W, K, torch.finfo(dt).bits // 8, chunk_bytes)
    for b in range(B):
        fb = f_B[b : b + 1].to(dt)
        for y0 in range(0, H, rows):
            y1 = min(H, y0 + rows)
            out[b : b + 1, :, y0:y1] = _corr_rows(f_A[b : b + 1, :, y0:y1], fb, warp[b : b + 1, y0:y1], window, dt)
    return out


def _local_corr_gather(f_A: Tensor, f_B: Tensor, warp: Tensor, radius: int, chunk_bytes: int) -> Tensor:
    """Whole-pixel gathers and one bilinear blend (:func:`_corr_rows_gather`), rows in chunks."""
    B, C, H, W = f_A.shape
    K = (2 * radius + 1) ** 2
    dt = _compute_dtype(f_A, f_B, warp)
    out = torch.empty((B, K, H, W), device=f_A.device, dtype=dt)
    M = (2 * radius + 2) ** 2
    # per pixel: the indices (M, int64), the products (M) and the blend's temporaries (~3 M), and on a GPU the
    # gathered neighbours (M, C) (a CPU holds those only for a block of pixels, :data:`_GATHER_BLOCK`)
    elem = torch.finfo(dt).bits // 8
    per_row = (M * 8 + 4 * M * elem + (0 if f_A.device.type == "cpu" else M * C * elem)) * W
    rows = max(1, int(chunk_bytes) // per_row)
    steps = torch.arange(-radius, radius + 2, device=f_A.device)
    for b in range(B):
        fb = f_B[b].permute(1, 2, 0).reshape(H * W, C).to(dt)  # a view for channels-last float32 features
        fa = f_A[b].permute(1, 2, 0).to(dt)  # (H, W, C), a view for the refiner's channels-last features
        for y0 in range(0, H, rows):
            y1 = min(H, y0 + rows)
            out[b, :, y0:y1] = _corr_rows_gather(fa[y0:y1], fb, warp[b, y0:y1], H, W, radius, steps)
    return out


def _corr_rows_gather(fa: Tensor, fb: Tensor, warp: Tensor, H: int, W: int, radius: int, steps: Tensor) -> Tensor:
    """Local correlation of a band of rows by whole-pixel gathers: ``fa (rows, W, C)``, ``warp (rows, W, 2)``,
    ``fb (H * W, C)`` (B's pixels); ``steps`` = ``arange(-r, r + 2)``. Returns
    ``(K, rows, W)``.

    Pixel position of the offset ``(i, j)`` sample (``align_corners=False``): ``((warp + 1) * size - 1) / 2``
    plus ``(j - r, i - r)`` whole pixels. With ``p0 = floor`` of the base position and ``t`` its fraction,
    the bilinear sample is ``sum over corners (1 - t) or t`` weights of B at ``p0 + offset + {0, 1}``, a
    zero outside the image (``padding_mode="zeros"``); so every sample is a blend of the dot products with
    the ``(2r + 2)^2`` neighbours ``p0 + steps``.
    """
    rows, W_, C = fa.shape
    n = rows * W_
    m = steps.numel()
    dt = fa.dtype
    # positions in float64 where the device has it (MPS has no float64: float32 there, as the official)
    w = warp.reshape(n, 2).to(torch.float32 if warp.device.type == "mps" else torch.float64)
    px = ((w[:, 0] + 1) * W - 1) / 2
    py = ((w[:, 1] + 1) * H - 1) / 2
    x0, y0 = px.floor(), py.floor()
    tx, ty = (px - x0).to(dt), (py - y0).to(dt)
    # clamped so that a block wholly outside the image stays wholly outside (and indices stay small)
    xs = x0.clamp(-radius - 2, W + radius).long()[:, None] + steps  # (n, m)
    ys = y0.clamp(-radius - 2, H + radius).long()[:, None] + steps
    inside = ((ys >= 0) & (ys < H))[:, :, None] & ((xs >= 0) & (xs < W))[:, None, :]
    idx = (ys.clamp(0, H - 1)[:, :, None] * W + xs.clamp(0, W - 1)[:, None, :]).reshape(n, m * m)
    fa = fa.reshape(n, C)
    dots = torch.empty((n, m * m), device=fa.device, dtype=dt)
    # the dot products with the neighbours, a few pixels at a time: on a CPU a block's gathered rows stay in
    # the cache (index_select + multiply + sum; a batched matrix-vector product and 2-D fancy indexing were
    # 3-7x slower); on a GPU the whole band at once
    block = _GATHER_BLOCK if fa.device.type == "cpu" else n
    for i in range(0, n, block):
        j = min(n, i + block)
        g = fb.index_select(0, idx[i:j].reshape(-1)).reshape(j - i, m * m, C)
        torch.sum(g.mul_(fa[i:j, None]), dim=-1, out=dots[i:j])
    dots = dots.reshape(n, m, m)
    dots = torch.where(inside, dots / C**0.5, 0.0)  # neighbours outside the image read zeros
    tx, ty = tx[:, None, None], ty[:, None, None]
    top = dots[:, :-1, :-1] + tx * (dots[:, :-1, 1:] - dots[:, :-1, :-1])
    bottom = dots[:, 1:, :-1] + tx * (dots[:, 1:, 1:] - dots[:, 1:, :-1])
    out = top + ty * (bottom - top)  # (n, 2r + 1, 2r + 1): k = i * (2r + 1) + j
    return out.reshape(rows, W_, (m - 1) ** 2).permute(2, 0, 1)


def _corr_rows(f_A: Tensor, f_B: Tensor, warp: Tensor, window: Tensor, dt: torch.dtype) -> Tensor:
    """Local correlation of a band of rows: ``f_A (B, C, rows, W)``, ``warp (B, rows, W, 2)`` against the
    whole ``f_B (B, C, H, W)`` (already ``dt``); ``window (K, 2)``. Returns ``(B, K, rows, W)``; the
    ``grid_sample`` window of the band is its only large temporary."""
    B, C, rows, W = f_A.shape
    K = window.shape[0]
    coords = (warp.to(dt)[:, :, :, None] + window).reshape(B, rows, W * K, 2)
    wf = F.grid_sample(f_B, coords, mode="bilinear", padding_mode="zeros", align_corners=False)
    prod = f_A.to(dt)[..., None] / C**0.5 * wf.reshape(B, C, rows, W, K)
    return prod.sum(dim=1).permute(0, 3, 1, 2)


def _local_corr_backward_torch(
    grad: Tensor,
    f_A: Tensor,
    f_B: Tensor,
    warp: Tensor,
    radius: int,
    chunk_bytes: int,
    need_a: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor]:
    B, C, H, W = f_A.shape
    K = (2 * radius + 1) ** 2
    dt = _compute_dtype(f_A, f_B, warp)
    window = _window(radius, H, W, f_A.device, dt)
    rows = _rows_per_chunk(C, W, K, torch.finfo(dt).bits // 8, chunk_bytes)
    scale = C**0.5
    g_A = torch.empty((B, C, H, W), device=f_A.device, dtype=dt) if need_a else None
    g_B = torch.zeros((B, C, H, W), device=f_A.device, dtype=dt) if need_b else None
    for b in range(B):
        fb = f_B[b : b + 1].to(dt)
        for y0 in range(0, H, rows):
            y1 = min(H, y0 + rows)
            n = y1 - y0
            coords = (warp[b, y0:y1, :, None].to(dt) + window).reshape(1, n, W * K, 2)
            g = grad[b, :, y0:y1].to(dt).permute(1, 2, 0)  # (n, W, K)
            if need_a:
                wf = F.grid_sample(fb, coords, mode="bilinear", padding_mode="zeros", align_corners=False)
                g_A[b, :, y0:y1] = (wf.reshape(C, n, W, K) * g).sum(dim=-1) / scale
                del wf
            if need_b:
                g_wf = (f_A[b, :, y0:y1, :, None].to(dt) / scale * g).reshape(1, C, n, W * K)
                gb, _ = torch.ops.aten.grid_sampler_2d_backward(
                    g_wf, fb, coords, 0, 0, False, [True, False]
                )  # interpolation 0 = bilinear, padding 0 = zeros, align_corners=False
                g_B[b : b + 1] += gb
                del g_wf, gb
    empty = f_A.new_empty((0,))
    return (
        g_A.to(f_A.dtype) if need_a else empty,
        g_B.to(f_B.dtype) if need_b else empty,
    )
