"""RoMa v2: the thin orchestrator wiring backbone -> matcher -> fine features -> refiners.

Public surface follows the official ``romav2.RoMaV2`` (2.0.1): ``forward``, ``match``, ``sample``,
``to_pixel_coordinates``, ``match_keypoints``, ``apply_setting`` and the settable attributes
``H_lr, W_lr, H_hr, W_hr, bidirectional, threshold, balanced_sampling, half_precision_kde,
precise_fraction, grid_kde``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from romav2_plugin import postprocess, runtime
from romav2_plugin.config import RoMaV2Config, get_setting
from romav2_plugin.geometry import (
    bhwc_interpolate,
    to_pixel,
)
from romav2_plugin.io import ImageLike, to_tensor_image
from romav2_plugin.nn.backbone import DINOv3Backbone
from romav2_plugin.nn.fine_features import FineFeatures
from romav2_plugin.nn.matcher import Matcher
from romav2_plugin.nn.refiner import build_refiners
from romav2_plugin.profiling import stage as profile_range

__all__ = ["RoMaV2"]


class RoMaV2(nn.Module):
    """RoMa v2 dense matcher.

    ``RoMaV2(config)`` builds a randomly initialised model and downloads nothing; use
    :meth:`from_pretrained` for the official weights. The model lives wherever you move it
    (``.to(device)``); there is no global device.

    Args:
        config: :class:`~romav2_plugin.config.RoMaV2Config` (defaults to the official architecture).
        setting: named preset (``turbo``, ``fast``, ``base``, ``precise``, ``mega1500``, ``scannet1500``,
            ``wxbs``, ``satast``); defaults to ``config.setting`` (``precise``).
        device: where to put the model.
        amp: ``True``: bf16 autocast exactly where the official code uses it on CUDA, on any device (and
            the frozen backbone held in bf16, as the official model does); ``False``: everything in fp32,
            no autocast anywhere;
            ``None`` (default): on for CUDA inputs and on CPUs with native bf16 (AVX512-BF16 or AMX), off
            otherwise; :func:`romav2_plugin.runtime.amp_default` decides, ``$ROMAV2_CPU_BF16=0|1``
            overrides it on the CPU.
    """

    H_lr: int
    W_lr: int
    H_hr: int | None
    W_hr: int | None
    bidirectional: bool
    threshold: float | None
    balanced_sampling: bool
    half_precision_kde: bool
    precise_fraction: float
    grid_kde: bool

    def __init__(
        self,
        config: RoMaV2Config | None = None,
        *,
        setting: str | None = None,
        device: torch.device | str | None = None,
        amp: bool | None = None,
    ) -> None:
        super().__init__()
        cfg = config or RoMaV2Config()
        if not isinstance(cfg, RoMaV2Config):
            raise TypeError(f"config must be a RoMaV2Config, got {type(cfg).__name__}")
        self.cfg = cfg
        self.f = DINOv3Backbone(cfg.backbone)
        self.matcher = Matcher(cfg.matcher)
        self.refiners = build_refiners(cfg.refiners)
        self.refiner_features = FineFeatures(cfg.fine_features)
        self.anchor_width = cfg.anchor_width
        self.anchor_height = cfg.anchor_height
        self.amp = amp
        self.apply_setting(setting if setting is not None else cfg.setting)
        self.eval()
        if device is not None:
            self.to(device)
        self._hold_backbone(self.device)
        if cfg.compile:
            self._compile_fixed_shape_parts()

    def _compile_fixed_shape_parts(self) -> None:
        """``config.compile``: ``torch.compile`` in place (``nn.Module.compile``: state-dict keys unchanged)
        of the parts whose input shapes a setting fixes: the backbone's blocks, the matcher's multi-view ViT and
        DPT head, the fine-feature CNN and each refiner. Each compiles on its first call per shape (start-up
        time, cached by torch's compile cache); the orchestrator, resizing and sampling stay eager."""
        parts = [*self.f.vit.blocks, self.matcher.mv_vit, self.matcher.head, self.refiner_features,
                 *self.refiners.values()]
        for m in parts:
            m.compile(dynamic=False)

    def _channels_last_on(self, device: torch.device) -> bool:
        """:func:`romav2_plugin.runtime.channels_last_cuda` on a CUDA device: the fine-feature CNN and the
        refiners' weights are moved to channels-last once (their inputs follow in :meth:`_fine_features`)."""
        if device.type != "cuda" or not runtime.channels_last_cuda():
            return False
        if not getattr(self, "_is_channels_last", False):
            for m in (self.refiner_features, *self.refiners.values()):
                m.to(memory_format=torch.channels_last)
            self._is_channels_last = True
        return True

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
        *,
        setting: str | None = None,
        device: torch.device | str | None = None,
        amp: bool | None = None,
        config: RoMaV2Config | None = None,
    ) -> RoMaV2:
        """Build the model and load weights in the official layout.

        Args:
            weights: ``None`` (``$ROMAV2_WEIGHTS``, else the official release URL, downloaded once and
                cached), ``"tiny"`` (romav2-tiny, shipped inside the package: see
                :mod:`romav2_plugin.weights.named`), a local path, a URL, or an official-layout state dict.
            setting: named preset; default: the config's (``precise`` for the official model, ``tiny``
                for romav2-tiny).
            config: the architecture. Default: the official one, or the ``config`` recorded in a model
                card beside the file (``<file stem>.json``, written by ``romav2-train``), or romav2-tiny's.
        """
        from romav2_plugin.weights.named import load_weights

        if setting is not None:
            get_setting(setting)
        sd, recorded_config = load_weights(weights)
        config = config or recorded_config
        model = cls(config, setting=setting, amp=amp)
        model.load_official_state_dict(sd)
        model.eval()
        if device is not None:
            model.to(device)
        model._hold_backbone(model.device)
        return model

    def load_official_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Strictly load a state dict in the official checkpoint layout (see :mod:`romav2_plugin.weights.layout`)."""
        from romav2_plugin.weights.layout import check_layout, official_layout, official_to_internal

        check_layout(sd, official_layout(self))
        internal = official_to_internal(sd, self.f.num_blocks, self.cfg.backbone)
        # timm's k_bias (fixed zero) and RoPE periods are non-persistent buffers: not part of the mapping.
        self.load_state_dict(internal, strict=True)

    def official_state_dict(self, *, extra_backbone: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """This model's weights in the official key layout (backbone entries as this model holds them)."""
        from romav2_plugin.weights.layout import internal_to_official

        return internal_to_official(self.state_dict(), extra_backbone=extra_backbone)

    # ------------------------------------------------------------------ settings
    def apply_setting(self, setting: str) -> None:
        """Set the resolutions and options of a named preset (see :data:`romav2_plugin.config.SETTINGS`)."""
        s = get_setting(setting)
        self.setting = setting
        self.H_lr, self.W_lr, self.H_hr, self.W_hr = s.H_lr, s.W_lr, s.H_hr, s.W_hr
        self.bidirectional = s.bidirectional
        self.threshold = s.threshold
        self.balanced_sampling = s.balanced_sampling
        self.half_precision_kde = s.half_precision_kde
        self.precise_fraction = s.precise_fraction
        self.grid_kde = s.grid_kde

    @property
    def device(self) -> torch.device:
        return self.matcher.omega.device

    def set_amp(self, amp: bool | None, device: torch.device | str | None = None) -> RoMaV2:
        """bf16 autocast: on (``True``), off (``False``) or the device's default (``None``: on CUDA and on
        CPUs with native bf16, see :func:`romav2_plugin.runtime.amp_default`).

        A frozen backbone is then held in bf16 when autocast is on for ``device`` (default: the model's),
        in fp32 otherwise, as the official model holds it. This, construction and ``from_pretrained`` (with
        their ``device``) are the only places that choose the backbone's dtype: ``forward`` never changes it.
        Returns the model.
        """
        self.amp = amp
        self._hold_backbone(torch.device(device) if device is not None else self.device)
        return self

    def _amp_for(self, device: torch.device) -> bool:
        return self.amp if self.amp is not None else runtime.amp_default(device)

    def _hold_backbone(self, device: torch.device) -> None:
        if any(p.requires_grad for p in self.f.parameters()):
            return  # a backbone being trained keeps its fp32 weights (autocast does the rest)
        want = torch.bfloat16 if self._amp_for(device) else torch.float32
        if self.f.vit.patch_embed.proj.weight.dtype != want:
            self.f.to(want)

    def _backbone_amp(self, amp: bool) -> bool:
        """Autocast for the backbone: on with ``amp``, and also when its weights are held in bf16 while
        ``amp`` is off (a model moved from CUDA to a CPU without native bf16, say, or ``model.amp = False``
        set by hand): bf16 weights run as bf16 either way. Warns once in that case."""
        if amp or self.f.vit.patch_embed.proj.weight.dtype != torch.bfloat16:
            return amp
        if not getattr(self, "_warned_bf16_backbone", False):
            self._warned_bf16_backbone = True
            warnings.warn(
                "The backbone is held in bf16 but autocast is off on this device, so it runs in bf16 (slow "
                "on CPUs without native bf16, i.e. without AVX512-BF16 or AMX). Call model.set_amp(False) "
                "to hold it in fp32, or model.set_amp(None) to choose by the device it is on now.",
                stacklevel=3,
            )
        return True

    # ------------------------------------------------------------------ network
    #: Memory knob (see :mod:`romav2_plugin.runtime`): at most this many pixels per call of the fine-feature
    #: CNN and the refiners; ``None``: ``runtime.MAX_BATCH_PIXELS_CPU`` / ``_GPU``. Same numbers either way.
    max_batch_pixels: int | None = None

    def _chunk(self, n: int, h: int, w: int, device: torch.device) -> int:
        limit = runtime.max_batch_pixels(device, self.max_batch_pixels)
        return max(1, min(n, limit // max(1, h * w)))

    def _fine_features(self, imgs: torch.Tensor, *, amp: bool) -> dict[int, torch.Tensor]:
        """Per stride, the refiner's fp32 input projection of the fine features ``(n, h, w, proj_dim)``: each
        map is projected as soon as the CNN makes it, so the full-width maps (64-256 channels, the largest
        tensors at high resolution) never outlive their layer."""
        if self._channels_last_on(imgs.device):
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        project = {int(k): r.project for k, r in self.refiners.items()}
        n = imgs.shape[0]
        step = self._chunk(n, *imgs.shape[-2:], imgs.device)
        if step >= n:
            return self.refiner_features(imgs, amp=amp, project=project)
        out: dict[int, torch.Tensor] = {}
        for i in range(0, n, step):  # chunks written into preallocated outputs: no concatenated copy
            part = self.refiner_features(imgs[i : i + step], amp=amp, project=project)
            for s, x in part.items():
                if s not in out:
                    out[s] = x.new_empty((n, *x.shape[1:]))
                out[s][i : i + step] = x
        return out

    def _refine(self, refiner, fine: torch.Tensor, warp, conf, scale_factor, *, amp: bool):
        """Run ``refiner`` on every direction.

        ``fine (2B, h, w, C)`` holds A's then B's projected features; ``warp``/``conf`` hold the ``n = B`` (A->B) or
        ``n = 2B`` (A->B then B->A) directions. Row ``i`` refines ``fine[i]`` against ``fine[(i + B) % 2B]``.
        Above ``max_batch_pixels`` the rows run in chunks within each direction, on views of ``fine``
        (no copy of the high-resolution feature maps).
        """
        n, (h, w) = warp.shape[0], warp.shape[1:3]
        B = fine.shape[0] // 2
        step = self._chunk(n, h, w, fine.device)
        if step >= n:
            f_B = fine[B:] if n == B else torch.cat((fine[B:], fine[:B]))
            return refiner(fine[:n], f_B, warp, conf, scale_factor, amp=amp, projected=True)
        outs = []
        for lo in range(0, n, B):  # per direction, so every chunk's features are views, not copies
            for i in range(lo, lo + B, step):
                j = min(i + step, lo + B)
                ib = (i + B) % (2 * B)
                outs.append(refiner(fine[i:j], fine[ib : ib + j - i], warp[i:j], conf[i:j], scale_factor, amp=amp,
                                    projected=True))
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def _check_pair(self, img_A: torch.Tensor, img_B: torch.Tensor, stage: str) -> None:
        p = self.cfg.backbone.patch_size
        for name, x in (("img_A_" + stage, img_A), ("img_B_" + stage, img_B)):
            if x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"{name}: expected (B, 3, H, W), got {tuple(x.shape)}")
            if x.shape[-2] % p or x.shape[-1] % p:
                raise ValueError(f"{name}: H and W must be multiples of {p}, got {tuple(x.shape[-2:])}")
        if img_A.shape != img_B.shape:
            raise ValueError(f"{stage} images must have the same shape, got {tuple(img_A.shape)} and {tuple(img_B.shape)}")

    def forward(
        self,
        img_A_lr: torch.Tensor,
        img_B_lr: torch.Tensor,
        img_A_hr: torch.Tensor | None = None,
        img_B_hr: torch.Tensor | None = None,
        *,
        refine: bool = True,
        return_attention: bool = False,
    ) -> dict[str, Any]:
        """Dense warps for already-resized images.

        Args:
            img_A_lr, img_B_lr: ``(B, 3, H_lr, W_lr)`` in ``[0, 1]``, sides multiples of 16.
            img_A_hr, img_B_hr: optional ``(B, 3, H_hr, W_hr)`` for the second refinement pass.
            refine: run the refiners (``False``: matcher only, for its training stage; the final
                ``warp_AB``/``confidence_AB`` are then the matcher's).
            return_attention: put the matcher's attention logits in ``preds["matcher"]`` (training).

        Returns:
            dict with ``warp_AB (B, H, W, 2)`` normalized ``[-1, 1]`` and raw ``confidence_AB (B, H, W, 4)``
            (overlap logit, P00, P10, P11) at the finest resolution, the ``_BA`` ones (``None`` unless
            bidirectional), ``"matcher"`` (coarse warps) and ``"refiner_{s}_AB"``/``"refiner_{s}_BA"``
            (``{"warp", "confidence"}`` of each refiner of the last pass).
        """
        self._check_pair(img_A_lr, img_B_lr, "lr")
        if (img_A_hr is None) != (img_B_hr is None):
            raise ValueError("Pass both img_A_hr and img_B_hr, or neither")
        if img_A_hr is not None:
            self._check_pair(img_A_hr, img_B_hr, "hr")
        amp = self._amp_for(img_A_lr.device)
        B = img_A_lr.shape[0]
        bidir = self.bidirectional
        # Both images through the backbone as one batch (per-sample network: same numbers).
        with profile_range("romav2.backbone"):
            feats = self.f(torch.cat((img_A_lr, img_B_lr)), amp=self._backbone_amp(amp))
            if not amp:
                feats = [x.float() for x in feats]  # no-op for an fp32 backbone
        with profile_range("romav2.matcher"):
            coarse = self.matcher(
                [x[:B] for x in feats], [x[B:] for x in feats], bidirectional=bidir, amp=amp,
                return_attention=return_attention,
            )
        preds: dict[str, Any] = {"matcher": coarse}
        # Both directions through the refiners as one batch of 2B.
        if bidir:
            warp = torch.cat((coarse["warp_AB"], coarse["warp_BA"]))
            conf = torch.cat((coarse["confidence_AB"], coarse["confidence_BA"]))
        else:
            warp, conf = coarse["warp_AB"], coarse["confidence_AB"]
        passes = ((img_A_lr, img_B_lr), (img_A_hr, img_B_hr)) if refine else ()
        for stage, (img_A, img_B) in enumerate(passes):
            if img_A is None:
                continue
            H, W = img_A.shape[-2:]
            scale_factor = torch.tensor((W / self.anchor_width, H / self.anchor_height), device=img_A.device)
            with profile_range("romav2.fine_features"):
                fine = self._fine_features(torch.cat((img_A, img_B)), amp=amp)
            for stride_key, refiner in self.refiners.items():
                s = int(stride_key)
                if stage == 1 and s == 4:
                    # The first hi-res pass starts from the lr overlap but not from the lr precision:
                    # precisions are absolute at their stride and must be re-estimated.
                    conf = torch.cat((conf[..., :1], torch.zeros_like(conf[..., 1:])), dim=-1)
                with profile_range(f"romav2.refiner.s{s}"):
                    warp = bhwc_interpolate(warp.detach(), (H // s, W // s), mode="bilinear", align_corners=False)
                    conf = bhwc_interpolate(conf.detach(), (H // s, W // s), mode="bilinear", align_corners=False)
                    warp, conf = self._refine(refiner, fine[s], warp, conf, scale_factor, amp=amp)
                preds[f"refiner_{s}_AB"] = {"warp": warp[:B], "confidence": conf[:B]}
                preds[f"refiner_{s}_BA"] = {"warp": warp[B:], "confidence": conf[B:]} if bidir else None
            del fine  # free this pass's fine features before the next pass computes its own
        preds["warp_AB"], preds["confidence_AB"] = warp[:B], conf[:B]
        preds["warp_BA"], preds["confidence_BA"] = (warp[B:], conf[B:]) if bidir else (None, None)
        return preds

    # ------------------------------------------------------------------ user API
    def _resize(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return postprocess.resize_image(x, H, W)

    @torch.inference_mode()
    def match(self, img_A: ImageLike, img_B: ImageLike) -> dict[str, torch.Tensor | None]:
        """Match two images (or two equal-sized batches).

        Args:
            img_A, img_B: path, PIL image, ``(H, W, 3)`` uint8 ndarray, or ``(3, H, W)`` / ``(B, 3, H, W)``
                tensor (float in ``[0, 1]`` or uint8). Sizes may differ between A and B.

        Returns:
            ``warp_AB (B, H, W, 2)`` normalized ``[-1, 1]`` (A's pixel-centre grid -> B),
            ``confidence_AB (B, H, W, 4)``, ``overlap_AB (B, H, W, 1)`` in ``[0, 1]``,
            ``precision_AB (B, H, W, 2, 2)`` (of the B-side position), and the ``_BA`` ones (``None``
            unless bidirectional). ``H, W`` is the finest working resolution (``H_hr`` if set, else ``H_lr``).
            The model runs in eval mode; the training mode it was in is restored afterwards.
        """
        was_training = self.training
        self.eval()
        try:
            return self._match(img_A, img_B)
        finally:
            self.train(was_training)

    def _match(self, img_A: ImageLike, img_B: ImageLike) -> dict[str, torch.Tensor | None]:
        dev = self.device
        x_A = to_tensor_image(img_A, name="image A", device=dev)
        x_B = to_tensor_image(img_B, name="image B", device=dev)
        if x_A.shape[0] != x_B.shape[0]:
            raise ValueError(f"Batch sizes differ: {x_A.shape[0]} (A) vs {x_B.shape[0]} (B)")
        p = self.cfg.backbone.patch_size
        for name, x in (("image A", x_A), ("image B", x_B)):
            if min(x.shape[-2:]) < p:
                raise ValueError(f"{name}: {tuple(x.shape[-2:])} is smaller than one {p}x{p} patch")
        for name in ("H_lr", "W_lr", "H_hr", "W_hr"):
            v = getattr(self, name)
            if v is not None and (int(v) != v or v <= 0 or v % p):
                raise ValueError(f"{name}={v} must be a positive multiple of {p}")
        lr_A, lr_B = self._resize(x_A, self.H_lr, self.W_lr), self._resize(x_B, self.H_lr, self.W_lr)
        hr_A = hr_B = None
        if self.H_hr is not None and self.W_hr is not None:
            hr_A, hr_B = self._resize(x_A, self.H_hr, self.W_hr), self._resize(x_B, self.H_hr, self.W_hr)
        preds = self(lr_A, lr_B, hr_A, hr_B)
        overlap_AB, precision_AB = postprocess.map_confidence(preds["confidence_AB"], self.threshold)
        out = {
            "warp_AB": preds["warp_AB"],
            "confidence_AB": preds["confidence_AB"],
            "overlap_AB": overlap_AB,
            "precision_AB": precision_AB,
            "warp_BA": None,
            "confidence_BA": None,
            "overlap_BA": None,
            "precision_BA": None,
        }
        if self.bidirectional:
            overlap_BA, precision_BA = postprocess.map_confidence(preds["confidence_BA"], self.threshold)
            out.update(
                warp_BA=preds["warp_BA"],
                confidence_BA=preds["confidence_BA"],
                overlap_BA=overlap_BA,
                precision_BA=precision_BA,
            )
        return {k: (v.clone() if v is not None else None) for k, v in out.items()}

    def sample(
        self,
        preds: Mapping[str, Any],
        num_corresp: int,
        *,
        batch_index: int = 0,
        generator: torch.Generator | int | None = None,
        min_overlap: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Sample matches from :meth:`match` output (one batch element).

        Same algorithm and random draws as the official sampler (with ``generator=None`` and the same
        ``torch.manual_seed``), but with bounded KDE memory, an explicit ``generator`` (or int seed), and
        no crash when fewer candidates exist than requested. Settings that differ from the official ones
        (``tiny``: ``half_precision_kde=False``, ``precise_fraction < 1``, ``grid_kde``) draw other matches:
        with ``precise_fraction < 1`` only that fraction of the candidates with the smallest predicted
        uncertainty can be drawn (:func:`romav2_plugin.postprocess.precise_candidates`); with ``grid_kde``
        the density is approximated on a grid (:func:`romav2_plugin.sampling.kde_density_grid`).

        Args:
            num_corresp: maximum number of matches.
            min_overlap: if set, only matches whose overlap exceeds it are candidates, so the count
                reflects the overlap (unrelated images give few or no matches).

        Returns:
            matches ``(N, 4)`` normalized ``(x_A, y_A, x_B, y_B)``, overlap ``(N,)``, A-side precision
            ``(N, 2, 2)`` and B-side precision ``(N, 2, 2)`` (``None`` when unavailable; A-side entries are
            NaN in unidirectional settings, where only the B side is predicted).
        """
        with profile_range("romav2.sampling"):
            return postprocess.sample_matches(
                preds, num_corresp, batch_index=batch_index, generator=generator, min_overlap=min_overlap,
                balanced=self.balanced_sampling, half_precision_kde=self.half_precision_kde,
                precise_fraction=self.precise_fraction, grid_kde=self.grid_kde,
            )

    def grid_matches(
        self, preds: Mapping[str, Any], threshold: float, *, batch_index: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Every grid match whose overlap exceeds ``threshold`` (no random sampling); same returns as :meth:`sample`."""
        return postprocess.grid_matches(preds, threshold, batch_index=batch_index)

    @staticmethod
    def to_pixel_coordinates(
        matches: torch.Tensor, H_A: int, W_A: int, H_B: int, W_B: int, *, pixel_center: float = 0.5
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized matches ``(..., 4)`` -> pixel keypoints ``(..., 2)`` in A and in B.

        ``pixel_center=0.5`` (default) is the official convention (top-left pixel centre at (0.5, 0.5));
        pass ``0.0`` for OpenCV/kornia/hloc keypoints (top-left pixel centre at (0, 0)).
        """
        return (
            to_pixel(matches[..., :2], H_A, W_A, pixel_center=pixel_center),
            to_pixel(matches[..., 2:], H_B, W_B, pixel_center=pixel_center),
        )

    @staticmethod
    def match_keypoints(
        x_A: torch.Tensor,
        x_B: torch.Tensor,
        warp: torch.Tensor,
        certainty: torch.Tensor,
        return_tuple: bool = True,
        return_inds: bool = False,
        max_dist: float = 0.005,
        cert_th: float = 0.0,
    ):
        """Mutual-nearest matching of given keypoints through the dense warp.

        Args:
            x_A: ``(N, 2)`` keypoints of A, normalized ``[-1, 1]`` (see :func:`~romav2_plugin.geometry.to_normalized`).
            x_B: ``(M, 2)`` keypoints of B, normalized.
            warp: ``(H, W, 2)`` (or ``(1, H, W, 2)``; the last two channels are used) A->B warp.
            certainty: ``(H, W)`` (or ``(1, H, W, 1)``) overlap of A.
            max_dist: maximum distance in normalized units between warped ``x_A`` and ``x_B``.
            cert_th: minimum certainty at ``x_A``.

        Returns:
            as the official function: matched keypoints ``(x_A[i], x_B[j])`` or indices ``(i, j)``.
        """
        if warp.ndim == 4:
            warp = warp[0]
        while certainty.ndim > 2:
            certainty = certainty[0] if certainty.shape[0] == 1 else certainty[..., 0]
        if x_A.ndim != 2 or x_A.shape[-1] != 2 or x_B.ndim != 2 or x_B.shape[-1] != 2:
            raise ValueError(f"x_A and x_B must be (N, 2) normalized keypoints, got {tuple(x_A.shape)}, {tuple(x_B.shape)}")
        x_A = x_A.to(warp.dtype)
        x_B = x_B.to(warp.dtype)
        x_A_to_B = F.grid_sample(warp[..., -2:].permute(2, 0, 1)[None], x_A[None, None], align_corners=False)[0, :, 0].mT
        cert = F.grid_sample(certainty[None, None], x_A[None, None], align_corners=False)[0, 0, 0]
        if len(x_A) == 0 or len(x_B) == 0:
            inds_A = inds_B = torch.zeros(0, dtype=torch.long, device=warp.device)
        else:
            D = torch.cdist(x_A_to_B, x_B)
            mutual = (D == D.min(dim=-1, keepdim=True).values) & (D == D.min(dim=-2, keepdim=True).values)
            inds_A, inds_B = torch.nonzero(mutual & (cert[:, None] > cert_th) & (D < max_dist), as_tuple=True)
        if return_tuple:
            return (inds_A, inds_B) if return_inds else (x_A[inds_A], x_B[inds_B])
        if return_inds:
            return torch.cat((inds_A, inds_B), dim=-1)
        return torch.cat((x_A[inds_A], x_B[inds_B]), dim=-1)
