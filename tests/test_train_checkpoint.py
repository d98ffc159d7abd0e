"""Training checkpoints: a checkpoint is read without running code from it, and a
full disk while writing one is reported as such, keeping the last checkpoint and no temporary file."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch

from romav2_plugin.train import checkpoint

BASE = ('[data]\nsize = [64, 64]\n[[data.sources]]\nkind = "homography"\npath = "{photos}"\n'
        '[[stages]]\nname = "matcher"\nsteps = 2\nbatch_size = 1\n[model]\narchitecture = "tiny"\n')


@pytest.fixture
def photos(tmp_path):
    from PIL import Image

    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    return d


def _config(tmp_path, photos, out="run", extra="") -> Path:
    p = tmp_path / f"{out}.toml"
    p.write_text(f'out_dir = "{tmp_path / out}"\n{extra}' + BASE.format(photos=photos))
    return p


def _real_state() -> dict:
    """What the trainer stores: tensors, an Adam state, a LambdaLR state, counters, a history (the RNG states
    are added by save_training_state)."""
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([w], lr=1e-3, betas=(0.9, 0.99))
    w.sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    return {"config": {"out_dir": "x", "data": {"size": [64, 64]}}, "model": {"w": w.detach().clone()},
            "ema": {"decay": 0.9, "state": {"w": w.detach().clone()}}, "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "stage_index": 0, "step": 3, "global_step": 3,
            "history": [{"step": 1, "loss": 0.5}]}


def test_a_real_checkpoint_still_loads_with_weights_only(tmp_path):
    np.random.seed(7)
    path = checkpoint.save_training_state(tmp_path / "checkpoint.pt", _real_state())
    state = checkpoint.load_training_state(path)
    assert state["step"] == 3 and state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    np_state = state["rng"]["numpy"]
    assert np_state[0] == "MT19937" and np.array_equal(np_state[1], np.random.get_state()[1])
    checkpoint.set_rng_state(state["rng"])


class _Plant:
    """Pickles to a call that creates a file when unpickled (any code would run the same way)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "romav2_plugin.train/1", **_real_state(), "rng": checkpoint.rng_state(),
                "extra": _Plant(marker)}, path)


@pytest.mark.parametrize("how", ["--resume", "--export"])
def test_checkpoint_with_code_is_refused_and_nothing_runs(tmp_path, photos, capsys, how):
    from romav2_plugin.train.__main__ import main

    marker = tmp_path / "PWNED"
    cfg = _config(tmp_path, photos)
    _plant(tmp_path / "run" / "checkpoint.pt", marker)
    argv = [str(cfg), "--no-progress"] + (["--resume"] if how == "--resume" else ["--export", str(tmp_path / "m.pt")])
    rc = main(argv)
    err = capsys.readouterr().err
    assert not marker.exists(), "code from the checkpoint ran"
    assert rc == 4, err
    assert "checkpoint.pt" in err and "code" in err and "weights_only" not in err
    assert not (tmp_path / "m.pt").exists()


def test_load_training_state_refuses_code_directly(tmp_path):
    marker = tmp_path / "PWNED"
    _plant(tmp_path / "checkpoint.pt", marker)
    with pytest.raises(Exception, match="code"):
        checkpoint.load_training_state(tmp_path / "checkpoint.pt")
    assert not marker.exists()


# ---------------------------------------------------------------- item 6: disk full while saving
class _FullDisk:
    """A file whose writes fail with ENOSPC after ``room`` bytes (as a full file system does)."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, b) -> int:
        if self.room < len(b):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("how", ["torch-wraps-it", "plain-oserror"])
def test_disk_full_while_saving_says_so_keeps_the_last_checkpoint_no_temp(tmp_path, photos, capsys, monkeypatch, how):
    from romav2_plugin.train.__main__ import main

    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            return real_save(obj, f, *a, **k)
        if how == "plain-oserror":
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, _FullDisk(f, 1000), *a, **k)  # torch raises RuntimeError, ENOSPC as context

    monkeypatch.setattr(checkpoint.torch, "save", save)
    cfg = _config(tmp_path, photos, extra="checkpoint_every = 1\nlog_every = 1\n")
    rc = main([str(cfg), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "disk is full" in err and "checkpoint.pt" in err and "probably a bug" not in err
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint.pt"]  # no temp file
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert checkpoint.load_training_state(run / "checkpoint.pt")["global_step"] == 1  # the last good one
