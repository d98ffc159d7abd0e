"""A convolution followed by a batch norm (and a ReLU), folded into one convolution at inference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["conv_bn", "conv_bn_relu"]


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The folded ``(weight, bias)`` of ``bn(conv(.))`` when ``bn`` normalises with its running statistics,
    else ``None`` (training mode: batch statistics, running statistics updated)."""
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale if conv.bias is None else (conv.bias - bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1))), shift


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(x))``. When ``bn`` normalises with its running statistics (eval mode), the normalisation is
    folded into the convolution (``w * s``, ``(b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``),
    computed on the fly so that it follows the parameters and stays differentiable: the same maths with one
    pass over the activations fewer (fp32 results differ by rounding, ~1e-7 relative). In training mode (batch
    statistics, running statistics updated) it is the two modules as they are.

    Shapes: ``x (B, C_in, H, W)`` -> ``(B, C_out, H', W')``.
    """
    folded = _folded(conv, bn)
    if folded is None:
        return bn(conv(x))
    return conv._conv_forward(x, *folded)


def cpu_fused_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype a fused oneDNN op (convolution or linear layer with its activation applied as it writes)
    runs in, or ``None`` where it must not be used: CPU inference on float32 / bf16 activations, with no
    autograd, compiler or exporter watching. Under a CPU autocast: the autocast dtype (the inputs are cast as
    autocast casts them for a convolution or a linear layer); without one, ``x``'s dtype, and only when the
    weight has it too (the unfused op would refuse mixed dtypes: its error is kept)."""
    if (
        x.device.type != "cpu"
        or not torch.backends.mkldnn.is_available()
        or torch.is_grad_enabled()  # off under no_grad and inference_mode
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
    ):
        return None
    autocast = torch.is_autocast_enabled("cpu")
    dt = torch.get_autocast_dtype("cpu") if autocast else x.dtype
    if dt not in (torch.float32, torch.bfloat16) or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not autocast and weight.dtype != dt:
        return None
    return dt


def _fused_dtype(x: torch.Tensor, conv: nn.Conv2d) -> torch.dtype | None:
    """:func:`cpu_fused_dtype` for a convolution: also channels-last 4-D activations (what the refiners and
    the fine features feed it) and zero padding given as numbers."""
    if (
        x.dim() != 4
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
        or not x.is_contiguous(memory_format=torch.channels_last)
    ):
        return None
    return cpu_fused_dtype(x, conv.weight)


def conv_bn_relu(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``relu(bn(conv(x)))`` (:func:`conv_bn` and a ReLU). For CPU inference on channels-last activations the
    three run as one oneDNN convolution with the ReLU applied as it writes its output (the same convolution
    algorithm as ``F.conv2d`` there, and a ReLU commutes with the output's rounding: ``match()``'s warps were
    bit for bit the unfused ones at ``base`` and ``precise``, benchmarks/results/cpu_levers_cpu.md), saving one pass over the activations: 0.10 against 0.15 s for the 5x5 depthwise
    convolution of 512 channels at 320x320, bf16, one thread of a 2-core AMD EPYC (beside a training run). Under a CPU autocast the
    inputs are cast as autocast casts them for a convolution. Elsewhere (training, gradients, other devices,
    float64, exporting) it is :func:`conv_bn` followed by ``F.relu``.

    Shapes: ``x (B, C_in, H, W)`` -> ``(B, C_out, H', W')``.
    """
    dt = _fused_dtype(x, conv)
    folded = _folded(conv, bn) if dt is not None else None
    if folded is None:
        return F.relu(conv_bn(x, conv, bn))
    weight, bias = folded
    return torch.ops.mkldnn._convolution_pointwise(
        x.to(dt), weight.to(dt), bias.to(dt), list(conv.padding), list(conv.stride), list(conv.dilation),
        conv.groups, "relu", [], "",
    )
