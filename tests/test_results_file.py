"""The HDF5 results file of ``romav2-match``: a file we did not write is refused
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

from romav2_plugin.app import cli, matching
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
def double(cli_double):  # the command-line tests' double (tests/cli_support.py)
    return cli_double


@pytest.fixture
def no_model(cli_no_model):
    return cli_no_model


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


# ---------------------------------------------------------------- item 3: one writer, options first
HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.write(fd, f"{os.getpid()}\\n".encode())
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def held_lock(tmp_path):
    """Another process holding the results file's lock (as a running romav2-match does)."""
    procs = []

    def hold(out: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out) + ".lock"], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield hold
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.parametrize("exists", [False, True], ids=["new-file", "existing-file"])
def test_second_writer_is_refused_naming_the_other_process(no_model, images, tmp_path, capsys, held_lock, exists):
    h5py = pytest.importorskip("h5py")
    out = tmp_path / "r.h5"
    if exists:
        with h5py.File(out, "w") as f:
            f.attrs["romav2_results_format"] = 2
    before = _sha256(out) if exists else None
    holder = held_lock(out)
    rc = cli.main(_args(_pairs(tmp_path), images, out))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"pid {holder.pid}" in err and str(out) in err and "another --out" in err
    assert (_sha256(out) if exists else out.exists()) == (before if exists else False)


def test_single_pair_h5_goes_through_the_lock(no_model, images, tmp_path, capsys, held_lock):
    out = tmp_path / "one.h5"
    holder = held_lock(out)
    rc = cli.main([str(images / "a.jpg"), str(images / "b.jpg"), "--out", str(out), "--no-pictures"])
    err = capsys.readouterr().err
    assert rc == 2 and f"pid {holder.pid}" in err and not out.exists(), err


def test_ray_engine_goes_through_the_lock_before_the_cluster(images, tmp_path, held_lock, monkeypatch):
    pytest.importorskip("ray")
    from romav2_plugin import distributed
    from romav2_plugin.app.errors import CommandError

    def no_cluster(*a, **k):
        raise AssertionError("the cluster must not be started")

    monkeypatch.setattr(distributed.pairs, "connect", no_cluster)
    out = tmp_path / "r.h5"
    holder = held_lock(out)
    with pytest.raises(CommandError) as e:
        distributed.match_pairs(_pairs(tmp_path), images, out, setting="turbo", num_samples=200, progress=False)
    assert e.value.code == 2 and f"pid {holder.pid}" in e.value.message


def test_lock_is_released_when_the_run_ends(double, images, tmp_path):
    import fcntl
    import os

    out = tmp_path / "r.h5"
    assert cli.main(_args(_pairs(tmp_path), images, out)) == 0
    fd = os.open(str(out) + ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the run still held it
    finally:
        os.close(fd)
    assert cli.main(_args(_pairs(tmp_path), images, out, "--seed", "0")) == 0  # and again, in-process


@pytest.mark.parametrize(
    "extra, named",
    [(["--seed", "1"], "seed"), (["--num-samples", "300"], "num_samples"), (["--setting", "fast"], "setting"),
     (["--min-overlap", "0.2"], "min_overlap"), (["--weights", "tiny"], "weights_sha256")],
)
def test_other_options_on_a_finished_file_are_refused_not_nothing_to_do(
    double, images, tmp_path, capsys, extra, named
):
    out = tmp_path / "r.h5"
    pairs = _pairs(tmp_path)
    assert cli.main(_args(pairs, images, out)) == 0
    before = _sha256(out)
    capsys.readouterr()
    argv = _args(pairs, images, out)
    for i in range(0, len(extra), 2):  # replace the option (argparse keeps the last one anyway)
        argv += extra[i : i + 2]
    rc = cli.main(argv)
    cap = capsys.readouterr()
    assert rc == 2, cap
    assert "nothing to do" not in cap.out and named in cap.err and "--overwrite" in cap.err
    assert _sha256(out) == before and len(double) == 1


def test_the_lock_names_this_run_while_it_runs(images, tmp_path, monkeypatch):
    import os

    out = tmp_path / "r.h5"
    seen = []

    def fake_load_model(weights, setting, device, amp):
        seen.append((out.parent / "r.h5.lock").read_text().strip())
        return HomographyWarpDouble(DEMO_H, setting=setting), {"weights": "double.pt", "weights_sha256": "0" * 16}

    monkeypatch.setattr(matching, "load_model", fake_load_model)
    assert cli.main(_args(_pairs(tmp_path), images, out)) == 0
    assert seen == [str(os.getpid())] and not (tmp_path / "r.h5.lock").exists()
