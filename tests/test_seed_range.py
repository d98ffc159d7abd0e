"""Seeds: ``--seed`` is range-checked up front ([0, 2**63): what HDF5's int64 attribute,
torch and numpy accept), naming the option, before the model; nothing (no ``*.h5.new``) is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from romav2_plugin.app import cli, matching

ASSETS = Path(__file__).resolve().parents[1] / "romav2_plugin" / "assets"


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(matching, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))


@pytest.mark.parametrize("seed", [str(10**20), str(2**63), "-1"])
@pytest.mark.parametrize("mode", ["single", "pairs"])
def test_seed_out_of_range_refused_up_front(no_model, tmp_path, capsys, seed, mode):
    if mode == "single":
        argv = [str(ASSETS / "demo_A.jpg"), str(ASSETS / "demo_B.jpg"), "--out", str(tmp_path / "o.h5")]
    else:
        d = tmp_path / "imgs"
        d.mkdir()
        for n in ("demo_A.jpg", "demo_B.jpg"):
            (d / n).write_bytes((ASSETS / n).read_bytes())
        (d / "pairs.txt").write_text("demo_A.jpg demo_B.jpg\n")
        argv = ["--pairs", str(d / "pairs.txt"), "--out", str(tmp_path / "r.h5")]
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--seed", seed])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--seed" in err and "2**63" in err, err
    assert not list(tmp_path.glob("*.h5*"))
