"""The HDF5 results file of ``romav2-match`` (issue #32, items 1 and 3): a file we did not write is refused
untouched; one writer per results file; the run's options are checked before anything else.

The network is replaced by the exact-homography double (or must not load at all), so these run in seconds.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from romav2_plugin import cli
from romav2_plugin.testing import HomographyWarpDouble

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "romav2_plugin" / "assets"
DEMO_H = np.asarray(json.loads((ASSETS / "demo_pair.json").read_text())["homography_A_to_B"])


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for n, src in (("a.jpg", "A"), ("b.jpg", "B"), ("c.jpg", "A")):
        (d / n).write_bytes((ASSETS / f"demo_{src}.jpg").read_bytes())
    return d


@pytest.fixture
def double(monkeypatch):
    calls = []

    def fake_load_model(weights, setting, device, amp):
        calls.append((weights, setting))
        return HomographyWarpDouble(DEMO_H, setting=setting or "precise"), {
            "weights": "double.pt",
            "weights_sha256": "0" * 16,
        }

    monkeypatch.setattr(cli, "load_model", fake_load_model)
    return calls


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(cli, "load_model", refuse)


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _pairs(tmp_path, text="a.jpg b.jpg\n"):
    p = tmp_path / "pairs.txt"
    p.write_text(text)
    return p


def _args(pairs, images, out, *extra, n=200, seed=0):
    return ["--pairs", str(pairs), "--image-dir", str(images), "--out", str(out), "--setting", "turbo",
            "--num-samples", str(n), "--seed", str(seed), *extra]  # fmt: skip


# ---------------------------------------------------------------- item 1: a file we did not write
def _hloc_features(path: Path, h5py) -> None:
    """As hloc's extract_features writes feats-*.h5: one group per image name (names may hold '/')."""
    with h5py.File(path, "w") as f:
        for name in ("a.jpg", "sub/b.jpg", "c.jpg"):
            g = f.create_group(name)
            g.create_dataset("keypoints", data=np.random.default_rng(0).random((5, 2), dtype=np.float32))
            g.create_dataset("descriptors", data=np.zeros((256, 5), np.float32))
            g.create_dataset("image_size", data=np.array([640, 480]))


def _hloc_matches(path: Path, h5py) -> None:
    """As hloc's match_features writes matches-*.h5: groups name0/name1 with matches0 and matching_scores0."""
    with h5py.File(path, "w") as f:
        for a, b in (("a.jpg", "b.jpg"), ("a.jpg", "c.jpg")):
            g = f.create_group(f"{a}/{b}")
            g.create_dataset("matches0", data=np.arange(5, dtype=np.int16))
            g.create_dataset("matching_scores0", data=np.ones(5, np.float16))


def _nested(path: Path, h5py) -> None:
    """Any nested file with attributes of its own (but none of ours)."""
    with h5py.File(path, "w") as f:
        f.attrs["creator"] = "someone else"
        f.create_group("x/y/z").attrs["complete"] = False
        f.create_dataset("x/data", data=np.arange(10))


@pytest.mark.parametrize("make", [_hloc_features, _hloc_matches, _nested], ids=["feats", "matches", "nested"])
@pytest.mark.parametrize("mode", ["pairs", "pairs-overwrite", "single"])
def test_hdf5_file_we_did_not_write_is_refused_byte_identical(no_model, images, tmp_path, capsys, make, mode):
    h5py = pytest.importorskip("h5py")
    out = tmp_path / "theirs.h5"
    make(out, h5py)
    before = _sha256(out)
    if mode == "single":
        argv = [str(images / "a.jpg"), str(images / "b.jpg"), "--out", str(out), "--no-pictures"]
    else:
        argv = _args(_pairs(tmp_path), images, out, *(["--overwrite"] if mode == "pairs-overwrite" else []))
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(out) in err and "not a romav2-match results file" in err and "another --out" in err
    assert _sha256(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["imgs", "pairs.txt", "theirs.h5"]) or mode == "single"
    assert not list(tmp_path.glob("theirs.h5.*"))


def test_our_file_of_the_earlier_layout_is_still_migrated(double, images, tmp_path, capsys):
    """Format 1 carried no format attribute but the run options as root attributes (every pair wrote them)."""
    h5py = pytest.importorskip("h5py")
    out = tmp_path / "old.h5"
    with h5py.File(out, "w") as f:
        for k, v in {"setting": "turbo", "weights_sha256": "0" * 16, "seed": 0, "num_samples": 200}.items():
            f.attrs[k] = v
        f.attrs["min_overlap"] = 0.5
        g = f.create_group("a.jpg/b.jpg")
        g.create_dataset("keypoints_A", data=np.zeros((3, 2), np.float32))
        g.attrs.update({"image_A": "a.jpg", "image_B": "b.jpg", "complete": True})
    assert cli.main(_args(_pairs(tmp_path, "a.jpg b.jpg\nb.jpg c.jpg\n"), images, out)) == 0
    assert "migrated" in capsys.readouterr().err
