"""Training data: pairs of images with dense ground truth.

Every dataset maps an integer index to one sample, deterministically (all randomness comes from a
generator seeded by ``(seed, index)``), so the data order is fully described by the training step and a
resumed run sees exactly the samples it would have seen. A sample is a dict::

    image_A, image_B: (3, H, W) float32 in [0, 1]
    warp_AB:  (H, W, 2) normalized [-1, 1] (A's pixel centres -> B), covis_AB: (H, W) bool
    warp_BA, covis_BA: the same from B to A

Implementations: :class:`HomographyPairs` (any folder of photos, with geometric and photometric
augmentation), :class:`RenderedPairs` (ray-cast textured 3D scenes with depth, so parallax and occlusions),
:class:`MegaDepthPairs` (a MegaDepth-style scene folder, layout in its docstring) and :class:`MixedPairs`.
"""

from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from romav2_plugin.geometry import normalized_grid, to_normalized, to_pixel
from romav2_plugin.train.augment import photometric, random_homography, shading, uniform
from romav2_plugin.train.ground_truth import warp_from_depth, warp_from_homography
from romav2_plugin.train.scenes import Scene, random_camera_pair, random_scene, relative_pose

__all__ = [
    "IMAGE_SUFFIXES",
    "PairDataset",
    "ImageFolder",
    "HomographyPairs",
    "RenderedPairs",
    "MegaDepthPairs",
    "MixedPairs",
    "collate",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def sample_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63 - 1))


class PairDataset(ABC):
    """Index -> sample (see the module docstring). ``len()`` is the number of distinct samples, or a
    nominal epoch for procedural datasets (any non-negative index is valid there)."""

    size: tuple[int, int]

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def sample(self, index: int) -> dict[str, torch.Tensor]: ...

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.sample(index)


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch (``(B, ...)`` tensors)."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def _check_eight_bit(path: Path) -> None:
    """16-bit and float images are refused (``convert("RGB")`` would clip them, mostly to white), naming the
    file, as romav2-match refuses them (:func:`romav2_plugin.io.probe_image`, header only)."""
    from romav2_plugin.io import probe_image

    try:
        probe_image(path, min_side=1)
    except ValueError as e:
        if "16-bit" in str(e):
            raise ValueError(f"Training image {e}") from None


class ImageFolder:
    """The photos under ``root`` (recursively, sorted), decoded once and kept as uint8 at most
    ``max_side`` pixels on the long side.

    Args:
        root: folder, or a list of folders/files.
        exclude: file names (not paths) to leave out, e.g. the held-out set.
    """

    def __init__(self, root, *, max_side: int = 640, exclude: tuple[str, ...] = ()) -> None:
        roots = [Path(r) for r in (root if isinstance(root, (list, tuple)) else [root])]
        files: list[Path] = []
        for r in roots:
            if r.is_file():
                files.append(r)
            elif r.is_dir():
                files += [p for p in r.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
            else:
                raise FileNotFoundError(f"Image folder {r} does not exist (check the data path in the config)")
        excl = set(exclude)
        self.files = sorted(p for p in files if p.name not in excl)
        if not self.files:
            raise ValueError(f"No images ({', '.join(IMAGE_SUFFIXES)}) found under {', '.join(map(str, roots))}")
        self._check_headers()
        self.max_side = max_side
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.files)

    def _check_headers(self) -> None:
        """Every file must open as an image (header only: fast), so a bad file stops training before it starts."""
        from PIL import Image, UnidentifiedImageError

        for path in self.files:
            try:
                with Image.open(path) as im:
                    im.size  # noqa: B018 - reading the header is the check
            except (OSError, UnidentifiedImageError) as e:
                raise ValueError(f"Cannot read training image {path}: {e}. Remove or replace the file.") from None
            _check_eight_bit(path)

    def load(self, i: int) -> torch.Tensor:
        """``(3, H, W)`` float32 in ``[0, 1]``."""
        i = i % len(self.files)
        if i not in self._cache:
            from PIL import Image, ImageOps

            path = self.files[i]
            try:
                with Image.open(path) as im:
                    im = ImageOps.exif_transpose(im).convert("RGB")
                    s = self.max_side / max(im.size)
                    if s < 1:
                        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)
                    arr = np.asarray(im, dtype=np.uint8).copy()
            except OSError as e:
                raise ValueError(f"Cannot read training image {path}: {e}. Remove or replace the file.") from None
            self._cache[i] = torch.from_numpy(arr).permute(2, 0, 1)
        return self._cache[i].float() / 255


@functools.lru_cache(maxsize=8)
def _pixel_centres(H: int, W: int) -> torch.Tensor:
    """``(H, W, 3)`` float64 homogeneous pixel centres (``pixel_center=0.5``)."""
    grid = to_pixel(normalized_grid(1, H, W, dtype=torch.float64), H, W, pixel_center=0.5)[0]
    return torch.cat((grid, torch.ones_like(grid[..., :1])), -1)


def _sample_image(img: torch.Tensor, M: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``size`` pixels whose pixel ``x`` shows ``img`` at ``M x`` (pixels, ``pixel_center=0.5``);
    returns the image and the mask of pixels inside ``img``."""
    H, W = size
    h, w = img.shape[-2:]
    xh = _pixel_centres(H, W) @ M.T
    src = to_normalized(xh[..., :2] / xh[..., 2:], h, w, pixel_center=0.5).float()
    out = F.grid_sample(img[None], src[None], mode="bilinear", align_corners=False, padding_mode="zeros")[0]
    inside = (src.abs() < 1).all(-1) & (xh[..., 2] > 0)
    return out * inside, inside


class HomographyPairs(PairDataset):
    """Synthetic pairs: two random homographic views of one photo, each with its own appearance change.

    A view of size ``size`` is cut from the photo (rescaled so that its short side is ``1.3 x`` the view's
    long side) through a random homography; the ground truth maps A to B through the two homographies and
    is co-visible where B's pixel lies inside the photo.
    """

    def __init__(
        self,
        images: ImageFolder,
        size: tuple[int, int] = (256, 256),
        *,
        seed: int = 0,
        max_rotation_deg: float = 25.0,
        scale_range: tuple[float, float] = (0.7, 1.4),
        max_translation: float = 0.15,
        max_perspective: float = 0.15,
        photometric_strength: float = 1.0,
        illumination: float = 0.0,
    ) -> None:
        self.images, self.size, self.seed = images, tuple(size), seed
        self.geo = dict(max_rotation_deg=max_rotation_deg, scale_range=scale_range, max_translation=max_translation,
                        max_perspective=max_perspective)
        self.photometric_strength = photometric_strength
        self.illumination = illumination

    def __len__(self) -> int:
        return len(self.images) * 100

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        g = sample_generator(self.seed, index)
        H, W = self.size
        img = self.images.load(int(torch.randint(len(self.images), (), generator=g)))
        h, w = img.shape[-2:]
        s = 1.3 * max(H, W) / min(h, w)
        # view -> photo: put the view centre at a random point of the central part of the photo
        cx, cy = uniform(g, 0.4, 0.6) * w, uniform(g, 0.4, 0.6) * h
        base = torch.tensor([[1 / s, 0, cx - W / (2 * s)], [0, 1 / s, cy - H / (2 * s)], [0, 0, 1]], dtype=torch.float64)
        M_A = base @ random_homography(g, (H, W), **self.geo)
        M_B = base @ random_homography(g, (H, W), **self.geo)
        image_A, in_A = _sample_image(img, M_A, (H, W))
        image_B, in_B = _sample_image(img, M_B, (H, W))
        H_AB = torch.linalg.inv(M_B) @ M_A
        warp_AB, covis_AB = warp_from_homography(H_AB[None], (H, W), (H, W))
        warp_BA, covis_BA = warp_from_homography(torch.linalg.inv(H_AB)[None], (H, W), (H, W))
        covis_AB = covis_AB[0] & in_A
        covis_BA = covis_BA[0] & in_B
        # a pixel is co-visible only if its match also shows the photo
        covis_AB &= F.grid_sample(in_B[None, None].float(), warp_AB, mode="nearest", align_corners=False)[0, 0] > 0
        covis_BA &= F.grid_sample(in_A[None, None].float(), warp_BA, mode="nearest", align_corners=False)[0, 0] > 0
        image_A, image_B = _appearance(image_A, image_B, g, self.photometric_strength, self.illumination)
        return {
            "image_A": image_A, "image_B": image_B,
            "warp_AB": warp_AB[0], "covis_AB": covis_AB, "warp_BA": warp_BA[0], "covis_BA": covis_BA,
        }


def _appearance(image_A: torch.Tensor, image_B: torch.Tensor, g: torch.Generator, strength: float,
                illumination: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each view's colour jitter (``strength`` > 0), then its shading field (``illumination`` > 0); with
    ``illumination`` 0 the generator is drawn exactly as before that option existed."""
    if strength > 0:
        image_A, image_B = photometric(image_A, g, strength), photometric(image_B, g, strength)
    if illumination > 0:
        image_A, image_B = shading(image_A, g, illumination), shading(image_B, g, illumination)
    return image_A, image_B


class RenderedPairs(PairDataset):
    """Ray-cast 3D scenes (:func:`~romav2_plugin.train.scenes.random_scene`) textured with crops of photos;
    ground truth from the exact depth maps and poses (:func:`~romav2_plugin.train.ground_truth.warp_from_depth`),
    so occluded pixels are not co-visible. Pairs with less than ``min_covisible`` co-visible pixels are
    redrawn (deterministically)."""

    def __init__(
        self, images: ImageFolder, size: tuple[int, int] = (256, 256), *, seed: int = 0,
        max_angle_deg: float = 35.0, photometric_strength: float = 0.5, min_covisible: float = 0.2,
        texture_size: int = 192, illumination: float = 0.0,
    ) -> None:
        self.images, self.size, self.seed = images, tuple(size), seed
        self.max_angle_deg, self.photometric_strength = max_angle_deg, photometric_strength
        self.illumination = illumination
        self.min_covisible, self.texture_size = min_covisible, texture_size

    def __len__(self) -> int:
        return 10_000

    def _textures(self, g: torch.Generator, n: int) -> list[torch.Tensor]:
        out = []
        for _ in range(n):
            img = self.images.load(int(torch.randint(len(self.images), (), generator=g)))
            h, w = img.shape[-2:]
            c = min(h, w, int(uniform(g, 0.3, 0.8) * min(h, w)) + 16)
            y0 = int(torch.randint(h - c + 1, (), generator=g))
            x0 = int(torch.randint(w - c + 1, (), generator=g))
            crop = img[:, y0 : y0 + c, x0 : x0 + c][None]
            out.append(F.interpolate(crop, size=(self.texture_size,) * 2, mode="bilinear", antialias=True,
                                     align_corners=False)[0])
        return out

    def render_pair(self, g: torch.Generator):
        """``(scene, cam_A, cam_B, image_A, depth_A, image_B, depth_B)`` for one draw."""
        scene: Scene = random_scene(g, self._textures(g, 6))
        cam_A, cam_B = random_camera_pair(g, self.size, max_angle_deg=self.max_angle_deg)
        image_A, depth_A = scene.render(cam_A)
        image_B, depth_B = scene.render(cam_B)
        return scene, cam_A, cam_B, image_A, depth_A, image_B, depth_B

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        g = sample_generator(self.seed, index)
        for _ in range(8):
            _, cam_A, cam_B, image_A, depth_A, image_B, depth_B = self.render_pair(g)
            T = relative_pose(cam_A, cam_B)
            warp_AB, covis_AB = warp_from_depth(depth_A[None], depth_B[None], cam_A.K[None], cam_B.K[None], T[None])
            warp_BA, covis_BA = warp_from_depth(
                depth_B[None], depth_A[None], cam_B.K[None], cam_A.K[None], torch.linalg.inv(T)[None]
            )
            if covis_AB.float().mean() >= self.min_covisible:
                break
        image_A, image_B = _appearance(image_A, image_B, g, self.photometric_strength, self.illumination)
        return {
            "image_A": image_A, "image_B": image_B,
            "warp_AB": warp_AB[0], "covis_AB": covis_AB[0], "warp_BA": warp_BA[0], "covis_BA": covis_BA[0],
        }


class MegaDepthPairs(PairDataset):
    """A MegaDepth-style scene folder::

        root/
          cameras.json     {"<image name>": {"K": [[3x3]], "R": [[3x3]], "t": [3]}, ...}
                           K in pixels of the stored image (pixel centres at +0.5, COLMAP), R|t world-to-camera
          pairs.txt        "<name_A> <name_B> <overlap>" per line ('#' comments)
          images/<name>    any PIL-readable image
          depths/<stem>.npy  float32 (H, W) z-depth at the image's resolution, 0 where unknown

    Images and depth maps are resized to ``size`` (depth: nearest) and ``K`` scaled accordingly; pairs with
    ``overlap < min_overlap`` are skipped. Ground truth uses the depth-consistency check of
    :func:`~romav2_plugin.train.ground_truth.warp_from_depth`.
    """

    def __init__(
        self, root, size: tuple[int, int] = (256, 256), *, seed: int = 0, min_overlap: float = 0.1,
        rel_depth_tol: float = 0.05,
    ) -> None:
        self.root, self.size, self.seed, self.rel_depth_tol = Path(root), tuple(size), seed, rel_depth_tol
        for need in ("cameras.json", "pairs.txt", "images", "depths"):
            if not (self.root / need).exists():
                raise FileNotFoundError(
                    f"MegaDepth-style scene {self.root}: missing {need} (layout: see romav2_plugin.train.data."
                    "MegaDepthPairs)"
                )
        try:
            self.cameras = json.loads((self.root / "cameras.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.root / 'cameras.json'} is not valid JSON: {e}") from None
        self.pairs: list[tuple[str, str]] = []
        for n, line in enumerate((self.root / "pairs.txt").read_text(encoding="utf-8").splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 3:
                raise ValueError(f"{self.root / 'pairs.txt'}:{n}: expected '<name_A> <name_B> <overlap>', got {line!r}")
            a, b, ov = parts[0], parts[1], float(parts[2])
            for name in (a, b):
                if name not in self.cameras:
                    raise ValueError(f"{self.root / 'pairs.txt'}:{n}: {name} has no entry in cameras.json")
            if ov >= min_overlap:
                self.pairs.append((a, b))
        if not self.pairs:
            raise ValueError(f"{self.root}: no pair with overlap >= {min_overlap} in pairs.txt")

    def __len__(self) -> int:
        return len(self.pairs)

    def _view(self, name: str):
        from PIL import Image

        H, W = self.size
        _check_eight_bit(self.root / "images" / name)
        with Image.open(self.root / "images" / name) as im:
            im = im.convert("RGB")
            w0, h0 = im.size
            img = torch.from_numpy(np.asarray(im.resize((W, H), Image.BICUBIC), dtype=np.float32) / 255).permute(2, 0, 1)
        depth = torch.from_numpy(np.load(self.root / "depths" / (Path(name).stem + ".npy")).astype(np.float32))
        if depth.shape != (h0, w0):
            raise ValueError(f"{name}: depth map {tuple(depth.shape)} does not match the image ({h0}, {w0})")
        depth = F.interpolate(depth[None, None], size=(H, W), mode="nearest")[0, 0]
        cam = self.cameras[name]
        K = torch.tensor(cam["K"], dtype=torch.float64)
        K = torch.diag(torch.tensor([W / w0, H / h0, 1.0], dtype=torch.float64)) @ K
        T = torch.eye(4, dtype=torch.float64)
        T[:3, :3] = torch.tensor(cam["R"], dtype=torch.float64)
        T[:3, 3] = torch.tensor(cam["t"], dtype=torch.float64)
        return img, depth, K, T

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        perm = torch.randperm(len(self.pairs), generator=sample_generator(self.seed, index // len(self.pairs)))
        a, b = self.pairs[int(perm[index % len(self.pairs)])]
        img_A, d_A, K_A, T_A = self._view(a)
        img_B, d_B, K_B, T_B = self._view(b)
        T_AB = T_B @ torch.linalg.inv(T_A)
        w_AB, c_AB = warp_from_depth(d_A[None], d_B[None], K_A[None], K_B[None], T_AB[None], rel_depth_tol=self.rel_depth_tol)
        w_BA, c_BA = warp_from_depth(
            d_B[None], d_A[None], K_B[None], K_A[None], torch.linalg.inv(T_AB)[None], rel_depth_tol=self.rel_depth_tol
        )
        return {"image_A": img_A, "image_B": img_B, "warp_AB": w_AB[0], "covis_AB": c_AB[0],
                "warp_BA": w_BA[0], "covis_BA": c_BA[0]}


class MixedPairs(PairDataset):
    """Draws each sample from one of ``datasets`` with probabilities proportional to ``weights``."""

    def __init__(self, datasets: list[PairDataset], weights: list[float], *, seed: int = 0) -> None:
        if len(datasets) != len(weights) or not datasets or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("MixedPairs: one non-negative weight per dataset, not all zero")
        sizes = {d.size for d in datasets}
        if len(sizes) != 1:
            raise ValueError(f"MixedPairs: all datasets must have the same image size, got {sorted(sizes)}")
        self.datasets, self.seed, self.size = datasets, seed, datasets[0].size
        self.p = torch.tensor(weights, dtype=torch.float64) / sum(weights)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        g = sample_generator(self.seed + 7919, index)
        k = int(torch.multinomial(self.p, 1, generator=g))
        inner = int(torch.randint(2**31 - 1, (), generator=g))
        d = self.datasets[k]
        return d.sample(inner % len(d) if isinstance(d, MegaDepthPairs) else inner)


