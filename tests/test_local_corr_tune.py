"""The run-time specialised local-correlation forward and its tile autotuner, without a GPU.

* the autotuner's choice with fake timings and a fake failing candidate, its JSON cache, the off switch;
* the candidate sets and the default tile;
* the specialised kernel's arithmetic for every tile (entry point) on the CPU: ``kernels/local_corr.cu`` built
  with ``-DRV2_SPEC_C/-DRV2_SPEC_R`` through the host shim of ``tests/cuda_host_shim/`` against the torch op.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from romav2_plugin import kernels, runtime
from romav2_plugin.ops import local_corr
from romav2_plugin.ops import local_corr_tune as tune

SHIM_DIR = Path(__file__).resolve().parent / "cuda_host_shim"
KERNEL_DIR = Path(kernels.__file__).resolve().parent


# ------------------------------------------------------------------------------------------------------
# autotuner
class _Fake:
    """Fake timings (ms by tile name, default 1.0) and failing tiles; counts every check and timing."""

    def __init__(self, ms=None, failing=()):
        self.ms, self.failing = dict(ms or {}), set(failing)
        self.checked, self.timed = [], []

    def check(self, t):
        self.checked.append(t.name)
        return [f"forward bfloat16: max rel error 5.00e-01 > 1e-04 ({t.name})"] if t.name in self.failing else []

    def time_s(self, t):
        self.timed.append(t.name)
        return self.ms.get(t.name, 1.0) / 1e3


def test_autotune_picks_the_fastest_candidate_that_passes_its_check_and_caches_it(tmp_path):
    cands = tune.candidates(192, "bf16")
    fastest, second = cands[3], cands[7]
    fake = _Fake(ms={fastest.name: 0.1, second.name: 0.2}, failing={fastest.name})
    path = tmp_path / tune.CACHE_FILE
    got = tune.autotune("gpu|bf16|shape", cands, check=fake.check, time_s=fake.time_s, path=path)
    assert got == second  # the fastest failed its check: never timed, never chosen
    assert fastest.name not in fake.timed and len(fake.timed) == len(cands) - 1
    assert sorted(fake.checked) == sorted(t.name for t in cands)
    entry = json.loads(path.read_text())["gpu|bf16|shape"]
    assert entry["chosen"] == second.name and entry["ms"][second.name] == 0.2
    assert list(entry["rejected"]) == [fastest.name] and "max rel error" in entry["rejected"][fastest.name][0]
    # next use (next process): read from the file, nothing is checked or timed again
    again = _Fake(ms={cands[0].name: 0.01})
    assert tune.autotune("gpu|bf16|shape", cands, check=again.check, time_s=again.time_s, path=path) == second
    assert again.checked == again.timed == []
    # another shape is tuned on its own and both choices stay in the file
    other = tune.autotune("gpu|bf16|other", cands, check=again.check, time_s=again.time_s, path=path)
    assert other == cands[0] and set(json.loads(path.read_text())) == {"gpu|bf16|shape", "gpu|bf16|other"}


def test_autotune_when_every_candidate_fails_returns_none_and_remembers_it(tmp_path):
    cands = tune.candidates(48, "f32")
    fake = _Fake(failing={t.name for t in cands})
    path = tmp_path / tune.CACHE_FILE
    assert tune.autotune("k", cands, check=fake.check, time_s=fake.time_s, path=path) is None
    assert fake.timed == [] and json.loads(path.read_text())["k"]["chosen"] is None
    again = _Fake()
    assert tune.autotune("k", cands, check=again.check, time_s=again.time_s, path=path) is None
    assert again.checked == []


def test_autotune_ignores_a_cached_tile_that_is_no_longer_a_candidate(tmp_path):
    cands = tune.candidates(48, "f32")
    path = tmp_path / tune.CACHE_FILE
    path.write_text(json.dumps({"k": {"chosen": "l64_v9_t999"}}))
    fake = _Fake(ms={cands[1].name: 0.5})
    assert tune.autotune("k", cands, check=fake.check, time_s=fake.time_s, path=path) == cands[1]
    assert len(fake.timed) == len(cands)


def test_autotune_off_checks_only_the_default_tile_and_writes_nothing(tmp_path):
    cands = tune.candidates(192, "f16")
    default = tune.default_tile(192, "f16")
    path = tmp_path / tune.CACHE_FILE
    fake = _Fake()
    got = tune.autotune("k", cands, check=fake.check, time_s=fake.time_s, path=path, tune=False, default=default)
    assert got == default and fake.checked == [default.name] and fake.timed == [] and not path.exists()
    bad = _Fake(failing={default.name})
    assert tune.autotune("k", cands, check=bad.check, time_s=bad.time_s, path=path, tune=False, default=default) is None


def test_autotune_knob(monkeypatch):
    monkeypatch.delenv("ROMAV2_LOCAL_CORR_AUTOTUNE", raising=False)
    assert runtime.local_corr_autotune() is True
    monkeypatch.setattr(runtime, "LOCAL_CORR_AUTOTUNE", False)
    assert runtime.local_corr_autotune() is False
    monkeypatch.setenv("ROMAV2_LOCAL_CORR_AUTOTUNE", " ON ")
    assert runtime.local_corr_autotune() is True
    monkeypatch.setenv("ROMAV2_LOCAL_CORR_AUTOTUNE", "0")
    assert runtime.local_corr_autotune() is False
    monkeypatch.setenv("ROMAV2_LOCAL_CORR_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match="ROMAV2_LOCAL_CORR_AUTOTUNE='fast'"):
        runtime.local_corr_autotune()


@pytest.mark.parametrize("sfx", ["f32", "f16", "bf16"])
def test_candidates_fit_the_channels_and_the_default_is_one_of_them(sfx):
    for C, _r in kernels.specialisations():
        cands = tune.candidates(C, sfx)
        assert cands, (C, sfx)
        entries = set(kernels.spec_entries(C, sfx))
        for t in cands:
            assert C % t.vec == 0 and t.lanes * t.vec <= C and -(-C // (t.lanes * t.vec)) * t.vec <= tune.MAX_REGS
            assert t.entry(sfx) in entries and tune.Tile.parse(t.name) == t
        assert tune.default_tile(C, sfx) in cands
    assert tune.candidates(3, "bf16") == [] and tune.default_tile(3, "bf16") is None  # odd: generic kernel


# ------------------------------------------------------------------------------------------------------
# the specialised kernel on the host shim
def _build(tmp_path, C, r):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++) to build the CUDA host shim")
    out = tmp_path / f"libspec_{C}_{r}.so"
    cmd = [cxx, "-std=c++20", "-O1", "-Wall", "-Wno-unknown-pragmas", "-shared", "-fPIC", "-pthread",
           f"-DRV2_SPEC_C={C}", f"-DRV2_SPEC_R={r}", "-I", str(SHIM_DIR), "-I", str(KERNEL_DIR),
           str(SHIM_DIR / "host_spec_driver.cpp"), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lib = ctypes.CDLL(str(out))
    lib.host_lc_fwd_spec.restype = ctypes.c_int
    return lib


_DT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


# C=12, r=1: loads wider than the channels per lane (guarded steps) and sub-warp groups past the last
# pixel (B*H*W=30 is not a multiple of 32 / lanes); C=16, r=3: the tiny model's shape class, windows
# partly / fully outside the image.
@pytest.mark.slow  # a g++ build and 28-36 threaded kernel runs per case (~6 s)
@pytest.mark.parametrize("C,r", [(12, 1), (16, 3)])
def test_host_shim_every_specialised_entry_point_matches_the_torch_op(tmp_path, C, r):
    lib = _build(tmp_path, C, r)
    B, H, W = 2, 3, 5
    g = torch.Generator().manual_seed(C + r)
    f_A, f_B = torch.randn(B, C, H, W, generator=g), torch.randn(B, C, H, W, generator=g)
    warp = (torch.rand(B, H, W, 2, generator=g) * 2 - 1) * 1.4
    entries = kernels.spec_entries(C)
    assert len(entries) == (36 if C % 8 == 0 else 28)  # no 16-byte loads of 16-bit values when 8 does not divide C
    worst = 0.0
    for name in entries:
        sfx, lanes = name.split("_")[3], int(name.split("_")[4][1:])
        dt = _DT[sfx]
        a, b = (t.to(dt).permute(0, 2, 3, 1).contiguous() for t in (f_A, f_B))
        out = torch.full((B, (2 * r + 1) ** 2, H, W), float("nan"))
        fn = ctypes.cast(getattr(lib, name), ctypes.c_void_p)
        ptrs = [ctypes.c_void_p(t.data_ptr()) for t in (a, b, warp, out)]
        assert lib.host_lc_fwd_spec(fn, lanes, *ptrs, B, H, W) == 0
        ref = local_corr(f_A.to(dt).float(), f_B.to(dt).float(), warp, r)  # exactly upcast inputs
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6 * ref.abs().max().item(), msg=name)
        worst = max(worst, float((out - ref).abs().max()))
    print(f"host shim C={C} r={r}: {len(entries)} specialised entry points, max abs err {worst:.2e}")


def test_misaligned_views_are_copied_before_vector_loads():
    """A contiguous view may start at any element; the specialised kernel's 16-byte loads need alignment."""
    buf = torch.zeros(1 + 2 * 3 * 4 * 8, dtype=torch.bfloat16)
    view = buf[1:].view(2, 3, 4, 8)
    assert view.data_ptr() % 16 != 0
    fixed = tune._aligned(view, 8)
    assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, view)
    assert tune._aligned(view, 1) is view  # 2-byte loads: any bf16 address
    whole = torch.zeros(2, 3, 4, 8, dtype=torch.bfloat16)
    assert tune._aligned(whole, 8) is whole  # no copy when aligned
