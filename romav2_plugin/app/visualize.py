"""Pictures of a match result, with PIL and torch only (no matplotlib).

Sizes are deterministic: every panel is resized to :data:`PANEL_HEIGHT` pixels high, its width
``round(W * PANEL_HEIGHT / H)`` (see :func:`panel_size`).

* :func:`draw_matches`: A left, B right, same height; up to ``max_draw`` matches as lines with end
  points, coloured by confidence (:func:`confidence_colors`: red = low, yellow, green = high).
  Size ``(w_A + w_B, PANEL_HEIGHT)``.
* :func:`draw_warp`: as in the RoMa papers, each image next to the other one warped into its frame,
  multiplied by the overlap and blended with white where the overlap is low. Top row: A, then B warped
  into A's frame (``warp_AB``). Bottom row (only when ``warp_BA`` is given): B, then A warped into B's
  frame. Size ``(max(2 w_A, 2 w_B), PANEL_HEIGHT)`` for one row, ``(max(2 w_A, 2 w_B), 2 PANEL_HEIGHT)``
  for two; unused space is white.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

__all__ = ["PANEL_HEIGHT", "panel_size", "confidence_colors", "draw_matches", "warp_image", "draw_warp"]

PANEL_HEIGHT = 480

# (position, RGB) stops of the confidence colour map
_STOPS = np.array([0.0, 0.5, 1.0])
_COLORS = np.array([[215, 48, 39], [254, 224, 80], [26, 175, 84]], dtype=np.float64)


def panel_size(width: int, height: int, panel_height: int = PANEL_HEIGHT) -> tuple[int, int]:
    """``(w, h)`` of a panel showing a ``width x height`` image."""
    return max(1, round(width * panel_height / height)), panel_height


def confidence_colors(confidence: np.ndarray) -> np.ndarray:
    """``(N,)`` values in ``[0, 1]`` -> ``(N, 3)`` uint8 RGB: red (0) -> yellow (0.5) -> green (1)."""
    c = np.clip(np.nan_to_num(np.asarray(confidence, dtype=np.float64)), 0, 1)
    rgb = np.stack([np.interp(c, _STOPS, _COLORS[:, k]) for k in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def _resized(img: Image.Image, panel_height: int) -> Image.Image:
    return img.resize(panel_size(img.width, img.height, panel_height), Image.Resampling.LANCZOS)


def draw_matches(
    img_A: Image.Image,
    img_B: Image.Image,
    kpts_A: np.ndarray,
    kpts_B: np.ndarray,
    confidence: np.ndarray,
    *,
    max_draw: int = 300,
    panel_height: int = PANEL_HEIGHT,
    seed: int = 0,
) -> Image.Image:
    """Side-by-side picture of matches.

    Args:
        kpts_A, kpts_B: ``(N, 2)`` pixel coordinates in the ORIGINAL images, OpenCV convention (top-left
            pixel centre at (0, 0)).
        confidence: ``(N,)`` in ``[0, 1]``; the colour of each line.
        max_draw: at most this many matches are drawn (a seeded random subset; highest confidence drawn last).
    """
    pa, pb = _resized(img_A.convert("RGB"), panel_height), _resized(img_B.convert("RGB"), panel_height)
    canvas = Image.new("RGB", (pa.width + pb.width, panel_height), "white")
    canvas.paste(pa, (0, 0))
    canvas.paste(pb, (pa.width, 0))
    kpts_A, kpts_B = np.asarray(kpts_A, dtype=np.float64), np.asarray(kpts_B, dtype=np.float64)
    confidence = np.asarray(confidence, dtype=np.float64)
    n = len(kpts_A)
    if n == 0 or max_draw <= 0:
        return canvas
    idx = np.arange(n)
    if n > max_draw:
        idx = np.random.default_rng(seed).choice(n, size=max_draw, replace=False)
    idx = idx[np.argsort(np.nan_to_num(confidence[idx]), kind="stable")]
    # pixel centres scale with (x + 0.5) * s - 0.5 between resolutions
    sa = (pa.width / img_A.width, pa.height / img_A.height)
    sb = (pb.width / img_B.width, pb.height / img_B.height)
    xa = (kpts_A[idx, 0] + 0.5) * sa[0] - 0.5
    ya = (kpts_A[idx, 1] + 0.5) * sa[1] - 0.5
    xb = (kpts_B[idx, 0] + 0.5) * sb[0] - 0.5 + pa.width
    yb = (kpts_B[idx, 1] + 0.5) * sb[1] - 0.5
    colors = confidence_colors(confidence[idx])
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    r = 2
    for x0, y0, x1, y1, col in zip(xa, ya, xb, yb, colors):
        c = (int(col[0]), int(col[1]), int(col[2]), 120)
        draw.line((x0, y0, x1, y1), fill=c, width=1)
        for x, y in ((x0, y0), (x1, y1)):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=c[:3] + (255,))
    out = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")
    return out


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def warp_image(
    src: Image.Image, warp: torch.Tensor, overlap: torch.Tensor, size: tuple[int, int]
) -> Image.Image:
    """``src`` sampled at ``warp`` (``(h, w, 2)`` normalized, the target image's grid -> ``src``), shown at
    ``size = (w, h)``, multiplied by ``overlap`` (``(h, w)`` or ``(h, w, 1)``) and blended with white."""
    W, H = size
    warp = warp.detach().float().cpu().reshape(1, *warp.shape[-3:-1], 2)
    overlap = overlap.detach().float().cpu().reshape(1, 1, *warp.shape[1:3])
    # upsample the warp (normalized coordinates are resolution independent) and the overlap to the panel
    grid = F.interpolate(warp.permute(0, 3, 1, 2), size=(H, W), mode="bilinear", align_corners=False).permute(
        0, 2, 3, 1
    )
    ov = F.interpolate(overlap, size=(H, W), mode="bilinear", align_corners=False).clamp(0, 1)
    # sample from src shown at about the panel scale (antialiased), not the full-size image
    s = src.convert("RGB")
    if s.height > 2 * H:
        s = s.resize(panel_size(s.width, s.height, 2 * H), Image.Resampling.LANCZOS)
    x = F.grid_sample(_to_tensor(s), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = (grid.abs() <= 1).all(dim=-1)[:, None].float()
    ov = ov * inside
    out = ov * x + (1 - ov) * torch.ones_like(x)
    arr = (out[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(arr)


def draw_warp(
    img_A: Image.Image,
    img_B: Image.Image,
    warp_AB: torch.Tensor,
    overlap_AB: torch.Tensor,
    warp_BA: torch.Tensor | None = None,
    overlap_BA: torch.Tensor | None = None,
    *,
    panel_height: int = PANEL_HEIGHT,
) -> Image.Image:
    """Warp picture (see the module docstring). ``warp_* (h, w, 2)`` / ``(1, h, w, 2)``, ``overlap_* (h, w[, 1])``."""
    sa = panel_size(img_A.width, img_A.height, panel_height)
    sb = panel_size(img_B.width, img_B.height, panel_height)
    rows = [(_resized(img_A.convert("RGB"), panel_height), warp_image(img_B, warp_AB, overlap_AB, sa))]
    if warp_BA is not None and overlap_BA is not None:
        rows.append(
            (_resized(img_B.convert("RGB"), panel_height), warp_image(img_A, warp_BA, overlap_BA, sb))
        )
    width = max(2 * sa[0], 2 * sb[0])
    canvas = Image.new("RGB", (width, panel_height * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    labels = (("A", "B warped into A"), ("B", "A warped into B"))
    for r, (left, right) in enumerate(rows):
        y = r * panel_height
        canvas.paste(left, (0, y))
        canvas.paste(right, (left.width, y))
        for x, text in ((0, labels[r][0]), (left.width, labels[r][1])):
            box = draw.textbbox((x + 6, y + 6), text)
            draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill="white")
            draw.text((x + 6, y + 6), text, fill="black")
    return canvas
