"""ONNX export: the graph computes what the eager model computes (checked with ONNX Runtime), the export-only
rewrites are exact, and bad requests fail early with nothing written."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from romav2_plugin import export as ex
from romav2_plugin.nn.vit import RopeEmbedding, apply_rope

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ exact rewrites
@pytest.mark.parametrize("H,W", [(20, 20), (50, 50), (80, 80), (64, 48), (7, 13)])
def test_rope_emulation_is_bitwise_the_bf16_computation(H, W):
    rope = RopeEmbedding(64)
    sin, cos = rope(H, W, emulate=False)
    sin_e, cos_e = rope(H, W, emulate=True)
    assert sin.dtype == torch.bfloat16 and sin_e.dtype == torch.float32
    assert torch.equal(sin.float(), sin_e) and torch.equal(cos.float(), cos_e)
    x = torch.randn(2, 3, H * W, 64, generator=torch.Generator().manual_seed(H * W))
    assert torch.equal(apply_rope(x, sin, cos), apply_rope(x, sin_e, cos_e, emulate=torch.bfloat16))


def test_rope_emulation_is_what_export_traces(monkeypatch):
    rope = RopeEmbedding(64)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    sin, _ = rope(10, 12)
    assert sin.dtype == torch.float32  # ONNX-friendly, and equal to the bf16 tables (test above)
    assert torch.equal(sin, rope(10, 12, emulate=False)[0].float())


# ------------------------------------------------------------------------------------ names, errors
class _Settings:
    """Just what the naming helpers read from a model."""

    def __init__(self, hr: bool, bidirectional: bool):
        self.H_lr = self.W_lr = 32
        self.H_hr = self.W_hr = 64 if hr else None
        self.bidirectional = bidirectional


def test_names_follow_the_setting():
    one = _Settings(hr=False, bidirectional=False)
    assert ex.input_names(one) == ["image_A", "image_B"]
    assert ex.output_names(one) == ["warp_AB", "overlap_AB", "precision_AB"]
    two = _Settings(hr=True, bidirectional=True)
    assert ex.input_names(two) == ["image_A", "image_B", "image_A_hr", "image_B_hr"]
    assert ex.output_names(two)[3:] == ["warp_BA", "overlap_BA", "precision_BA"]


def test_preds_from_outputs():
    one = _Settings(hr=False, bidirectional=False)
    outs = [np.zeros((1, 4, 4, 2)), np.ones((1, 4, 4, 1)), np.zeros((1, 4, 4, 2, 2))]
    preds = ex.preds_from_outputs(one, outs)
    assert preds["warp_BA"] is None and preds["overlap_AB"].shape == (1, 4, 4, 1)
    assert isinstance(preds["warp_AB"], torch.Tensor)
    assert ex.preds_from_outputs(one, dict(zip(ex.output_names(one), outs)))["overlap_AB"].sum() == 16
    with pytest.raises(ValueError, match="expected 3 outputs"):
        ex.preds_from_outputs(one, outs[:2])
    with pytest.raises(ValueError, match="another setting"):
        ex.preds_from_outputs(_Settings(hr=False, bidirectional=True), dict(zip(ex.output_names(one), outs)))


def test_bad_requests_fail_before_anything_is_written(tmp_path):
    pytest.importorskip("onnxscript")
    m = _Settings(hr=False, bidirectional=False)
    with pytest.raises(ValueError, match=r"must end in \.onnx"):
        ex.export_onnx(m, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="batch_size"):
        ex.export_onnx(m, tmp_path / "x.onnx", batch_size=0)
    with pytest.raises(ValueError, match="opset"):
        ex.export_onnx(m, tmp_path / "x.onnx", opset=13)
    (tmp_path / "x.onnx.data").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        ex.export_onnx(m, tmp_path / "x.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx.data"]
    assert (tmp_path / "x.onnx.data").read_bytes() == b"keep me"


def test_missing_onnx_names_the_extra(monkeypatch, tmp_path):
    real = ex.importlib.util.find_spec
    monkeypatch.setattr(ex.importlib.util, "find_spec", lambda n, *a: None if n == "onnxscript" else real(n, *a))
    with pytest.raises(ImportError, match=r"romav2-plugin\[export\].*onnxscript"):
        ex.export_onnx(_Settings(False, False), tmp_path / "x.onnx")


# ------------------------------------------------------------------------------------ real exports
def _images(seed: int, shape=(200, 280)):
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, shape[0] // 8, shape[1] // 8, generator=g)
    return torch.nn.functional.interpolate(small, size=shape, mode="bicubic", align_corners=False).clamp(0, 1)


def _run_onnx(path: Path, inputs: dict[str, torch.Tensor]):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == list(inputs)
    names = [o.name for o in sess.get_outputs()]
    return names, sess.run(None, {k: v.numpy() for k, v in inputs.items()})


def _compare(model, preds_onnx, img_A, img_B):
    eager = model.match(img_A, img_B)
    for name in ex.output_names(model):
        a, b = eager[name], preds_onnx[name]
        assert a.shape == b.shape, name
        err = (a - b).abs().max().item()
        print(f"{name}: max |eager - onnxruntime| = {err:.2e}")
        scale = 1.0 if name.startswith(("warp", "overlap")) else max(1.0, a.abs().max().item())
        assert err <= 1e-4 * scale, (name, err)  # measured: <= 6e-7 (float rounding of reordered ops)
    return eager


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.slow
def test_cli_exports_turbo_and_onnxruntime_reproduces_match(tmp_path, random_checkpoint, random_model):
    pytest.importorskip("onnxscript")
    out = tmp_path / "onnx" / "turbo.onnx"
    cmd = [sys.executable, "-m", "romav2_plugin.export", "--setting", "turbo", "--out", str(out)]
    cmd += ["--weights", str(random_checkpoint)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "inputs: image_A, image_B; outputs: warp_AB, overlap_AB, precision_AB" in r.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["turbo.onnx", "turbo.onnx.data"]  # no staging left
    digest = _sha(out)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--overwrite" in r.stderr and _sha(out) == digest

    img_A, img_B = _images(0), _images(1, (240, 200))
    inputs = ex.prepare_inputs(random_model, img_A, img_B)
    assert {k: tuple(v.shape) for k, v in inputs.items()} == {"image_A": (1, 3, 320, 320), "image_B": (1, 3, 320, 320)}
    names, outs = _run_onnx(out, inputs)
    assert names == ex.output_names(random_model)
    preds = ex.preds_from_outputs(random_model, outs)
    _compare(random_model, preds, img_A, img_B)
    # The core's sampling works on the runtime's outputs.
    matches, overlap, _, _ = random_model.sample(preds, 500, generator=0)
    assert matches.shape == (500, 4) and (matches.abs() <= 1).all()
    kA, kB = random_model.to_pixel_coordinates(matches, 200, 280, 240, 200)
    assert (kA[:, 0] <= 280).all() and (kB[:, 1] <= 240).all()


@pytest.mark.slow
def test_bidirectional_two_pass_export(tmp_path, random_checkpoint):
    pytest.importorskip("onnxscript")
    from romav2_plugin import RoMaV2

    model = RoMaV2.from_pretrained(random_checkpoint, setting="precise", amp=True)
    model.H_lr = model.W_lr = 160  # precise's structure (both directions, a second pass), small sizes
    model.H_hr, model.W_hr = 240, 256
    path = ex.export_onnx(model, tmp_path / "precise_small.onnx", batch_size=2)
    assert model.amp is True and model.f.vit.patch_embed.proj.weight.dtype == torch.bfloat16  # restored
    model.set_amp(False)  # fp32 backbone (exact: the release's backbone is bf16) to compare with the fp32 graph
    img_A = torch.cat([_images(2), _images(3)])
    img_B = torch.cat([_images(4, (180, 300)), _images(5, (180, 300))])
    inputs = ex.prepare_inputs(model, img_A, img_B)
    assert list(inputs) == ["image_A", "image_B", "image_A_hr", "image_B_hr"]
    assert tuple(inputs["image_A_hr"].shape) == (2, 3, 240, 256)
    names, outs = _run_onnx(path, inputs)
    assert len(names) == 6 and names[3] == "warp_BA"
    preds = ex.preds_from_outputs(model, outs)
    assert preds["warp_BA"].shape == (2, 240, 256, 2)
    _compare(model, preds, img_A, img_B)
