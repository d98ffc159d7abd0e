"""Orphan ``checkpoint.pt.*.tmp``: a training killed inside a save left its temporary file
for good. Temporary files now carry ``HOST-PID``; the next run in that folder removes those of this machine
whose process is gone (never a live writer's, never another machine's in a shared folder) and says so."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from romav2_plugin.train import checkpoint


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_atomic_save_names_its_temporary_file_with_host_and_pid(tmp_path, monkeypatch):
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", spy)
    checkpoint.atomic_save({"x": torch.zeros(1)}, tmp_path / "checkpoint.pt")
    assert seen and seen[0].startswith(f"checkpoint.pt.{socket.gethostname()}-{os.getpid()}.") and seen[0].endswith(".tmp")


def test_only_dead_writers_temporaries_are_removed(tmp_path, capsys):
    host = socket.gethostname()
    dead = tmp_path / f"checkpoint.pt.{host}-{_dead_pid()}.k3j4h5.tmp"
    mine = tmp_path / f"checkpoint.pt.{host}-{os.getpid()}.a1b2c3.tmp"
    live = tmp_path / f"romav2_tiny.pt.{host}-1.zz99.tmp"  # pid 1 is alive
    elsewhere = tmp_path / f"checkpoint.pt.{host}x-{_dead_pid()}.q1.tmp"  # another machine
    other = tmp_path / "notes.tmp"
    for p in (dead, mine, live, elsewhere, other):
        p.write_bytes(b"x")
    assert checkpoint.remove_stale_temporaries(tmp_path) == [dead]
    assert not dead.exists() and all(p.exists() for p in (mine, live, elsewhere, other))
    assert f"removed {dead}, left by an interrupted save" in capsys.readouterr().err


def test_a_training_run_cleans_its_folder_first(tmp_path, monkeypatch):
    from romav2_plugin.train import loop

    calls = []

    class Stop(Exception):
        pass

    def record(folder):
        calls.append(folder)
        raise Stop

    monkeypatch.setattr(checkpoint, "remove_stale_temporaries", record)
    trainer = loop.Trainer.__new__(loop.Trainer)
    trainer.out = tmp_path / "run"
    with pytest.raises(Stop):
        trainer._run(resume=True, max_steps=1)
    assert calls == [tmp_path / "run"]
