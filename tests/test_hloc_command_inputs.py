"""The hloc command's inputs, checked before the model as romav2-match does: an image
under 16x16 in a RoMa v2 run was found after the other pairs had been matched (and their work thrown away);
an empty pairs file exited 0 printing output paths that did not exist. Both are now exit 2 up front.

The network is the homography double (no weights)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from romav2_plugin.adapters import hloc as adapter
from romav2_plugin.testing import HomographyWarpDouble


@pytest.fixture
def match_dense(hloc):
    return adapter.ensure_registered()


@pytest.fixture
def calls(match_dense, monkeypatch):
    """The network is the identity double; ``calls['n']`` counts the pairs it matched."""
    monkeypatch.setattr(adapter, "_load_core", lambda conf: HomographyWarpDouble(np.eye(3), setting=conf["setting"]))
    n = {"n": 0}
    real = adapter.dense_predict

    def counting(*a):
        n["n"] += 1
        return real(*a)

    monkeypatch.setattr(adapter, "dense_predict", counting)
    return n


@pytest.fixture
def scene(tmp_path, hloc):
    import cv2

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in (("a.png", (96, 128)), ("b.png", (96, 128)), ("c.png", (80, 112)), ("tiny.png", (12, 40))):
        cv2.imwrite(str(images / name), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return tmp_path, images


def _conf(match_dense):
    conf = copy.deepcopy(match_dense.confs["romav2"])
    conf["model"].update(setting="turbo", max_num_matches=200)
    return conf


def test_image_under_16_pixels_is_refused_before_any_pair_is_matched(match_dense, calls, scene):
    from romav2_plugin.app.hloc import InputError, run_match_dense

    tmp, images = scene
    pairs = tmp / "pairs.txt"
    pairs.write_text("a.png b.png\na.png c.png\nb.png tiny.png\n")  # the small image comes last
    with pytest.raises(InputError, match=r"tiny\.png: 40x12 is too small.*16x16"):
        run_match_dense(_conf(match_dense), pairs, images, tmp / "out")
    assert calls["n"] == 0
    assert not (tmp / "out").exists() or not list((tmp / "out").iterdir())


def test_cli_small_image_exits_2_naming_it(match_dense, calls, scene, capsys):
    from romav2_plugin.app import hloc_command as command

    tmp, images = scene
    pairs = tmp / "pairs.txt"
    pairs.write_text("a.png b.png\nc.png tiny.png\n")
    argv = ["match_dense", "--pairs", str(pairs), "--image_dir", str(images), "--export_dir", str(tmp / "out")]
    code = command.main(argv + ["--weights", "tiny", "--setting", "turbo"])
    err = capsys.readouterr().err
    assert code == 2 and "tiny.png: 40x12 is too small" in err, err
    assert calls["n"] == 0


def test_small_images_stay_allowed_for_other_confs(match_dense, scene):
    """The 16x16 minimum is RoMa v2's patch; other matchers' confs keep hloc's own behaviour."""
    from romav2_plugin.app.hloc import _check_images

    tmp, images = scene
    _check_images(images, [("a.png", "tiny.png")], min_side=None)


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_empty_pairs_file_exits_2_no_pairs(match_dense, calls, scene, capsys, text):
    from romav2_plugin.app import hloc_command as command

    tmp, images = scene
    pairs = tmp / "pairs.txt"
    pairs.write_text(text)
    argv = ["match_dense", "--pairs", str(pairs), "--image_dir", str(images), "--export_dir", str(tmp / "out")]
    code = command.main(argv + ["--weights", "tiny"])
    cap = capsys.readouterr()
    assert code == 2 and "no pairs" in cap.err, (cap.out, cap.err)
    assert "matches:" not in cap.out
    assert not (tmp / "out").exists()
