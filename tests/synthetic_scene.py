"""A small textured 3D scene with exact geometry, for end-to-end tests of matching -> SfM pipelines.

The scene is a set of textured rectangles (a floor, two walls and a box), ray-cast by the project's one scene
renderer, :mod:`romav2_plugin.train.scenes` (each face textured once with a seeded noise texture). Cameras
are pinhole cameras in COLMAP's convention (``x_img = K [R | t] X``, the top-left pixel *corner* at
``(0, 0)``, so the centre of the top-left pixel is ``(0.5, 0.5)``; OpenCV's centre-at-0 pixel is
``colmap - 0.5``); :class:`Camera` holds them as numpy arrays with COLMAP's ``f, cx, cy``, as pycolmap
takes them.

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
from romav2_plugin.train import scenes

__all__ = ["Camera", "Scene", "default_scene", "default_cameras", "SceneWarpDouble"]


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
    def look_at(C, target, f: float, width: int, height: int) -> Camera:
        cam = scenes.Camera.look_at(C, target, f, height, width)
        return Camera(cam.R.numpy(), cam.C.numpy(), f, width / 2, height / 2, width, height)

    def for_renderer(self) -> scenes.Camera:
        return scenes.Camera(torch.from_numpy(self.R), torch.from_numpy(self.C), torch.from_numpy(self.K), self.height, self.width)


class Scene:
    """The renderer's scene (:class:`romav2_plugin.train.scenes.Scene`) seen with :class:`Camera`: renders are
    ``(H, W, 3)`` uint8, distances numpy."""

    def __init__(self, rects: list[scenes.Rect]) -> None:
        self.renderer = scenes.Scene(rects)
        self.rects = rects

    def cast(self, origin: torch.Tensor, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest hit of rays ``origin (3,) + t * dirs (N, 3)``: ``t (N,)`` (``inf``: none), face ``(N,)``
        (``-1``: none), face coordinates ``ab (N, 2)`` in ``[0, 1]``."""
        return self.renderer.cast(origin, dirs)

    def rays(self, cam: Camera, pix_colmap: torch.Tensor) -> torch.Tensor:
        """World-frame ray directions ``(N, 3)`` through COLMAP pixel coordinates ``(N, 2)``."""
        return self.renderer.rays(cam.for_renderer(), pix_colmap)

    def project(self, cam: Camera, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """COLMAP pixels ``(N, 2)`` and camera-frame depth ``(N,)`` of world points ``X (N, 3)``."""
        return self.renderer.project(cam.for_renderer(), X)

    def render(self, cam: Camera, supersample: int = 2) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB image (box-filtered over ``supersample**2`` rays per pixel)."""
        image, _ = self.renderer.render(cam.for_renderer(), supersample=supersample)
        return (image.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()

    def surface_distance(self, X: np.ndarray) -> np.ndarray:
        """Distance ``(N,)`` of points ``(N, 3)`` to the nearest rectangle."""
        return self.renderer.surface_distance(torch.as_tensor(X, dtype=torch.float64)).numpy()


def default_scene() -> Scene:
    """Floor, back and left walls, and a box on the floor: non-planar, with occlusions."""
    faces = [
        ((-4, -4, 0), (8, 0, 0), (0, 8, 0), 1),  # floor z=0
        ((-4, 4, 0), (8, 0, 0), (0, 0, 4), 2),  # back wall y=4
        ((-4, -4, 0), (0, 8, 0), (0, 0, 4), 3),  # left wall x=-4
        ((-1, -1, 1.5), (2, 0, 0), (0, 2, 0), 4),  # box top
        ((-1, -1, 0), (2, 0, 0), (0, 0, 1.5), 5),  # box front y=-1
        ((1, -1, 0), (0, 2, 0), (0, 0, 1.5), 6),  # box right x=1
        ((-1, -1, 0), (0, 2, 0), (0, 0, 1.5), 7),  # box left x=-1
        ((-1, 1, 0), (2, 0, 0), (0, 0, 1.5), 8),  # box back y=1
    ]
    return Scene([scenes.Rect(o, u, v, scenes.noise_texture(seed), tile=None) for o, u, v, seed in faces])


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
