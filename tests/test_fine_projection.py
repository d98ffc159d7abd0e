"""The refiners' input projections applied as the fine-feature CNN makes each map (so the full-width maps are
freed early): the same numbers as projecting afterwards, in fp32 under a bf16 autocast, and through the model's
chunked path."""

from __future__ import annotations

import pytest
import torch

from romav2_plugin import RoMaV2
from romav2_plugin.config import FineFeaturesConfig, RefinerConfig
from romav2_plugin.nn.fine_features import FineFeatures
from romav2_plugin.nn.refiner import ConvRefiner
from romav2_plugin.testing import make_micro_weights


def _cnn_and_projections(seed=0):
    torch.manual_seed(seed)
    ff = FineFeatures(FineFeaturesConfig(channels=(8, 12, 16))).eval()
    for m in ff.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    projs = {s: torch.nn.Linear(c, 5) for s, c in ((1, 8), (2, 12), (4, 16))}
    return ff, projs


@pytest.mark.parametrize("amp", [False, True])
def test_projection_while_the_features_are_made_equals_projecting_afterwards(amp):
    ff, projs = _cnn_and_projections()
    img = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(1))
    project = {s: (lambda f, p=p: p(f.float())) for s, p in projs.items()}
    with torch.inference_mode():
        raw = ff(img, amp=amp)
        got = ff(img, amp=amp, project=project)
        assert set(got) == {1, 2, 4}
        for s, p in projs.items():
            assert got[s].dtype == torch.float32  # the projection ran outside the CNN's bf16 autocast
            assert got[s].shape == (*raw[s].shape[:3], 5)
            torch.testing.assert_close(got[s], p(raw[s].float()), atol=0, rtol=0)


def test_projected_refiner_input_equals_the_raw_one():
    torch.manual_seed(0)
    cfg = RefinerConfig(stride=4, feat_dim=16, proj_dim=8, displacement_emb_dim=7, local_corr_radius=1, hidden_blocks=2)
    ref = ConvRefiner(cfg).eval()
    g = torch.Generator().manual_seed(2)
    f_A, f_B = torch.randn(1, 9, 11, 16, generator=g), torch.randn(1, 9, 11, 16, generator=g)
    warp = torch.rand(1, 9, 11, 2, generator=g) * 2 - 1
    conf = torch.randn(1, 9, 11, 1, generator=g)
    sf = torch.tensor([1.0, 1.0])
    with torch.inference_mode():
        a = ref(f_A, f_B, warp, conf, sf)
        b = ref(ref.project(f_A), ref.project(f_B), warp, conf, sf, projected=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_model_keeps_only_the_projected_maps_and_chunks_give_the_same_match(tmp_path):
    model = RoMaV2.from_pretrained(make_micro_weights(tmp_path / "micro.pt"), amp=False)
    model.H_lr = model.W_lr = 64
    imgs = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        fine = model._fine_features(imgs, amp=False)
    for k, r in model.refiners.items():
        assert fine[int(k)].shape[-1] == r.cfg.proj_dim  # the full-width map was not kept
    A, B = imgs[:1], imgs[1:]
    whole = model.match(A, B)
    model.max_batch_pixels = 64 * 64 // 2  # one image per fine-feature call, one direction per refiner call
    chunked = model.match(A, B)
    torch.testing.assert_close(chunked["warp_AB"], whole["warp_AB"], atol=1e-6, rtol=0)
