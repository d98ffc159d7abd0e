"""Image loading and validation.

Accepted inputs (:data:`ImageLike`): a path (any format PIL reads; EXIF orientation applied), a PIL image,
a ``(H, W, 3)`` / ``(H, W)`` / ``(H, W, 4)`` uint8 ndarray, or a tensor ``(3, H, W)`` / ``(B, 3, H, W)``
(``(B, 1, H, W)`` grayscale is replicated) float in ``[0, 1]`` or uint8. Output is always
``(B, 3, H, W)`` float32 in ``[0, 1]``.

Refused with a :class:`ValueError` naming the problem and the fix: 16-bit or float images (which would
otherwise be silently clipped), NaN/inf values, float values outside ``[0, 1]``, wrong ranks or channel
counts, empty images and images larger than :data:`MAX_PIXELS`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["ImageLike", "load_image", "probe_image", "to_tensor_image", "MAX_PIXELS", "MIN_SIDE"]

ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor

#: Largest image (in pixels) accepted; matching always resizes to at most a few megapixels anyway.
MAX_PIXELS = 100_000_000
#: Smallest side the network can use: one 16x16 patch of the backbone.
MIN_SIDE = 16

_EIGHT_BIT_MODES = {"1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "La"}


def _pil_to_rgb(img: Image.Image, name: str) -> Image.Image:
    if img.mode not in _EIGHT_BIT_MODES:
        raise ValueError(
            f"{name}: image mode {img.mode!r} (16-bit or floating point) is not supported. "
            "Convert it to 8-bit RGB first, e.g. with a tone mapping that suits your data "
            "(PIL: img.point(lambda v: v / 256).convert('L'))."
        )
    if img.width * img.height > MAX_PIXELS:
        raise ValueError(f"{name}: {img.width}x{img.height} exceeds the limit of {MAX_PIXELS} pixels; downscale it first.")
    if img.width == 0 or img.height == 0:
        raise ValueError(f"{name}: empty image")
    return img.convert("RGB")  # grayscale replicated, alpha dropped, palette expanded


def load_image(path: str | Path) -> Image.Image:
    """Open ``path`` with PIL, apply EXIF orientation and convert to 8-bit RGB."""
    path = Path(path)
    _check_is_file(path)
    try:
        with Image.open(path) as img:  # reads the header only
            if img.width * img.height > MAX_PIXELS:
                raise ValueError(
                    f"{path}: {img.width}x{img.height} exceeds the limit of {MAX_PIXELS} pixels; downscale it first."
                )
            img.load()
            img = ImageOps.exif_transpose(img)
            return _pil_to_rgb(img, str(path))
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: {e}") from None
    except (OSError, SyntaxError) as e:  # PIL raises these for unreadable / truncated files
        raise ValueError(f"Cannot read image {path}: {e}. Is it an image file PIL can open?") from e


def special_file_kind(path: Path) -> str | None:
    """What ``path`` is when it exists but is neither a regular file nor a folder (``"a named pipe (FIFO)"``,
    ``"a character device"``, ...; ``/dev/stdin`` is what standard input is); ``None`` otherwise."""
    import stat

    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    for test, kind in (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return None


def _check_is_file(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an image file")
    if not path.is_file():
        kind = special_file_kind(path)
        if kind is not None:
            raise ValueError(
                f"{path} is {kind}, not a regular file: images are read from files (their header is read "
                "before the model loads, the pixels later). Save the image to a file first."
            )
        raise FileNotFoundError(f"Image not found: {path}")


def probe_image(path: str | Path, *, min_side: int = MIN_SIDE) -> tuple[int, int]:
    """Check an image file from its header only (no decoding): it exists, is a file PIL can identify, is
    8-bit, within :data:`MAX_PIXELS` and at least ``min_side`` pixels on each side. Returns ``(width, height)``
    as stored (before EXIF rotation). Raises ``FileNotFoundError`` / ``ValueError`` as :func:`load_image`."""
    path = Path(path)
    _check_is_file(path)
    try:
        with Image.open(path) as img:
            w, h, mode = img.width, img.height, img.mode
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: {e}") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"Cannot read image {path}: {e}. Is it an image file PIL can open?") from None
    if mode not in _EIGHT_BIT_MODES:
        raise ValueError(
            f"{path}: image mode {mode!r} (16-bit or floating point) is not supported. Convert it to 8-bit RGB first."
        )
    if w * h > MAX_PIXELS:
        raise ValueError(f"{path}: {w}x{h} exceeds the limit of {MAX_PIXELS} pixels; downscale it first.")
    check_min_size(w, h, str(path), min_side)
    return w, h


def check_min_size(w: int, h: int, name: str, min_side: int = MIN_SIDE) -> None:
    if min(w, h) < min_side:
        raise ValueError(
            f"{name}: {w}x{h} is too small: the network needs at least {min_side}x{min_side} pixels "
            f"(one patch); upscale it first."
        )


def _fmt(v: float) -> str:
    """A value as short as possible but never rounded into the valid range (1.000001 is not shown as 1)."""
    for digits in (4, 7, 10, 17):
        s = f"{v:.{digits}g}"
        if (float(s) < 0.0 or float(s) > 1.0) == (v < 0.0 or v > 1.0):
            return s
    return repr(v)


def _check_values(x: torch.Tensor, name: str) -> None:
    if x.numel() == 0:
        raise ValueError(f"{name}: empty image tensor of shape {tuple(x.shape)}")
    if x.is_floating_point():
        # One pass (aminmax) instead of four (isfinite, all, min, max): NaN propagates into both ends and
        # +-inf shows at one of them. ~15x cheaper on a 2040x1530 image on a CPU (benchmarks/cpu_levers.py).
        lo_t, hi_t = torch.aminmax(x)
        lo, hi = float(lo_t), float(hi_t)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name}: contains NaN or inf values")
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"{name}: float values must lie in [0, 1], got [{_fmt(lo)}, {_fmt(hi)}]. "
                "Divide 8-bit data by 255 (or pass it as uint8)."
            )


def to_tensor_image(img: ImageLike, *, name: str = "image", device: torch.device | str | None = None) -> torch.Tensor:
    """Convert any :data:`ImageLike` to ``(B, 3, H, W)`` float32 in ``[0, 1]`` on ``device``."""
    if isinstance(img, (str, Path)):
        img = load_image(img)
    if isinstance(img, Image.Image):
        img = np.asarray(_pil_to_rgb(img, name))
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8:
            raise ValueError(
                f"{name}: ndarray images must be uint8 (got {img.dtype}); for float data pass a torch tensor "
                "in [0, 1], for 16-bit data convert to 8-bit first."
            )
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
            raise ValueError(f"{name}: ndarray images must be (H, W), (H, W, 3) or (H, W, 4), got {img.shape}")
        if img.shape[-1] == 1:
            img = np.repeat(img, 3, axis=-1)
        img = torch.from_numpy(np.array(img[..., :3], copy=True)).permute(2, 0, 1)
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{name}: unsupported image type {type(img).__name__}; expected a path, PIL image, ndarray or tensor")
    x = img
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"{name}: tensor images must be (3, H, W) or (B, 3, H, W), got shape {tuple(img.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(
            f"{name}: expected 1 or 3 channels in dim 1 (B, C, H, W), got shape {tuple(img.shape)}. "
            "Channels-last arrays must be permuted to (B, C, H, W)."
        )
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif not x.is_floating_point():
        raise ValueError(
            f"{name}: unsupported tensor dtype {x.dtype} (16-bit and integer images are refused); "
            "use uint8 or float in [0, 1]"
        )
    _check_values(x, name)
    if x.shape[-1] * x.shape[-2] > MAX_PIXELS:
        raise ValueError(f"{name}: {x.shape[-1]}x{x.shape[-2]} exceeds the limit of {MAX_PIXELS} pixels")
    return x.to(device=device, dtype=torch.float32)
