import numpy as np
import pytest
import torch
from PIL import Image

from romav2_plugin.io import load_image, to_tensor_image


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)


def test_all_input_types_agree(rgb, tmp_path):
    p = tmp_path / "a.png"
    Image.fromarray(rgb).save(p)
    ref = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    for x in (p, str(p), Image.fromarray(rgb), rgb, torch.from_numpy(rgb).permute(2, 0, 1), ref, ref[0]):
        out = to_tensor_image(x)
        assert out.shape == (1, 3, 20, 30) and out.dtype == torch.float32
        assert torch.allclose(out, ref), type(x)


def test_grayscale_rgba_palette_converted(rgb, tmp_path):
    gray = rgb[..., 0]
    out = to_tensor_image(gray)
    assert out.shape == (1, 3, 20, 30) and torch.equal(out[:, 0], out[:, 2])
    out = to_tensor_image(torch.rand(2, 1, 8, 9))
    assert out.shape == (2, 3, 8, 9)
    rgba = np.concatenate((rgb, np.full_like(rgb[..., :1], 7)), -1)
    assert torch.allclose(to_tensor_image(rgba), to_tensor_image(rgb))
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert torch.allclose(to_tensor_image(tmp_path / "a.png"), to_tensor_image(rgb))
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    assert to_tensor_image(tmp_path / "p.png").shape == (1, 3, 20, 30)


def test_exif_orientation_applied(rgb, tmp_path):
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 deg clockwise when displayed
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 30)


def test_bad_inputs_give_clear_errors(tmp_path):
    Image.fromarray(np.full((10, 10), 300, dtype=np.uint16)).save(tmp_path / "d.png")  # mode I;16
    with pytest.raises(ValueError, match="16-bit"):
        load_image(tmp_path / "d.png")
    with pytest.raises(ValueError, match="uint8"):
        to_tensor_image(np.zeros((10, 10, 3), dtype=np.uint16))
    with pytest.raises(ValueError, match="16-bit and integer"):
        to_tensor_image(torch.zeros(1, 3, 10, 10, dtype=torch.int16))
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="Cannot read image"):
        load_image(tmp_path / "x.jpg")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    for bad in (float("nan"), float("inf"), -float("inf")):  # one aminmax pass must see each of them
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            x = torch.rand(1, 3, 10, 10, dtype=dtype)
            x[0, 1, 4, 7] = bad
            with pytest.raises(ValueError, match="NaN or inf"):
                to_tensor_image(x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_tensor_image(torch.rand(1, 3, 10, 10) * 255)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        to_tensor_image(torch.rand(1, 4, 10, 10))
    with pytest.raises(ValueError, match="channels"):
        to_tensor_image(torch.rand(10, 10, 3))
    with pytest.raises(ValueError, match="empty"):
        to_tensor_image(torch.rand(0, 3, 10, 10))
    with pytest.raises(TypeError, match="unsupported image type"):
        to_tensor_image(3.0)


def test_huge_image_refused_before_decoding(monkeypatch, tmp_path):
    import romav2_plugin.io as io

    monkeypatch.setattr(io, "MAX_PIXELS", 50)
    with pytest.raises(ValueError, match="exceeds the limit of 50 pixels"):
        io.to_tensor_image(torch.rand(1, 3, 10, 10))
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a refused image"))
    with pytest.raises(ValueError, match="10x10 exceeds the limit of 50 pixels"):
        io.load_image(tmp_path / "big.png")
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's own guard is left as it was


def test_range_error_shows_the_offending_value_unrounded():
    x = torch.full((1, 3, 8, 8), 0.5)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 1.000001, 1e-6
    with pytest.raises(ValueError, match=r"got \[1e-06, 1\.000001\]"):
        to_tensor_image(x)


def test_folder_is_not_called_missing_and_probe_checks_headers(tmp_path):
    from romav2_plugin.io import probe_image

    with pytest.raises(ValueError, match="is a folder, not an image file"):
        load_image(tmp_path)
    with pytest.raises(ValueError, match="is a folder"):
        probe_image(tmp_path)
    Image.fromarray(np.zeros((10, 30, 3), np.uint8)).save(tmp_path / "s.png")
    with pytest.raises(ValueError, match="30x10 is too small"):
        probe_image(tmp_path / "s.png")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "ok.png")
    assert probe_image(tmp_path / "ok.png") == (30, 20)
