"""benchmarks.cpu_levers: the "before" variants it measures against compute what the code computes now, and
the A/B levers of this round run end to end on a micro model (rows, ratios, parity)."""

from __future__ import annotations

import importlib

import pytest
import torch

import benchmarks.cpu_levers as cl
from romav2_plugin import RoMaV2
from romav2_plugin.testing import make_micro_weights

lcm = importlib.import_module("romav2_plugin.ops.local_corr")


@pytest.mark.parametrize("C, r", [(32, 1), (16, 3), (8, 2)])
def test_before_local_corr_reproduction_equals_the_current_one(C, r):
    g = torch.Generator().manual_seed(C + r)
    f_A, f_B = torch.randn(2, C, 9, 13, generator=g, dtype=torch.float64), torch.randn(2, C, 9, 13, generator=g, dtype=torch.float64)
    warp = torch.rand(2, 9, 13, 2, generator=g, dtype=torch.float64) * 2.4 - 1.2
    before = cl._before_gather_torch(f_A, f_B, warp, r, 2**20)
    now = lcm._local_corr_torch(f_A, f_B, warp, r, 2**20)
    # radius 1 before = grid_sample, whose window offsets are float32 like the official's (~1e-7 here)
    tol = 1e-12 if r >= 2 else 1e-6
    torch.testing.assert_close(before, now, atol=tol, rtol=0)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    model = RoMaV2.from_pretrained(make_micro_weights(tmp_path_factory.mktemp("w") / "micro.pt"), amp=False)
    model.H_lr = model.W_lr = 64
    g = torch.Generator().manual_seed(0)
    return model, torch.rand(1, 3, 70, 90, generator=g), torch.rand(1, 3, 80, 60, generator=g)


@pytest.mark.parametrize("lever", ["gathercorr", "corrblock", "convrelu", "earlyproj", "fusedlinear"])
def test_levers_run_and_leave_the_model_as_it_was(micro, lever):
    model, A, B = micro
    ref = model.match(A, B)["warp_AB"]
    rows, extra = [], {}
    getattr(cl, f"lever_{lever}")("micro", model, A, B, rows, extra, 1, 0)
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] > 0
    assert rows[1]["parity"] is not None and rows[1]["parity"] < 1e-5  # the same warps either way
    assert not any("forward" in vars(m) for m in (model.refiner_features, *model.refiners.values()))  # restored
    from romav2_plugin.nn import conv_bn, linear

    assert linear.cpu_fused_dtype is conv_bn.cpu_fused_dtype  # restored
    torch.testing.assert_close(model.match(A, B)["warp_AB"], ref, atol=0, rtol=0)
