"""The user-facing model: inputs, batching, settings, sampling, keypoint matching, errors, fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from romav2_plugin import RoMaV2
from romav2_plugin.testing import HomographyWarpDouble


@pytest.fixture
def model(random_model):
    """The session model at a small working resolution (restored afterwards)."""
    random_model.apply_setting("turbo")
    random_model.H_lr = random_model.W_lr = 160
    yield random_model
    random_model.apply_setting("turbo")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (100, 70, 3), dtype=np.uint8)
    return a, b


def test_input_types_give_the_same_result(model, images, tmp_path):
    a, b = images
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    ref = model.match(a, b)
    assert ref["warp_AB"].shape == (1, 160, 160, 2) and ref["warp_BA"] is None
    as_tensor = lambda x: torch.from_numpy(x).permute(2, 0, 1).float() / 255  # noqa: E731
    for x, y in ((tmp_path / "a.png", str(tmp_path / "b.png")), (Image.fromarray(a), Image.fromarray(b)), (as_tensor(a), as_tensor(b)[None])):
        out = model.match(x, y)
        torch.testing.assert_close(out["warp_AB"], ref["warp_AB"], atol=1e-5, rtol=0)


def test_batch_equals_single(model, images):
    a, b = images
    t = lambda x: torch.from_numpy(x).permute(2, 0, 1).float() / 255  # noqa: E731
    A = torch.stack((t(a), t(a).flip(-1)))
    B = torch.stack((t(b), t(b).flip(-2)))
    batch = model.match(A, B)
    for i in range(2):
        single = model.match(A[i], B[i])
        torch.testing.assert_close(batch["warp_AB"][i], single["warp_AB"][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(batch["overlap_AB"][i], single["overlap_AB"][0], atol=1e-4, rtol=0)


def test_bidirectional_two_stage_outputs(model, images):
    model.apply_setting("precise")
    model.H_lr = model.W_lr = 160
    model.H_hr = model.W_hr = 224
    out = model.match(*images)
    for d in ("AB", "BA"):
        assert out[f"warp_{d}"].shape == (1, 224, 224, 2)
        assert out[f"overlap_{d}"].shape == (1, 224, 224, 1)
        assert out[f"precision_{d}"].shape == (1, 224, 224, 2, 2)
        P = out[f"precision_{d}"]
        assert torch.allclose(P, P.mT) and (torch.linalg.eigvalsh(P) > 0).all()  # Cholesky-parametrised
    # one image / direction at a time (the memory knob) gives the same numbers as batching them
    model.max_batch_pixels = 1
    try:
        seq = model.match(*images)
    finally:
        del model.max_batch_pixels
    for k in ("warp_AB", "warp_BA", "confidence_AB", "confidence_BA"):
        torch.testing.assert_close(seq[k], out[k], atol=1e-5, rtol=1e-5)
    m, c, pa, pb = model.sample(out, 200, generator=0)
    assert m.shape == (200, 4) and c.shape == (200,) and pa.shape == pb.shape == (200, 2, 2)
    assert torch.isfinite(pa).all()


def test_fp32_mode_never_autocasts(model, images, monkeypatch):
    real = torch.autocast

    def guarded(*args, **kwargs):
        if kwargs.get("enabled", True):
            raise AssertionError("autocast entered with amp=False")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "autocast", guarded)
    model.amp = False
    out = model.match(*images)
    assert out["warp_AB"].dtype == torch.float32


def test_sampling_reproducible_and_overlap_aware():
    H = torch.tensor([[1.0, 0.0, 200.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # B overlaps A's left part only
    d = HomographyWarpDouble(H, setting="turbo")
    preds = d.match(torch.rand(1, 3, 300, 400), torch.rand(1, 3, 300, 400))
    a = d.sample(preds, 1000, generator=3)
    b = d.sample(preds, 1000, generator=3)
    assert torch.equal(a[0], b[0])
    c = d.sample(preds, 1000, generator=4)
    assert not torch.equal(a[0], c[0])
    assert (a[0][:, 2:].abs() <= 1).all()  # every sample lies in the overlap
    # a thin overlap (a 6 px strip): min_overlap bounds the count by the overlapping area
    thin = HomographyWarpDouble(torch.tensor([[1.0, 0, 394.0], [0, 1, 0], [0, 0, 1]]), setting="turbo")
    p1 = thin.match(torch.rand(1, 3, 300, 400), torch.rand(1, 3, 300, 400))
    n_overlap = int((p1["overlap_AB"] > 0.5).sum())
    got = thin.sample(p1, 5000, generator=0, min_overlap=0.5)
    assert 0 < len(got[0]) <= n_overlap < 5000
    # unrelated images (no overlap): nothing, instead of 5000 random "matches" or a crash
    far = HomographyWarpDouble(torch.tensor([[1.0, 0, 5000.0], [0, 1, 0], [0, 0, 1]]), setting="turbo")
    p2 = far.match(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))
    assert len(far.sample(p2, 5000, generator=0, min_overlap=0.5)[0]) == 0
    # grid_matches returns every confident grid match, deterministically
    g = d.grid_matches(preds, 0.5)
    assert len(g[0]) == len(d.grid_matches(preds, 0.5)[0]) > 0


def test_match_keypoints_through_warp():
    H = torch.tensor([[0.9, 0.05, 10.0], [-0.03, 1.1, -5.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    d = HomographyWarpDouble(H, setting="turbo")
    preds = d.match(torch.rand(1, 3, 240, 320), torch.rand(1, 3, 240, 320))
    from romav2_plugin.geometry import to_normalized

    g = torch.Generator().manual_seed(0)
    kA = torch.rand(300, 2, generator=g, dtype=torch.float64) * torch.tensor([250.0, 180.0]) + 20
    kB = (torch.cat((kA, torch.ones(300, 1, dtype=torch.float64)), 1) @ H.T)
    kB = kB[:, :2] / kB[:, 2:]
    perm = torch.randperm(300, generator=g)
    xA = to_normalized(kA, 240, 320, pixel_center=0.0).float()
    xB = to_normalized(kB[perm], 240, 320, pixel_center=0.0).float()
    iA, iB = RoMaV2.match_keypoints(xA, xB, preds["warp_AB"], preds["overlap_AB"], return_inds=True)
    assert len(iA) > 250
    assert torch.equal(perm[iB], iA)  # every returned pair is the true correspondence


def test_errors(model, images):
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        model.match(np.zeros((10, 40, 3), np.uint8), images[1])
    with pytest.raises(ValueError, match="1 or 3 channels"):
        model.match(torch.rand(1, 4, 32, 32), torch.rand(1, 3, 32, 32))
    bad = torch.rand(1, 3, 32, 32)
    bad[..., 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.match(bad, torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="Batch sizes differ"):
        model.match(torch.rand(2, 3, 32, 32), torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="Unknown setting"):
        model.apply_setting("ultra")
    model.H_lr = 100
    with pytest.raises(ValueError, match="H_lr=100 must be a positive multiple of 16"):
        model.match(*images)
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.rand(1, 3, 40, 40), torch.rand(1, 3, 40, 40))


def test_gradients_reach_refiners_for_fine_tuning(random_model):
    m = random_model
    m.apply_setting("turbo")
    # training mode updates the batch norms' running statistics: restored afterwards, since the session model
    # is compared with the checkpoint file by other tests (tests/test_export.py)
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    try:
        m.refiners.train()
        A, B = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
        out = m(A, B)
        # warps are detached between strides (as in the official model): each stride gets its own loss
        loss = sum(out[f"refiner_{s}_AB"]["warp"].square().mean() + out[f"refiner_{s}_AB"]["confidence"].square().mean() for s in (4, 2, 1))
        loss.backward()
        grads = [p.grad for p in m.refiners["4"].parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert m.refiners["4"].proj.weight.grad.abs().sum() > 0  # through the local correlation too
        assert all(p.grad is None for p in m.f.parameters())  # the backbone is frozen
    finally:
        m.zero_grad(set_to_none=True)
        m.eval()
        m.load_state_dict(saved)
