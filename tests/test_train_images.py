"""Training images: 16-bit (and float) images are refused before training, naming the
file, as romav2-match refuses them, instead of being clipped to white by PIL's convert("RGB")."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from romav2_plugin.train.data import ImageFolder


def _photos(tmp_path, *, sixteen: bool):
    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "ok.png")
    if sixteen:  # a real 16-bit grayscale PNG, values spread over 0..65535
        Image.fromarray(rng.integers(0, 65536, (64, 64), dtype=np.uint16)).save(d / "deep.png")
        assert Image.open(d / "deep.png").mode.startswith("I")
    return d


def test_16bit_training_image_is_refused_naming_the_file(tmp_path):
    d = _photos(tmp_path, sixteen=True)
    with pytest.raises(ValueError, match=r"deep\.png.*16-bit"):
        ImageFolder([str(d)])


def test_8bit_folder_still_loads(tmp_path):
    f = ImageFolder([str(_photos(tmp_path, sixteen=False))])
    x = f.load(0)
    assert x.shape == (3, 64, 64) and 0 < x.mean() < 1


def test_romav2_train_exits_2_before_training(tmp_path, capsys):
    from romav2_plugin.train.__main__ import main

    d = _photos(tmp_path, sixteen=True)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'out_dir = "{tmp_path / "run"}"\n[model]\narchitecture = "tiny"\n[data]\nsize = [64, 64]\n'
                   f'workers = 0\n[[data.sources]]\nkind = "homography"\npath = "{d}"\n'
                   '[[stages]]\nname = "matcher"\nsteps = 1\nbatch_size = 1\n')
    assert main([str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "deep.png" in err and "16-bit" in err and "probably a bug" not in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
