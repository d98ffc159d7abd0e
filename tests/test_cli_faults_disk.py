"""romav2-match's output faults: a read-only folder, a full disk (caught by the free-space check or as a
real ENOSPC), a writer failing with ENOSPC. Nothing half-written is left behind and a resume completes.

A read-only folder and a tiny full file system are made with a private mount namespace (``unshare -m`` +
tmpfs) when that works (root in a container), else with chmod (non-root), else the test is skipped with the
reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_support import ASSETS, can_mount, child_env, pairs_args, run_driver

from romav2_plugin.app import cli, errors


def _readonly_setup(tmp_path) -> tuple[Path, str | None]:
    """A read-only folder: a private read-only tmpfs (root) or chmod 555 (non-root)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        return ro, None
    reason = can_mount(tmp_path)
    if reason:
        pytest.skip(f"running as root, so chmod cannot make a folder read-only, and {reason}")
    return ro, f"mount -t tmpfs -o ro,size=1m tmpfs '{ro}'"


@pytest.mark.slow  # a child process per case
@pytest.mark.parametrize("target", ["matches.npz", "res.h5", "folder", "pairs.h5"])
def test_readonly_output_refused_before_the_model_same_code(cli_driver, cli_images, tmp_path, target):
    ro, wrap = _readonly_setup(tmp_path)
    if target == "pairs.h5":
        pairs = tmp_path / "pairs.txt"
        pairs.write_text("a.jpg b.jpg\n")
        args = pairs_args(pairs, cli_images, ro / "results.h5")
    else:
        out = ro / ("sub" if target == "folder" else target)
        args = [
            cli_images / "a.jpg",
            cli_images / "b.jpg",
            "--out",
            out,
            "--setting",
            "turbo",
            "--num-samples",
            "100",
        ]
    r = run_driver(cli_driver, args, wrap=wrap)
    assert r.returncode == errors.EXIT_USAGE == 2, r.stderr
    assert "MODEL-LOADED" not in r.stderr  # refused before the model loads
    assert "cannot write there" in r.stderr or "cannot create the folder" in r.stderr, r.stderr
    assert "wrote" not in r.stdout and "Traceback" not in r.stderr


@pytest.fixture
def tiny_fs(tmp_path):
    reason = can_mount(tmp_path)
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


@pytest.mark.slow  # child processes on a tiny file system
@pytest.mark.parametrize("blind", [False, True], ids=["free-space-check", "real-ENOSPC"])
def test_full_disk_pairs_then_resume_elsewhere(cli_driver, cli_images, tmp_path, tiny_fs, blind):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg b.jpg\nb.jpg a.jpg\na.jpg c.jpg\nc.jpg a.jpg\nb.jpg c.jpg\n")
    saved = tmp_path / "saved"
    saved.mkdir()
    r = _run_full_disk_and_copy(
        cli_driver, pairs_args(pairs, cli_images, tiny_fs / "r.h5", n=2000), tiny_fs, saved,
        child_env(BLIND_FREE_SPACE="1" if blind else ""),
    )  # fmt: skip
    assert r.returncode == errors.EXIT_RUNTIME == 1, (r.returncode, r.stderr[-2000:])  # not 139 (segfault)
    assert "the disk is full" in r.stderr and "Traceback" not in r.stderr
    assert "STOPPED" in r.stdout and "not run" in r.stdout
    assert sorted(p.name for p in saved.iterdir()) == ["r.h5"]  # no .part / .new left over
    # the finished pairs survive: a resume with room to spare (the file copied out) completes the list
    r2 = run_driver(cli_driver, pairs_args(pairs, cli_images, saved / "r.h5", n=2000))
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "0 failed" in r2.stdout and "already done" in r2.stdout
    with h5py.File(saved / "r.h5", "r") as f:
        assert sum(1 for k1 in f for _ in f[k1]) == 5


@pytest.mark.slow  # child processes on a tiny file system
def test_full_disk_single_npz_leaves_nothing(cli_driver, tmp_path, tiny_fs):
    saved = tmp_path / "saved"
    saved.mkdir()
    args = [ASSETS / "demo_A.jpg", ASSETS / "demo_B.jpg", "--out", tiny_fs / "m.npz", "--setting", "turbo",
            "--num-samples", "5000", "--no-pictures"]  # fmt: skip
    r = _run_full_disk_and_copy(cli_driver, args, tiny_fs, saved, child_env(BLIND_FREE_SPACE="1"), size="64k")
    assert r.returncode == 1 and "the disk is full" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert list(saved.iterdir()) == []  # no m.npz.part on the full disk
    assert "wrote" not in r.stdout
    # the free space is checked up front
    r = _run_full_disk_and_copy(cli_driver, args, tiny_fs, saved, child_env(), size="64k")
    assert r.returncode == 2 and "MODEL-LOADED" not in r.stderr and "free" in r.stderr, r.stderr


def test_enospc_npz_simulated_no_part_file(cli_double, tmp_path, monkeypatch, capsys):
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
