"""Orphan temporaries: a run killed while creating or repairing a results file left
``FILE.h5.new`` / ``FILE.h5.repair`` behind for good; the next run on that file (which holds the writer lock,
so no other run is writing them) removes them and says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from romav2_plugin.app import cli

ASSETS = Path(__file__).resolve().parents[1] / "romav2_plugin" / "assets"
H = np.asarray(json.loads((ASSETS / "demo_pair.json").read_text())["homography_A_to_B"])


@pytest.fixture
def double(cli_small_double):  # tests/cli_support.py
    return cli_small_double


@pytest.mark.parametrize("mode", ["single", "pairs"])
def test_stale_new_and_repair_files_are_removed_at_the_next_start(double, tmp_path, capsys, mode):
    out = tmp_path / "r.h5"
    stale = [tmp_path / "r.h5.new", tmp_path / "r.h5.repair"]
    for p in stale:
        p.write_bytes(b"left by a run killed with SIGKILL")
    other = tmp_path / "other.h5.new"
    other.write_bytes(b"not ours to remove")
    if mode == "single":
        argv = [str(ASSETS / "demo_A.jpg"), str(ASSETS / "demo_B.jpg"), "--out", str(out)]
    else:
        for n in ("demo_A.jpg", "demo_B.jpg"):
            (tmp_path / n).write_bytes((ASSETS / n).read_bytes())
        (tmp_path / "pairs.txt").write_text("demo_A.jpg demo_B.jpg\n")
        argv = ["--pairs", str(tmp_path / "pairs.txt"), "--out", str(out)]
    code = cli.main(argv + ["--setting", "turbo", "--num-samples", "100", "--no-pictures"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert not any(p.exists() for p in stale)
    assert f"removed {tmp_path / 'r.h5.new'}, left by an interrupted run" in err
    assert other.read_bytes() == b"not ours to remove" and out.is_file()
