"""Ours vs the official code (romav2==2.0.1) on a CUDA GPU, same seeded random official-layout weights, every
named setting, bf16 (as released) and fp32 with TF32 off. Skipped without CUDA or without ``romav2``.

Bounds (:data:`benchmarks.gpu_model.BOUNDS`): the warp difference in pixels of the finest grid (max and
99th percentile) and the overlap difference (max). fp32 differs by summation order only (our NVRTC local
correlation against the official path, both directions batched); bf16 rounds where each code rounds.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

needs_gpu_and_official = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("romav2") is None, reason="needs romav2==2.0.1 (the official code)"),
]


@pytest.fixture(scope="module")
def gm():
    sys.path.insert(0, str(ROOT))
    try:
        import benchmarks.gpu_model as gm
    finally:
        sys.path.remove(str(ROOT))
    return gm


@pytest.fixture(scope="module")
def sd():
    from romav2_plugin.testing import make_random_official_state_dict

    return make_random_official_state_dict(0)


@pytest.fixture(scope="module")
def built():
    return {}


@needs_gpu_and_official[0]
@needs_gpu_and_official[1]
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("setting", ["turbo", "fast", "base", "precise", "mega1500", "scannet1500", "wxbs", "satast"])
def test_gpu_parity_with_the_official_code(gm, sd, built, setting, precision):
    dev = torch.device("cuda")
    if precision not in built:
        built.clear()  # one pair of models on the GPU at a time
        built[precision] = gm.parity_models(sd, precision, dev)
    r = gm.parity_setting(setting, precision, dev, False, sd, built[precision])
    print(setting, precision, r["diff"])
    assert r["diff"], "no directions compared"
    mx, p99, ov = gm.BOUNDS[precision]
    for d, v in r["diff"].items():
        assert v["warp_px_max"] <= mx and v["warp_px_p99"] <= p99, (d, v)
        assert v["overlap_max"] <= ov, (d, v)


def test_compare_measures_pixels_and_bounds_apply(gm):
    """The comparison itself (CPU tensors): a shift of one pixel in x reads as 1 px; bounds accept / reject."""
    H, W = 8, 10
    warp = torch.zeros(1, H, W, 2)
    ov = torch.full((1, H, W, 1), 0.5)
    prec = torch.eye(2).expand(1, H, W, 2, 2).clone()
    po = {"warp_AB": warp + torch.tensor([2 / W, 0.0]), "overlap_AB": ov, "precision_AB": prec}
    pr = {"warp_AB": warp, "overlap_AB": ov, "precision_AB": prec + 0.0}
    d = gm.compare(po, pr, H, W)["AB"]
    assert d["warp_px_max"] == pytest.approx(1.0) and d["overlap_max"] == 0.0
    assert gm.within({"AB": d}, "bf16") and not gm.within({"AB": d}, "fp32")
