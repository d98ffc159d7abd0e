"""``--weights``: the named model 'tiny' in all three commands, the demo's choice of weights, and the errors
for weights that are missing or empty."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_support import DEMO_H

from romav2_plugin import export as ex
from romav2_plugin.app import cli
from romav2_plugin.testing import HomographyWarpDouble


@pytest.fixture
def record_from_pretrained(monkeypatch):
    """RoMaV2.from_pretrained replaced by the exact-homography double; records the weights it was given."""
    from romav2_plugin.model import RoMaV2

    calls = []

    def fake(cls, weights=None, *, setting="precise", device=None, amp=None, config=None):
        calls.append(weights)
        return HomographyWarpDouble(DEMO_H, setting=setting or "precise")

    monkeypatch.setattr(RoMaV2, "from_pretrained", classmethod(fake))
    return calls


def test_weights_tiny_goes_to_from_pretrained_in_match_and_export(
    record_from_pretrained, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "o"
    assert (
        cli.main(["--demo", "--weights", "tiny", "--setting", "turbo", "--out", str(out), "--no-pictures",
                  "--num-samples", "200"])
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


def test_weights_tiny_goes_to_the_hloc_conf(hloc, tmp_path, monkeypatch):
    """python -m romav2_plugin.hloc: the conf gets the name, nothing treats it as a path."""
    from romav2_plugin.adapters.hloc import ensure_registered
    from romav2_plugin.app import hloc_command as hcli

    seen = {}

    def fake_run(conf, *a, **k):
        seen.update(conf["model"])
        return tmp_path / "f.h5", tmp_path / "m.h5"

    monkeypatch.setattr(hcli, "run_match_dense", fake_run)
    ensure_registered()
    argv = ["match_dense", "--pairs", "p.txt", "--image_dir", ".", "--export_dir", ".", "--weights", "tiny"]
    assert hcli.main(argv) == 0
    assert seen["weights"] == "tiny"


def test_demo_uses_tiny_without_official_weights_and_says_so(
    record_from_pretrained, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("ROMAV2_PLUGIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("ROMAV2_WEIGHTS", raising=False)
    out = tmp_path / "o"
    assert cli.main(["--demo", "--setting", "turbo", "--out", str(out), "--no-pictures", "--num-samples", "200"]) == 0
    assert record_from_pretrained == ["tiny"]
    assert "small shipped model 'tiny'" in capsys.readouterr().out
    # the official file already in the cache is used (and nothing is downloaded)
    cached = tmp_path / "cache" / "weights" / "romav2.0.1.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"stand-in")
    assert cli.main(["--demo", "--setting", "turbo", "--out", str(out), "--no-pictures", "--num-samples", "200"]) == 0
    assert record_from_pretrained[-1] == str(cached)
    assert "official weights found in the cache" in capsys.readouterr().out


def test_weights_not_found_names_the_source(cli_no_model, tmp_path, monkeypatch, capsys):
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
