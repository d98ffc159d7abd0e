"""``--engine ray --address HOST:PORT`` where nothing listens: Ray retried for minutes
(no exit after 150 s); now ``--connect-timeout S`` (default 30) bounds the wait and the run exits 4 naming the
address, before any Ray connection, lock or results file. Tested with a free local port and a short timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from romav2_plugin.distributed import cluster as distributed

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "romav2_plugin" / "assets"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pairs(tmp_path):
    for n in ("demo_A.jpg", "demo_B.jpg"):
        (tmp_path / n).write_bytes((ASSETS / n).read_bytes())
    (tmp_path / "pairs.txt").write_text("demo_A.jpg demo_B.jpg\n")
    return tmp_path / "pairs.txt"


def _run(args, cwd, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.monotonic()
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    return r, time.monotonic() - t


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_romav2_match_unreachable_address_exits_4_within_the_timeout(pairs, address):
    pytest.importorskip("ray")
    addr = address.format(port=_free_port())
    out = pairs.parent / "r.h5"
    args = ["-m", "romav2_plugin.app.cli", "--pairs", str(pairs), "--out", str(out), "--weights", "tiny"]
    r, took = _run(args + ["--engine", "ray", "--address", addr, "--connect-timeout", "2"], pairs.parent)
    assert r.returncode == 4, r.stderr[-3000:]
    assert f"cannot reach the Ray cluster at --address {addr}" in r.stderr and "within 2 s" in r.stderr, r.stderr
    assert took < 60, took  # 2 s of retries plus Python and Ray's import
    assert not out.exists() and not list(pairs.parent.glob("r.h5*"))


def test_hloc_command_unreachable_address_exits_4(pairs, hloc):
    pytest.importorskip("ray")
    addr = f"127.0.0.1:{_free_port()}"
    args = ["-m", "romav2_plugin.hloc", "match_dense", "--pairs", str(pairs), "--image_dir", str(pairs.parent)]
    args += ["--export_dir", str(pairs.parent / "out"), "--weights", "tiny", "--engine", "ray", "--address", addr]
    r, took = _run(args + ["--connect-timeout", "1.5"], pairs.parent)
    assert r.returncode == 4 and f"--address {addr}" in r.stderr, r.stderr[-3000:]
    assert took < 60


def test_wait_reachable_bounds_the_wait_and_accepts_a_listener():
    port = _free_port()
    t = time.monotonic()
    with pytest.raises(distributed.CommandError) as e:
        distributed._wait_reachable(f"127.0.0.1:{port}", 1.0)
    assert e.value.code == 4 and 0.9 < time.monotonic() - t < 10
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        distributed._wait_reachable(f"127.0.0.1:{srv.getsockname()[1]}", 1.0)  # returns at once
    distributed._wait_reachable("auto", 0.1)  # Ray resolves 'auto' itself


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "soon"])
def test_connect_timeout_must_be_positive(bad, capsys):
    from romav2_plugin.app import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--pairs", "p.txt", "--engine", "ray", "--connect-timeout", bad])
    assert e.value.code == 2 and "--connect-timeout" in capsys.readouterr().err
