"""Linear layers (and a following GELU) as one oneDNN inner product at float32 CPU inference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from romav2_plugin.nn.conv_bn import cpu_fused_dtype

__all__ = ["FusedLinear", "FusedMlp", "linear"]

# What an activation is called by torch.ops.mkldnn._linear_pointwise: (attr, algorithm).
_ACTIVATIONS = {None: ("none", ""), "gelu": ("gelu", "none")}  # "none": the exact (erf) GELU, nn.GELU()'s


def linear(x: torch.Tensor, layer: nn.Linear, act: str | None = None) -> torch.Tensor:
    """``layer(x)``, followed by the exact GELU when ``act="gelu"``.

    For CPU inference in float32 (:func:`~romav2_plugin.nn.conv_bn.cpu_fused_dtype`, no autocast to bf16) it
    is one oneDNN inner product that adds the bias, and applies the GELU, as it writes the output: no
    separate pass to broadcast the bias into the output (``addmm``) nor to apply the GELU. Results differ
    from ``F.linear``'s by summation order (~1e-7 relative). Elsewhere it is ``F.linear`` and ``F.gelu``:
    training, gradients, other devices, float64, compiling or exporting, and bf16 (under an autocast or
    not), where the same fused op was measured slower end to end on a CPU with native bf16
    (``benchmarks.cpu_levers --levers fusedlinear``: ``precise`` 1.04x, ``base`` 1.01x; in fp32 0.96x).

    Shapes: ``x (..., in_features)`` -> ``(..., out_features)``.
    """
    if act not in _ACTIVATIONS:
        raise ValueError(f"linear(): act={act!r} is not one of {sorted(map(str, _ACTIVATIONS))}")
    dt = cpu_fused_dtype(x, layer.weight)
    if dt is not torch.float32:  # None, or bf16: F.linear's addmm is the faster of the two there (measured)
        y = F.linear(x, layer.weight, layer.bias)
        return F.gelu(y) if act == "gelu" else y
    attr, algorithm = _ACTIVATIONS[act]  # here x and the parameters are float32 (the gate), no casts needed
    return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, attr, [], algorithm)


class FusedLinear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (same parameters, same state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self)

    @classmethod
    def of(cls, layer: nn.Linear) -> FusedLinear:
        """A :class:`FusedLinear` holding ``layer``'s parameters (the same tensors, not copies)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.weight = layer.weight
        new.bias = layer.bias
        return new


class FusedMlp(nn.Module):
    """``fc2(gelu(fc1(x)))`` with the GELU fused into ``fc1`` (:func:`linear`); the parameters and state-dict
    keys of an MLP with submodules ``fc1`` and ``fc2`` (ours in :mod:`romav2_plugin.nn.vit`, timm's).

    Shapes: ``x (..., dim)`` -> ``(..., out_dim)``.
    """

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x, self.fc1, "gelu"), self.fc2)

    @classmethod
    def of_timm(cls, mlp: nn.Module) -> nn.Module:
        """timm's ``Mlp`` as a :class:`FusedMlp` when it is exactly fc1, exact GELU, fc2 (no dropout, no norm,
        nothing else with parameters or buffers); otherwise ``mlp`` unchanged."""
        act = getattr(mlp, "act", None)
        simple = (
            isinstance(getattr(mlp, "fc1", None), nn.Linear)
            and isinstance(getattr(mlp, "fc2", None), nn.Linear)
            and isinstance(act, nn.GELU) and act.approximate == "none"
            and all(isinstance(getattr(mlp, n, nn.Identity()), nn.Identity) or
                    (isinstance(getattr(mlp, n), nn.Dropout) and getattr(mlp, n).p == 0.0)
                    for n in ("drop1", "norm", "drop2"))
            and {n for n, _ in mlp.named_children()} <= {"fc1", "act", "drop1", "norm", "fc2", "drop2"}
        )
        return cls(mlp.fc1, mlp.fc2) if simple else mlp
