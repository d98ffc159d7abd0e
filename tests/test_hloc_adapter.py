"""hloc adapter: keypoint conventions (no hloc needed), registration, match_dense runs, the CLI.

The network is replaced by ``HomographyWarpDouble`` wherever geometry is checked: it returns the exact
dense warp of a known homography, and everything after it (sampling, pixel conversion, hloc's rescaling and
quantisation) is the real code.
"""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from romav2_plugin.adapters import hloc as adapter
from romav2_plugin.config import SETTINGS
from romav2_plugin.testing import HomographyWarpDouble

REPO = Path(__file__).resolve().parents[1]

# A homography between *original* images (OpenCV pixel convention: top-left pixel centre at (0, 0)).
H_ORIG = np.array([[0.93, 0.06, 21.0], [-0.04, 1.02, -13.0], [2e-5, -1e-5, 1.0]])


def _apply_h(H: np.ndarray, k: np.ndarray) -> np.ndarray:
    ph = np.concatenate([k, np.ones_like(k[:, :1])], 1) @ H.T
    return ph[:, :2] / ph[:, 2:]


def _tensor_to_orig(scale: np.ndarray) -> np.ndarray:
    """Pixel map of hloc's rescaling ``o = (r + 0.5) * scale - 0.5`` as a 3x3 matrix."""
    sx, sy = scale
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1.0]])


def _hloc_rescale(k: torch.Tensor, scale: np.ndarray) -> np.ndarray:
    """hloc.match_dense's formula, reimplemented: ``scale_keypoints(k + 0.5, scale) - 0.5``."""
    return ((k.double() + 0.5) * torch.as_tensor(scale) - 0.5).numpy()


def _double(H_0to1: np.ndarray, setting: str) -> HomographyWarpDouble:
    """Network double for hloc pairs whose ``image1 = H_0to1(image0)``.

    The adapter gives hloc's ``image1`` to the core as image A (hloc's convention for dense matchers), so the
    double's A -> B homography is the inverse.
    """
    return HomographyWarpDouble(np.linalg.inv(H_0to1), setting=setting)


# ---------------------------------------------------------------------------------------- no hloc needed
@pytest.mark.parametrize("setting", ["turbo", "precise"])
def test_keypoints_follow_homography_after_hloc_rescaling(setting):
    # Original sizes (W, H) and the tensor sizes hloc would pass after resize_max + dfactor (H, W): all
    # non-square, none a multiple of 16, anisotropic scales.
    orig0, orig1 = np.array([997, 611]), np.array([803, 1201])
    t0, t1 = (299, 485), (581, 397)
    scale0, scale1 = orig0 / np.array(t0[::-1]), orig1 / np.array(t1[::-1])
    # The homography the double sees lives in the tensors' pixel frames.
    H_t = np.linalg.inv(_tensor_to_orig(scale1)) @ H_ORIG @ _tensor_to_orig(scale0)
    double = _double(H_t, setting="turbo")
    net = adapter.build_dense_matcher({"setting": setting, "max_num_matches": 3000}, core=double)
    assert double.bidirectional == SETTINGS[setting].bidirectional
    data = {"image0": torch.rand(1, 3, *t0), "image1": torch.rand(1, 3, *t1)}
    pred = adapter.dense_predict(net, data, 3000)
    assert set(pred) == {"keypoints0", "keypoints1", "scores"}
    k0, k1, s = pred["keypoints0"], pred["keypoints1"], pred["scores"]
    assert 1000 < len(k0) <= 3000 and k0.shape == k1.shape == (len(s), 2)
    assert ((s >= 0) & (s <= 1)).all()
    # Keypoints lie inside the tensors they refer to.
    for k, (h, w) in ((k0, t0), (k1, t1)):
        assert (k >= -0.5).all() and (k[:, 0] <= w - 0.5).all() and (k[:, 1] <= h - 0.5).all()
    k0o, k1o = _hloc_rescale(k0, scale0), _hloc_rescale(k1, scale1)
    err = np.linalg.norm(_apply_h(H_ORIG, k0o) - k1o, axis=1)
    assert err.max() < 0.05, err.max()


def test_image1_is_the_grid_side_and_image0_is_refined():
    """hloc's convention for dense matchers (its LoFTR adapter: "we refine kpts in image0"). In a
    one-direction setting the core's A side is its working grid: image1's keypoints are grid points (the same
    in every pair that image1 is part of), image0's are where the warp lands."""
    t0, t1 = (240, 300), (270, 330)  # tensor sizes (H, W)
    s = SETTINGS["turbo"]
    assert not s.bidirectional
    net = adapter.build_dense_matcher(
        {"setting": "turbo", "max_num_matches": 2000}, core=_double(H_ORIG, "turbo")
    )
    pred = adapter.dense_predict(
        net, {"image0": torch.rand(1, 3, *t0), "image1": torch.rand(1, 3, *t1)}, 2000
    )
    k0, k1 = pred["keypoints0"].double().numpy(), pred["keypoints1"].double().numpy()
    assert len(k0) > 1000

    def grid_coords(k, hw):  # keypoints in cells of the s.W_lr x s.H_lr grid over the tensor
        return (k + 0.5) * np.array([s.W_lr / hw[1], s.H_lr / hw[0]]) - 0.5

    g1, g0 = grid_coords(k1, t1), grid_coords(k0, t0)
    assert np.abs(g1 - g1.round()).max() < 1e-3
    assert np.abs(g0 - g0.round()).max() > 0.2  # off the grid: refined
    assert np.abs(_apply_h(H_ORIG, k0) - k1).max() < 0.02


def test_threshold_mode_keeps_top_scores():
    double = HomographyWarpDouble(np.eye(3), setting="turbo")
    net = adapter.build_dense_matcher(
        {"setting": "turbo", "sample_mode": "threshold", "confidence_threshold": 0.5}, core=double
    )
    data = {"image0": torch.rand(1, 3, 48, 80), "image1": torch.rand(1, 3, 48, 80)}
    every = adapter.dense_predict(net, data, None)
    assert 0.95 * 320 * 320 <= len(every["scores"]) <= 320 * 320  # every grid match (turbo: 320 x 320)
    top = adapter.dense_predict(net, data, 100)
    assert len(top["scores"]) == 100 and top["scores"].min() >= every["scores"].max() - 1e-6
    torch.testing.assert_close(top["keypoints1"], top["keypoints0"], atol=1e-3, rtol=0)


def test_sampling_is_reproducible():
    double = _double(H_ORIG, setting="turbo")
    data = {"image0": torch.rand(1, 3, 64, 64), "image1": torch.rand(1, 3, 64, 64)}

    def run(seed):
        conf = {"setting": "turbo", "max_num_matches": 200, "seed": seed}
        return adapter.dense_predict(adapter.build_dense_matcher(conf, core=double), data, 200)

    a, b, c = run(0), run(0), run(1)
    assert len(a["scores"]) == 200
    torch.testing.assert_close(a["keypoints0"], b["keypoints0"])
    torch.testing.assert_close(a["keypoints1"], b["keypoints1"])
    assert not torch.equal(a["keypoints0"], c["keypoints0"])  # the seed is used
    with pytest.raises(ValueError, match="max_num_matches"):
        adapter.build_dense_matcher({"max_num_matches": None}, core=double)


@pytest.mark.parametrize("typo", ["num_sample", "max_num_match", "sede", "num_samples"])
def test_unknown_model_keys_are_rejected_with_the_valid_ones(typo):
    double = HomographyWarpDouble(np.eye(3), setting="turbo")
    with pytest.raises(
        ValueError, match=rf"unknown key\(s\) .*: {typo}; valid keys: name, weights, setting"
    ) as e:
        adapter.build_dense_matcher({"name": "romav2", "setting": "turbo", typo: 1}, core=double)
    assert all(k in str(e.value) for k in adapter.DEFAULT_MODEL_CONF)


def test_weights_are_passed_through_to_from_pretrained(monkeypatch):
    """``weights: "tiny"`` (the shipped small model), a path or a URL reach ``RoMaV2.from_pretrained`` as given."""
    from romav2_plugin.model import RoMaV2

    seen = []

    def fake(weights=None, **kwargs):
        seen.append((weights, kwargs))
        return HomographyWarpDouble(np.eye(3), setting=kwargs["setting"])

    monkeypatch.setattr(RoMaV2, "from_pretrained", staticmethod(fake))
    for weights in ("tiny", "/some/romav2.pt", None):
        adapter.build_dense_matcher({"name": "romav2", "weights": weights, "setting": "base", "amp": False})
    assert seen == [(w, {"setting": "base", "amp": False}) for w in ("tiny", "/some/romav2.pt", None)]


def test_without_hloc_nothing_happens_and_errors_name_the_extra(monkeypatch):
    real = adapter.importlib.util.find_spec
    monkeypatch.setattr(
        adapter.importlib.util, "find_spec", lambda name, *a: None if name == "hloc" else real(name, *a)
    )
    monkeypatch.setattr(adapter, "_MATCHER_CLASS", None)
    before = list(sys.meta_path)
    assert adapter.register() is False
    assert sys.meta_path == before
    for fn in (adapter.require_hloc, adapter.matcher_class, adapter.ensure_registered):
        with pytest.raises(ImportError, match=r"romav2-plugin\[hloc\]") as e:
            fn()
        assert "github.com/cvg/Hierarchical-Localization" in str(e.value)


def test_import_romav2_plugin_does_not_import_hloc():
    code = "import sys, romav2_plugin; from romav2_plugin.adapters import hloc; hloc.register(); print('hloc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------- with hloc
# The ``hloc`` fixture (conftest.py) takes upstream hloc from ../shared/thirdparty/hloc when none is installed.
@pytest.fixture
def match_dense(hloc):
    return adapter.ensure_registered()


def test_hloc_and_the_parts_we_use_import_here_and_in_subprocesses(hloc):
    """CI guard: where hloc is available, the pipeline modules import (in-process and for the CLI tests)."""
    from hloc import match_dense, reconstruction, triangulation  # noqa: F401

    assert adapter.register() is True
    code = "import hloc.match_dense, hloc.reconstruction, hloc.triangulation, pycolmap"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_registration_is_idempotent_and_adds_only_ours(match_dense):
    import hloc.matchers

    loftr = copy.deepcopy(match_dense.confs["loftr"])
    assert adapter.register() is True and adapter.register() is True
    assert sum(isinstance(f, adapter._HlocFinder) for f in sys.meta_path) == 1
    assert match_dense.confs["loftr"] == loftr
    for name in ("romav2", "romav2_fast", "romav2_aachen", "romav2_tiny"):
        assert match_dense.confs[name]["model"]["name"] == "romav2"
    module = sys.modules[adapter.MODULE_NAME]
    assert hloc.matchers.romav2 is module
    import hloc.matchers.romav2 as imported

    assert imported is module and module.RoMaV2 is adapter.matcher_class()


def test_dynamic_load_returns_our_base_model(match_dense):
    import hloc.matchers
    from hloc.utils.base_model import BaseModel, dynamic_load

    cls = dynamic_load(hloc.matchers, "romav2")
    assert cls is adapter.matcher_class()
    assert issubclass(cls, BaseModel) and cls.__module__ == "hloc.matchers.romav2"


@pytest.mark.parametrize("name", ["romav2", "romav2_fast", "romav2_aachen", "romav2_tiny"])
def test_conf_sanity(match_dense, name):
    conf = match_dense.confs[name]
    assert set(conf) == {"output", "model", "preprocessing", "max_error", "cell_size"}
    assert conf["output"] not in {c["output"] for k, c in match_dense.confs.items() if k != name}
    model = adapter.check_model_conf(conf["model"])  # only known keys
    assert model["weights"] == ("tiny" if name == "romav2_tiny" else None) and model["sample_mode"] == "balanced"
    # The README's table: setting, resize_max, max_error / cell_size, matches per pair.
    expected = {
        "romav2": ("precise", 1280, 1, 1, 5000),
        "romav2_fast": ("base", 1024, 1, 1, 5000),
        "romav2_aachen": ("precise", 1280, 2, 8, 10000),
        "romav2_tiny": ("tiny", 1024, 1, 1, 5000),
    }[name]
    pre = conf["preprocessing"]
    got = (
        model["setting"],
        pre["resize_max"],
        conf["max_error"],
        conf["cell_size"],
        model["max_num_matches"],
    )
    assert got == expected
    s = SETTINGS[model["setting"]]
    assert pre["grayscale"] is False and pre["dfactor"] >= 1
    assert pre["resize_max"] >= max(s.H_hr or s.H_lr, s.W_hr or s.W_lr)  # the core does the downsizing


def test_hloc_model_forward_with_double(match_dense, monkeypatch):
    import hloc.matchers
    from hloc.utils.base_model import dynamic_load

    monkeypatch.setattr(adapter, "_load_core", lambda conf: _double(H_ORIG, setting=conf["setting"]))
    Model = dynamic_load(hloc.matchers, "romav2")
    model = Model({**match_dense.confs["romav2"]["model"], "setting": "turbo", "max_num_matches": 500}).eval()
    assert model.conf["sample_mode"] == "balanced"  # hloc's BaseModel merged our defaults
    with pytest.raises(ValueError, match="max_num_match; valid keys"):  # through hloc's BaseModel too
        Model({**match_dense.confs["romav2"]["model"], "max_num_match": 500})
    pred = model({"image0": torch.rand(1, 3, 200, 260), "image1": torch.rand(1, 3, 210, 250)})
    assert len(pred["scores"]) == 500
    err = np.linalg.norm(
        _apply_h(H_ORIG, pred["keypoints0"].double().numpy()) - pred["keypoints1"].numpy(), axis=1
    )
    assert err.max() < 0.02
    with pytest.raises(AssertionError, match="image1"):
        model({"image0": torch.rand(1, 3, 32, 32)})


# ---------------------------------------------------------------------------------------- match_dense runs
def _texture(h: int, w: int, seed: int) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


@pytest.fixture
def scene(tmp_path, hloc):
    """Three small images a, b, c (b = a warped by H_ORIG) and the three pairs."""
    import cv2

    images = tmp_path / "images"
    images.mkdir()
    a = _texture(150, 200, 0)
    cv2.imwrite(str(images / "a.png"), a)
    cv2.imwrite(str(images / "b.png"), cv2.warpPerspective(a, H_ORIG, (190, 170)))
    cv2.imwrite(str(images / "c.png"), _texture(140, 180, 1))
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.png b.png\na.png c.png\nb.png c.png\n")
    return tmp_path, images, pairs


@pytest.fixture
def double_conf(match_dense, monkeypatch):
    """``romav2`` conf (turbo) whose network is the homography double (no weights needed)."""
    monkeypatch.setattr(adapter, "_load_core", lambda conf: _double(H_ORIG, setting=conf["setting"]))
    conf = copy.deepcopy(match_dense.confs["romav2"])
    conf["model"].update(setting="turbo", max_num_matches=1000)
    return conf


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_match_dense_main_matches_follow_the_warp_within_quantisation(double_conf, scene, match_dense):
    from hloc.utils.io import get_keypoints, get_matches

    tmp, images, pairs = scene
    (tmp / "out").mkdir()  # hloc's main does not create it
    features, matches = match_dense.main(double_conf, pairs, images, export_dir=tmp / "out")
    k0, k1 = get_keypoints(features, "a.png"), get_keypoints(features, "b.png")
    m, scores = get_matches(matches, "a.png", "b.png")
    assert len(m) > 200 and ((scores > 0) & (scores <= 1)).all()
    # Raw dense matches are the double's homography to < 0.05 px; quantised ones within the conf's error.
    import h5py

    with h5py.File(matches, "r") as fd:
        raw0, raw1 = fd["a.png/b.png/keypoints0"][()], fd["a.png/b.png/keypoints1"][()]
    assert np.abs(_apply_h(H_ORIG, raw0.astype(np.float64)) - raw1).max() < 0.05
    err = np.linalg.norm(_apply_h(H_ORIG, k0[m[:, 0]].astype(np.float64)) - k1[m[:, 1]], axis=1)
    tol = 2 * double_conf["max_error"] * 1.05 + 0.05  # both ends move by <= max_error (H is ~isometric)
    assert err.max() < tol, err.max()


@pytest.mark.slow  # several match_dense runs
def test_run_match_dense_resume_overwrite_and_interrupt(double_conf, scene, match_dense, monkeypatch):
    import h5py

    from romav2_plugin.app.hloc import run_match_dense

    tmp, images, pairs = scene
    out = tmp / "out"
    one = tmp / "one.txt"
    one.write_text("a.png b.png\n")
    features, matches = run_match_dense(double_conf, one, images, out, matches=out / "m.h5")
    assert features == out / "feats_matches-romav2.h5"
    before = (_sha(features), _sha(matches))
    # Already done: skipped, files untouched.
    run_match_dense(double_conf, one, images, out, matches=out / "m.h5")
    assert (_sha(features), _sha(matches)) == before

    # Interrupted half way (second new pair): outputs exactly as before, no staging file left.
    calls = {"n": 0, "interrupt_at": 2}
    real = adapter.dense_predict

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == calls["interrupt_at"]:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(adapter, "dense_predict", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_match_dense(double_conf, pairs, images, out, matches=out / "m.h5")
    assert (_sha(features), _sha(matches)) == before
    assert sorted(p.name for p in out.iterdir()) == ["feats_matches-romav2.h5", "m.h5"]

    # Resume: only the two missing pairs are matched; the first pair's results are kept as they were.
    calls.update(n=0, interrupt_at=None)
    with h5py.File(matches, "r") as fd:
        old = fd["a.png/b.png/matches0"][()]
    run_match_dense(double_conf, pairs, images, out, matches=out / "m.h5")
    assert calls["n"] == 2
    with h5py.File(matches, "r") as fd:
        assert {"a.png/b.png", "a.png/c.png", "b.png/c.png"} <= {f"{a}/{b}" for a in fd for b in fd[a]}
        np.testing.assert_array_equal(fd["a.png/b.png/matches0"][()], old)

    # --overwrite recomputes all three.
    calls["n"] = 0
    run_match_dense(double_conf, pairs, images, out, matches=out / "m.h5", overwrite=True)
    assert calls["n"] == 3


def test_bad_inputs_are_reported_before_anything_is_written(double_conf, scene):
    from romav2_plugin.app.hloc import InputError, run_match_dense

    tmp, images, pairs = scene
    out = tmp / "out"
    bad = tmp / "bad.txt"
    bad.write_text("a.png missing.png\n")
    with pytest.raises(InputError, match=r"missing under .*: missing\.png"):
        run_match_dense(double_conf, bad, images, out)
    (images / "junk.png").write_bytes(b"not an image")
    bad.write_text("a.png junk.png\n")
    with pytest.raises(InputError, match=r"format OpenCV can read: junk\.png"):
        run_match_dense(double_conf, bad, images, out)
    with pytest.raises(InputError, match="does not exist"):
        run_match_dense(double_conf, tmp / "nope.txt", images, out)
    out.mkdir()
    (out / "feats_matches-romav2.h5").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable HDF5"):
        run_match_dense(double_conf, pairs, images, out)
    assert (out / "feats_matches-romav2.h5").read_bytes() == b"garbage"
    assert not (out / "matches-romav2_pairs.h5").exists()


def test_pycolmap_import_and_geometric_verification(double_conf, scene, match_dense):
    import pycolmap
    from hloc import reconstruction, triangulation

    tmp, images, pairs = scene
    one = tmp / "one.txt"
    one.write_text("a.png b.png\n")
    (tmp / "out").mkdir()
    features, matches = match_dense.main(double_conf, one, images, export_dir=tmp / "out")
    db = tmp / "database.db"
    reconstruction.create_empty_db(db)
    reconstruction.import_images(images, db, pycolmap.CameraMode.AUTO, ["a.png", "b.png"])
    ids = reconstruction.get_image_ids(db)
    with pycolmap.Database.open(db) as d:
        triangulation.import_features(ids, d, features)
        triangulation.import_matches(ids, d, one, matches)
    triangulation.estimation_and_geometric_verification(db, one)
    with pycolmap.Database.open(db) as d:
        n_matches = len(d.read_matches(ids["a.png"], ids["b.png"]))
        tvg = d.read_two_view_geometry(ids["a.png"], ids["b.png"])
    assert n_matches > 200
    # An exact homography between the two views: (nearly) every match is an inlier.
    assert len(tvg.inlier_matches) >= 0.95 * n_matches, (len(tvg.inlier_matches), n_matches)


# ---------------------------------------------------------------------------------------- real network
@pytest.fixture
def toronto_scene(tmp_path, toronto_pair, hloc):
    images = tmp_path / "images"
    images.mkdir()
    for name, src in zip(("A.jpg", "B.jpg"), toronto_pair):
        os.symlink(src, images / name)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("A.jpg B.jpg\n")
    return tmp_path, images, pairs


@pytest.mark.slow
def test_match_dense_main_random_weights_agrees_with_core_warp(
    toronto_scene, random_checkpoint, random_model, match_dense
):
    import h5py
    from hloc.match_dense import ImagePairDataset
    from hloc.utils.io import get_keypoints, get_matches
    from scipy.spatial import cKDTree

    from romav2_plugin.geometry import to_normalized, to_pixel

    tmp, images, pairs = toronto_scene
    conf = copy.deepcopy(match_dense.confs["romav2"])
    conf["model"].update(weights=str(random_checkpoint), setting="turbo", amp=False)
    (tmp / "out").mkdir()
    features, matches = match_dense.main(conf, pairs, images, export_dir=tmp / "out")
    with h5py.File(matches, "r") as fd:
        raw0, raw1 = fd["A.jpg/B.jpg/keypoints0"][()], fd["A.jpg/B.jpg/keypoints1"][()]
    assert 0 < len(raw0) <= conf["model"]["max_num_matches"]

    # The core's dense warp on exactly the tensors hloc fed (turbo: one direction). hloc's image1 (B.jpg) is
    # the core's A: its keypoints are the grid points, image0's (A.jpg) where the warp takes them.
    img0, img1, scale0, scale1, _, _ = ImagePairDataset(images, conf["preprocessing"], [("A.jpg", "B.jpg")])[
        0
    ]
    preds = random_model.match(img1[None], img0[None])
    warp = preds["warp_AB"][0].double()
    h, w = warp.shape[:2]
    (H0, W0), (H1, W1) = img0.shape[-2:], img1.shape[-2:]
    t1 = (torch.from_numpy(raw1).double() + 0.5) / torch.from_numpy(scale1) - 0.5  # back into the tensor
    g = to_pixel(to_normalized(t1, H1, W1, pixel_center=0.0), h, w, pixel_center=0.0)
    gi = g.round()
    assert (g - gi).abs().max() < 1e-3  # every image1 keypoint is a grid point of the warp
    x0 = warp[gi[:, 1].long(), gi[:, 0].long()]
    expect0 = _hloc_rescale(to_pixel(x0, H0, W0, pixel_center=0.0), scale0)
    assert np.abs(expect0 - raw0).max() < 0.01

    # Final (quantised) matches: each comes from a raw match within max_error at both ends.
    m, _ = get_matches(matches, "A.jpg", "B.jpg")
    f0, f1 = get_keypoints(features, "A.jpg")[m[:, 0]], get_keypoints(features, "B.jpg")[m[:, 1]]
    assert len(m) > 0
    tol = conf["max_error"] + 1e-3
    tree = cKDTree(raw0)
    for a, b in zip(f0, f1):
        near = tree.query_ball_point(a, tol)
        assert near and np.linalg.norm(raw1[near] - b, axis=1).min() <= tol


@pytest.mark.slow
def test_cli_end_to_end(toronto_scene, random_checkpoint):
    tmp, images, pairs = toronto_scene
    out = tmp / "out"
    base = [
        sys.executable,
        "-m",
        "romav2_plugin.hloc",
        "match_dense",
        "--conf",
        "romav2",
        "--pairs",
        str(pairs),
    ]
    base += [
        "--image_dir",
        str(images),
        "--export_dir",
        str(out),
        "--weights",
        str(random_checkpoint),
        "--setting",
        "turbo",
    ]

    def run(*extra):
        return subprocess.run(base + list(extra), cwd=REPO, capture_output=True, text=True, timeout=900)

    r = run()
    assert r.returncode == 0, r.stderr[-3000:]
    features, matches = out / "feats_matches-romav2.h5", out / "matches-romav2_pairs.h5"
    assert f"matches: {matches}" in r.stdout and "100%" in r.stderr  # progress bar
    digest = (_sha(features), _sha(matches))
    r = run()
    assert r.returncode == 0 and "nothing to do" in r.stderr
    assert (_sha(features), _sha(matches)) == digest
    bad = tmp / "bad.txt"
    bad.write_text("A.jpg B.jpg\nA.jpg gone.jpg\n")
    r = subprocess.run(
        [*base[:7], str(bad), *base[8:]], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 2 and "gone.jpg" in r.stderr and "missing" in r.stderr
    assert (_sha(features), _sha(matches)) == digest
    r = run("--overwrite")
    assert r.returncode == 0 and "1 of 1 pairs to match" in r.stderr, r.stderr[-3000:]


@pytest.mark.slow  # a subprocess
def test_cli_missing_image_is_a_clear_error(scene):
    tmp, images, _ = scene
    bad = tmp / "bad.txt"
    bad.write_text("a.png gone.png\n")
    cmd = [sys.executable, "-m", "romav2_plugin.hloc", "match_dense", "--conf", "romav2", "--pairs", str(bad)]
    cmd += ["--image_dir", str(images), "--export_dir", str(tmp / "out")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "1 image(s) listed in the pairs are missing" in r.stderr and "gone.png" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp / "out").exists()
    r = subprocess.run(
        cmd[:3] + ["match_dense", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and "loftr_aachen" in r.stdout and "romav2_fast" in r.stdout
