"""Make the demo image pair shipped with the package (``demo_A.jpg``, ``demo_B.jpg``, ``demo_pair.json``).

Source photo: ``skimage/data/coffee.png`` from the scikit-image wheel ("Coffee cup", courtesy of Pikolo
Espresso Bar, photographer Rachel Michetti; CC0 / no copyright restrictions, as stated in the docstring
of ``skimage.data.coffee``).

* A is the photo itself (600 x 400).
* B (640 x 480) is A seen through a known homography ``H`` (A pixels -> B pixels, OpenCV convention:
  the top-left pixel centre is (0, 0)), resampled bicubically, then relit: gamma, gain, a colour cast
  and a vignette. Pixels of B that see nothing of A are black.

``H`` and the provenance are written to ``demo_pair.json``; ``romav2-match --demo`` reports the
reprojection error of the matches against ``H``. Run from the repository root (needs scikit-image)::

    python romav2_plugin/assets/make_demo_pair.py
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HERE = Path(__file__).resolve().parent
SIZE_B = (640, 480)  # (width, height)
# Where the four corners of A land in B (pixels, OpenCV convention): a rotation, a zoom-out and a
# perspective tilt, with most of A still visible in B.
CORNERS_A_IN_B = [(70.0, 62.0), (585.0, 18.0), (612.0, 430.0), (38.0, 402.0)]
PHOTOMETRIC = {"gamma": 0.75, "gain": 1.08, "rgb_cast": [1.06, 1.0, 0.9], "vignette": 0.35}
JPEG_QUALITY = 88


def homography_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 homography mapping 4 points ``src`` to ``dst`` (direct linear solve, ``H[2, 2] = 1``)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    h = np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(rhs, dtype=np.float64))
    return np.append(h, 1.0).reshape(3, 3)


def warp_homography(img: np.ndarray, H: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``out[y, x] = img(H^-1 (x, y))`` (OpenCV pixel convention), bicubic; outside A is 0. ``img``: HxWx3 float."""
    w_out, h_out = size
    h_in, w_in = img.shape[:2]
    ys, xs = np.meshgrid(
        np.arange(h_out, dtype=np.float64), np.arange(w_out, dtype=np.float64), indexing="ij"
    )
    p = np.stack((xs, ys, np.ones_like(xs)), axis=-1) @ np.linalg.inv(H).T
    src = p[..., :2] / p[..., 2:]
    # pixel (OpenCV, centre of the top-left pixel at 0) -> grid_sample's align_corners=False coordinates
    grid = np.stack((2 * (src[..., 0] + 0.5) / w_in - 1, 2 * (src[..., 1] + 0.5) / h_in - 1), axis=-1)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].double()
    g = torch.from_numpy(grid)[None]
    out = F.grid_sample(x, g, mode="bicubic", padding_mode="zeros", align_corners=False)
    inside = (np.abs(grid) <= 1).all(axis=-1)
    return out[0].permute(1, 2, 0).numpy().clip(0, 1) * inside[..., None]


def relight(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    ys, xs = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    vignette = 1 - PHOTOMETRIC["vignette"] * (xs**2 + ys**2) / 2
    out = (
        PHOTOMETRIC["gain"]
        * img ** PHOTOMETRIC["gamma"]
        * np.asarray(PHOTOMETRIC["rgb_cast"])
        * vignette[..., None]
    )
    return out.clip(0, 1)


def main() -> None:
    import skimage
    import skimage.data

    src_path = Path(skimage.data.__file__).parent / "coffee.png"
    raw = src_path.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    a = np.asarray(Image.open(src_path).convert("RGB"))
    h_a, w_a = a.shape[:2]
    corners_a = np.array([(0, 0), (w_a - 1, 0), (w_a - 1, h_a - 1), (0, h_a - 1)], dtype=np.float64)
    H = homography_from_points(corners_a, np.asarray(CORNERS_A_IN_B))
    b = relight(warp_homography(a.astype(np.float64) / 255, H, SIZE_B))
    Image.fromarray(a).save(HERE / "demo_A.jpg", quality=JPEG_QUALITY, optimize=True)
    Image.fromarray((b * 255 + 0.5).astype(np.uint8)).save(
        HERE / "demo_B.jpg", quality=JPEG_QUALITY, optimize=True
    )
    meta = {
        "homography_A_to_B": H.tolist(),
        "convention": (
            "pixel coordinates, OpenCV convention (top-left pixel centre at (0, 0), x right, y down); "
            "[x_B, y_B, 1] ~ H @ [x_A, y_A, 1]"
        ),
        "image_A": {"file": "demo_A.jpg", "width": w_a, "height": h_a, "content": "the source photo"},
        "image_B": {
            "file": "demo_B.jpg",
            "width": SIZE_B[0],
            "height": SIZE_B[1],
            "content": "A warped by H (bicubic, black outside A), then relit",
            "photometric": PHOTOMETRIC,
        },
        "source": {
            "package": "scikit-image",
            "package_version": skimage.__version__,
            "file": "skimage/data/coffee.png",
            "sha256": sha,
            "sha256_base64url_as_in_wheel_RECORD": base64.urlsafe_b64encode(bytes.fromhex(sha))
            .decode()
            .rstrip("="),
            "description": "Coffee cup. Photograph courtesy of Pikolo Espresso Bar (photographer Rachel Michetti).",
            "licence": "CC0 - 'No copyright restrictions. CC0 by the photographer (Rachel Michetti).' "
            "(docstring of skimage.data.coffee)",
        },
        "made_by": "romav2_plugin/assets/make_demo_pair.py",
        "jpeg_quality": JPEG_QUALITY,
    }
    (HERE / "demo_pair.json").write_text(json.dumps(meta, indent=2) + "\n")
    for name in ("demo_A.jpg", "demo_B.jpg", "demo_pair.json"):
        print(f"{HERE / name}: {(HERE / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
