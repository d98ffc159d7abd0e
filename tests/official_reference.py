"""The official model (romav2==2.0.1, installed with --no-deps) around given weights, for parity tests.

The official constructor downloads weights and the DINOv3 code through torch.hub, impossible offline, so
``benchmarks/_official.py`` assembles the official model from its own sub-modules. Here the backbone is
ours (checked separately in test_backbone.py), and ``no_autocast()`` runs the official code in plain fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

pytest.importorskip("romav2", reason="official reference: pip install --no-deps romav2==2.0.1")

from benchmarks._official import build_official as _build_official  # noqa: E402
from benchmarks._official import no_autocast  # noqa: E402,F401


def build_official(state_dict: dict[str, torch.Tensor], backbone: Callable, setting: str) -> nn.Module:
    return _build_official(state_dict, setting, amp=False, backbone=backbone)
