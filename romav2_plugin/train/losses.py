"""The training objectives of RoMa v2's two stages (arXiv 2511.15706, Sec. 3), written for this package.

Matcher stage (:func:`matcher_loss`):

* ``nll``: the auxiliary negative log-likelihood of the single-head attention: for every co-visible token of
  A, ``-log softmax(logits)`` at the token of B that contains the ground-truth match;
* ``warp``: the generalized Charbonnier penalty (:func:`charbonnier`) of the coarse (stride 4) warp error,
  in pixels of the working resolution, on co-visible pixels;
* ``overlap``: binary cross-entropy of the overlap logit against co-visibility, on all pixels.

Refiner stage (:func:`refiner_loss`), summed over the refiners' strides (4, 2, 1):

* ``warp``: the Charbonnier penalty of each refiner's warp error (pixels of the working resolution) on
  co-visible pixels whose current error is below ``cutoff_px * stride`` (pixels the refiner cannot reach are
  left out);
* ``overlap``: ``overlap_weight`` (1e-2) x the binary cross-entropy of the accumulated overlap logit;
* ``precision``: ``precision_weight`` (1e-3) x the Gaussian negative log-likelihood of the predicted 2x2
  precision ``P`` on the *detached* residual ``r`` (pixels): ``0.5 r^T P r - 0.5 log det P``, on the same
  pixels as the warp term.

Every term is a mean over its pixels (zero when there are none), so each is a scalar that does not grow
with the resolution.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from romav2_plugin.train.ground_truth import resample_ground_truth

__all__ = ["LossConfig", "charbonnier", "matcher_loss", "refiner_loss", "gaussian_nll", "patch_targets"]


@dataclass(frozen=True)
class LossConfig:
    """Weights and constants of both stages' objectives (see the module docstring).

    ``charbonnier_alpha``/``charbonnier_c``: ``rho(r) = (r^2 + c^2)^(alpha/2) - c^alpha`` with ``r`` in
    pixels; ``cutoff_px``: refiner pixels with an error above ``cutoff_px * stride`` are left out.
    """

    nll_weight: float = 1.0
    matcher_warp_weight: float = 1.0
    matcher_overlap_weight: float = 1.0
    charbonnier_alpha: float = 0.5
    charbonnier_c: float = 1.0
    refiner_warp_weight: float = 1.0
    overlap_weight: float = 1e-2
    precision_weight: float = 1e-3
    cutoff_px: float = 8.0


def charbonnier(r: torch.Tensor, alpha: float, c: float) -> torch.Tensor:
    """Generalized Charbonnier ``(r^2 + c^2)^(alpha/2) - c^alpha`` (zero at ``r = 0``), elementwise."""
    return (r.square() + c * c).pow(alpha / 2) - c**alpha


def _full(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in at least float32 (bf16/fp16 activations under autocast are upcast)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n = mask.sum()
    return torch.where(n > 0, (x * mask).sum() / n.clamp(min=1), x.sum() * 0)


def _pixel_error(warp: torch.Tensor, gt: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """``|warp - gt|`` in pixels of an ``H x W`` image (normalized units scaled by ``(W/2, H/2)``)."""
    scale = torch.tensor((W / 2, H / 2), device=warp.device, dtype=warp.dtype)
    return (warp - gt) * scale


def patch_targets(gt_warp: torch.Tensor, gt_covis: torch.Tensor, hw: tuple[int, int]):
    """Token of B holding each A token's ground-truth match.

    Args:
        gt_warp: ``(B, H, W, 2)``; gt_covis: ``(B, H, W)``; hw: token grid ``(h, w)`` (both images).

    Returns:
        target index ``(B, h*w)`` (row-major token of B) and validity ``(B, h*w)``.
    """
    h, w = hw
    warp, covis = resample_ground_truth(gt_warp, gt_covis, (h, w))
    col = ((warp[..., 0] + 1) / 2 * w).floor().long().clamp(0, w - 1)
    row = ((warp[..., 1] + 1) / 2 * h).floor().long().clamp(0, h - 1)
    return (row * w + col).reshape(warp.shape[0], -1), covis.reshape(warp.shape[0], -1)


def matcher_loss(
    coarse: Mapping[str, Any], gt_warp: torch.Tensor, gt_covis: torch.Tensor, image_hw: tuple[int, int],
    cfg: LossConfig, direction: str = "AB",
) -> dict[str, torch.Tensor]:
    """Matcher-stage terms for one direction.

    Args:
        coarse: the matcher's output (``preds["matcher"]`` of ``RoMaV2.forward(..., return_attention=True)``):
            ``warp_{dir} (B, h4, w4, 2)``, ``confidence_{dir} (B, h4, w4, 1)``, ``attention_{dir} (B, n, n)``.
        gt_warp, gt_covis: ground truth at any resolution of A.
        image_hw: working resolution ``(H, W)`` (pixel units of the warp term).

    Returns:
        ``{"nll", "warp", "overlap", "total"}`` scalars.
    """
    H, W = image_hw
    warp = coarse[f"warp_{direction}"]
    logit = coarse[f"confidence_{direction}"][..., 0]
    attn = coarse[f"attention_{direction}"]
    Bn, h4, w4, _ = warp.shape
    n = attn.shape[-1]
    ratio = round((h4 * w4 / n) ** 0.5)
    target, valid = patch_targets(gt_warp, gt_covis, (h4 // ratio, w4 // ratio))
    logp = torch.log_softmax(_full(attn), dim=-1).gather(-1, target[..., None])[..., 0]
    nll = _masked_mean(-logp, valid.to(logp.dtype))
    gw, gc = resample_ground_truth(gt_warp, gt_covis, (h4, w4))
    err = _pixel_error(_full(warp), gw.to(_full(warp).dtype), H, W).norm(dim=-1)
    reg = _masked_mean(charbonnier(err, cfg.charbonnier_alpha, cfg.charbonnier_c), gc.to(err.dtype))
    ov = F.binary_cross_entropy_with_logits(_full(logit), gc.to(_full(logit).dtype))
    total = cfg.nll_weight * nll + cfg.matcher_warp_weight * reg + cfg.matcher_overlap_weight * ov
    return {"nll": nll, "warp": reg, "overlap": ov, "total": total}


def gaussian_nll(residual: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """``0.5 r^T P r - 0.5 log det P`` per pixel.

    Args:
        residual: ``(..., 2)`` (pixels; pass it detached); precision: ``(..., 3)`` = ``(P00, P10, P11)``.
    """
    p00, p10, p11 = precision.unbind(-1)
    rx, ry = residual.unbind(-1)
    quad = p00 * rx * rx + 2 * p10 * rx * ry + p11 * ry * ry
    det = (p00 * p11 - p10 * p10).clamp(min=1e-12)
    return 0.5 * quad - 0.5 * det.log()


def refiner_loss(
    preds: Mapping[str, Any], gt_warp: torch.Tensor, gt_covis: torch.Tensor, image_hw: tuple[int, int],
    cfg: LossConfig, direction: str = "AB",
) -> dict[str, torch.Tensor]:
    """Refiner-stage terms for one direction, summed over the refiners found in ``preds``.

    Args:
        preds: ``RoMaV2.forward`` output with ``refiner_{s}_{dir}`` = ``{"warp" (B, H/s, W/s, 2),
            "confidence" (B, H/s, W/s, 4)}``.
        gt_warp, gt_covis: ground truth of A at the working resolution (or any).
        image_hw: working resolution ``(H, W)``.

    Returns:
        ``{"warp", "overlap", "precision", "total"}`` and per-stride ``"warp_{s}"``.
    """
    H, W = image_hw
    out: dict[str, torch.Tensor] = {}
    totals = {"warp": 0.0, "overlap": 0.0, "precision": 0.0}
    strides = sorted((int(k.split("_")[1]) for k in preds if k.startswith("refiner_") and k.endswith(direction)
                      and preds[k] is not None), reverse=True)
    if not strides:
        raise ValueError("refiner_loss: preds hold no refiner outputs (run the model with refine=True)")
    for s in strides:
        p = preds[f"refiner_{s}_{direction}"]
        warp, conf = _full(p["warp"]), _full(p["confidence"])
        gw, gc = resample_ground_truth(gt_warp, gt_covis, warp.shape[1:3])
        res = _pixel_error(warp, gw.to(warp.dtype), H, W)
        err = res.norm(dim=-1)
        keep = (gc & (err.detach() < cfg.cutoff_px * s)).to(warp.dtype)
        reg = _masked_mean(charbonnier(err, cfg.charbonnier_alpha, cfg.charbonnier_c), keep)
        ov = F.binary_cross_entropy_with_logits(conf[..., 0], gc.to(conf.dtype))
        prec = _masked_mean(gaussian_nll(res.detach(), conf[..., 1:4]), keep)
        out[f"warp_{s}"] = reg
        totals["warp"] = totals["warp"] + reg
        totals["overlap"] = totals["overlap"] + ov
        totals["precision"] = totals["precision"] + prec
    out.update(totals)
    out["total"] = (
        cfg.refiner_warp_weight * totals["warp"] + cfg.overlap_weight * totals["overlap"]
        + cfg.precision_weight * totals["precision"]
    )
    return out
