"""Bad input and faults for the three commands (issues #15 and #14): each test reproduces one defect.

The network is replaced by the exact-homography double (in-process, or in a child process through a small
driver script), so these run in seconds. Faults: a read-only folder and a tiny full file system are made with
a private mount namespace (``unshare -m`` + tmpfs) when that works (root in a container), else with chmod
(non-root), else the test is skipped with the reason; a process killed inside an HDF5 write is a child whose
``create_dataset`` sends itself SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from romav2_plugin import export as ex
from romav2_plugin import signals
from romav2_plugin.app import cli, errors, hloc_command, matching
from romav2_plugin.app.results import FORMAT_ATTR, pair_key
from romav2_plugin.testing import HomographyWarpDouble

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "romav2_plugin" / "assets"
DEMO_H = np.asarray(json.loads((ASSETS / "demo_pair.json").read_text())["homography_A_to_B"])

DRIVER = """
import json, os, shutil, signal, sys
import numpy as np
from romav2_plugin.app import cli, matching
from romav2_plugin.testing import HomographyWarpDouble
H = np.asarray(json.loads(open(sys.argv[1]).read())["homography_A_to_B"])
def fake(weights, setting, device, amp):
    print("MODEL-LOADED", file=sys.stderr, flush=True)
    return HomographyWarpDouble(H, setting=setting or "precise"), {"weights": "double.pt", "weights_sha256": "0" * 16}
matching.load_model = fake
if os.environ.get("KILL_AT_DATASET"):  # SIGKILL inside the N-th dataset write
    import h5py
    orig, n = h5py.Group.create_dataset, [0]
    def create_dataset(self, *a, **k):
        n[0] += 1
        if n[0] == int(os.environ["KILL_AT_DATASET"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, *a, **k)
    h5py.Group.create_dataset = create_dataset
if os.environ.get("BLIND_FREE_SPACE"):  # hide the free-space checks: hit the real ENOSPC
    import collections
    U = collections.namedtuple("usage", "total used free")
    shutil.disk_usage = lambda p: U(1 << 40, 0, 1 << 40)
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.fixture
def driver(tmp_path):
    path = tmp_path / "driver.py"
    path.write_text(DRIVER)
    return path


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("ROMAV2_WEIGHTS", None)
    env.update(extra)
    return env


def run_driver(driver, args, *, wrap: str | None = None, env=None, timeout=300):
    """Run ``romav2-match ARGS`` with the double in a child; ``wrap``: a shell prefix run first (mounts)."""
    cmd = [sys.executable, str(driver), str(ASSETS / "demo_pair.json"), *map(str, args)]
    if wrap is not None:
        cmd = ["unshare", "-m", "sh", "-c", wrap + " && exec " + " ".join(f"'{c}'" for c in cmd)]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env or _env(), timeout=timeout, cwd=driver.parent
    )


def _can_mount(tmp_path) -> str | None:
    """None if a private tmpfs can be mounted here; else the reason."""
    if shutil.which("unshare") is None:
        return "unshare not available"
    d = tmp_path / "probe"
    d.mkdir()
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{d}'"],
        capture_output=True,
        text=True,
    )
    return None if r.returncode == 0 else f"cannot mount a private tmpfs ({r.stderr.strip()[:200]})"


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    (d / "a").mkdir(parents=True)
    for n, src in (("a.jpg", "A"), ("b.jpg", "B"), ("a/b.jpg", "B"), ("a-b.jpg", "A"), ("c.jpg", "A")):
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

    monkeypatch.setattr(matching, "load_model", fake_load_model)
    return calls


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(matching, "load_model", refuse)


def _pairs_args(pairs, images, out, n=200):
    return ["--pairs", str(pairs), "--image-dir", str(images), "--out", str(out), "--setting", "turbo",
            "--num-samples", str(n)]  # fmt: skip


# ------------------------------------------------------------------ (3) colliding names, old files
def test_colliding_pair_names_are_two_groups_and_resume_exactly(double, images, tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a/b.jpg c.jpg\na-b.jpg c.jpg\n")
    out = tmp_path / "r.h5"
    assert cli.main(_pairs_args(pairs, images, out)) == 0
    assert pair_key("a/b.jpg", "c.jpg") != pair_key("a-b.jpg", "c.jpg")
    with h5py.File(out, "r") as f:
        ga, gb = f[pair_key("a/b.jpg", "c.jpg")], f[pair_key("a-b.jpg", "c.jpg")]
        assert ga.attrs["image_A"] == "a/b.jpg" and gb.attrs["image_A"] == "a-b.jpg"
        assert ga.attrs["complete"] and gb.attrs["complete"]
        assert int(f.attrs[FORMAT_ATTR]) == 2
    capsys.readouterr()
    assert cli.main(_pairs_args(pairs, images, out)) == 0
    assert "nothing to do" in capsys.readouterr().out and len(double) == 1


def test_file_of_the_earlier_layout_is_migrated_not_misread(double, images, tmp_path, capsys):
    """Format 1 keyed 'a/b.jpg' and 'a-b.jpg' both as 'a-b.jpg/...': the one group left there holds a/b.jpg.
    The resume must keep it (moved to its injective key) and compute a-b.jpg, which was lost."""
    h5py = pytest.importorskip("h5py")
    out = tmp_path / "old.h5"
    with h5py.File(out, "w") as f:  # as written by the earlier version (no format attribute)
        for k, v in {"setting": "turbo", "weights_sha256": "0" * 16, "seed": 0, "num_samples": 200}.items():
            f.attrs[k] = v
        f.attrs["min_overlap"] = 0.5
        g = f.create_group("a-b.jpg/c.jpg")
        g.create_dataset("keypoints_A", data=np.zeros((3, 2), np.float32))
        g.attrs.update({"image_A": "a/b.jpg", "image_B": "c.jpg", "time_match_s": 123.0, "complete": True})
        f.create_group("b.jpg/c.jpg").attrs.update({"image_A": "b.jpg", "image_B": "c.jpg"})  # unfinished
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a/b.jpg c.jpg\na-b.jpg c.jpg\nb.jpg c.jpg\n")
    assert cli.main(_pairs_args(pairs, images, out)) == 0
    cap = capsys.readouterr()
    assert "2 matched now, 1 already done" in cap.out and "migrated" in cap.err
    with h5py.File(out, "r") as f:
        old = f[pair_key("a/b.jpg", "c.jpg")]
        assert old.attrs["time_match_s"] == 123.0 and old["keypoints_A"].shape == (3, 2)  # kept, not redone
        new = f[pair_key("a-b.jpg", "c.jpg")]
        assert new.attrs["image_A"] == "a-b.jpg" and len(new["confidence"]) > 0
        assert f[pair_key("b.jpg", "c.jpg")].attrs["complete"]


# ------------------------------------------------------------------ (9), (12) input checks
def test_pairs_file_not_utf8_names_line_and_byte(no_model, images, tmp_path, capsys):
    pairs = tmp_path / "pairs.txt"
    pairs.write_bytes(b"a.jpg b.jpg\n# ok\ncaf\xe9.jpg b.jpg\n")
    assert cli.main(_pairs_args(pairs, images, tmp_path / "r.h5")) == 2
    err = capsys.readouterr().err
    assert "pairs.txt:3: not valid UTF-8" in err and "0xe9" in err and "byte offset 20" in err
    assert "Traceback" not in err


def test_folder_given_as_image_is_called_a_folder(no_model, tmp_path, capsys):
    rc = cli.main([str(tmp_path), str(ASSETS / "demo_B.jpg"), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "is a folder, not an image file" in err and "not found" not in err


def test_image_smaller_than_one_patch_refused_before_the_model(no_model, tmp_path, capsys):
    Image.fromarray(np.zeros((12, 40, 3), np.uint8)).save(tmp_path / "small.png")
    assert (
        cli.main([str(tmp_path / "small.png"), str(ASSETS / "demo_B.jpg"), "--out", str(tmp_path / "o")]) == 2
    )
    assert "40x12 is too small" in capsys.readouterr().err


def test_pairs_bad_images_found_before_the_model(no_model, images, tmp_path, capsys):
    (images / "dir.jpg").mkdir()
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg gone.jpg\ndir.jpg b.jpg\n")
    assert cli.main(_pairs_args(pairs, images, tmp_path / "r.h5")) == 3  # every pair failed: no model load
    out = capsys.readouterr()
    assert "Image not found" in out.out and "is a folder" in out.out and "wrote      nothing" in out.out


# ------------------------------------------------------------------ (5) read-only output
def _readonly_setup(tmp_path) -> tuple[Path, str | None]:
    """A read-only folder: a private read-only tmpfs (root) or chmod 555 (non-root)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        return ro, None
    reason = _can_mount(tmp_path)
    if reason:
        pytest.skip(f"running as root, so chmod cannot make a folder read-only, and {reason}")
    return ro, f"mount -t tmpfs -o ro,size=1m tmpfs '{ro}'"


@pytest.mark.parametrize("target", ["matches.npz", "res.h5", "folder", "pairs.h5"])
def test_readonly_output_refused_before_the_model_same_code(driver, images, tmp_path, target):
    pytest.importorskip("h5py")
    ro, wrap = _readonly_setup(tmp_path)
    if target == "pairs.h5":
        pairs = tmp_path / "pairs.txt"
        pairs.write_text("a.jpg b.jpg\n")
        args = _pairs_args(pairs, images, ro / "results.h5")
    else:
        out = ro / ("sub" if target == "folder" else target)
        args = [
            images / "a.jpg",
            images / "b.jpg",
            "--out",
            out,
            "--setting",
            "turbo",
            "--num-samples",
            "100",
        ]
    r = run_driver(driver, args, wrap=wrap)
    assert r.returncode == errors.EXIT_USAGE == 2, r.stderr
    assert "MODEL-LOADED" not in r.stderr  # refused before the model loads
    assert "cannot write there" in r.stderr or "cannot create the folder" in r.stderr, r.stderr
    assert "wrote" not in r.stdout and "Traceback" not in r.stderr


# ------------------------------------------------------------------ (6) full disk
@pytest.fixture
def tiny_fs(tmp_path):
    reason = _can_mount(tmp_path)
    if reason:
        pytest.skip(f"no tiny file system for the full-disk case: {reason}")
    d = tmp_path / "tiny"
    d.mkdir()
    return d


def _run_full_disk_and_copy(driver, args, tiny_fs, copy_to, env, size="400k"):
    """Run the driver on the tiny file system and copy its files out before the mount disappears."""
    cmd = [sys.executable, str(driver), str(ASSETS / "demo_pair.json"), *map(str, args)]
    quoted = " ".join(f"'{c}'" for c in cmd)
    script = (
        f"mount -t tmpfs -o size={size} tmpfs '{tiny_fs}' && {quoted}; rc=$?; ls -a '{tiny_fs}' >&2; "
        f"cp -a '{tiny_fs}'/. '{copy_to}'/; exit $rc"
    )
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.parametrize("blind", [False, True], ids=["free-space-check", "real-ENOSPC"])
def test_full_disk_pairs_then_resume_elsewhere(driver, images, tmp_path, tiny_fs, blind):
    h5py = pytest.importorskip("h5py")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg b.jpg\nb.jpg a.jpg\na.jpg c.jpg\nc.jpg a.jpg\nb.jpg c.jpg\n")
    saved = tmp_path / "saved"
    saved.mkdir()
    r = _run_full_disk_and_copy(
        driver, _pairs_args(pairs, images, tiny_fs / "r.h5", n=2000), tiny_fs, saved,
        _env(BLIND_FREE_SPACE="1" if blind else ""),
    )  # fmt: skip
    assert r.returncode == errors.EXIT_RUNTIME == 1, (r.returncode, r.stderr[-2000:])  # not 139 (segfault)
    assert "the disk is full" in r.stderr and "Traceback" not in r.stderr
    assert "STOPPED" in r.stdout and "not run" in r.stdout
    assert sorted(p.name for p in saved.iterdir()) == ["r.h5"]  # no .part / .new left over
    # the finished pairs survive: a resume with room to spare (the file copied out) completes the list
    r2 = run_driver(driver, _pairs_args(pairs, images, saved / "r.h5", n=2000))
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "0 failed" in r2.stdout and "already done" in r2.stdout
    with h5py.File(saved / "r.h5", "r") as f:
        assert sum(1 for k1 in f for _ in f[k1]) == 5


def test_full_disk_single_npz_leaves_nothing(driver, tmp_path, tiny_fs):
    saved = tmp_path / "saved"
    saved.mkdir()
    args = [ASSETS / "demo_A.jpg", ASSETS / "demo_B.jpg", "--out", tiny_fs / "m.npz", "--setting", "turbo",
            "--num-samples", "5000", "--no-pictures"]  # fmt: skip
    r = _run_full_disk_and_copy(driver, args, tiny_fs, saved, _env(BLIND_FREE_SPACE="1"), size="64k")
    assert r.returncode == 1 and "the disk is full" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert list(saved.iterdir()) == []  # no m.npz.part on the full disk
    assert "wrote" not in r.stdout
    r = _run_full_disk_and_copy(driver, args, tiny_fs, saved, _env(), size="64k")  # free space checked up front
    assert r.returncode == 2 and "MODEL-LOADED" not in r.stderr and "free" in r.stderr, r.stderr


def test_enospc_npz_simulated_no_part_file(double, tmp_path, monkeypatch, capsys):
    """Anywhere (no mount needed): numpy's writer fails with ENOSPC."""
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", full)
    out = tmp_path / "o"
    assert cli.main(["--demo", "--setting", "turbo", "--out", str(out), "--num-samples", "100"]) == 1
    cap = capsys.readouterr()
    assert "the disk is full" in cap.err and "wrote" not in cap.out
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------ (7) locked file
def test_results_file_locked_by_another_process_is_called_in_use(no_model, images, tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    out = tmp_path / "r.h5"
    with h5py.File(out, "w") as f:
        f.attrs["setting"] = "turbo"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import h5py, time; f = h5py.File({str(out)!r}, 'a'); print('open', flush=True); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "open"
        pairs = tmp_path / "pairs.txt"
        pairs.write_text("a.jpg b.jpg\n")
        rc = cli.main(_pairs_args(pairs, images, out))
        err = capsys.readouterr().err
        if "locked" not in err and rc != 2:
            pytest.skip(f"HDF5 file locking is disabled here (HDF5_USE_FILE_LOCKING?): {err[-300:]}")
        assert rc == 2 and "is locked: another process" in err
        assert "remove it" not in err and "not a readable" not in err
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------ (10) killed inside a write
@pytest.mark.parametrize("kill_at, kept", [(3, 0), (9, 1)], ids=["first-write", "second-write"])
def test_killed_inside_a_write_the_next_run_resumes(driver, images, tmp_path, kill_at, kept):
    h5py = pytest.importorskip("h5py")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg b.jpg\nb.jpg a.jpg\na.jpg c.jpg\n")
    out = tmp_path / "r.h5"
    args = _pairs_args(pairs, images, out)
    r = run_driver(driver, args, env=_env(KILL_AT_DATASET=str(kill_at)))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    before = {}
    if kept:
        with h5py.File(out, "r") as f:
            before = {k: f[k].attrs["time_match_s"] for k in [pair_key("a.jpg", "b.jpg")]}
    r = run_driver(driver, args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{3 - kept} matched now, {kept} already done, 0 failed" in r.stdout
    with h5py.File(out, "r") as f:
        for k, t in before.items():
            assert f[k].attrs["time_match_s"] == t  # the finished pair was not lost nor redone
        assert sum(1 for k1 in f for _ in f[k1]) == 3


def test_damaged_file_is_repaired_keeping_what_reads_back(double, images, tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg b.jpg\nb.jpg a.jpg\n")
    out = tmp_path / "r.h5"
    assert cli.main(_pairs_args(pairs, images, out)) == 0
    data = bytearray(out.read_bytes())
    data[len(data) // 2 :] = b"\0" * (len(data) - len(data) // 2)  # the second half of the file is lost
    out.write_bytes(bytes(data))
    capsys.readouterr()
    rc = cli.main(_pairs_args(pairs, images, out))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "repaired" in cap.err and (tmp_path / "r.h5.damaged").is_file()
    with h5py.File(out, "r") as f:
        assert int(f.attrs[FORMAT_ATTR]) == 2 and sum(1 for k1 in f for _ in f[k1]) == 2


def test_not_hdf5_results_file_is_refused_untouched(no_model, images, tmp_path, capsys):
    pytest.importorskip("h5py")
    out = tmp_path / "r.h5"
    out.write_text("my notes")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg b.jpg\n")
    assert cli.main(_pairs_args(pairs, images, out)) == 2
    assert "cannot be read as an HDF5 results file" in capsys.readouterr().err
    assert out.read_text() == "my notes"


# ------------------------------------------------------------------ sampling default (#14)
class _Unrelated(HomographyWarpDouble):
    """What a network says about two unrelated images: a warp, with low overlap (0.1) everywhere."""

    def match(self, img_A, img_B):
        out = super().match(img_A, img_B)
        for k in ("overlap_AB", "overlap_BA"):
            if out[k] is not None:
                out[k] = 0.1 * torch.ones_like(out[k])
        return out


def test_unrelated_images_give_no_matches_and_a_warning(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(
        matching,
        "load_model",
        lambda w, s, d, a: (_Unrelated(DEMO_H, setting=s or "precise"), {"weights": "x.pt", "weights_sha256": ""}),
    )
    out = tmp_path / "o"
    assert cli.main(["--demo", "--setting", "turbo", "--out", str(out), "--num-samples", "500"]) == 0
    cap = capsys.readouterr().out
    assert len(np.load(out / "matches.npz")["confidence"]) == 0  # was 500 random matches
    assert "WARNING" in cap and "no confident match" in cap
    # the official sampler's behaviour stays one option away
    assert (
        cli.main(
            ["--demo", "--setting", "turbo", "--out", str(out), "--num-samples", "500", "--min-overlap", "0"]
        )
        == 0
    )
    assert len(np.load(out / "matches.npz")["confidence"]) == 500
    assert "no confident match" in capsys.readouterr().out


def test_related_images_keep_their_matches_with_the_default(double, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["--demo", "--setting", "turbo", "--out", str(out), "--num-samples", "500"]) == 0
    assert len(np.load(out / "matches.npz")["confidence"]) == 500
    assert "WARNING" not in capsys.readouterr().out


# ------------------------------------------------------------------ --weights tiny, --demo
@pytest.fixture
def record_from_pretrained(monkeypatch):
    """RoMaV2.from_pretrained replaced by the double; records the weights it was given (works before or after
    the lead's named 'tiny' model lands)."""
    from romav2_plugin.model import RoMaV2

    calls = []

    def fake(cls, weights=None, *, setting="precise", device=None, amp=None, config=None):
        calls.append(weights)
        return HomographyWarpDouble(DEMO_H, setting=setting or "precise")

    monkeypatch.setattr(RoMaV2, "from_pretrained", classmethod(fake))
    return calls


def test_weights_tiny_goes_to_from_pretrained_in_all_three(
    record_from_pretrained, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "o"
    assert (
        cli.main(["--demo", "--weights", "tiny", "--setting", "turbo", "--out", str(out), "--no-pictures"])
        == 0
    )
    assert record_from_pretrained == ["tiny"]
    assert str(np.load(out / "matches.npz")["weights"]) == "tiny"
    # romav2-export
    monkeypatch.setattr(ex, "_require_onnx", lambda: None)
    monkeypatch.setattr(ex, "export_onnx", lambda model, path, **k: Path(path))
    monkeypatch.setattr(ex, "_describe", lambda p: str(p))
    monkeypatch.setattr(ex, "input_names", lambda m: ["image_A"])
    monkeypatch.setattr(ex, "output_names", lambda m: ["warp_AB"])
    assert ex.main(["--weights", "tiny", "--out", str(tmp_path / "t.onnx")]) == 0
    assert record_from_pretrained == ["tiny", "tiny"]
    # python -m romav2_plugin.hloc: the conf gets the name, nothing treats it as a path
    seen = {}

    def fake_run(conf, *a, **k):
        seen.update(conf["model"])
        return tmp_path / "f.h5", tmp_path / "m.h5"

    monkeypatch.setattr(hloc_command, "run_match_dense", fake_run)
    try:
        from romav2_plugin.adapters.hloc import ensure_registered

        ensure_registered()
    except ImportError:
        pytest.skip("hloc not importable for the hloc part")
    argv = ["match_dense", "--pairs", "p.txt", "--image_dir", ".", "--export_dir", ".", "--weights", "tiny"]
    assert hloc_command.main(argv) == 0
    assert seen["weights"] == "tiny"


def test_demo_uses_tiny_without_official_weights_and_says_so(
    record_from_pretrained, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("ROMAV2_PLUGIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("ROMAV2_WEIGHTS", raising=False)
    out = tmp_path / "o"
    assert cli.main(["--demo", "--setting", "turbo", "--out", str(out), "--no-pictures"]) == 0
    assert record_from_pretrained == ["tiny"]
    assert "small shipped model 'tiny'" in capsys.readouterr().out
    # the official file already in the cache is used (and nothing is downloaded)
    cached = tmp_path / "cache" / "weights" / "romav2.0.1.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"stand-in")
    assert cli.main(["--demo", "--setting", "turbo", "--out", str(out), "--no-pictures"]) == 0
    assert record_from_pretrained[-1] == str(cached)
    assert "official weights found in the cache" in capsys.readouterr().out


def test_weights_not_found_names_the_source(no_model, tmp_path, monkeypatch, capsys):
    c = cli
    monkeypatch.delenv("ROMAV2_WEIGHTS", raising=False)
    missing = tmp_path / "nope.pt"
    assert c.main(["--demo", "--weights", str(missing), "--out", str(tmp_path / "o")]) == 4
    err = capsys.readouterr().err
    assert (
        "--weights" in err and "not found" in err and "ROMAV2_WEIGHTS" not in err and "--weights tiny" in err
    )
    monkeypatch.setenv("ROMAV2_WEIGHTS", str(missing))
    assert c.main(["--demo", "--out", str(tmp_path / "o")]) == 4
    err = capsys.readouterr().err
    assert f"ROMAV2_WEIGHTS={missing}" in err and "unset ROMAV2_WEIGHTS" in err
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert c.main(["--demo", "--weights", str(empty), "--out", str(tmp_path / "o")]) == 4
    assert "is empty (0 bytes" in capsys.readouterr().err  # not IndexError


# ------------------------------------------------------------------ one set of conventions
def test_export_help_tells_the_truth(capsys):
    with pytest.raises(SystemExit) as e:
        ex.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: romav2-export")
    for opt in ("--batch-size", "--opset", "--overwrite", "exit codes"):
        assert opt in out
    assert "TensorRT" not in out


def test_hloc_help_without_hloc_prints_usage_and_install_hint(tmp_path):
    code = "import sys; sys.modules['hloc'] = None\nfrom romav2_plugin.app.hloc_command import main\nsys.exit(main(sys.argv[1:]))"
    for argv, rc in ((["--help"], 0), (["match_dense", "--help"], 0)):
        r = subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=_env(), cwd=tmp_path
        )
        assert r.returncode == rc, r.stderr
        assert "usage: python -m romav2_plugin.hloc" in r.stdout and "pip install" in r.stdout
    r = subprocess.run(
        [sys.executable, "-c", code, "match_dense", "--pairs", "p", "--image_dir", ".", "--export_dir", "."],
        capture_output=True, text=True, env=_env(), cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == errors.EXIT_SETUP and "pip install" in r.stderr and "Traceback" not in r.stderr


def test_missing_dependency_and_bad_checkpoint_same_code_in_all_three(tmp_path, monkeypatch, capsys):
    bogus = tmp_path / "romav2.0.1.pt"
    bogus.write_bytes(b"not a checkpoint")
    # romav2-export: onnx missing -> 4; bad checkpoint -> 4
    monkeypatch.setattr(ex, "_require_onnx", lambda: (_ for _ in ()).throw(ImportError(ex.EXPORT_HINT)))
    assert ex.main(["--out", str(tmp_path / "x.onnx")]) == errors.EXIT_SETUP
    assert "romav2-plugin[export]" in capsys.readouterr().err
    monkeypatch.setattr(ex, "_require_onnx", lambda: None)
    assert ex.main(["--out", str(tmp_path / "x.onnx"), "--weights", str(bogus)]) == errors.EXIT_SETUP
    assert "checkpoint" in capsys.readouterr().err
    # romav2-match: bad checkpoint -> 4 (h5py missing -> 4: test_cli.py)
    assert (
        cli.main(["--demo", "--weights", str(bogus), "--setting", "turbo", "--out", str(tmp_path / "o")]) == 4
    )
    assert "checkpoint" in capsys.readouterr().err
    # python -m romav2_plugin.hloc: a weights error raised while hloc loads the model -> 4
    from romav2_plugin.model import RoMaV2

    try:
        from romav2_plugin.adapters.hloc import ensure_registered

        ensure_registered()
    except ImportError:
        pytest.skip("hloc not importable")
    monkeypatch.setattr(
        hloc_command, "run_match_dense", lambda conf, *a, **k: RoMaV2.from_pretrained(conf["model"]["weights"])
    )
    argv = ["match_dense", "--pairs", "p", "--image_dir", ".", "--export_dir", ".", "--weights", str(bogus)]
    assert hloc_command.main(argv) == errors.EXIT_SETUP
    assert "checkpoint" in capsys.readouterr().err


def test_sigterm_handler_restored_after_each_command(double, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["--demo", "--setting", "turbo", "--out", str(tmp_path / "o"), "--no-pictures"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_deferred_interrupts_hold_a_signal_until_the_block_ends():
    """A SIGTERM inside the block (a checkpoint being written) does not interrupt it; it is raised on leaving,
    through the handler that was in place, and every handler is restored."""
    import os

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
    finished = []
    with pytest.raises(signals.Terminated), signals.sigterm_as_interrupt():
        with signals.deferred_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # Python runs handlers between bytecodes: it would have raised here
                sum(range(100))
            finished.append(True)
    assert finished == [True]
    assert {s: signal.getsignal(s) for s in before} == before
    with signals.deferred_interrupts():  # nothing caught: nothing raised
        pass
    assert {s: signal.getsignal(s) for s in before} == before
