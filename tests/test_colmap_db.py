"""romav2-match --pairs --colmap-db: the COLMAP database writer (app/colmap_db.py) on tiny inputs, and the pair
lists of romav2-sfm (app/pair_lists.py). The network is the homography double on a 32x32 grid (cli_support)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from romav2_plugin.app import cli

pycolmap = pytest.importorskip("pycolmap")


def _args(pairs, images, db, *extra, n=200):
    return ["--pairs", str(pairs), "--image-dir", str(images), "--colmap-db", str(db), "--setting", "turbo",
            "--num-samples", str(n), *map(str, extra)]  # fmt: skip


def _digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def three(tmp_path, cli_images):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg b.jpg\na.jpg c.jpg\n")
    return pairs, cli_images, tmp_path / "database.db"


def _read(db_path):
    with pycolmap.Database.open(db_path) as db:
        images = {im.name: im for im in db.read_all_images()}
        kps = {n: db.read_keypoints(im.image_id) for n, im in images.items()}
        matches = {}
        tvgs = {}
        for a in images:
            for b in images:
                ia, ib = images[a].image_id, images[b].image_id
                if ia < ib and db.exists_matches(ia, ib):
                    matches[(a, b)] = db.read_matches(ia, ib)
                if ia < ib and db.exists_two_view_geometry(ia, ib):
                    tvgs[(a, b)] = db.read_two_view_geometry(ia, ib)
        return images, kps, matches, tvgs, db.num_cameras(), db.num_frames(), db.num_rigs()


def test_database_opens_in_pycolmap_with_shared_keypoints(three, cli_small_double, capsys):
    pairs, images, db = three
    assert cli.main(_args(pairs, images, db)) == 0
    ims, kps, matches, tvgs, n_cams, n_frames, n_rigs = _read(db)
    assert set(ims) == {"a.jpg", "b.jpg", "c.jpg"}
    # one camera per folder and size (a.jpg and c.jpg are both 600x400, b.jpg 640x480), a frame per image
    assert n_cams == 2 and n_rigs == 2 and n_frames == 3
    assert ims["a.jpg"].camera_id == ims["c.jpg"].camera_id != ims["b.jpg"].camera_id
    assert set(matches) == {("a.jpg", "b.jpg"), ("a.jpg", "c.jpg")}
    for (a, b), m in matches.items():
        assert len(m) > 50 and m[:, 0].max() < len(kps[a]) and m[:, 1].max() < len(kps[b])
        assert len(np.unique(m[:, 0])) == len(m) and len(np.unique(m[:, 1])) == len(m)  # one-to-one
        assert tvgs[(a, b)].config != pycolmap.TwoViewGeometryConfiguration.UNDEFINED
    # a.jpg's two pairs share keypoints where both drew the same grid points of A: every keypoint of a.jpg is
    # used, and those used by both pairs were stored once
    used = [matches[("a.jpg", "b.jpg")][:, 0], matches[("a.jpg", "c.jpg")][:, 0]]
    shared = np.intersect1d(*used)
    assert len(shared) >= 20
    assert len(kps["a.jpg"]) == len(np.union1d(*used)) == len(used[0]) + len(used[1]) - len(shared)
    with pycolmap.Database.open(db) as d:
        cam = d.read_camera(ims["b.jpg"].camera_id)
    assert cam.model == pycolmap.CameraModelId.SIMPLE_RADIAL and (cam.width, cam.height) == (640, 480)
    np.testing.assert_allclose(cam.params, [1.2 * 640, 320, 240, 0])  # COLMAP's prior focal length
    assert "wrote" in capsys.readouterr().out


def test_keypoints_use_colmap_pixel_centres(three, cli_small_double):
    """Each stored keypoint of a pair lies within max error of a raw match + 0.5 (OpenCV -> COLMAP)."""
    pairs, images, db = three
    pairs.write_text("a.jpg b.jpg\n")
    h5 = db.with_suffix(".h5")
    assert cli.main(_args(pairs, images, db, "--max-error", 1, "--cell-size", 1)) == 0
    assert cli.main(["--pairs", str(pairs), "--image-dir", str(images), "--out", str(h5), "--setting", "turbo",
                     "--num-samples", "200"]) == 0  # fmt: skip
    import h5py

    with h5py.File(h5) as f:
        g = f["a.jpg/b.jpg"]
        raw_A, raw_B = g["keypoints_A"][()], g["keypoints_B"][()]
    _, kps, matches, _, *_ = _read(db)
    m = matches[("a.jpg", "b.jpg")]
    kA, kB = kps["a.jpg"][m[:, 0], :2], kps["b.jpg"][m[:, 1], :2]
    dA = np.linalg.norm(kA[:, None] - (raw_A + 0.5)[None], axis=-1)
    best = dA.argmin(1)
    assert dA.min(1).max() <= 1.0 + 1e-4
    assert np.linalg.norm(kB - (raw_B[best] + 0.5), axis=1).max() <= 1.0 + 1e-4
    assert np.abs(kA - raw_A[best]).mean() > 0.25  # not the OpenCV coordinates


def test_resume_skips_finished_pairs_and_keeps_keypoint_ids(three, cli_small_double, capsys):
    pairs, images, db = three
    pairs.write_text("a.jpg b.jpg\n")
    assert cli.main(_args(pairs, images, db)) == 0
    _, kps1, m1, *_ = _read(db)
    pairs.write_text("a.jpg b.jpg\nb.jpg a.jpg\na.jpg c.jpg\n")
    capsys.readouterr()
    assert cli.main(_args(pairs, images, db)) == 0
    assert "2 of 3 pairs already in" in capsys.readouterr().err  # (b, a) is the same database pair
    _, kps2, m2, *_ = _read(db)
    np.testing.assert_array_equal(kps2["a.jpg"][: len(kps1["a.jpg"])], kps1["a.jpg"])  # append-only
    np.testing.assert_array_equal(m2[("a.jpg", "b.jpg")], m1[("a.jpg", "b.jpg")])
    assert ("a.jpg", "c.jpg") in m2
    assert cli.main(_args(pairs, images, db)) == 0  # nothing left to do
    assert "nothing to do" in capsys.readouterr().out


def test_resume_with_other_options_is_refused(three, cli_small_double, capsys):
    pairs, images, db = three
    assert cli.main(_args(pairs, images, db)) == 0
    before = _digest(db)
    assert cli.main(_args(pairs, images, db, "--cell-size", 4)) == 2
    err = capsys.readouterr().err
    assert "cell_size" in err and "another --colmap-db" in err
    assert _digest(db) == before


def test_foreign_database_is_refused_unchanged_unless_added_to(three, cli_small_double, capsys):
    pairs, images, db = three
    with pycolmap.Database.open(db) as d:  # someone else's database: a camera and an image
        cam = pycolmap.Camera(model="PINHOLE", width=640, height=480, params=[500, 500, 320, 240])
        cid = d.write_camera(cam)
        d.write_image(pycolmap.Image(name="theirs.jpg", camera_id=cid))
    before = _digest(db)
    assert cli.main(_args(pairs, images, db)) == 2
    err = capsys.readouterr().err
    assert str(db) in err and "--colmap-db-add" in err and "did not write" in err
    assert _digest(db) == before and not db.with_name(db.name + ".lock").exists()
    assert cli.main(_args(pairs, images, db, "--colmap-db-add")) == 0
    ims, *_ , n_cams, _, _ = _read(db)
    assert set(ims) == {"theirs.jpg", "a.jpg", "b.jpg", "c.jpg"} and n_cams == 3


@pytest.mark.parametrize("content", [b"", b"not a database at all\n", b"SQLite format 3\x00" + b"\x00" * 84])
def test_files_that_are_not_colmap_databases_are_left_alone(three, cli_no_model, capsys, content):
    pairs, images, db = three
    db.write_bytes(content)
    assert cli.main(_args(pairs, images, db, "--colmap-db-add")) == 2
    assert "--colmap-db" in capsys.readouterr().err
    assert db.read_bytes() == content


def test_argument_combinations(three, capsys):
    pairs, images, db = three
    for extra, msg in (
        (["--out", "x.h5"], "leave out --out"),
        (["--overwrite"], "does not apply to --colmap-db"),
        (["--max-error", "3"], "--max-error"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(_args(pairs, images, db, *extra))
        assert e.value.code == 2 and msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--pairs", str(pairs), "--cell-size", "4"])
    assert "apply to --colmap-db only" in capsys.readouterr().err


def test_python_api_pairs_job(three, cli_small_double):
    """The same database from Python: the one PairsJob with a LocalExecutor."""
    from romav2_plugin.app.pairs import LocalExecutor, PairsJob, run_pairs

    _, images, db = three
    job = PairsJob([("a.jpg", "b.jpg")], images, db.parent, setting="turbo", num_samples=200, colmap_db=db,
                   progress=False)
    run = run_pairs(job, LocalExecutor())
    assert run.code == 0 and run.n_done == 1
    ims, _, matches, *_ = _read(db)
    assert set(ims) == {"a.jpg", "b.jpg"} and len(matches[("a.jpg", "b.jpg")]) > 50


# ----------------------------------------------------------------------------------------- pair lists
def test_pair_lists(tmp_path):
    from romav2_plugin.app.errors import CommandError
    from romav2_plugin.app.pair_lists import list_images, pairs_from

    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    (d / ".hidden").mkdir()
    for n in ("f10.jpg", "f2.jpg", "f1.PNG", "sub/g.jpg", ".hidden/x.jpg", "notes.txt"):
        (d / n).write_bytes(b"x")
    assert list_images(d) == ["f1.PNG", "f2.jpg", "f10.jpg", "sub/g.jpg"]  # natural order, hidden skipped
    assert len(pairs_from("exhaustive", d)) == 6
    assert pairs_from("sequential:2", d) == [
        ("f1.PNG", "f2.jpg"), ("f1.PNG", "f10.jpg"), ("f2.jpg", "f10.jpg"), ("f2.jpg", "sub/g.jpg"),
        ("f10.jpg", "sub/g.jpg"),
    ]  # fmt: skip
    r = tmp_path / "retrieval.txt"
    r.write_text("f1.PNG f2.jpg\nf2.jpg f1.PNG\nf1.PNG f1.PNG\nf1.PNG sub/g.jpg\n")
    assert pairs_from(f"retrieval:{r}", d) == [("f1.PNG", "f2.jpg"), ("f1.PNG", "sub/g.jpg")]
    for bad in ("sequential:x", "sequential:0", "nearest", "retrieval:"):
        with pytest.raises(CommandError) as e:
            pairs_from(bad, d)
        assert e.value.code == 2


def test_interrupted_inside_a_pair_then_resumed(three, cli_small_double, monkeypatch, capsys):
    """Ctrl-C in the middle of the second pair's transaction: the first pair is kept as written, the rerun
    redoes the second one and the database ends complete."""
    pairs, images, db = three
    real = pycolmap.estimate_two_view_geometry
    calls = []

    def interrupt_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pycolmap, "estimate_two_view_geometry", interrupt_second)
    assert cli.main(_args(pairs, images, db)) == 130
    _, kps1, m1, tvg1, *_ = _read(db)
    assert set(tvg1) == set(m1) == {("a.jpg", "b.jpg")}  # nothing of the second pair was written
    monkeypatch.setattr(pycolmap, "estimate_two_view_geometry", real)
    capsys.readouterr()
    assert cli.main(_args(pairs, images, db)) == 0
    assert "1 of 2 pairs already in" in capsys.readouterr().err
    _, kps2, m2, tvg2, *_ = _read(db)
    np.testing.assert_array_equal(m2[("a.jpg", "b.jpg")], m1[("a.jpg", "b.jpg")])
    np.testing.assert_array_equal(kps2["b.jpg"], kps1["b.jpg"])
    m = m2[("a.jpg", "c.jpg")]
    assert len(m) > 50 and m[:, 0].max() < len(kps2["a.jpg"]) and m[:, 1].max() < len(kps2["c.jpg"])
    assert set(tvg2) == {("a.jpg", "b.jpg"), ("a.jpg", "c.jpg")}


def test_pairs_from_without_a_list(tmp_path, cli_images, cli_small_double):
    """romav2-match --pairs-from sequential:1 --image-dir DIR: each image with the next in name order."""
    db = tmp_path / "seq.db"
    args = ["--pairs-from", "sequential:1", "--image-dir", str(cli_images), "--colmap-db", str(db),
            "--setting", "turbo", "--num-samples", "100"]  # fmt: skip
    assert cli.main(args) == 0
    ims, _, matches, tvgs, n_cams, *_ = _read(db)
    assert len(ims) == 5 and len(matches) == len(tvgs) == 4
    assert n_cams == 3  # 600x400 and 640x480 in the top folder, 640x480 in a/ (a/b.jpg)
