"""linear / FusedLinear / FusedMlp (romav2_plugin.nn.linear): at CPU inference one oneDNN inner product with
the bias and the exact GELU applied as it writes (float32), equal to F.linear (+ F.gelu) within a tolerance
against a float64 reference; the plain ops everywhere else (bf16, gradients, float64, compiling); the same
parameters and state-dict keys as the modules they stand in for (ours and timm's)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from op_log import OpNames
from torch import nn

from romav2_plugin.nn.linear import FusedLinear, FusedMlp, linear


def _layer_and_input(bias: bool = True, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(24, 40, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(40, 24, generator=g, dtype=dtype) * 0.3)
        if bias:
            layer.bias.copy_(torch.randn(40, generator=g, dtype=dtype))
    x = torch.randn(2, 9, 24, generator=g, dtype=dtype)
    return layer, x


def _reference(layer: nn.Linear, x: torch.Tensor, act: str | None) -> torch.Tensor:
    y = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    return F.gelu(y) if act == "gelu" else y


@pytest.mark.parametrize("act", [None, "gelu"])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_at_cpu_inference_matches_float64(act, bias):
    layer, x = _layer_and_input(bias)
    with torch.inference_mode():
        with OpNames() as ops:
            fused = linear(x, layer, act)
        plain = F.linear(x, layer.weight, layer.bias)
        plain = F.gelu(plain) if act == "gelu" else plain
    assert "_linear_pointwise" in ops.names and "addmm" not in ops.names and "gelu" not in ops.names
    assert fused.shape == (2, 9, 40) and fused.dtype == torch.float32
    ref = _reference(layer, x, act)
    torch.testing.assert_close(fused.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", [None, "gelu"])
@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_keeps_the_plain_linear(act, autocast):
    # bf16 (under a CPU autocast, or bf16 weights and activations) stays F.linear + F.gelu: the fused op was
    # measured slower end to end there (benchmarks/results/cpu_levers_cpu.md, lever fusedlinear)
    layer, x = _layer_and_input()
    if not autocast:
        layer, x = layer.bfloat16(), x.bfloat16()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        with OpNames() as ops:
            out = linear(x, layer, act)
        plain = F.linear(x, layer.weight, layer.bias)
        plain = F.gelu(plain) if act == "gelu" else plain
    assert "_linear_pointwise" not in ops.names
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, plain, atol=0, rtol=0)
    ref = _reference(layer.float(), x.bfloat16().float(), act)  # inputs rounded to bf16, as autocast does
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=2e-2)  # bf16 rounding of weights and output


@pytest.mark.parametrize("case", ["grad", "float64", "mixed dtypes"])
def test_falls_back_where_the_fused_op_must_not_run(case):
    layer, x = _layer_and_input(dtype=torch.float64 if case == "float64" else torch.float32)
    if case == "mixed dtypes":
        x = x.bfloat16()
    ctx = contextlib.nullcontext() if case == "grad" else torch.inference_mode()
    with ctx, OpNames() as ops:
        if case == "mixed dtypes":  # F.linear's own error, not a oneDNN one
            with pytest.raises(RuntimeError, match="dtype"):
                linear(x, layer, "gelu")
            return
        out = linear(x, layer, "gelu")
    assert "_linear_pointwise" not in ops.names
    torch.testing.assert_close(out.double(), _reference(layer, x, "gelu"), atol=1e-5, rtol=1e-5)
    if case == "grad":
        out.sum().backward()  # gradients reach the parameters through F.linear
        assert layer.weight.grad is not None and layer.bias.grad is not None


def test_gradcheck_of_the_training_path():
    layer, x = _layer_and_input(dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w, b: linear(x, layer, "gelu"), (x, layer.weight, layer.bias))


def test_unknown_activation_names_the_choices():
    layer, x = _layer_and_input()
    with pytest.raises(ValueError, match="relu.*not one of"):
        linear(x, layer, "relu")


def test_fused_linear_and_mlp_keep_parameters_and_keys():
    layer, x = _layer_and_input()
    fl = FusedLinear.of(layer)
    assert fl.weight is layer.weight and fl.bias is layer.bias
    assert fl.state_dict().keys() == layer.state_dict().keys()
    with torch.inference_mode():
        torch.testing.assert_close(fl(x), layer(x), atol=1e-5, rtol=1e-5)
    assert "out_features=40" in repr(fl)


def test_timm_mlp_becomes_fused_only_when_it_is_fc1_gelu_fc2():
    from timm.layers.mlp import Mlp

    torch.manual_seed(0)
    mlp = Mlp(24, 48).eval()
    fused = FusedMlp.of_timm(mlp)
    assert isinstance(fused, FusedMlp) and fused.fc1 is mlp.fc1 and fused.fc2 is mlp.fc2
    assert fused.state_dict().keys() == mlp.state_dict().keys()
    x = torch.randn(3, 5, 24)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), mlp(x), atol=1e-5, rtol=1e-5)
    # Anything else stays as it is: an approximate GELU, a norm with parameters, dropout.
    assert FusedMlp.of_timm(Mlp(24, 48, act_layer=lambda: nn.GELU(approximate="tanh"))).__class__ is Mlp
    assert FusedMlp.of_timm(Mlp(24, 48, norm_layer=nn.LayerNorm)).__class__ is Mlp
    assert FusedMlp.of_timm(Mlp(24, 48, drop=0.1)).__class__ is Mlp


def test_backbone_runs_its_mlps_through_the_fused_path():
    from romav2_plugin.config import BackboneConfig
    from romav2_plugin.nn.backbone import DINOv3Backbone

    cfg = BackboneConfig(embed_dim=64, depth=2, num_heads=2, layers=(0, 1))
    bb = DINOv3Backbone(cfg).eval()
    assert all(isinstance(b.mlp, FusedMlp) and isinstance(b.attn.proj, FusedLinear) for b in bb.vit.blocks)
    img = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), OpNames() as ops:
        fused = bb(img)
    assert "_linear_pointwise" in ops.names
    with torch.no_grad():  # the float64 reference (the plain path: the fused op is float32 only)
        ref = bb.double()(img.double())
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)
