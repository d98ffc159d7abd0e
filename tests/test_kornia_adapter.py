"""kornia.feature.RoMaV2: registration, LoFTR's contract, pixel conventions, masks, bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

kornia = pytest.importorskip("kornia")

import kornia.feature as KF  # noqa: E402

import romav2_plugin  # noqa: E402,F401  (registers KF.RoMaV2)
from romav2_plugin.adapters.kornia import RoMaV2 as AdapterRoMaV2  # noqa: E402
from romav2_plugin.testing import HomographyWarpDouble  # noqa: E402

H_TRUE = torch.tensor([[1.05, 0.04, 6.0], [-0.03, 0.97, -3.0], [2e-4, -1e-4, 1.0]], dtype=torch.float64)


def _apply(Hm: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    kh = torch.cat((k.double(), torch.ones(len(k), 1, dtype=torch.float64)), 1) @ Hm.T
    return kh[:, :2] / kh[:, 2:]


def test_registered_and_nothing_else_changed():
    assert KF.RoMaV2 is AdapterRoMaV2
    assert KF.LoFTR.__module__.startswith("kornia.")  # untouched


def test_without_kornia_import_works_and_adapter_names_extra():
    code = (
        "import sys; sys.modules['kornia'] = None\n"
        "import romav2_plugin\n"
        "try:\n"
        "    import romav2_plugin.adapters.kornia as a; a.register()\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "IMPORTERROR" in r.stdout and "romav2-plugin[kornia]" in r.stdout


@pytest.mark.parametrize("setting", ["turbo", "precise"])
@pytest.mark.parametrize("B", [1, 2])
def test_homography_conventions(setting, B):
    """With the network replaced by a known dense warp, keypoints1 = H(keypoints0) to 0.05 px."""
    m = KF.RoMaV2(model=HomographyWarpDouble(H_TRUE), setting=setting, num_samples=400, seed=0)
    img0 = torch.rand(B, 1, 301, 453)  # grayscale, non-square, not multiples of 16
    img1 = torch.rand(B, 3, 333, 397)
    out = m({"image0": img0, "image1": img1})
    assert set(out) >= {"keypoints0", "keypoints1", "confidence", "batch_indexes"}
    n = len(out["keypoints0"])
    assert n == B * 400
    assert out["keypoints0"].shape == out["keypoints1"].shape == (n, 2)
    assert out["confidence"].shape == (n,) and out["batch_indexes"].dtype == torch.long
    assert torch.equal(out["batch_indexes"].bincount(), torch.full((B,), 400))
    err = (_apply(H_TRUE, out["keypoints0"]) - out["keypoints1"].double()).norm(dim=-1)
    assert err.max() < 0.05, err.max()
    k0 = out["keypoints0"]
    assert (k0[:, 0] >= -0.5).all() and (k0[:, 0] <= 453 - 0.5).all()  # inside image 0, OpenCV convention
    if setting == "precise":
        assert out["precision0"].shape == out["precision1"].shape == (n, 2, 2)
    else:
        assert "precision0" not in out


def test_threshold_mode_and_masks():
    m = KF.RoMaV2(model=HomographyWarpDouble(H_TRUE), setting="turbo", sample_mode="threshold", confidence_threshold=0.5)
    img0, img1 = torch.rand(1, 3, 200, 260), torch.rand(1, 3, 220, 240)
    out = m({"image0": img0, "image1": img1})
    assert len(out["keypoints0"]) > 10000  # every confident grid match
    mask0 = torch.ones(1, 200, 260, dtype=torch.bool)
    mask0[:, :, 130:] = False  # right half is padding
    mask1 = torch.ones(1, 220, 240, dtype=torch.bool)
    mask1[:, :50] = False
    out2 = m({"image0": img0, "image1": img1, "mask0": mask0, "mask1": mask1})
    k0, k1 = out2["keypoints0"], out2["keypoints1"]
    assert 0 < len(k0) < len(out["keypoints0"])
    assert (k0[:, 0].round() < 130).all() and (k1[:, 1].round() >= 50).all()


def test_kornia_ransac_downstream():
    m = KF.RoMaV2(model=HomographyWarpDouble(H_TRUE), setting="turbo", num_samples=500, seed=0)
    out = m({"image0": torch.rand(1, 3, 240, 320), "image1": torch.rand(1, 3, 240, 320)})
    from kornia.geometry.ransac import RANSAC

    Hest, inliers = RANSAC("homography", inl_th=1.0, max_iter=50)(out["keypoints0"], out["keypoints1"])
    Hest = Hest / Hest[2, 2]
    corners = torch.tensor([[0.0, 0.0], [319.0, 0.0], [319.0, 239.0], [0.0, 239.0]])
    assert (_apply(Hest.double(), corners) - _apply(H_TRUE, corners)).norm(dim=-1).max() < 0.5
    assert inliers.float().mean() > 0.95


def test_random_weights_keypoints_follow_core_warp(random_model):
    """keypoints1 equals the core's warp_AB sampled at keypoints0 (at the input resolution)."""
    random_model.apply_setting("turbo")
    random_model.H_lr = random_model.W_lr = 160
    try:
        m = KF.RoMaV2(model=random_model, num_samples=300, seed=0, min_overlap=None)
        img0 = torch.rand(1, 3, 150, 210, generator=torch.Generator().manual_seed(0))
        img1 = torch.rand(1, 3, 170, 190, generator=torch.Generator().manual_seed(1))
        out = m({"image0": img0, "image1": img1})
        preds = random_model.match(img0, img1)
    finally:
        random_model.apply_setting("turbo")
    from romav2_plugin.geometry import bhwc_grid_sample, to_normalized, to_pixel

    x0 = to_normalized(out["keypoints0"], 150, 210, pixel_center=0.0)
    x1 = bhwc_grid_sample(preds["warp_AB"], x0[None, None])[0, 0]
    k1 = to_pixel(x1, 170, 190, pixel_center=0.0)
    assert (k1 - out["keypoints1"]).norm(dim=-1).max() < 1e-3


def test_module_behaviour_and_bad_input(random_model):
    m = KF.RoMaV2(model=HomographyWarpDouble(H_TRUE), setting="turbo")
    assert isinstance(m, torch.nn.Module) and not m.training
    assert m.to("cpu") is m
    with pytest.raises(ValueError, match="Unknown sample_mode"):
        KF.RoMaV2(model=HomographyWarpDouble(H_TRUE), sample_mode="topk")
    ok = torch.rand(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        m({"image0": ok[0], "image1": ok})
    with pytest.raises(ValueError, match="1 or 3 channels"):
        m({"image0": torch.rand(1, 2, 64, 64), "image1": ok})
    with pytest.raises(ValueError, match="empty batch"):
        m({"image0": torch.rand(0, 3, 64, 64), "image1": torch.rand(0, 3, 64, 64)})
    with pytest.raises(ValueError, match="Missing 'image1'"):
        m({"image0": ok})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m({"image0": ok * 255, "image1": ok})
    # state_dict of a real model wraps the core's keys
    wrapped = KF.RoMaV2(model=random_model)
    assert "model.matcher.omega" in wrapped.state_dict()


# ------------------------------------------------------------------ masks checked before the network
class _NoNetwork(HomographyWarpDouble):
    def match(self, img_A, img_B):
        raise AssertionError("the network ran on invalid input")


_B, _H, _W = 2, 48, 64


@pytest.mark.parametrize(
    "mask, expect",
    [
        (torch.ones(_B, _H // 2, _W // 2, dtype=torch.bool), r"shape \(B, H, W\) = \(2, 48, 64\).*got \(2, 24, 32\)"),
        (torch.ones(_B, _W, _H, dtype=torch.bool), "looks transposed"),
        (torch.ones(_H, _W, dtype=torch.bool), r"add the batch dimension: mask0\[None\]"),
        (torch.ones(_B + 1, _H, _W, dtype=torch.bool), "batch size differs"),
        (torch.ones(_B, 2, _H, _W, dtype=torch.bool), "got \\(2, 2, 48, 64\\)"),
        (torch.full((_B, _H, _W), float("nan")), "NaN"),  # 0.5 is valid: kornia's convention
        (torch.ones(_B, _H, _W, dtype=torch.complex64), "unsupported dtype"),
        ([[1]], "must be a \\(B, H, W\\) tensor"),
    ],
    ids=["half-size", "transposed", "no-batch", "wrong-batch", "two-channels", "float-nan", "complex", "list"],
)
def test_bad_masks_refused_before_the_network(mask, expect):
    m = KF.RoMaV2(model=_NoNetwork(H_TRUE), setting="turbo", num_samples=100)
    with pytest.raises(ValueError, match=expect):
        m({"image0": torch.rand(_B, 3, _H, _W), "image1": torch.rand(_B, 3, _H, _W), "mask0": mask})


@pytest.mark.parametrize("form", ["B1HW", "uint8", "float01"])
def test_accepted_mask_forms_give_the_same_result(form):
    m = KF.RoMaV2(model=HomographyWarpDouble(H_TRUE), setting="turbo", num_samples=300, seed=0)
    img0, img1 = torch.rand(1, 3, 200, 260), torch.rand(1, 3, 220, 240)
    mask = torch.ones(1, 200, 260, dtype=torch.bool)
    mask[:, :, 130:] = False
    ref = m({"image0": img0, "image1": img1, "mask0": mask})
    other = {"B1HW": mask[:, None], "uint8": mask.to(torch.uint8), "float01": mask.float()}[form]
    out = m({"image0": img0, "image1": img1, "mask0": other})
    assert torch.equal(out["keypoints0"], ref["keypoints0"]) and (ref["keypoints0"][:, 0].round() < 130).all()


class _Unrelated(HomographyWarpDouble):
    def match(self, img_A, img_B):
        out = super().match(img_A, img_B)
        out["overlap_AB"] = 0.1 * torch.ones_like(out["overlap_AB"])  # what a network says for unrelated images
        return out


def test_unrelated_images_give_no_matches_by_default():
    img0, img1 = torch.rand(1, 3, 120, 160), torch.rand(1, 3, 120, 160)
    out = KF.RoMaV2(model=_Unrelated(H_TRUE), setting="turbo", num_samples=500, seed=0)({"image0": img0, "image1": img1})
    assert len(out["keypoints0"]) == 0
    official = KF.RoMaV2(model=_Unrelated(H_TRUE), setting="turbo", num_samples=500, seed=0, min_overlap=None)
    assert len(official({"image0": img0, "image1": img1})["keypoints0"]) == 500
    related = KF.RoMaV2(model=HomographyWarpDouble(H_TRUE), setting="turbo", num_samples=500, seed=0)
    assert len(related({"image0": img0, "image1": img1})["keypoints0"]) == 500
    with pytest.raises(ValueError, match="min_overlap"):
        KF.RoMaV2(model=HomographyWarpDouble(H_TRUE), min_overlap=1.5)


def test_geometry_inlier_ratio_per_batch_element_separates_scrambled_matches():
    """``geometry_inlier_ratio (B,)``: ~1 for the exact homography, below the unreliable threshold for
    confident matches that fit no geometry (the scrambled double, as two noise images give), NaN without
    matches."""
    from romav2_plugin.testing import ScrambledWarpDouble
    from romav2_plugin.verify import MIN_INLIER_RATIO

    img0, img1 = torch.rand(2, 3, 120, 160), torch.rand(2, 3, 130, 150)
    good = KF.RoMaV2(model=HomographyWarpDouble(H_TRUE), setting="turbo", num_samples=300, seed=0)
    r = good({"image0": img0, "image1": img1})["geometry_inlier_ratio"]
    assert r.shape == (2,) and (r > 0.99).all()
    bad = KF.RoMaV2(model=ScrambledWarpDouble(), setting="turbo", num_samples=300, seed=0)
    out = bad({"image0": img0, "image1": img1})
    assert len(out["keypoints0"]) == 600  # the overlap calls them all confident
    assert (out["geometry_inlier_ratio"] < MIN_INLIER_RATIO).all()
    none = KF.RoMaV2(model=_Unrelated(H_TRUE), setting="turbo", num_samples=300, seed=0)({"image0": img0, "image1": img1})
    assert none["geometry_inlier_ratio"].isnan().all()


def test_covisible_per_pair_follows_the_geometric_check():
    """``covisible (B,)`` bool: True for matches that fit one geometry, False for confident matches that fit
    none and for a pair without matches; ``min_inlier_ratio`` moves the cut and is checked at construction."""
    from romav2_plugin.testing import ScrambledWarpDouble
    from romav2_plugin.verify import MIN_INLIER_RATIO

    img0, img1 = torch.rand(2, 3, 120, 160), torch.rand(2, 3, 130, 150)
    data = {"image0": img0, "image1": img1}
    good = KF.RoMaV2(model=HomographyWarpDouble(H_TRUE), setting="turbo", num_samples=300, seed=0)
    assert good.min_inlier_ratio == MIN_INLIER_RATIO
    out = good(data)
    assert out["covisible"].dtype == torch.bool and out["covisible"].shape == (2,) and out["covisible"].all()
    bad = KF.RoMaV2(model=ScrambledWarpDouble(), setting="turbo", num_samples=300, seed=0)(data)
    assert not bad["covisible"].any()
    none = KF.RoMaV2(model=_Unrelated(H_TRUE), setting="turbo", num_samples=300, seed=0)(data)
    assert not none["covisible"].any()  # NaN ratio: not covisible
    strict = KF.RoMaV2(model=ScrambledWarpDouble(), setting="turbo", num_samples=300, seed=0, min_inlier_ratio=0.0)
    assert strict(data)["covisible"].all()
    for bad_value in (float("nan"), 1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="min_inlier_ratio"):
            KF.RoMaV2(model=HomographyWarpDouble(H_TRUE), min_inlier_ratio=bad_value)


@pytest.mark.slow
def test_covisible_flags_the_noise_pair_in_a_batch_with_romav2_tiny():
    """romav2-tiny (weights="tiny"), one batch: the demo pair (resized to one size) and two unrelated
    uniform-noise images. The overlap calls both confident; ``covisible`` keeps the demo pair, flags the
    noise pair."""
    from importlib.resources import files

    import numpy as np
    from PIL import Image

    assets = files("romav2_plugin.assets")
    demo = [torch.from_numpy(np.asarray(Image.open(str(assets / f"demo_{s}.jpg")).convert("RGB").resize((384, 288))))
            .permute(2, 0, 1).float() / 255 for s in "AB"]
    g = torch.Generator().manual_seed(0)
    noise = [torch.rand(3, 288, 384, generator=g) for _ in range(2)]
    data = {"image0": torch.stack((demo[0], noise[0])), "image1": torch.stack((demo[1], noise[1]))}
    matcher = KF.RoMaV2(weights="tiny", num_samples=2000, seed=0)
    with torch.inference_mode():
        out = matcher(data)
    per_pair = torch.bincount(out["batch_indexes"], minlength=2)
    assert (per_pair > 1000).all(), per_pair  # both "confident"
    ratio = out["geometry_inlier_ratio"]
    assert out["covisible"].tolist() == [True, False], ratio
    kept = out["covisible"][out["batch_indexes"]]
    assert (out["batch_indexes"][kept] == 0).all()
