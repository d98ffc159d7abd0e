"""DPT head (Ranftl et al., "Vision Transformers for Dense Prediction") predicting the coarse warp.

Input: the two backbone maps ``(B, h, w, 1024)`` (the second one already summed with the multi-view
features and the match embedding). Each is used twice, giving four token maps that are layer-normed,
projected and resized to strides ``16/4, 16/2, 16, 32`` of the input, fused coarse-to-fine by
RefineNet-style blocks and upsampled to stride 4.

Output: ``(B, 4h, 4w, warp_dim + confidence_dim)`` (channels-last).

Note on residual units: the official implementation applies an *in-place* ReLU to the unit's input
before the skip connection is added, so a residual unit computes ``conv2(relu(conv1(relu(x)))) + relu(x)``.
We compute exactly that, without the in-place mutation.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DPTHead"]


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(features, features, 3, 1, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FusionBlock(nn.Module):
    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1, 1, 0, bias=True)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.has_residual = has_residual
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size: tuple[int, int] | None = None):
        if self.has_residual:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            size = (int(x.shape[-2] * 2), int(x.shape[-1] * 2))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """Dense prediction head; see the module docstring for shapes."""

    def __init__(
        self,
        dim_in: int = 1024,
        out_dim: int = 3,
        features: int = 256,
        out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024),
        patch_size: int = 16,
        down_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.down_ratio = down_ratio
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, oc, 1, 1, 0) for oc in out_channels)
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4, padding=0),
                nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2, padding=0),
                nn.Identity(),
                nn.Conv2d(out_channels[3], out_channels[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        scratch = nn.Module()
        for i, oc in enumerate(out_channels, start=1):
            setattr(scratch, f"layer{i}_rn", nn.Conv2d(oc, features, 3, 1, 1, bias=False))
        scratch.refinenet1 = FusionBlock(features)
        scratch.refinenet2 = FusionBlock(features)
        scratch.refinenet3 = FusionBlock(features)
        scratch.refinenet4 = FusionBlock(features, has_residual=False)
        scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, 1, 1)
        scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(32, out_dim, 1, 1, 0)
        )
        self.scratch = scratch

    def forward(self, tokens: list[torch.Tensor], *, amp: bool = False) -> torch.Tensor:
        """``tokens``: list of ``(B, h, w, dim_in)`` (length dividing 4) -> ``(B, 4h, 4w, out_dim)``."""
        B, h, w, _ = tokens[0].shape
        factor = 4 // len(tokens)
        tokens = [t for t in tokens for _ in range(factor)]
        ctx = torch.autocast(tokens[0].device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            maps = []
            for i, t in enumerate(tokens):
                x = self.norm(t.reshape(B, h * w, -1))
                x = x.permute(0, 2, 1).reshape(B, -1, h, w)
                maps.append(self.resize_layers[i](self.projects[i](x)))
            s = self.scratch
            l1, l2, l3, l4 = (getattr(s, f"layer{i}_rn")(m) for i, m in enumerate(maps, start=1))
            out = s.refinenet4(l4, size=l3.shape[2:])
            out = s.refinenet3(out, l3, size=l2.shape[2:])
            out = s.refinenet2(out, l2, size=l1.shape[2:])
            out = s.refinenet1(out, l1)
            out = s.output_conv1(out)
            size = (int(h * self.patch_size / self.down_ratio), int(w * self.patch_size / self.down_ratio))
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=True)
        out = s.output_conv2(out.float())
        return out.permute(0, 2, 3, 1)
