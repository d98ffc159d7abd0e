"""romav2-match driven with the network replaced by the exact-homography double, for the fault tests.

In-process (the ``cli_double`` / ``cli_no_model`` fixtures patch ``matching.load_model``) or in a child process
through a small driver script (``run_driver``), which can also SIGKILL itself inside the N-th HDF5 dataset
write (``KILL_AT_DATASET``) or hide the free-space checks to hit a real ENOSPC (``BLIND_FREE_SPACE``), so
these tests run in seconds. Faults that need a file system (read-only, full) use a private mount namespace
(``unshare -m`` + tmpfs) where that works (root in a container), see ``can_mount``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "romav2_plugin" / "assets"
DEMO_H = np.asarray(json.loads((ASSETS / "demo_pair.json").read_text())["homography_A_to_B"])

DRIVER = """
import json, os, shutil, signal, sys
import numpy as np
from romav2_plugin.app import cli, matching
from romav2_plugin.testing import HomographyWarpDouble
H = np.asarray(json.loads(open(sys.argv[1]).read())["homography_A_to_B"])
def fake(weights, setting, device, amp):
    print("MODEL-LOADED", file=sys.stderr, flush=True)
    return HomographyWarpDouble(H, setting=setting or "precise"), {"weights": "double.pt", "weights_sha256": "0" * 16}
matching.load_model = fake
if os.environ.get("KILL_AT_DATASET"):  # SIGKILL inside the N-th dataset write
    import h5py
    orig, n = h5py.Group.create_dataset, [0]
    def create_dataset(self, *a, **k):
        n[0] += 1
        if n[0] == int(os.environ["KILL_AT_DATASET"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, *a, **k)
    h5py.Group.create_dataset = create_dataset
if os.environ.get("BLIND_FREE_SPACE"):  # hide the free-space checks: hit the real ENOSPC
    import collections
    U = collections.namedtuple("usage", "total used free")
    shutil.disk_usage = lambda p: U(1 << 40, 0, 1 << 40)
sys.exit(cli.main(sys.argv[2:]))
"""


def child_env(**extra):
    """The environment of a child ``romav2-match``: this checkout importable, no ``ROMAV2_WEIGHTS``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("ROMAV2_WEIGHTS", None)
    env.update(extra)
    return env


def run_driver(driver, args, *, wrap: str | None = None, env=None, timeout=300):
    """Run ``romav2-match ARGS`` with the double in a child; ``wrap``: a shell prefix run first (mounts)."""
    cmd = [sys.executable, str(driver), str(ASSETS / "demo_pair.json"), *map(str, args)]
    if wrap is not None:
        cmd = ["unshare", "-m", "sh", "-c", wrap + " && exec " + " ".join(f"'{c}'" for c in cmd)]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env or child_env(), timeout=timeout, cwd=driver.parent
    )


def can_mount(tmp_path) -> str | None:
    """None if a private tmpfs can be mounted here; else the reason."""
    if shutil.which("unshare") is None:
        return "unshare not available"
    d = tmp_path / "probe"
    d.mkdir()
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{d}'"],
        capture_output=True,
        text=True,
    )
    return None if r.returncode == 0 else f"cannot mount a private tmpfs ({r.stderr.strip()[:200]})"


def pairs_args(pairs, images, out, n=200):
    return ["--pairs", str(pairs), "--image-dir", str(images), "--out", str(out), "--setting", "turbo",
            "--num-samples", str(n)]  # fmt: skip


# ------------------------------------------------------------------ fixtures (imported by conftest.py)
@pytest.fixture
def cli_driver(tmp_path):
    """The driver script: ``python DRIVER demo_pair.json ARGS`` runs romav2-match with the double."""
    path = tmp_path / "driver.py"
    path.write_text(DRIVER)
    return path


@pytest.fixture
def cli_images(tmp_path):
    """An image folder whose names collide once flattened (``a/b.jpg`` and ``a-b.jpg``)."""
    d = tmp_path / "imgs"
    (d / "a").mkdir(parents=True)
    for n, src in (("a.jpg", "A"), ("b.jpg", "B"), ("a/b.jpg", "B"), ("a-b.jpg", "A"), ("c.jpg", "A")):
        (d / n).write_bytes((ASSETS / f"demo_{src}.jpg").read_bytes())
    return d


@pytest.fixture
def cli_double(monkeypatch):
    """romav2-match in this process with the double as its network; records ``(weights, setting)``."""
    from romav2_plugin.app import matching
    from romav2_plugin.testing import HomographyWarpDouble

    calls = []

    def fake_load_model(weights, setting, device, amp):
        calls.append((weights, setting))
        return HomographyWarpDouble(DEMO_H, setting=setting or "precise"), {
            "weights": "double.pt",
            "weights_sha256": "0" * 16,
        }

    monkeypatch.setattr(matching, "load_model", fake_load_model)
    return calls


@pytest.fixture
def cli_small_double(monkeypatch):
    """:func:`cli_double` on a 32x32 grid: the balanced sampler's KDE over every candidate stays cheap."""
    from romav2_plugin.app import matching
    from romav2_plugin.testing import HomographyWarpDouble

    def fake(weights, setting, device, amp):
        d = HomographyWarpDouble(DEMO_H, setting=setting or "precise")
        d.H_lr = d.W_lr = 32
        return d, {"weights": "double.pt", "weights_sha256": "0" * 16}

    monkeypatch.setattr(matching, "load_model", fake)


@pytest.fixture
def cli_no_model(monkeypatch):
    """romav2-match in this process, failing the test if it loads a model (input refused before it)."""
    from romav2_plugin.app import matching

    def refuse(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(matching, "load_model", refuse)
