"""romav2-match's results file across runs: resume, colliding pair names, files of the earlier layout,
a file locked by another process, a run killed inside a write, a damaged file, a file that is not HDF5."""

from __future__ import annotations

import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from cli_support import child_env, pairs_args, run_driver

from romav2_plugin.app import cli
from romav2_plugin.app.results import FORMAT_ATTR, pair_key


def test_colliding_pair_names_are_two_groups_and_resume_exactly(cli_double, cli_images, tmp_path, capsys):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a/b.jpg c.jpg\na-b.jpg c.jpg\n")
    out = tmp_path / "r.h5"
    assert cli.main(pairs_args(pairs, cli_images, out)) == 0
    assert pair_key("a/b.jpg", "c.jpg") != pair_key("a-b.jpg", "c.jpg")
    with h5py.File(out, "r") as f:
        ga, gb = f[pair_key("a/b.jpg", "c.jpg")], f[pair_key("a-b.jpg", "c.jpg")]
        assert ga.attrs["image_A"] == "a/b.jpg" and gb.attrs["image_A"] == "a-b.jpg"
        assert ga.attrs["complete"] and gb.attrs["complete"]
        assert int(f.attrs[FORMAT_ATTR]) == 2
    capsys.readouterr()
    assert cli.main(pairs_args(pairs, cli_images, out)) == 0
    assert "nothing to do" in capsys.readouterr().out and len(cli_double) == 1


def test_file_of_the_earlier_layout_is_migrated_not_misread(cli_double, cli_images, tmp_path, capsys):
    """Format 1 keyed 'a/b.jpg' and 'a-b.jpg' both as 'a-b.jpg/...': the one group left there holds a/b.jpg.
    The resume must keep it (moved to its injective key) and compute a-b.jpg, which was lost."""
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
    assert cli.main(pairs_args(pairs, cli_images, out)) == 0
    cap = capsys.readouterr()
    assert "2 matched now, 1 already done" in cap.out and "migrated" in cap.err
    with h5py.File(out, "r") as f:
        old = f[pair_key("a/b.jpg", "c.jpg")]
        assert old.attrs["time_match_s"] == 123.0 and old["keypoints_A"].shape == (3, 2)  # kept, not redone
        new = f[pair_key("a-b.jpg", "c.jpg")]
        assert new.attrs["image_A"] == "a-b.jpg" and len(new["confidence"]) > 0
        assert f[pair_key("b.jpg", "c.jpg")].attrs["complete"]


def test_results_file_locked_by_another_process_is_called_in_use(cli_no_model, cli_images, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)  # HDF5's default, locking (read at each open)
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
        rc = cli.main(pairs_args(pairs, cli_images, out))
        err = capsys.readouterr().err
        assert rc == 2 and "is locked: another process" in err, (rc, err[-500:])
        assert "remove it" not in err and "not a readable" not in err
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow  # two child processes per case
@pytest.mark.parametrize("kill_at, kept", [(3, 0), (9, 1)], ids=["first-write", "second-write"])
def test_killed_inside_a_write_the_next_run_resumes(cli_driver, cli_images, tmp_path, kill_at, kept):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg b.jpg\nb.jpg a.jpg\na.jpg c.jpg\n")
    out = tmp_path / "r.h5"
    args = pairs_args(pairs, cli_images, out)
    r = run_driver(cli_driver, args, env=child_env(KILL_AT_DATASET=str(kill_at)))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    before = {}
    if kept:
        with h5py.File(out, "r") as f:
            before = {k: f[k].attrs["time_match_s"] for k in [pair_key("a.jpg", "b.jpg")]}
    r = run_driver(cli_driver, args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{3 - kept} matched now, {kept} already done, 0 failed" in r.stdout
    with h5py.File(out, "r") as f:
        for k, t in before.items():
            assert f[k].attrs["time_match_s"] == t  # the finished pair was not lost nor redone
        assert sum(1 for k1 in f for _ in f[k1]) == 3


def test_damaged_file_is_repaired_keeping_what_reads_back(cli_double, cli_images, tmp_path, capsys):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg b.jpg\nb.jpg a.jpg\n")
    out = tmp_path / "r.h5"
    assert cli.main(pairs_args(pairs, cli_images, out)) == 0
    data = bytearray(out.read_bytes())
    data[len(data) // 2 :] = b"\0" * (len(data) - len(data) // 2)  # the second half of the file is lost
    out.write_bytes(bytes(data))
    capsys.readouterr()
    rc = cli.main(pairs_args(pairs, cli_images, out))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "repaired" in cap.err and (tmp_path / "r.h5.damaged").is_file()
    with h5py.File(out, "r") as f:
        assert int(f.attrs[FORMAT_ATTR]) == 2 and sum(1 for k1 in f for _ in f[k1]) == 2


def test_not_hdf5_results_file_is_refused_untouched(cli_no_model, cli_images, tmp_path, capsys):
    out = tmp_path / "r.h5"
    out.write_text("my notes")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg b.jpg\n")
    assert cli.main(pairs_args(pairs, cli_images, out)) == 2
    assert "cannot be read as an HDF5 results file" in capsys.readouterr().err
    assert out.read_text() == "my notes"
