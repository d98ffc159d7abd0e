"""A small textured 3D scene with exact geometry, for end-to-end tests of matching -> SfM pipelines.

The scene is a set of textured rectangles (a floor, two walls and a box); cameras are pinhole cameras in
COLMAP's convention (``x_img = K [R | t] X``, the top-left pixel *corner* at ``(0, 0)``, so the centre of
the top-left pixel is ``(0.5, 0.5)``; OpenCV's centre-at-0 pixel is ``colmap - 0.5``).

:class:`SceneWarpDouble` is a network double whose dense warp is exact: a pixel of image A is cast into the
scene, the hit point is projected into image B and kept when B sees that same point (not occluded). It
recognises which view an input tensor shows by comparing it with the rendered views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from romav2_plugin.testing import WarpDouble

__all__ = ["Rect", "Camera", "Scene", "default_scene", "default_cameras", "SceneWarpDouble"]


@dataclass(frozen=True)
class Rect:
    """The rectangle ``origin + a * u + b * v`` for ``a, b`` in ``[0, 1]``, with texture ``seed``."""

    origin: tuple[float, float, float]
    u: tuple[float, float, float]
    v: tuple[float, float, float]
    seed: int


@dataclass(frozen=True)
class Camera:
    """Pinhole camera: ``R (3, 3)`` world-to-camera rotation, ``C (3,)`` centre, ``f``, ``cx``, ``cy`` (COLMAP)."""

    R: np.ndarray
    C: np.ndarray
    f: float
    cx: float
    cy: float
    width: int
    height: int

    @property
    def t(self) -> np.ndarray:
        return -self.R @ self.C

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.f, 0, self.cx], [0, self.f, self.cy], [0, 0, 1.0]])

    @staticmethod
    def look_at(C, target, f: float, width: int, height: int, up=(0.0, 0.0, 1.0)) -> Camera:
        C, target, up = (np.asarray(x, dtype=np.float64) for x in (C, target, up))
        z = target - C
        z /= np.linalg.norm(z)
        x = np.cross(z, up)
        x /= np.linalg.norm(x)
        y = np.cross(z, x)
        return Camera(np.stack([x, y, z]), C, f, width / 2, height / 2, width, height)


class Scene:
    """Textured rectangles; :meth:`cast` gives exact ray hits, :meth:`render` images."""

    def __init__(self, rects: list[Rect], texture_size: int = 256) -> None:
        self.rects = rects
        f64 = torch.float64
        self.o = torch.tensor([r.origin for r in rects], dtype=f64)  # (R, 3)
        self.u = torch.tensor([r.u for r in rects], dtype=f64)
        self.v = torch.tensor([r.v for r in rects], dtype=f64)
        self.n = torch.linalg.cross(self.u, self.v)
        # Texture: a sum of bilinearly upsampled noise octaves, scaled to each face's size so that texel
        # density is similar everywhere.
        self.textures = []
        for r in rects:
            g = torch.Generator().manual_seed(r.seed)
            tex = torch.zeros(3, texture_size, texture_size)
            for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.2)):
                noise = torch.rand(1, 3, cells, cells, generator=g)
                tex += weight * torch.nn.functional.interpolate(
                    noise, size=(texture_size, texture_size), mode="bicubic", align_corners=False
                )[0]
            self.textures.append(tex.clamp(0, 1))

    def cast(self, origin: torch.Tensor, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest hit of rays ``origin (3,) + t * dirs (N, 3)``.

        Returns:
            ``t (N,)`` (``inf`` for no hit), face index ``(N,)`` (``-1`` for none) and face coordinates
            ``ab (N, 2)`` in ``[0, 1]``.
        """
        d = dirs.double()
        denom = d @ self.n.T  # (N, R)
        num = ((self.o - origin) * self.n).sum(-1)  # (R,)
        t = num / denom  # inf/nan for parallel rays, masked below
        P = origin + t[..., None] * d[:, None]  # (N, R, 3)
        rel = P - self.o
        a = (rel * self.u).sum(-1) / (self.u * self.u).sum(-1)
        b = (rel * self.v).sum(-1) / (self.v * self.v).sum(-1)
        ok = (t > 1e-9) & (a >= 0) & (a <= 1) & (b >= 0) & (b <= 1) & (denom.abs() > 1e-12)
        t = torch.where(ok, t, torch.full_like(t, math.inf))
        t_min, face = t.min(dim=1)
        hit = torch.isfinite(t_min)
        ab = torch.stack([a.gather(1, face[:, None])[:, 0], b.gather(1, face[:, None])[:, 0]], -1)
        return t_min, torch.where(hit, face, torch.full_like(face, -1)), ab

    @staticmethod
    def rays(cam: Camera, pix_colmap: torch.Tensor) -> torch.Tensor:
        """World-frame ray directions ``(N, 3)`` through COLMAP pixel coordinates ``(N, 2)``."""
        x = (pix_colmap[:, 0] - cam.cx) / cam.f
        y = (pix_colmap[:, 1] - cam.cy) / cam.f
        d_cam = torch.stack([x, y, torch.ones_like(x)], -1)
        return d_cam @ torch.from_numpy(cam.R)  # R^T d

    def project(self, cam: Camera, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """COLMAP pixels ``(N, 2)`` and camera-frame depth ``(N,)`` of world points ``X (N, 3)``."""
        Xc = (X - torch.from_numpy(cam.C)) @ torch.from_numpy(cam.R).T
        z = Xc[:, 2]
        return torch.stack([cam.f * Xc[:, 0] / z + cam.cx, cam.f * Xc[:, 1] / z + cam.cy], -1), z

    def render(self, cam: Camera, supersample: int = 2) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB image (box-filtered over ``supersample**2`` rays per pixel)."""
        s = supersample
        offs = (torch.arange(s, dtype=torch.float64) + 0.5) / s
        ys = (torch.arange(cam.height, dtype=torch.float64)[:, None] + offs).reshape(-1)
        xs = (torch.arange(cam.width, dtype=torch.float64)[:, None] + offs).reshape(-1)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        pix = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
        _, face, ab = self.cast(torch.from_numpy(cam.C), self.rays(cam, pix))
        rgb = torch.full((len(pix), 3), 0.5)
        for i, tex in enumerate(self.textures):
            m = face == i
            if m.any():
                grid = (ab[m] * 2 - 1).float()[None, :, None]  # (1, n, 1, 2)
                rgb[m] = torch.nn.functional.grid_sample(tex[None], grid, align_corners=False)[0, :, :, 0].T
        img = rgb.reshape(cam.height, s, cam.width, s, 3).mean(dim=(1, 3))
        return (img * 255).round().clamp(0, 255).to(torch.uint8).numpy()

    def surface_distance(self, X: np.ndarray) -> np.ndarray:
        """Distance ``(N,)`` of points ``(N, 3)`` to the nearest rectangle."""
        X = torch.as_tensor(X, dtype=torch.float64)
        rel = X[:, None] - self.o  # (N, R, 3)
        a = ((rel * self.u).sum(-1) / (self.u * self.u).sum(-1)).clamp(0, 1)
        b = ((rel * self.v).sum(-1) / (self.v * self.v).sum(-1)).clamp(0, 1)
        closest = self.o + a[..., None] * self.u + b[..., None] * self.v
        return (X[:, None] - closest).norm(dim=-1).min(dim=1).values.numpy()


def default_scene() -> Scene:
    """Floor, back and left walls, and a box on the floor: non-planar, with occlusions."""
    rects = [
        Rect((-4, -4, 0), (8, 0, 0), (0, 8, 0), 1),  # floor z=0
        Rect((-4, 4, 0), (8, 0, 0), (0, 0, 4), 2),  # back wall y=4
        Rect((-4, -4, 0), (0, 8, 0), (0, 0, 4), 3),  # left wall x=-4
        Rect((-1, -1, 1.5), (2, 0, 0), (0, 2, 0), 4),  # box top
        Rect((-1, -1, 0), (2, 0, 0), (0, 0, 1.5), 5),  # box front y=-1
        Rect((1, -1, 0), (0, 2, 0), (0, 0, 1.5), 6),  # box right x=1
        Rect((-1, -1, 0), (0, 2, 0), (0, 0, 1.5), 7),  # box left x=-1
        Rect((-1, 1, 0), (2, 0, 0), (0, 0, 1.5), 8),  # box back y=1
    ]
    return Scene(rects)


def default_cameras(n: int = 6, width: int = 320, height: int = 240, f: float = 280.0) -> list[Camera]:
    """``n`` views on an arc in front of the box, all looking at it."""
    cams = []
    for i, az in enumerate(np.linspace(-125, -55, n)):
        a = math.radians(az)
        C = (6.5 * math.cos(a), 6.5 * math.sin(a), 3.0 + 0.3 * (i % 2))
        cams.append(Camera.look_at(C, (0.0, 0.5, 0.6), f, width, height))
    return cams


class SceneWarpDouble(WarpDouble):
    """Exact dense warp between views of a :class:`Scene` (a network double; see :class:`WarpDouble`).

    Args:
        scene: the scene.
        cameras: the views, in the order of ``images``.
        images: ``(H, W, 3)`` uint8 renders of the views; an input tensor is recognised as the view whose
            render it resembles most (after resizing both to 16 x 16).
        setting: preset whose working resolution to mimic.
    """

    def __init__(self, scene: Scene, cameras: list[Camera], images: list[np.ndarray], setting: str = "turbo"):
        super().__init__(setting)
        self.scene, self.cameras = scene, cameras
        self._prints = torch.stack([self._fingerprint(torch.from_numpy(im).permute(2, 0, 1) / 255.0) for im in images])

    @staticmethod
    def _fingerprint(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x[None].float(), size=(16, 16), mode="area")[0].reshape(-1)

    def view_of(self, x: torch.Tensor) -> int:
        d = (self._prints - self._fingerprint(x)).abs().mean(dim=1)
        best = int(d.argmin())
        if d[best] > 0.02:
            raise ValueError(f"input is not one of the scene's views (closest: {best}, distance {d[best]:.3f})")
        return best

    def pixel_warp(self, pix, x_from, x_to, reverse):
        ca, cb = self.cameras[self.view_of(x_from)], self.cameras[self.view_of(x_to)]
        shape = pix.shape[:-1]
        # The inputs may be resized views: go to the views' own pixels (OpenCV centre at 0) and COLMAP's.
        sa = torch.tensor([ca.width / x_from.shape[-1], ca.height / x_from.shape[-2]], dtype=torch.float64)
        sb = torch.tensor([cb.width / x_to.shape[-1], cb.height / x_to.shape[-2]], dtype=torch.float64)
        pa = (pix.reshape(-1, 2) + 0.5) * sa  # COLMAP pixels of view a
        rays = self.scene.rays(ca, pa)
        t, face, _ = self.scene.cast(torch.from_numpy(ca.C), rays)
        hit = face >= 0
        X = torch.from_numpy(ca.C) + torch.where(hit, t, 0)[:, None] * rays
        pb, z = self.scene.project(cb, X)
        # Visible in b: in front, and the first surface along b's ray is this point.
        tb, _, _ = self.scene.cast(torch.from_numpy(cb.C), (X - torch.from_numpy(cb.C)))
        visible = hit & (z > 0) & ((tb - 1).abs() < 1e-6)
        out = pb / sb - 0.5  # tensor pixels of x_to, OpenCV convention
        return out.reshape(*shape, 2), visible.reshape(shape)
