"""VGG19-BN fine features for the refiners.

The first 26 layers of torchvision's ``vgg19_bn().features`` (convolutions, batch norms, ReLUs and
the first two max-pools), laid out under the same indices so the official ``refiner_features.layers.N``
keys load directly. The features are read just before each max-pool: 64 channels at stride 1, 128 at
stride 2, 256 at stride 4. (The official model also runs the third max-pool and throws its output
away; we stop before it.)

Under ``amp`` the convolutions run in a bf16 autocast on the input's device. The official code hard-codes
``device_type="cuda"`` here, so it runs them in bf16 on CUDA and in fp32 on a CPU; ours follows its CUDA
placement on every device (on a CPU with native bf16 this halves the time of this stage).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
from torch import nn

from romav2_plugin.config import FineFeaturesConfig
from romav2_plugin.nn.backbone import imagenet_normalize
from romav2_plugin.nn.conv_bn import conv_bn, conv_bn_relu

__all__ = ["FineFeatures"]


def _vgg19_to_stride4(c1: int, c2: int, c4: int) -> tuple[int | str, ...]:
    """Out channels per conv, ``"M"`` for max-pool: the VGG19 layout up to stride 4 (pre-pool)."""
    return (c1, c1, "M", c2, c2, "M", c4, c4, c4, c4)


class FineFeatures(nn.Module):
    """Forward: ``img (B, 3, H, W)`` in ``[0, 1]`` -> ``{1: (B, H, W, c1), 2: (B, H/2, W/2, c2),
    4: (B, H/4, W/4, c4)}`` channels-last views (official widths 64, 128, 256)."""

    def __init__(self, cfg: FineFeaturesConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or FineFeaturesConfig()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _vgg19_to_stride4(*cfg.channels):
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c_in = v
        self.layers = nn.ModuleList(layers)

    def forward(
        self, img: torch.Tensor, *, amp: bool = False, project: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] | None = None
    ) -> dict[int, torch.Tensor]:
        """``project``: per stride, a function applied to that stride's ``(B, h, w, C)`` map as soon as it is
        computed, outside any autocast (the refiners' fp32 input projections), so only its (narrower) result
        is kept: the full-width maps are freed while the deeper layers run."""
        # channels-last input: faster convolutions, and the NHWC feature views below are contiguous
        x = imagenet_normalize(img).contiguous(memory_format=torch.channels_last)
        feats: dict[int, torch.Tensor] = {}
        stride = 1

        def keep(s: int, f: torch.Tensor) -> None:
            if project is not None and s in project:
                with torch.autocast(f.device.type, enabled=False):
                    f = project[s](f)
            feats[s] = f

        # The official code autocasts here with device_type="cuda" (bf16 on CUDA; its CPU runs stay fp32).
        # Under amp we autocast on the input's device, so a CPU with native bf16 gets the CUDA placement.
        ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            i = 0
            while i < len(self.layers):
                layer = self.layers[i]
                if isinstance(layer, nn.MaxPool2d):
                    keep(stride, x.permute(0, 2, 3, 1))
                    stride *= 2
                nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
                if isinstance(layer, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
                    after = self.layers[i + 2] if i + 2 < len(self.layers) else None
                    if isinstance(after, nn.ReLU):
                        x = conv_bn_relu(x, layer, nxt)  # folded, and fused with the ReLU on a CPU at inference
                        i += 3
                    else:
                        x = conv_bn(x, layer, nxt)  # folded at inference
                        i += 2
                    continue
                x = layer(x)
                i += 1
            keep(stride, x.permute(0, 2, 3, 1))
        return feats
