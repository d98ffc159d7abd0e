"""The DINOv3 wrapper has Meta's ``get_intermediate_layers(n=[11, 17])`` semantics: outputs of blocks 11 and
17, final norm applied, prefix (cls + 4 storage) tokens dropped, reshaped to ``(B, H/16, W/16, 1024)``."""

import pytest
import torch
from timm.models.eva import checkpoint_filter_fn

from romav2_plugin.config import BackboneConfig
from romav2_plugin.nn.backbone import _create_timm_vit, imagenet_normalize
from romav2_plugin.weights.layout import load_checkpoint


@pytest.fixture(scope="module")
def full_vit(random_checkpoint):
    sd = load_checkpoint(random_checkpoint)
    vit = _create_timm_vit(BackboneConfig()).eval()
    vit.load_state_dict(checkpoint_filter_fn({k[2:]: v for k, v in sd.items() if k.startswith("f.")}, vit))
    return vit.float()


def _reference_intermediates(vit, img, layers=(11, 17)):
    """Step through all 24 blocks by hand, as Meta's implementation does."""
    B, _, H, W = img.shape
    x = vit.patch_embed(imagenet_normalize(img))
    x, rope = vit._pos_embed(x)
    outs = []
    for i, blk in enumerate(vit.blocks):
        x = blk(x, rope=rope)
        if i in layers:
            y = vit.norm(x)[:, vit.num_prefix_tokens :]
            outs.append(y.reshape(B, H // 16, W // 16, -1))
    assert len(vit.blocks) == 24
    return outs


def test_wrapper_matches_full_model_semantics(random_model, full_vit):
    assert len(random_model.f.vit.blocks) == 18  # blocks 18-23 are never built
    assert full_vit.num_prefix_tokens == 5
    img = torch.rand(2, 3, 320, 480, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _reference_intermediates(full_vit, img)
        got = random_model.f(img, amp=False)
    assert [tuple(o.shape) for o in got] == [(2, 20, 30, 1024)] * 2
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert a.std() > 0.1  # normed features, not a degenerate map


def test_amp_runs_backbone_in_bf16(random_model):
    img = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    ref = random_model.f(img, amp=False)
    try:
        random_model.f.to(torch.bfloat16)
        got = random_model.f(img, amp=True)
    finally:
        random_model.f.to(torch.float32)
    assert got[0].dtype == torch.bfloat16
    for a, b in zip(got, ref):
        assert (a.float() - b).abs().mean() < 0.05
