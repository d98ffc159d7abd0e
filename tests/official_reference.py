"""Build the official romav2==2.0.1 model (installed with --no-deps) around given weights, for parity tests.

The official constructor downloads weights and the DINOv3 code through torch.hub, which is impossible
offline, so the reference is assembled from the official sub-modules (Matcher, Refiners, FineFeatures)
and a backbone callable supplied by the test (ours: the backbone is validated separately).
``fp32=True`` turns every autocast of the official code off, so it runs in plain fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from unittest import mock

import pytest
import torch
from torch import nn

romav2 = pytest.importorskip("romav2", reason="official reference: pip install --no-deps romav2==2.0.1")


def build_official(state_dict: dict[str, torch.Tensor], backbone: Callable, setting: str) -> nn.Module:
    from romav2.features import FineFeatures
    from romav2.matcher import Matcher
    from romav2.refiner import Refiners
    from romav2.romav2 import RoMaV2 as Official

    off = Official.__new__(Official)
    nn.Module.__init__(off)
    off.cfg = Official.Cfg()
    off.matcher = Matcher(Matcher.Cfg(enable_amp=False))
    off.refiners = Refiners(Refiners.Cfg())
    for ref in off.refiners.values():
        for blk in [ref.block1, *ref.hidden_blocks]:
            blk.enable_amp = False
    off.refiner_features = FineFeatures(FineFeatures.Cfg())
    off.anchor_width = off.anchor_height = 512
    off.name = "official"
    sd = {k: v for k, v in state_dict.items() if not k.startswith("f.")}
    missing, unexpected = off.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith("f.") for k in missing), missing
    off.f = backbone
    off.apply_setting(setting)
    off.eval()
    return off


@contextlib.contextmanager
def no_autocast():
    """Replace torch.autocast by a null context (the official DPT head hard-codes bf16 autocast)."""
    with mock.patch.object(torch, "autocast", lambda *a, **k: contextlib.nullcontext()):
        yield
