"""The official RoMa v2 pipeline (``romav2==2.0.1``) assembled offline, for the comparative benchmarks.

``romav2.RoMaV2()`` downloads its weights and the DINOv3 code through ``torch.hub``, which is impossible
offline. Here the official model object is built from the official sub-modules (``Matcher``,
``Refiners``, ``FineFeatures``) and its own ``forward``/``match`` code runs unchanged. Only the DINOv3
backbone is substituted by a module with identical maths that does the same work as the official one:

* timm's ``vit_large_patch16_dinov3_qkvb`` with **all 24 blocks**, loaded from the same official-layout
  state dict through ``timm.models.eva.checkpoint_filter_fn``;
* ``forward_intermediates(indices=[11, 17], norm=True, output_fmt="NLC", intermediates_only=True)``
  **without** ``stop_early``: like ``dinov3.get_intermediate_layers(n=[11, 17])`` of the official
  model, it runs every block although only blocks 11 and 17 are used;
* ImageNet normalisation first and, under ``amp``, the backbone held in bf16 inside a bf16 autocast, as
  the official ``Descriptor`` wrapper does.

``amp=False`` turns every autocast of the official code off (``Matcher``/``Refiner`` flags plus a null
``torch.autocast`` for the hard-coded one of the DPT head), so the official code runs in plain fp32: on CPU
the as-is official code autocasts bf16, which these CPUs execute about 100x slower.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from unittest import mock

import torch
from torch import nn

__all__ = ["OfficialDINOv3", "build_official", "no_autocast", "official_available"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_TIMM_NAME = "vit_large_patch16_dinov3_qkvb"


def official_available() -> bool:
    from importlib.util import find_spec

    return find_spec("romav2") is not None


class OfficialDINOv3(nn.Module):
    """Unpruned DINOv3 ViT-L/16 (24 blocks) returning the normed tokens of blocks 11 and 17 as
    ``(B, H/16, W/16, 1024)``, the contract of the official ``Descriptor``."""

    def __init__(self, backbone_sd: Mapping[str, torch.Tensor], *, amp: bool, layers=(11, 17)) -> None:
        super().__init__()
        import timm
        from timm.models.eva import checkpoint_filter_fn

        self.vit = timm.create_model(_TIMM_NAME, pretrained=False, num_classes=0, dynamic_img_size=True)
        self.vit.load_state_dict(checkpoint_filter_fn(dict(backbone_sd), self.vit), strict=True)
        self.vit.requires_grad_(False)
        self.layers = list(layers)
        self.amp = amp
        if amp:
            self.vit.to(torch.bfloat16)  # the official wrapper holds the frozen backbone in bf16

    def forward(self, img: torch.Tensor) -> list[torch.Tensor]:
        B, _, H, W = img.shape
        mean = torch.tensor(_IMAGENET_MEAN, device=img.device)[None, :, None, None]
        std = torch.tensor(_IMAGENET_STD, device=img.device)[None, :, None, None]
        x = (img - mean) / std
        with torch.no_grad(), torch.autocast(img.device.type, torch.bfloat16, enabled=self.amp):
            outs = self.vit.forward_intermediates(
                x, indices=self.layers, norm=True, output_fmt="NLC", intermediates_only=True
            )
        return [o.reshape(B, H // 16, W // 16, o.shape[-1]) for o in outs]


def build_official(
    state_dict: Mapping[str, torch.Tensor],
    setting: str,
    *,
    amp: bool,
    device: torch.device | str = "cpu",
    backbone: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
) -> nn.Module:
    """The official ``romav2.RoMaV2`` object around an official-layout ``state_dict``.

    ``amp=True`` is the official code as released (bf16 autocast everywhere it uses it); ``amp=False``
    disables the flags it exposes; run its ``match`` inside :func:`no_autocast` as well for plain fp32.
    The official code places tensors on its own global device (CUDA when available), so ``device`` must
    agree with it. ``backbone``: a callable to use instead of :class:`OfficialDINOv3` (the parity tests pass
    ours, which is checked separately).
    """
    from romav2.device import device as official_device
    from romav2.features import FineFeatures
    from romav2.matcher import Matcher
    from romav2.refiner import Refiners
    from romav2.romav2 import RoMaV2 as Official

    device = torch.device(device)
    if device.type != official_device.type:
        raise ValueError(f"The official code runs on its global device {official_device}, not {device}")
    off = Official.__new__(Official)
    nn.Module.__init__(off)
    off.cfg = Official.Cfg()
    off.matcher = Matcher(Matcher.Cfg(enable_amp=amp))
    off.refiners = Refiners(Refiners.Cfg())
    for ref in off.refiners.values():  # Refiners.Cfg has no amp flag; each conv block has one
        for blk in [ref.block1, *ref.hidden_blocks]:
            blk.enable_amp = amp
    off.refiner_features = FineFeatures(FineFeatures.Cfg())
    off.anchor_width, off.anchor_height = off.cfg.anchor_width, off.cfg.anchor_height
    off.name = "RoMa v2 (official code)"
    rest = {k: v for k, v in state_dict.items() if not k.startswith("f.")}
    missing, unexpected = off.load_state_dict(rest, strict=False)
    if unexpected or any(not k.startswith("f.") for k in missing):
        raise ValueError(f"state dict does not fit the official model: missing {missing}, unexpected {unexpected}")
    if backbone is None:
        backbone = OfficialDINOv3({k[2:]: v for k, v in state_dict.items() if k.startswith("f.")}, amp=amp)
    off.f = backbone
    off.apply_setting(setting)
    off.to(device)
    off.eval()
    return off


@contextlib.contextmanager
def no_autocast():
    """Replace ``torch.autocast`` by a null context (the official DPT head hard-codes a bf16 autocast)."""
    with mock.patch.object(torch, "autocast", lambda *a, **k: contextlib.nullcontext()):
        yield
