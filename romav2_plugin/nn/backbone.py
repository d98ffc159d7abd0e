"""Frozen DINOv3 ViT-L/16 coarse descriptor, built on timm.

timm's ``vit_large_patch16_dinov3_qkvb`` loaded through ``timm.models.eva.checkpoint_filter_fn``
reproduces Meta's DINOv3 reference (4 storage tokens, RoPE, LayerScale, masked k-bias). This module owns
the wrapper around it: ImageNet normalisation, layer selection, token reshape and the dtype policy.

The official pipeline runs all 24 blocks but only uses the normed outputs of blocks 11 and 17. We stop
after the last used block and do not build blocks 18-23 at all, which gives the same features for a
quarter less backbone compute and memory (their weights in the checkpoint are validated, then dropped).
"""

from __future__ import annotations

import torch
from torch import nn

from romav2_plugin.config import BackboneConfig
from romav2_plugin.nn.linear import FusedLinear, FusedMlp

__all__ = ["DINOv3Backbone", "imagenet_normalize"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(img: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in ``[0, 1]`` -> ImageNet-normalized, same shape and dtype."""
    mean = torch.tensor(_IMAGENET_MEAN, device=img.device, dtype=img.dtype)[None, :, None, None]
    std = torch.tensor(_IMAGENET_STD, device=img.device, dtype=img.dtype)[None, :, None, None]
    return (img - mean) / std


def _create_timm_vit(cfg: BackboneConfig, num_blocks: int | None = None) -> nn.Module:
    import timm

    model = timm.create_model(
        cfg.timm_name,
        pretrained=False,
        num_classes=0,
        dynamic_img_size=True,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
    )
    if num_blocks is not None:
        model.prune_intermediate_layers(indices=list(range(num_blocks)), prune_norm=False, prune_head=True)
    for blk in getattr(model, "blocks", ()):  # the same parameters, run through romav2_plugin.nn.linear
        blk.mlp = FusedMlp.of_timm(blk.mlp)
        proj = getattr(blk.attn, "proj", None)
        if type(proj) is nn.Linear:
            blk.attn.proj = FusedLinear.of(proj)
    return model


class DINOv3Backbone(nn.Module):
    """DINOv3 ViT/16 returning normed intermediate patch tokens.

    Frozen (``requires_grad=False``) after construction, as in the official model; when its parameters
    are made trainable (``romav2-tiny``, fine-tuning) the forward pass records gradients.

    Forward:
        img: ``(B, 3, H, W)`` float in ``[0, 1]``, ``H`` and ``W`` multiples of 16.

    Returns:
        list of ``len(cfg.layers)`` tensors ``(B, H/16, W/16, embed_dim)`` (prefix tokens dropped, final
        norm applied), in the dtype the backbone ran in.
    """

    def __init__(self, cfg: BackboneConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or BackboneConfig()
        self.num_blocks = max(self.cfg.layers) + 1
        self.vit = _create_timm_vit(self.cfg, self.num_blocks)
        self.requires_grad_(False)  # frozen, as in the official model

    def forward(self, img: torch.Tensor, *, amp: bool = False) -> list[torch.Tensor]:
        B, C, H, W = img.shape
        p = self.cfg.patch_size
        x = imagenet_normalize(img)
        param_dtype = self.vit.patch_embed.proj.weight.dtype
        if not amp:
            x = x.to(param_dtype)
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in self.vit.parameters())
        with torch.set_grad_enabled(trainable), torch.autocast(img.device.type, dtype=torch.bfloat16, enabled=amp):
            outs = self.vit.forward_intermediates(
                x,
                indices=list(self.cfg.layers),
                norm=True,
                stop_early=True,
                output_fmt="NLC",
                intermediates_only=True,
            )
        return [o.reshape(B, H // p, W // p, o.shape[-1]) for o in outs]
