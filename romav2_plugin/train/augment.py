"""Geometric and photometric augmentation for synthetic pairs (all randomness from a ``torch.Generator``).

Geometric: :func:`random_homography` composes a similarity (scale, rotation, translation) with a
perspective distortion of the image corners; the pair's relative homography is what the ground truth uses.
Photometric: :func:`photometric` changes brightness, contrast, saturation, per-channel gain (white
balance), gamma, adds blur and sensor noise, applied independently to A and B, so the matcher has to match
appearance changes, not copy pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["uniform", "random_homography", "photometric"]


def uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def random_homography(
    g: torch.Generator, hw: tuple[int, int], *, max_rotation_deg: float, scale_range: tuple[float, float],
    max_translation: float, max_perspective: float,
) -> torch.Tensor:
    """A random ``(3, 3)`` float64 homography acting on pixel coordinates (``pixel_center=0.5``) of an
    ``(H, W)`` image, about its centre: ``x' = C T R S P C^-1 x``.

    ``max_translation`` and ``max_perspective`` are fractions of the image size (the corners move by up
    to ``max_perspective * size`` each).
    """
    H, W = hw
    dt = torch.float64
    C = torch.tensor([[1, 0, W / 2], [0, 1, H / 2], [0, 0, 1]], dtype=dt)
    Ci = torch.linalg.inv(C)
    a = math.radians(uniform(g, -max_rotation_deg, max_rotation_deg))
    s = math.exp(uniform(g, math.log(scale_range[0]), math.log(scale_range[1])))
    tx, ty = uniform(g, -max_translation, max_translation) * W, uniform(g, -max_translation, max_translation) * H
    A = torch.tensor([[s * math.cos(a), -s * math.sin(a), tx], [s * math.sin(a), s * math.cos(a), ty], [0, 0, 1]],
                     dtype=dt)
    # perspective: move the four corners (centred coordinates) and fit the homography
    src = torch.tensor([[-W / 2, -H / 2], [W / 2, -H / 2], [W / 2, H / 2], [-W / 2, H / 2]], dtype=dt)
    jitter = (torch.rand(4, 2, generator=g, dtype=dt) * 2 - 1) * max_perspective * torch.tensor([W, H], dtype=dt)
    P = fit_homography(src, src + jitter)
    return C @ A @ P @ Ci


def fit_homography(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Homography ``(3, 3)`` mapping 4+ points ``src (N, 2)`` to ``dst (N, 2)`` (DLT, float64)."""
    rows = []
    for (x, y), (u, v) in zip(src.tolist(), dst.tolist()):
        rows.append([-x, -y, -1, 0, 0, 0, u * x, u * y, u])
        rows.append([0, 0, 0, -x, -y, -1, v * x, v * y, v])
    _, _, Vh = torch.linalg.svd(torch.tensor(rows, dtype=torch.float64))
    Hm = Vh[-1].reshape(3, 3)
    return Hm / Hm[2, 2]


def photometric(img: torch.Tensor, g: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random appearance change of ``img (3, H, W)`` in ``[0, 1]``; returns the same shape, in ``[0, 1]``."""
    k = strength
    x = img
    gray = x.mean(dim=0, keepdim=True)
    x = gray + (x - gray) * uniform(g, 1 - 0.6 * k, 1 + 0.6 * k)  # saturation
    x = x * torch.tensor([uniform(g, 1 - 0.15 * k, 1 + 0.15 * k) for _ in range(3)])[:, None, None]  # gain
    m = x.mean()
    x = m + (x - m) * uniform(g, 1 - 0.4 * k, 1 + 0.4 * k)  # contrast
    x = x + uniform(g, -0.2 * k, 0.2 * k)  # brightness
    x = x.clamp(0, 1).pow(math.exp(uniform(g, -0.4 * k, 0.4 * k)))  # gamma
    if float(torch.rand((), generator=g)) < 0.3 * k:  # blur
        sigma = uniform(g, 0.3, 1.5)
        r = max(1, int(2 * sigma))
        t = torch.arange(-r, r + 1, dtype=x.dtype)
        ker = torch.exp(-0.5 * (t / sigma) ** 2)
        ker = ker / ker.sum()
        x = F.conv2d(F.pad(x[:, None], (r, r, 0, 0), mode="replicate"), ker.view(1, 1, 1, -1))
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), ker.view(1, 1, -1, 1))[:, 0]
    x = x + torch.randn(x.shape, generator=g) * uniform(g, 0, 0.03 * k)  # noise
    return x.clamp(0, 1)


def shading(img: torch.Tensor, g: torch.Generator, depth: float) -> torch.Tensor:
    """A random smooth illumination change of ``img (3, H, W)`` in ``[0, 1]``: the image times a field in
    ``[1 - depth, 1]`` made of a linear ramp in a random direction and a soft round shadow (random centre,
    radius 0.2-0.7 of the half-size), each with a random share. Same shape, in ``[0, 1]``."""
    _, H, W = img.shape
    ys = torch.linspace(-1, 1, H, dtype=img.dtype)[:, None]
    xs = torch.linspace(-1, 1, W, dtype=img.dtype)[None, :]
    a = uniform(g, 0, 2 * math.pi)
    ramp = ((math.cos(a) * xs + math.sin(a) * ys) * 0.5 + 0.5).clamp(0, 1)
    cx, cy, r = uniform(g, -1, 1), uniform(g, -1, 1), uniform(g, 0.2, 0.7)
    blob = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * r * r))
    dark = (uniform(g, 0, 1) * ramp + uniform(g, 0, 1) * blob).clamp(0, 1)
    return (img * (1 - depth * dark)).clamp(0, 1)
