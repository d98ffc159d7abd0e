"""kornia's own contract for ``kornia.feature.RoMaV2``, as kornia's LoFTR tests use
a matcher: (a) float masks with arbitrary values (``torch.rand(1, 32, 32)``; 0 marks padding, anything else a
valid pixel) were refused with "must hold only 0 and 1"; (b) ``.to(dtype=torch.float64)``, ``.half()``,
``.to(torch.bfloat16)`` failed deep inside torch ("expected m1 and m2 to have the same dtype"): the module
now follows ``.to(dtype)`` (inputs and outputs in that dtype, the network in float32); (c)
``confidence_threshold`` NaN or 5 silently gave 0 matches: refused at construction."""

from __future__ import annotations

import math

import pytest
import torch

kornia = pytest.importorskip("kornia")

import kornia.feature as KF  # noqa: E402

import romav2_plugin  # noqa: E402,F401  (registers KF.RoMaV2)
from romav2_plugin.testing import HomographyWarpDouble, make_micro_weights  # noqa: E402


@pytest.fixture(scope="module")
def micro_core(tmp_path_factory):
    """The real network (micro architecture, seeded random weights) at a small working size."""
    from romav2_plugin import RoMaV2

    core = RoMaV2.from_pretrained(make_micro_weights(tmp_path_factory.mktemp("w") / "m.pt"), setting="turbo", amp=False)
    core.H_lr = core.W_lr = 64
    return core


def _images(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, 60, 70, generator=g).to(dtype), torch.rand(1, 1, 50, 64, generator=g).to(dtype)


# ------------------------------------------------------------------------------------------------ (a) masks
def test_random_float_masks_are_accepted_zero_is_padding():
    m = KF.RoMaV2(model=HomographyWarpDouble(torch.eye(3).double()), setting="turbo", num_samples=400, seed=0)
    img0, img1 = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    mask0 = torch.rand(1, 32, 32) + 1e-3  # kornia's test: torch.rand(1, 32, 32), all nonzero: all valid
    mask1 = torch.rand(1, 32, 32) + 1e-3
    mask0[:, :, 16:] = 0  # right half padding
    out = m({"image0": img0, "image1": img1, "mask0": mask0, "mask1": mask1})
    ref = m({"image0": img0, "image1": img1, "mask0": mask0 != 0})
    assert len(out["keypoints0"]) > 50
    assert torch.equal(out["keypoints0"], ref["keypoints0"])
    assert (out["keypoints0"][:, 0].round() < 16).all()


def test_nan_mask_is_refused():
    m = KF.RoMaV2(model=HomographyWarpDouble(torch.eye(3).double()), setting="turbo", num_samples=10)
    mask = torch.ones(1, 32, 32)
    mask[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        m({"image0": torch.rand(1, 1, 32, 32), "image1": torch.rand(1, 1, 32, 32), "mask0": mask})


# ------------------------------------------------------------------------------------------------ (b) dtypes
@pytest.mark.parametrize(
    "convert, dtype",
    [
        (lambda m: m.to(dtype=torch.float64), torch.float64),
        (lambda m: m.double(), torch.float64),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.to("cpu", torch.float16), torch.float16),
        (lambda m: torch.nn.Sequential(m).to(torch.float64)[0], torch.float64),
    ],
    ids=["to-dtype-f64", "double", "half", "to-bf16", "to-device-f16", "parent-f64"],
)
def test_module_follows_to_dtype(micro_core, convert, dtype):
    m32 = KF.RoMaV2(model=micro_core, num_samples=200, seed=0, min_overlap=None)
    ref = m32(dict(zip(("image0", "image1"), _images())))
    m = convert(KF.RoMaV2(model=micro_core, num_samples=200, seed=0, min_overlap=None))
    assert m.dtype == dtype
    assert all(p.dtype == torch.float32 for p in micro_core.parameters())  # the network keeps its weights
    out = m(dict(zip(("image0", "image1"), _images(dtype))))
    for k in ("keypoints0", "keypoints1", "confidence"):
        assert out[k].dtype == dtype, k
    assert out["batch_indexes"].dtype == torch.long
    if dtype == torch.float64:  # float64 images hold the float32 ones exactly: the same matches
        assert torch.equal(out["keypoints0"], ref["keypoints0"].double())
    else:  # the images were rounded to 16 bits: close, not equal
        assert len(out["keypoints0"]) == len(ref["keypoints0"])
    back = m.float()
    assert back.dtype == torch.float32 and back(dict(zip(("image0", "image1"), _images())))["keypoints0"].dtype == torch.float32


def test_non_real_dtypes_are_refused_at_to(micro_core):
    m = KF.RoMaV2(model=micro_core)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        m.to(torch.complex64)
    assert m.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ (c) threshold
@pytest.mark.parametrize("bad", [math.nan, 5, 1.0, -0.1, math.inf, True, "0.5"])
def test_confidence_threshold_checked_at_construction(bad):
    with pytest.raises(ValueError, match=r"confidence_threshold must be a number in \[0, 1\)"):
        KF.RoMaV2(model=HomographyWarpDouble(torch.eye(3).double()), sample_mode="threshold", confidence_threshold=bad)


@pytest.mark.parametrize("ok", [0, 0.0, 0.5, 0.99])
def test_confidence_threshold_in_range_accepted(ok):
    KF.RoMaV2(model=HomographyWarpDouble(torch.eye(3).double()), sample_mode="threshold", confidence_threshold=ok)
