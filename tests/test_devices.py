"""Device strings: every --device / config device is checked before anything loads:
a type torch knows but this machine lacks (xpu), or one that holds no data (meta), is refused (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from romav2_plugin.app import cli, matching

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "romav2_plugin" / "assets"
BAD = ["meta", "bogus", "cuda:99"] + ([] if getattr(torch, "xpu", None) and torch.xpu.is_available() else ["xpu"])


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(matching, "load_model", refuse)


@pytest.mark.parametrize("device", BAD)
def test_romav2_match_refuses_the_device_before_the_model(no_model, tmp_path, capsys, device):
    rc = cli.main([str(ASSETS / "demo_A.jpg"), str(ASSETS / "demo_B.jpg"), "--out", str(tmp_path / "o"),
                   "--device", device])
    err = capsys.readouterr().err
    assert rc == 2 and "--device" in err and device in err and "probably a bug" not in err, err


@pytest.mark.parametrize("device", ["meta", "xpu"] if "xpu" in BAD else ["meta"])
def test_romav2_match_pairs_refuses_the_device_before_the_model(no_model, tmp_path, capsys, device):
    d = tmp_path / "imgs"
    d.mkdir()
    for n in ("demo_A.jpg", "demo_B.jpg"):
        (d / n).write_bytes((ASSETS / n).read_bytes())
    (d / "pairs.txt").write_text("demo_A.jpg demo_B.jpg\n")
    rc = cli.main(["--pairs", str(d / "pairs.txt"), "--out", str(tmp_path / "r.h5"), "--device", device])
    err = capsys.readouterr().err
    assert rc == 2 and f"--device {device}" in err and not (tmp_path / "r.h5").exists(), err


def test_ray_engine_refuses_meta_before_the_cluster(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from romav2_plugin import distributed
    from romav2_plugin.app.errors import CommandError

    monkeypatch.setattr(distributed.pairs, "connect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("cluster")))
    d = tmp_path / "imgs"
    d.mkdir()
    for n in ("demo_A.jpg", "demo_B.jpg"):
        (d / n).write_bytes((ASSETS / n).read_bytes())
    with pytest.raises(CommandError) as e:
        distributed.match_pairs([("demo_A.jpg", "demo_B.jpg")], d, tmp_path / "r.h5", device="meta", progress=False)
    assert e.value.code == 2 and "meta" in e.value.message


@pytest.mark.parametrize("device", ["meta", "bogus"] + (["xpu"] if "xpu" in BAD else []))
def test_romav2_train_refuses_the_device_at_config_load(tmp_path, capsys, device):
    from romav2_plugin.train.__main__ import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'out_dir = "{tmp_path / "run"}"\ndevice = "{device}"\n[model]\narchitecture = "tiny"\n'
                   f'[data]\nsize = [64, 64]\n[[data.sources]]\nkind = "homography"\npath = "{tmp_path}"\n'
                   '[[stages]]\nname = "matcher"\nsteps = 1\n')
    assert main([str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "device" in err and device in err and "probably a bug" not in err, err


def test_good_devices_still_resolve():
    assert matching.resolve_device("cpu") == torch.device("cpu")
    assert matching.resolve_device("auto").type in ("cpu", "cuda")
