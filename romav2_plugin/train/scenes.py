"""Rendered 3D scenes with exact depth and poses: textured rectangles (a floor, walls, boxes) ray-cast.

The one scene renderer of the project: used for training pairs with parallax and occlusions
(:class:`romav2_plugin.train.data.RenderedPairs`), and by the tests' and the held-out benchmark's fixed scene
(``tests/synthetic_scene.py``: faces textured once with :func:`noise_texture`). Cameras are pinhole cameras in COLMAP's convention: ``x = K (R X + t)``,
pixel centres at ``+0.5`` (the top-left pixel spans ``[0, 1)``), ``R`` world-to-camera, the camera looks
along its ``+z`` axis with ``y`` pointing down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from romav2_plugin.train.augment import uniform

__all__ = ["Rect", "Camera", "Scene", "noise_texture", "relative_pose", "random_scene", "random_camera_pair"]


@dataclass(frozen=True)
class Rect:
    """The rectangle ``origin + a u + b v`` (``a, b`` in ``[0, 1]``) textured with ``texture``
    ``(3, h, w)`` in ``[0, 1]`` (``a`` along the texture's width, repeated every ``tile`` units), shaded by
    ``shade``. ``tile=None``: the texture spans the face once (within half a texel of the face's edges it
    blends with black, ``grid_sample``'s zero padding)."""

    origin: tuple[float, float, float]
    u: tuple[float, float, float]
    v: tuple[float, float, float]
    texture: torch.Tensor
    shade: float = 1.0
    tile: float | None = 2.5  # the texture repeats every ``tile`` scene units

    @property
    def size(self) -> tuple[float, float]:
        return math.dist((0, 0, 0), self.u), math.dist((0, 0, 0), self.v)


@dataclass(frozen=True)
class Camera:
    """``R (3, 3)`` world-to-camera, ``C (3,)`` centre (float64), ``K (3, 3)``, image ``(height, width)``."""

    R: torch.Tensor
    C: torch.Tensor
    K: torch.Tensor
    height: int
    width: int

    @property
    def t(self) -> torch.Tensor:
        return -self.R @ self.C

    @staticmethod
    def look_at(C, target, f: float, height: int, width: int, roll_deg: float = 0.0) -> Camera:
        dt = torch.float64
        C, target = torch.as_tensor(C, dtype=dt), torch.as_tensor(target, dtype=dt)
        z = target - C
        z = z / z.norm()
        up = torch.tensor([0.0, 0.0, 1.0], dtype=dt)
        x = torch.linalg.cross(z, up)
        x = x / x.norm()
        y = torch.linalg.cross(z, x)
        R = torch.stack((x, y, z))
        if roll_deg:
            a = math.radians(roll_deg)
            Rz = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]], dtype=dt)
            R = Rz @ R
        K = torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], dtype=dt)
        return Camera(R, C, K, height, width)


def relative_pose(cam_A: Camera, cam_B: Camera) -> torch.Tensor:
    """``(4, 4)`` transform from A's camera frame to B's."""
    R = cam_B.R @ cam_A.R.T
    t = cam_B.t - R @ cam_A.t
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3], T[:3, 3] = R, t
    return T


class Scene:
    """Textured rectangles; :meth:`render` gives an image and its z-depth for a camera."""

    def __init__(self, rects: list[Rect]) -> None:
        self.rects = rects
        dt = torch.float64
        self.o = torch.tensor([r.origin for r in rects], dtype=dt)
        self.u = torch.tensor([r.u for r in rects], dtype=dt)
        self.v = torch.tensor([r.v for r in rects], dtype=dt)
        self.n = torch.linalg.cross(self.u, self.v)

    def cast(self, origin: torch.Tensor, dirs: torch.Tensor):
        """Nearest hit of rays ``origin + t dirs (N, 3)``: ``t (N,)`` (inf: none), face ``(N,)`` (-1), ``ab (N, 2)``.

        Every quantity is an ``(N, F)`` product of ``(N, 3) @ (3, F)`` matrices (no ``(N, F, 3)``
        intermediates): with ``off = o - origin``, the hit ``P = origin + t d`` of face ``(o, u, v)`` has
        ``(P - o) . u = t (d . u) - off . u``."""
        with torch.no_grad():
            denom = dirs @ self.n.T
            valid = denom.abs() > 1e-12
            off = self.o - origin
            t = (off * self.n).sum(-1) / torch.where(valid, denom, torch.full_like(denom, 1e-12))
            a = (t * (dirs @ self.u.T) - (off * self.u).sum(-1)) / (self.u * self.u).sum(-1)
            b = (t * (dirs @ self.v.T) - (off * self.v).sum(-1)) / (self.v * self.v).sum(-1)
            ok = valid & (t > 1e-6) & (a >= 0) & (a <= 1) & (b >= 0) & (b <= 1)
            t = torch.where(ok, t, torch.full_like(t, math.inf))
            t_min, face = t.min(dim=1)
            hit = torch.isfinite(t_min)
            ab = torch.stack((a.gather(1, face[:, None])[:, 0], b.gather(1, face[:, None])[:, 0]), -1)
        return t_min, torch.where(hit, face, torch.full_like(face, -1)), ab

    def rays(self, cam: Camera, px: torch.Tensor) -> torch.Tensor:
        """World-frame ray directions ``(N, 3)`` through pixels ``px (N, 2)`` (COLMAP's convention), scaled so
        that ``t`` along them is the z-depth."""
        xh = torch.cat((px, torch.ones_like(px[:, :1])), dim=-1)
        d_cam = xh @ torch.linalg.inv(cam.K).T  # z = 1: t along it is the z-depth
        return d_cam @ cam.R  # R^T d

    def _shade(self, face: torch.Tensor, ab: torch.Tensor, background: float) -> torch.Tensor:
        out = torch.full((face.shape[0], 3), background, dtype=torch.float32)
        for i, r in enumerate(self.rects):
            m = face == i
            if not m.any():
                continue
            if r.tile is None:  # once across the face
                grid = (ab[m] * 2 - 1).float()[None, None]
                col = F.grid_sample(r.texture[None], grid, mode="bilinear", align_corners=False)
                out[m] = col[0, :, 0].T * r.shade
                continue
            reps = torch.tensor((max(1.0, r.size[0] / r.tile), max(1.0, r.size[1] / r.tile)), dtype=torch.float64)
            grid = ((ab[m] * reps).remainder(1.0).float() * 2 - 1)[None, None]  # tiled (a, b) -> (x, y)
            col = F.grid_sample(r.texture[None], grid, mode="bilinear", align_corners=False, padding_mode="border")
            out[m] = col[0, :, 0].T * r.shade
        return out

    def render(self, cam: Camera, supersample: int = 1, background: float = 0.5):
        """``image (3, H, W)`` in ``[0, 1]`` (``supersample^2`` rays per pixel) and ``depth (H, W)`` (0: no hit)."""
        H, W = cam.height, cam.width
        dt = torch.float64
        ys, xs = torch.meshgrid(torch.arange(H, dtype=dt) + 0.5, torch.arange(W, dtype=dt) + 0.5, indexing="ij")
        px = torch.stack((xs, ys), -1).reshape(-1, 2)
        t, face, ab = self.cast(cam.C, self.rays(cam, px))
        depth = torch.where(torch.isfinite(t), t, torch.zeros_like(t)).reshape(H, W).float()
        s = supersample
        if s > 1:
            off = (torch.arange(s, dtype=dt) + 0.5) / s - 0.5
            oy, ox = torch.meshgrid(off, off, indexing="ij")
            sub = (px[:, None] + torch.stack((ox, oy), -1).reshape(1, -1, 2)).reshape(-1, 2)
            _, face, ab = self.cast(cam.C, self.rays(cam, sub))
        col = self._shade(face, ab, background).reshape(H * W, s * s, 3).mean(1)
        return col.T.reshape(3, H, W).clamp(0, 1), depth

    def project(self, cam: Camera, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels ``(N, 2)`` (COLMAP's convention) and camera-frame depth ``(N,)`` of world points ``X (N, 3)``."""
        Xc = (X - cam.C) @ cam.R.T
        z = Xc[:, 2]
        K = cam.K
        return torch.stack((K[0, 0] * Xc[:, 0] / z + K[0, 2], K[1, 1] * Xc[:, 1] / z + K[1, 2]), -1), z

    def surface_distance(self, X: torch.Tensor) -> torch.Tensor:
        """Distance ``(N,)`` of points ``X (N, 3)`` to the nearest rectangle."""
        X = torch.as_tensor(X, dtype=torch.float64)
        rel = X[:, None] - self.o  # (N, F, 3)
        a = ((rel * self.u).sum(-1) / (self.u * self.u).sum(-1)).clamp(0, 1)
        b = ((rel * self.v).sum(-1) / (self.v * self.v).sum(-1)).clamp(0, 1)
        closest = self.o + a[..., None] * self.u + b[..., None] * self.v
        return (X[:, None] - closest).norm(dim=-1).min(dim=1).values


def noise_texture(seed: int, size: int = 256) -> torch.Tensor:
    """``(3, size, size)`` in ``[0, 1]``: a sum of bicubically upsampled noise octaves (4, 16 and 64 cells),
    seeded: a texture with detail at every scale, for faces textured once (``Rect(tile=None)``)."""
    g = torch.Generator().manual_seed(seed)
    tex = torch.zeros(3, size, size)
    for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.2)):
        noise = torch.rand(1, 3, cells, cells, generator=g)
        tex += weight * F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0]
    return tex.clamp(0, 1)


def _box(center, size, yaw, textures, shades) -> list[Rect]:
    cx, cy, cz = center
    sx, sy, sz = size
    c, s = math.cos(yaw), math.sin(yaw)
    ex = (c * sx, s * sx, 0.0)
    ey = (-s * sy, c * sy, 0.0)
    ez = (0.0, 0.0, sz)
    o = (cx - (ex[0] + ey[0]) / 2, cy - (ex[1] + ey[1]) / 2, cz)

    def add(p, q):
        return tuple(a + b for a, b in zip(p, q))

    faces = [
        (o, ex, ez),
        (add(o, ey), ez, ex),
        (o, ez, ey),
        (add(o, ex), ey, ez),
        (add(o, ez), ex, ey),
    ]
    return [Rect(f[0], f[1], f[2], textures[i % len(textures)], shades[i % len(shades)]) for i, f in enumerate(faces)]


def random_scene(g: torch.Generator, textures: list[torch.Tensor]) -> Scene:
    """A floor, three walls and 1-4 boxes with random sizes, poses, textures and shading."""

    def tex() -> torch.Tensor:
        return textures[int(torch.randint(len(textures), (), generator=g))]

    def shade() -> float:
        return uniform(g, 0.55, 1.0)

    L, Hw = 9.0, 5.0
    rects = [
        Rect((-L, -L, 0.0), (2 * L, 0, 0), (0, 2 * L, 0), tex(), shade()),
        Rect((-L, L, 0.0), (2 * L, 0, 0), (0, 0, Hw), tex(), shade()),
        Rect((-L, -L, 0.0), (0, 2 * L, 0), (0, 0, Hw), tex(), shade()),
        Rect((L, -L, 0.0), (0, 0, Hw), (0, 2 * L, 0), tex(), shade()),
    ]
    for _ in range(int(torch.randint(1, 5, (), generator=g))):
        size = (uniform(g, 0.6, 2.2), uniform(g, 0.6, 2.2), uniform(g, 0.5, 2.5))
        center = (uniform(g, -3, 3), uniform(g, -3, 3), 0.0)
        rects += _box(center, size, uniform(g, 0, math.pi), [tex() for _ in range(5)], [shade() for _ in range(5)])
    return Scene(rects)


def random_camera_pair(
    g: torch.Generator, hw: tuple[int, int], *, max_angle_deg: float = 35.0
) -> tuple[Camera, Camera]:
    """Two cameras looking at the scene centre from positions ``max_angle_deg`` apart at most."""
    H, W = hw
    target = torch.tensor([uniform(g, -1.5, 1.5), uniform(g, -1.5, 1.5), uniform(g, 0.3, 1.2)], dtype=torch.float64)
    az = uniform(g, -math.pi, math.pi)
    cams = []
    for k in range(2):
        a = az + (0.0 if k == 0 else math.radians(uniform(g, -max_angle_deg, max_angle_deg)))
        r = uniform(g, 3.5, 5.5)
        C = target + torch.tensor([r * math.cos(a), r * math.sin(a), uniform(g, 0.8, 3.0)], dtype=torch.float64)
        f = uniform(g, 0.7, 1.1) * W
        tgt = target + torch.tensor([uniform(g, -0.5, 0.5) for _ in range(3)], dtype=torch.float64)
        cams.append(Camera.look_at(C, tgt, f, H, W, roll_deg=uniform(g, -8, 8)))
    return cams[0], cams[1]
