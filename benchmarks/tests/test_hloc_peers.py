"""``benchmarks.hloc_peers --images``: a folder of photographs reconstructed by hloc (no true cameras), its
results file named by ``--scene``, and the clear errors for a folder without two images or a missing name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.hloc_peers import main


def _two_views(folder):
    """Two renders of the rendered test scene written as PNG photographs (a real 3D scene, not a plane)."""
    import cv2

    from benchmarks.hloc_peers import _scene

    _, _, renders = _scene(2)
    folder.mkdir()
    for i, im in enumerate(renders):
        cv2.imwrite(str(folder / f"photo{i}.png"), np.ascontiguousarray(im[..., ::-1]))
    return folder


def test_images_needs_two_photographs(tmp_path):
    pytest.importorskip("hloc")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.jpg").write_bytes(b"")
    (tmp_path / "one" / "notes.txt").write_text("not an image")  # other files are not counted
    with pytest.raises(SystemExit, match="1 images .* at least two"):
        main(["--images", str(tmp_path / "one"), "--scene", "x", "--methods", "sift", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--scene NAME"):
        main(["--images", str(tmp_path / "one"), "--methods", "sift", "--out", str(tmp_path)])


def test_images_names_an_unreadable_file(tmp_path):
    pytest.importorskip("hloc")
    photos = _two_views(tmp_path / "photos")
    (photos / "broken.JPG").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit, match="broken.JPG cannot be read as an image"):
        main(["--images", str(photos), "--scene", "x", "--methods", "sift", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # nothing written


def test_images_reconstructs_a_folder(tmp_path, capsys):
    pytest.importorskip("hloc")
    pytest.importorskip("pycolmap")
    photos = _two_views(tmp_path / "photos")
    out = tmp_path / "out"
    assert main(["--images", str(photos), "--scene", "pair", "--methods", "sift", "--out", str(out)]) == 0
    res = json.loads((out / "hloc_peers_pair_cpu.json").read_text())
    assert res["scene"] == "pair" and res["views"] == 2 and res["meta"]["images"] == ["photo0.png", "photo1.png"]
    (row,) = res["rows"]
    assert row["method"] == "sift" and row["centre_error"] is None  # no true cameras for photographs
    assert row["registered"] in (0, 2) and (row["points3D"] > 0) == (row["registered"] == 2)
    assert row["verified_pairs"] in (0, 1) and 0 <= row["inlier_matches"] <= row["matches"]
    assert len(row["pairs"]) == 1 and row["pairs"][0]["inliers"] == row["inlier_matches"]
    assert (row["verified_pairs"] == 1) == (row["inlier_matches"] > 0)
    md = (out / "hloc_peers_pair_cpu.md").read_text()
    assert "real 2-view scene 'pair'" in md and "photo0.png, photo1.png" in md and "| sift |" in md
    assert not (out / "hloc_peers_cpu.json").exists()  # the rendered scene's file is left alone
    # merging rows of another scene is refused, naming both
    with pytest.raises(SystemExit, match="scene pair with 2 views, this run rendered"):
        main(["--methods", "", "--merge", str(out / "hloc_peers_pair_cpu.json"), "--out", str(out)])


def test_tiny_weights_reach_the_match_dense_conf(monkeypatch, tmp_path):
    """``--tiny-weights`` sets the weights of the tiny row's conf (a candidate's model.pt); the shipped conf is
    left as it is."""
    pytest.importorskip("hloc")
    from benchmarks import hloc_peers
    from romav2_plugin.adapters import hloc as adapter

    seen = []

    class FakeMatchDense:
        confs = {"romav2_tiny": {"model": {"name": "romav2", "weights": "tiny"}}}

        @staticmethod
        def main(conf, pairs, images, export_dir):
            seen.append(conf)
            return "features", "matches"

    monkeypatch.setattr(adapter, "ensure_registered", lambda: FakeMatchDense)
    (tmp_path / "pairs.txt").write_text("a.png b.png\n")
    out = hloc_peers._match("tiny", tmp_path, [], [], tmp_path / "pairs.txt", tmp_path, "runs/x/model.pt")
    assert out == ("features", "matches") and seen[0]["model"]["weights"] == "runs/x/model.pt"
    assert FakeMatchDense.confs["romav2_tiny"]["model"]["weights"] == "tiny"
