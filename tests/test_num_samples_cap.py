"""``--num-samples 10**9``: was refused with "63.3 GiB needed" though a pair can never
give more matches than its grid has candidates; now the request is clamped to the setting's candidates for
the disk-space estimate, the run says so, and the pair is matched (the sampler stops at the candidates)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from romav2_plugin.app import cli, matching

ASSETS = Path(__file__).resolve().parents[1] / "romav2_plugin" / "assets"
H = np.asarray(json.loads((ASSETS / "demo_pair.json").read_text())["homography_A_to_B"])


@pytest.fixture
def double(cli_small_double):  # tests/cli_support.py
    return cli_small_double


def test_grid_candidates():
    assert matching.grid_candidates("turbo") == 320 * 320
    assert matching.grid_candidates("precise") == 1280 * 1280 * 2
    assert matching.grid_candidates(None) == max(matching.grid_candidates(s) for s in ("precise", "mega1500", "turbo"))


@pytest.mark.parametrize("mode", ["single", "pairs"])
def test_huge_num_samples_is_clamped_and_said(double, tmp_path, capsys, mode):
    import h5py

    out = tmp_path / "r.h5"
    common = ["--setting", "turbo", "--num-samples", str(10**9), "--min-overlap", "0", "--no-pictures"]
    if mode == "single":
        argv = [str(ASSETS / "demo_A.jpg"), str(ASSETS / "demo_B.jpg"), "--out", str(out)]
    else:
        for n in ("demo_A.jpg", "demo_B.jpg"):
            (tmp_path / n).write_bytes((ASSETS / n).read_bytes())
        (tmp_path / "pairs.txt").write_text("demo_A.jpg demo_B.jpg\n")
        argv = ["--pairs", str(tmp_path / "pairs.txt"), "--out", str(out)]
    code = cli.main(argv + common)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "GiB" not in err and f"--num-samples {10**9} is more than the {320 * 320} candidate matches" in err, err
    with h5py.File(out, "r") as f:
        n = []
        f.visititems(lambda name, obj: n.append(obj.shape[0]) if name.endswith("keypoints_A") else None)
    assert n and 0 < n[0] <= 32 * 32
