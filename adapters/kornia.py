"""kornia adapter: ``kornia.feature.RoMaV2``, a dense matcher with LoFTR's input/output contract.

Registered into ``kornia.feature`` by ``import romav2_plugin`` when kornia is installed (nothing else in
kornia is touched). Example::

    import kornia.feature as KF
    import romav2_plugin  # registers KF.RoMaV2
    matcher = KF.RoMaV2(setting="base")
    out = matcher({"image0": img0, "image1": img1})  # (B, 1|3, H, W) float in [0, 1]
    out["keypoints0"], out["keypoints1"], out["confidence"], out["batch_indexes"]

Keypoints are pixel coordinates of each *input* image with the kornia/OpenCV convention: the centre of
the top-left pixel is ``(0, 0)``. Float values outside ``[0, 1]`` are rejected (``ValueError``), not clipped.
Inputs (images and masks: shape, dtype, batch) are checked before the network runs.

Sampling default: only matches with overlap above ``min_overlap=0.5`` are drawn, so, as with LoFTR's
confidence threshold, unrelated images give few or no matches instead of ``num_samples`` random ones;
``min_overlap=None`` samples exactly as the official ``RoMaV2.sample()``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from romav2_plugin.model import RoMaV2 as _CoreRoMaV2
from romav2_plugin.verify import MIN_INLIER_RATIO, check_matches, default_threshold_px

__all__ = ["RoMaV2", "register"]

_SAMPLE_MODES = ("balanced", "threshold")
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_threshold(value: Any) -> None:
    """``confidence_threshold``: a number in ``[0, 1)`` (overlaps lie in ``[0, 1]``; NaN or >= 1 would keep
    no match at all, silently)."""
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and 0.0 <= value < 1.0):
        raise ValueError(
            f"confidence_threshold must be a number in [0, 1) (an overlap: matches above it are kept), got {value!r}"
        )


def _check_ratio(value: Any) -> None:
    """``min_inlier_ratio``: a number in ``[0, 1]`` (a share of the matches)."""
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and 0.0 <= value <= 1.0):
        raise ValueError(f"min_inlier_ratio must be a number in [0, 1] (a share of the matches), got {value!r}")


_IO_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _scale_precision(P: torch.Tensor, work_hw: tuple[int, int], img_hw: tuple[int, int]) -> torch.Tensor:
    """Precision from working-resolution pixels to input-image pixels (official ``prec_map_coordinates``)."""
    ratio = torch.tensor((work_hw[1] / img_hw[1], work_hw[0] / img_hw[0]), device=P.device, dtype=P.dtype)
    return P * ratio[:, None] * ratio[None, :]


class RoMaV2(nn.Module):
    """RoMa v2 for kornia.

    Args:
        weights: ``None`` (official release via ``$ROMAV2_WEIGHTS`` / cache / URL), a path, a URL, or
            ``"tiny"`` (romav2-tiny, shipped with the package: works offline).
        setting: RoMa v2 preset (``turbo``, ``fast``, ``base``, ``precise``, ``tiny``, ...); default: the
            weights' own (``precise`` for the official model, ``tiny`` for romav2-tiny), or, with ``model=``,
            that model's current setting.
        num_samples: matches per image pair in ``"balanced"`` mode.
        sample_mode: ``"balanced"`` (KDE-balanced sample of ``num_samples``) or ``"threshold"`` (every
            grid match with overlap above ``confidence_threshold``).
        confidence_threshold: overlap threshold of ``"threshold"`` mode.
        amp: bf16 autocast (``None``: on for CUDA and for CPUs with native bf16, AVX512-BF16 or AMX; see
            :func:`romav2_plugin.runtime.amp_default`; ``False``: fp32).
        device: where to put the model.
        seed: ``None`` (torch's global RNG), an int or a ``torch.Generator`` for reproducible sampling.
        model: an already-built core model (e.g. ``romav2_plugin.RoMaV2``) instead of ``weights``.
        min_overlap: ``"balanced"`` mode: only matches with overlap above it are drawn (default 0.5: unrelated
            images give few or no matches); ``None``: the official sampler's behaviour.
        min_inlier_ratio: a pair is reported ``covisible`` when at least this share of its matches fits one
            two-view geometry (default :data:`romav2_plugin.verify.MIN_INLIER_RATIO`, the threshold of
            ``romav2-match``'s warning, chosen on validation pairs with romav2-tiny; see ``docs/kornia.md``).

    Precision: ``.to(dtype)`` / ``.half()`` / ``.double()`` / ``.bfloat16()`` (as kornia's tests do for every
    module) set :attr:`dtype`: float images of any float dtype are taken, and ``keypoints``, ``confidence``
    and ``precision`` come back in that dtype. The network itself keeps its float32 weights (with its bf16
    autocast, ``amp``, on CUDA): a float64 network would not be more accurate than the weights it was trained
    in, and float16 weights lose accuracy without saving much over the autocast. Integer and complex dtypes
    are refused (``TypeError``).
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        setting: str | None = None,
        num_samples: int = 5000,
        sample_mode: str = "balanced",
        confidence_threshold: float = 0.5,
        amp: bool | None = None,
        device: torch.device | str | None = None,
        seed: int | torch.Generator | None = None,
        model: nn.Module | None = None,
        min_overlap: float | None = 0.5,
        min_inlier_ratio: float = MIN_INLIER_RATIO,
    ) -> None:
        super().__init__()
        _check_ratio(min_inlier_ratio)
        if min_overlap is not None and not 0.0 <= float(min_overlap) < 1.0:
            raise ValueError(f"min_overlap must lie in [0, 1) or be None, got {min_overlap}")
        if sample_mode not in _SAMPLE_MODES:
            raise ValueError(f"Unknown sample_mode {sample_mode!r}; choose one of {_SAMPLE_MODES}")
        if int(num_samples) <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        _check_threshold(confidence_threshold)
        if model is None:
            model = _CoreRoMaV2.from_pretrained(weights, setting=setting, amp=amp)
        elif setting is not None:
            model.apply_setting(setting)
        self.model = model
        if device is not None:
            self.model.to(device)
        self.num_samples = int(num_samples)
        self.sample_mode = sample_mode
        self.confidence_threshold = float(confidence_threshold)
        self.seed = seed
        self.min_overlap = None if min_overlap is None else float(min_overlap)
        self.min_inlier_ratio = float(min_inlier_ratio)
        self.dtype = torch.float32  # of the outputs (and what inputs are taken as): follows .to(dtype)
        self.eval()

    def _net_device(self) -> torch.device:
        for t in self.model.parameters():
            return t.device
        for t in self.model.buffers():
            return t.device
        return torch.device("cpu")

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        """``.to(dtype)``, ``.half()``, ``.double()``, ``.bfloat16()``, ``.float()`` (here or from a parent module)
        set :attr:`dtype`, the dtype of the outputs; the network keeps its own precision and only follows the
        device (see the class docstring). Device moves, ``share_memory()``... apply to the network as usual."""
        io = fn(torch.zeros((), dtype=self.dtype, device="cpu"))
        if io.dtype != self.dtype:
            if io.dtype not in _IO_DTYPES:
                raise TypeError(
                    f"kornia.feature.RoMaV2 works in float16, bfloat16, float32 or float64, not {io.dtype}"
                )
        net = fn(torch.zeros((), dtype=torch.float32, device=self._net_device()))
        if net.dtype == torch.float32:
            super()._apply(fn, recurse)
        else:  # a dtype change: the network only moves (its weights keep their precision)
            super()._apply(lambda t: t.to(net.device), recurse)
        self.dtype = io.dtype
        return self

    @staticmethod
    def _check(data: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        for key in ("image0", "image1"):
            if key not in data:
                raise ValueError(f"Missing {key!r}: pass {{'image0': (B, 1|3, H, W), 'image1': (B, 1|3, H, W)}}")
            x = data[key]
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                raise ValueError(f"{key} must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
            if x.shape[1] not in (1, 3):
                raise ValueError(f"{key} must have 1 or 3 channels, got {x.shape[1]} (shape {tuple(x.shape)})")
            if x.shape[0] == 0:
                raise ValueError(f"{key} is an empty batch")
        if data["image0"].shape[0] != data["image1"].shape[0]:
            raise ValueError(f"Batch sizes differ: {data['image0'].shape[0]} vs {data['image1'].shape[0]}")
        return data["image0"], data["image1"]

    @staticmethod
    def _check_mask(key: str, mask: Any, image: torch.Tensor) -> torch.Tensor:
        """A validity mask as ``(B, H, W)`` bool; ``(B, 1, H, W)`` is accepted too. kornia's convention: 0 marks
        padding, any other value (``torch.rand`` masks included) a valid pixel. Anything else (another size,
        transposed, no batch dimension, NaN, a complex dtype) is refused with a ``ValueError``."""
        B, _, H, W = image.shape
        img = "image" + key[-1]
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"{key} must be a (B, H, W) tensor, got {type(mask).__name__}")
        shape = tuple(mask.shape)
        if mask.ndim == 4 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if tuple(mask.shape) != (B, H, W):
            hint = ""
            if mask.ndim == 2 and tuple(mask.shape) == (H, W):
                hint = f"; add the batch dimension: {key}[None] (or expand it to the batch)"
            elif mask.ndim == 3 and tuple(mask.shape) == (B, W, H):
                hint = "; it looks transposed (B, W, H)"
            elif mask.ndim == 3 and mask.shape[0] != B and tuple(mask.shape[1:]) == (H, W):
                hint = f"; its batch size differs from {img}'s"
            raise ValueError(
                f"{key} must have the shape (B, H, W) = {(B, H, W)} of {img} {tuple(image.shape)} "
                f"(or (B, 1, H, W)), got {shape}{hint}. Masks are not resized."
            )
        if mask.dtype == torch.bool:
            return mask
        if mask.is_complex() or not (mask.is_floating_point() or mask.dtype in _INT_DTYPES):
            raise ValueError(f"{key}: unsupported dtype {mask.dtype}; use bool (True on valid pixels)")
        if mask.is_floating_point() and not torch.isfinite(mask).all():
            raise ValueError(f"{key} ({mask.dtype}) holds NaN or infinite values; 0 marks padding, any other value a valid pixel")
        return mask != 0  # kornia's convention (LoFTR): 0 is padding, anything else is valid

    @staticmethod
    def _in_mask(mask: torch.Tensor, kpts: torch.Tensor) -> torch.Tensor:
        """Value of a ``(H, W)`` validity mask at the pixel containing each keypoint ``(N, 2)``."""
        H, W = mask.shape
        ij = kpts.round().long()
        x = ij[:, 0].clamp(0, W - 1)
        y = ij[:, 1].clamp(0, H - 1)
        return mask[y, x].bool()

    def forward(self, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Match ``data["image0"]`` to ``data["image1"]``.

        Args:
            data: ``image0 (B, 1|3, H0, W0)``, ``image1 (B, 1|3, H1, W1)`` float in ``[0, 1]``; optional
                ``mask0 (B, H0, W0)``, ``mask1 (B, H1, W1)`` (or ``(B, 1, H, W)``), bool, integer or float: 0 on
                padding, anything else on valid pixels (LoFTR's padding masks), the size of their image (not
                resized); matches starting
                or landing on invalid pixels are removed. Checked before the network runs.

        Returns:
            ``keypoints0 (N, 2)``, ``keypoints1 (N, 2)`` pixel coordinates (top-left pixel centre at
            (0, 0)), ``confidence (N,)``, ``batch_indexes (N,)`` long, and, when the setting is
            bidirectional, ``precision0``/``precision1 (N, 2, 2)`` in input-image pixel units; and
            ``geometry_inlier_ratio (B,)`` (in :attr:`dtype`) and ``covisible (B,)`` bool, one value per batch
            element (pair): the share of that pair's matches that fit one two-view geometry
            (:func:`romav2_plugin.verify.check_matches`, as ``romav2-match`` reports it; NaN with fewer than 8
            matches), and whether it is at least ``min_inlier_ratio``. ``covisible`` is False for a pair whose
            matches look wrong (two unrelated images, two noise images, a baseline the weights cannot handle)
            although the overlap calls them confident; select a pair's matches with
            ``out["covisible"][out["batch_indexes"]]``. False for a pair without 8 matches.
        """
        img0, img1 = self._check(data)
        masks = {k: self._check_mask(k, data[k], img) for k, img in (("mask0", img0), ("mask1", img1)) if k in data}
        (B, _, H0, W0), (_, _, H1, W1) = img0.shape, img1.shape
        img0, img1 = (x.float() if x.is_floating_point() and x.dtype != torch.float32 else x for x in (img0, img1))
        preds = self.model.match(img0, img1)
        work_hw = tuple(preds["warp_AB"].shape[1:3])
        gen = self.seed
        out: dict[str, list[torch.Tensor]] = {k: [] for k in ("keypoints0", "keypoints1", "confidence", "batch_indexes", "precision0", "precision1")}
        ratios: list[float] = []
        for b in range(B):
            if self.sample_mode == "balanced":
                m, c, p0, p1 = self.model.sample(
                    preds, self.num_samples, batch_index=b, generator=gen, min_overlap=self.min_overlap
                )
            else:
                m, c, p0, p1 = self.model.grid_matches(preds, self.confidence_threshold, batch_index=b)
            k0, k1 = self.model.to_pixel_coordinates(m, H0, W0, H1, W1, pixel_center=0.0)
            keep = torch.ones(len(k0), dtype=torch.bool, device=k0.device)
            if "mask0" in masks:
                keep &= self._in_mask(masks["mask0"][b].to(k0.device), k0)
            if "mask1" in masks:
                keep &= self._in_mask(masks["mask1"][b].to(k1.device), k1)
            out["keypoints0"].append(k0[keep])
            out["keypoints1"].append(k1[keep])
            out["confidence"].append(c[keep])
            out["batch_indexes"].append(torch.full((int(keep.sum()),), b, dtype=torch.long, device=k0.device))
            # the geometric check of romav2-match (romav2_plugin.verify): NaN with fewer than 8 matches
            ratios.append(check_matches(k0[keep], k1[keep], threshold_px=default_threshold_px((H0, W0), (H1, W1))).inlier_ratio)
            if p0 is not None and self.model.bidirectional:
                out["precision0"].append(_scale_precision(p0[keep], work_hw, (H0, W0)))
                out["precision1"].append(_scale_precision(p1[keep], work_hw, (H1, W1)))
        result = {k: torch.cat(v) for k, v in out.items() if v}
        ratio = torch.tensor(ratios, dtype=torch.float64, device=preds["warp_AB"].device)
        result["geometry_inlier_ratio"] = ratio.float()
        result["covisible"] = ratio >= self.min_inlier_ratio  # NaN (too few matches) compares False
        return {k: (v.to(self.dtype) if v.is_floating_point() else v) for k, v in result.items()}


def register() -> None:
    """Expose :class:`RoMaV2` as ``kornia.feature.RoMaV2`` (idempotent; alters nothing else)."""
    try:
        import kornia.feature
    except ImportError as e:
        raise ImportError(f"The kornia adapter needs kornia: pip install 'romav2-plugin[kornia]' ({e})") from e

    existing = getattr(kornia.feature, "RoMaV2", None)
    if existing is not None and existing is not RoMaV2:
        return  # kornia ships its own: leave it alone
    kornia.feature.RoMaV2 = RoMaV2
