"""conv_bn: a convolution + batch norm folded at inference equals the two modules (float64 reference), keeps
gradients, and leaves training mode to the modules as they are; conv_bn_relu: fused by oneDNN at CPU inference
(the same result as the unfused path), unfused everywhere else."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from op_log import OpNames
from torch import nn

from romav2_plugin.nn.conv_bn import conv_bn, conv_bn_relu


def _pair(groups: int, bias: bool, affine: bool, dtype=torch.float64):
    g = torch.Generator().manual_seed(groups + 2 * bias + 4 * affine)
    conv = nn.Conv2d(8, 8, 5, padding=2, groups=groups, bias=bias).to(dtype)
    bn = nn.BatchNorm2d(8, affine=affine).to(dtype)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(8, generator=g, dtype=dtype))
        bn.running_var.copy_(torch.rand(8, generator=g, dtype=dtype) + 0.1)
        if affine:
            bn.weight.copy_(torch.randn(8, generator=g, dtype=dtype))
            bn.bias.copy_(torch.randn(8, generator=g, dtype=dtype))
    x = torch.randn(2, 8, 11, 13, generator=g, dtype=dtype)
    return conv, bn, x


@pytest.mark.parametrize("groups, bias, affine", [(1, True, True), (8, True, True), (8, False, True), (1, True, False)])
def test_folded_equals_the_two_modules_in_eval(groups, bias, affine):
    conv, bn, x = _pair(groups, bias, affine)
    bn.eval()
    torch.testing.assert_close(conv_bn(x, conv, bn), bn(conv(x)), atol=1e-12, rtol=1e-12)


def test_float32_tolerance_and_channels_last():
    conv, bn, x = _pair(8, True, True, dtype=torch.float32)
    bn.eval()
    x = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(conv_bn(x, conv, bn), bn(conv(x)), atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_conv_and_the_norm_parameters():
    conv, bn, x = _pair(8, True, True)
    bn.eval()
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: conv_bn(t, conv, bn), (x,))
    conv_bn(x, conv, bn).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (conv.weight, conv.bias, bn.weight, bn.bias))


def test_training_mode_uses_batch_statistics_and_updates_the_running_ones():
    conv, bn, x = _pair(1, True, True)
    bn.train()
    ref_bn = copy.deepcopy(bn)
    before = bn.running_mean.clone()
    out = conv_bn(x, conv, bn)
    assert not torch.equal(bn.running_mean, before)  # running statistics updated, as bn(conv(x)) does
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), bn.bias.detach(), atol=1e-9, rtol=0)  # batch-normalised
    torch.testing.assert_close(out, ref_bn(conv(x)), atol=0, rtol=0)  # the two modules as they are
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, atol=0, rtol=0)


def _cl(conv, bn, x, dtype=torch.float32):
    conv, bn = conv.to(dtype), bn.to(dtype)
    bn.eval()
    return conv, bn, x.to(dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("groups", [1, 8])
def test_conv_bn_relu_fused_at_cpu_inference_equals_the_unfused_path(groups):
    conv, bn, x = _cl(*_pair(groups, True, True))
    with torch.inference_mode():
        with OpNames() as ops:
            fused = conv_bn_relu(x, conv, bn)
        unfused = F.relu(conv_bn(x, conv, bn))
    assert "_convolution_pointwise" in ops.names  # the fused oneDNN convolution ran
    assert fused.is_contiguous(memory_format=torch.channels_last)
    ref = F.relu(bn.double()(conv.double()(x.double())))
    torch.testing.assert_close(fused, unfused, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused.double(), ref, atol=1e-5, rtol=1e-5)


def test_conv_bn_relu_fused_under_cpu_autocast_matches_the_autocast_convolution():
    conv, bn, x = _cl(*_pair(8, True, True))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        with OpNames() as ops:
            fused = conv_bn_relu(x, conv, bn)
        unfused = F.relu(conv_bn(x, conv, bn))
    assert "_convolution_pointwise" in ops.names
    assert fused.dtype == unfused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), unfused.float(), atol=1e-2, rtol=1e-2)  # bf16 rounding


@pytest.mark.parametrize("case", ["grad", "float64", "nchw", "train"])
def test_conv_bn_relu_falls_back_where_the_fused_op_must_not_run(case):
    conv, bn, x = _cl(*_pair(8, True, True))
    if case == "float64":
        conv, bn, x = _cl(conv, bn, x, torch.float64)
    if case == "nchw":
        x = x.contiguous()
    if case == "train":
        bn.train()
    ctx = contextlib.nullcontext() if case in ("grad", "train") else torch.inference_mode()
    with ctx, OpNames() as ops:
        out = conv_bn_relu(x, conv, bn)
    assert "_convolution_pointwise" not in ops.names
    if case == "grad":
        assert out.requires_grad  # gradients reach the parameters through the unfused path
        out.sum().backward()
        assert conv.weight.grad is not None and bn.weight.grad is not None
    assert (out >= 0).all()
