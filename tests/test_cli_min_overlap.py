"""romav2-match's default ``--min-overlap``: unrelated images give no matches and a warning, related images
keep theirs, and ``--min-overlap 0`` gives the official sampler's behaviour."""

from __future__ import annotations

import numpy as np
import torch
from cli_support import DEMO_H

from romav2_plugin.app import cli, matching
from romav2_plugin.testing import HomographyWarpDouble


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


def test_related_images_keep_their_matches_with_the_default(cli_double, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["--demo", "--setting", "turbo", "--out", str(out), "--num-samples", "500"]) == 0
    assert len(np.load(out / "matches.npz")["confidence"]) == 500
    assert "WARNING" not in capsys.readouterr().out
