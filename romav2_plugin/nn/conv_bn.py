"""A convolution followed by a batch norm, folded into one convolution at inference."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["conv_bn"]


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(x))``. When ``bn`` normalises with its running statistics (eval mode), the normalisation is
    folded into the convolution (``w * s``, ``(b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``),
    computed on the fly so that it follows the parameters and stays differentiable: the same maths with one
    pass over the activations fewer (fp32 results differ by rounding, ~1e-7 relative). In training mode (batch
    statistics, running statistics updated) it is the two modules as they are.

    Shapes: ``x (B, C_in, H, W)`` -> ``(B, C_out, H', W')``.
    """
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return bn(conv(x))
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale if conv.bias is None else (conv.bias - bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    weight = conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    return conv._conv_forward(x, weight, shift)
