"""ConvRefiners: residual warp and precision updates at strides 4, 2 and 1.

Each refiner takes the fine features of both images at its stride and the current warp (bilinearly
resized to its resolution) and predicts a displacement and a confidence update:

* inputs, concatenated on channels: ``proj(f_A)``, ``proj(f_B)`` sampled at the warp, an embedding of the
  displacement ``warp - grid`` scaled by ``(W / 512, H / 512)``, and (strides 4 and 2) the local correlation
  of ``proj(f_A)`` with ``proj(f_B)`` over a ``(2r+1)^2`` pixel window around the warp (r = 3, 1);
* a stack of depthwise-separable blocks (depthwise 5x5, BatchNorm, ReLU, pointwise 1x1), 1 + 8 of them;
* heads: displacement (added as ``delta / (4 * (w, h))`` to the warp) and 4 confidence channels: an
  overlap logit update and a Cholesky-parametrised 2x2 precision ``P = L L^T`` with
  ``L = [[softplus(a) + 1e-6, 0], [b, softplus(c) + 1e-6]]``. Overlap logits and precisions are
  accumulated over the strides.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from romav2_plugin.config import RefinerConfig
from romav2_plugin.geometry import bhwc_grid_sample, normalized_grid
from romav2_plugin.nn.conv_bn import conv_bn_relu
from romav2_plugin.ops import local_corr

__all__ = ["ConvRefiner", "build_refiners"]


class SeparableBlock(nn.Module):
    def __init__(self, dim: int, kernel_size: int, bn_momentum: float) -> None:
        super().__init__()
        self.conv_depthwise = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.BatchNorm2d(dim, momentum=bn_momentum)
        self.conv_pointwise = nn.Conv2d(dim, dim, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_pointwise(conv_bn_relu(x, self.conv_depthwise, self.norm))


class ConvRefiner(nn.Module):
    def __init__(self, cfg: RefinerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden_dim
        self.proj = nn.Linear(cfg.feat_dim, cfg.proj_dim)
        self.block1 = SeparableBlock(hidden, cfg.kernel_size, cfg.bn_momentum)
        self.hidden_blocks = nn.Sequential(
            *(SeparableBlock(hidden, cfg.kernel_size, cfg.bn_momentum) for _ in range(cfg.hidden_blocks))
        )
        self.disp_emb = nn.Conv2d(2, cfg.displacement_emb_dim, 1, 1, 0)
        self.warp_head = nn.Conv2d(hidden, cfg.warp_dim, 1, 1, 0)
        self.confidence_head = nn.Conv2d(hidden, cfg.confidence_dim, 1, 1, 0)

    def project(self, f: torch.Tensor) -> torch.Tensor:
        """The input projection, in fp32: ``(..., feat_dim)`` -> ``(..., proj_dim)``."""
        return self.proj(f.float())

    def forward(
        self,
        f_A: torch.Tensor,
        f_B: torch.Tensor,
        prev_warp: torch.Tensor,
        prev_confidence: torch.Tensor | None,
        scale_factor: torch.Tensor,
        *,
        amp: bool = False,
        projected: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One refinement step.

        Args:
            f_A, f_B: fine features ``(B, h, w, feat_dim)`` (channels-last), or with ``projected=True`` their
                projections :meth:`project` ``(B, h, w, proj_dim)`` (computed as the features are made).
            prev_warp: ``(B, h, w, 2)`` normalized ``[-1, 1]``.
            prev_confidence: ``(B, h, w, 1)`` (overlap logit from the matcher) or ``(B, h, w, 4)``
                (overlap logit + precision parameters from a previous refiner), or ``None``.
            scale_factor: ``(2,)`` = ``(W / anchor_width, H / anchor_height)`` of the image at this pass.

        Returns:
            warp ``(B, h, w, 2)`` and confidence ``(B, h, w, 4)`` = ``(logit, P00, P10, P11)``.
        """
        cfg = self.cfg
        B, h, w, _ = f_A.shape
        if f_B.shape[:3] != f_A.shape[:3] or prev_warp.shape[:3] != (B, h, w):
            raise ValueError(
                f"Refiner {cfg.stride}: shape mismatch f_A {tuple(f_A.shape)}, f_B {tuple(f_B.shape)}, "
                f"warp {tuple(prev_warp.shape)}"
            )
        prev_warp = prev_warp.detach()
        if prev_confidence is not None:
            prev_confidence = prev_confidence.detach()
        if not projected:
            f_A, f_B = self.project(f_A), self.project(f_B)
        with torch.no_grad():
            f_BA = bhwc_grid_sample(f_B, prev_warp, mode="bilinear", align_corners=False)
        grid = normalized_grid(B, h, w, device=prev_warp.device)
        disp = (prev_warp - grid).permute(0, 3, 1, 2)
        emb = self.disp_emb(scale_factor[None, :, None, None] * disp)
        parts = [f_A, f_BA, emb.permute(0, 2, 3, 1)]
        if cfg.local_corr_radius is not None:
            corr = local_corr(f_A.permute(0, 3, 1, 2), f_B.permute(0, 3, 1, 2), prev_warp, cfg.local_corr_radius)
            parts.append(corr.permute(0, 2, 3, 1))
        # Concatenated channels-last (one copy): ~1.5x faster depthwise/pointwise convolutions on CPU
        # (oneDNN) and GPU (cuDNN). The NCHW view of an NHWC tensor is channels-last.
        d = torch.cat(parts, dim=-1).permute(0, 3, 1, 2)
        ctx = torch.autocast(d.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            z = self.hidden_blocks(self.block1(d))
        z = z.float()
        displacement = self.warp_head(z).permute(0, 2, 3, 1)
        delta = self.confidence_head(z).permute(0, 2, 3, 1)
        size = torch.tensor((w, h), device=prev_warp.device)
        warp = prev_warp + displacement / (cfg.refine_init * size)
        if delta.shape[-1] == 4:
            l00 = F.softplus(delta[..., 1]) + 1e-6
            l10 = delta[..., 2]
            l11 = F.softplus(delta[..., 3]) + 1e-6
            delta = torch.stack((delta[..., 0], l00 * l00, l00 * l10, l10 * l10 + l11 * l11), dim=-1)
        if prev_confidence is None:
            confidence = delta
        elif prev_confidence.shape[-1] == delta.shape[-1]:
            confidence = prev_confidence + delta
        else:
            padded = torch.zeros_like(delta)
            padded[..., : prev_confidence.shape[-1]] = prev_confidence
            confidence = padded + delta
        return warp, confidence


def build_refiners(cfgs: tuple[RefinerConfig, ...]) -> nn.ModuleDict:
    """``ModuleDict`` keyed by stride as string (``"4"``, ``"2"``, ``"1"``), coarse to fine."""
    return nn.ModuleDict({str(c.stride): ConvRefiner(c) for c in cfgs})
