"""Proof tests of the CUDA kernels without a GPU.

* every kernel source compiles through NVRTC for sm_80 and sm_90 (cubin), the cache and the error path work;
* the kernel arithmetic itself (indexing, bilinear taps, channel chunking, warp-shuffle reduction, atomic
  scatter of the backward, fp16 / bf16 decoding) is verified on the CPU: ``kernels/local_corr.cu`` is compiled
  with g++ through ``tests/cuda_host_shim/`` (one host thread per CUDA thread, real lane exchanges) and its
  results are compared with the torch op.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from romav2_plugin import kernels
from romav2_plugin.ops import local_corr, local_corr_backward

ROOT = Path(__file__).resolve().parents[1]
SHIM_DIR = Path(__file__).resolve().parent / "cuda_host_shim"
KERNEL_DIR = Path(kernels.__file__).resolve().parent
lcm = importlib.import_module("romav2_plugin.ops.local_corr")


def _nvrtc_available() -> str | None:
    try:
        kernels.nvrtc_version()
    except ImportError as exc:
        return f"cuda-python (cuda.bindings.nvrtc) not importable: {exc}"
    except Exception as exc:  # noqa: BLE001 - e.g. libnvrtc not found
        return f"NVRTC library not loadable: {exc}"
    return None


_NO_NVRTC = _nvrtc_available()
needs_nvrtc = pytest.mark.skipif(_NO_NVRTC is not None, reason=_NO_NVRTC or "")


# ------------------------------------------------------------------------------------------------------
# NVRTC
@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", sorted(kernels.KERNELS))
def test_nvrtc_compiles_every_kernel(source, arch, tmp_path, monkeypatch):
    monkeypatch.setenv("ROMAV2_PLUGIN_CACHE", str(tmp_path))
    ck = kernels.compile_kernel(source, arch)
    assert ck.kind == "cubin" and not ck.from_cache
    assert ck.image[:4] == b"\x7fELF"
    for entry in kernels.KERNELS[source]:
        assert entry.encode() in ck.image, entry
    print(f"{source} [{arch}]: cubin {len(ck.image)} bytes")
    # second call comes from the on-disk cache, keyed by source hash + arch + NVRTC version
    cached = kernels.compile_kernel(source, arch)
    assert cached.from_cache and cached.image == ck.image
    assert any(p.name.startswith(Path(source).stem + f"-{arch}-nvrtc") for p in tmp_path.iterdir())


@needs_nvrtc
def test_nvrtc_ptx_fallback_for_virtual_arch(tmp_path, monkeypatch):
    monkeypatch.setenv("ROMAV2_PLUGIN_CACHE", str(tmp_path))
    ck = kernels.compile_kernel("local_corr.cu", "compute_90", use_cache=False)
    assert ck.kind == "ptx" and b".entry rv2_local_corr_fwd_f32" in ck.image


@needs_nvrtc
def test_nvrtc_compile_error_raises_with_log(monkeypatch):
    monkeypatch.setattr(
        kernels, "read_source", lambda name: 'extern "C" __global__ void k() { undeclared_x = 1; }'
    )
    with pytest.raises(RuntimeError, match="undeclared_x"):
        kernels.compile_kernel("broken.cu", "sm_80", use_cache=False)


@pytest.mark.slow  # compiles every kernel and specialisation (about 2 minutes on 2 contended cores)
@needs_nvrtc
def test_check_cli(tmp_path):
    env = {**os.environ, "ROMAV2_PLUGIN_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "romav2_plugin.kernels", "--check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "local_corr.cu [sm_80] cubin" in res.stdout and "local_corr.cu [sm_90] cubin" in res.stdout
    # every run-time specialisation of the shipped architectures, for both archs, all entry points present
    for c, r in kernels.specialisations():
        for arch in ("sm_80", "sm_90"):
            line = f"local_corr.cu -DRV2_SPEC_C={c} -DRV2_SPEC_R={r} [{arch}] cubin"
            assert line in res.stdout and f"ok, {len(kernels.spec_entries(c))} entry points" in res.stdout, line
    bad = subprocess.run(
        [sys.executable, "-m", "romav2_plugin.kernels", "--check", "--arch", "sm_1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0


def test_missing_cuda_python_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.nvrtc", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", None)
    with pytest.raises(ImportError, match=r"romav2-plugin\[cuda\]"):
        kernels.nvrtc_version()
    with pytest.raises(ImportError, match=r"romav2-plugin\[cuda\]"):
        kernels.get_function("local_corr.cu", "rv2_local_corr_fwd_f32", 0)


def test_imports_have_no_cuda_side_effects():
    code = (
        "import sys, torch\n"  # (torch itself may import parts of cuda-python)
        "before = set(sys.modules)\n"
        "import romav2_plugin.kernels, romav2_plugin.ops, romav2_plugin.kernels.__main__\n"
        "bad = [m for m in set(sys.modules) - before if m.startswith('cuda')]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------------------------------------------
# host shim: run the .cu on the CPU
@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++) to build the CUDA host shim")
    out = tmp_path_factory.mktemp("shim") / "librv2shim.so"
    cmd = [
        cxx,
        "-std=c++20",
        "-O1",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-shared",
        "-fPIC",
        "-pthread",
        "-I",
        str(SHIM_DIR),
        "-I",
        str(KERNEL_DIR),
        str(SHIM_DIR / "host_driver.cpp"),
        "-o",
        str(out),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lib = ctypes.CDLL(str(out))
    for fn in (lib.host_local_corr_fwd, lib.host_local_corr_bwd):
        fn.restype = ctypes.c_int
    return lib


def _p(t):
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _host_fwd(lib, f_A, f_B, warp, r):
    B, C, H, W = f_A.shape
    a = f_A.permute(0, 2, 3, 1).contiguous()
    b = f_B.permute(0, 2, 3, 1).contiguous()
    w = warp.float().contiguous()
    out = torch.full((B, (2 * r + 1) ** 2, H, W), float("nan"))
    assert lib.host_local_corr_fwd(_DT[f_A.dtype], _p(a), _p(b), _p(w), _p(out), B, H, W, C, r) == 0
    return out


def _host_bwd(lib, g, f_A, f_B, warp, r):
    B, C, H, W = f_A.shape
    a = f_A.permute(0, 2, 3, 1).contiguous()
    b = f_B.permute(0, 2, 3, 1).contiguous()
    w = warp.float().contiguous()
    g = g.float().contiguous()
    gA = torch.full((B, H, W, C), float("nan"))
    gB = torch.zeros((B, H, W, C))
    assert (
        lib.host_local_corr_bwd(_DT[f_A.dtype], _p(g), _p(a), _p(b), _p(w), _p(gA), _p(gB), B, H, W, C, r)
        == 0
    )
    return gA.permute(0, 3, 1, 2), gB.permute(0, 3, 1, 2)


def _inputs(B, C, H, W, seed=0, spread=1.4):
    g = torch.Generator().manual_seed(seed)
    f_A = torch.randn(B, C, H, W, generator=g)
    f_B = torch.randn(B, C, H, W, generator=g)
    warp = (torch.rand(B, H, W, 2, generator=g) * 2 - 1) * spread
    return f_A, f_B, warp


# B, C, H, W, r: C=5 / 12 (not multiples of 4, fewer channels than lanes), C=300 (> 256: two register
# chunks, lanes striding), H != W, windows partly / fully outside the image.
SHIM_CASES = [(2, 5, 3, 4, 1), (2, 12, 4, 3, 3), (1, 300, 2, 3, 1)]


@pytest.mark.parametrize("B,C,H,W,r", SHIM_CASES)
def test_host_shim_forward_backward_match_torch_op(shim, B, C, H, W, r):
    f_A, f_B, warp = _inputs(B, C, H, W, seed=C + r)
    ref = local_corr(f_A, f_B, warp, r)
    out = _host_fwd(shim, f_A, f_B, warp, r)
    tol = 2e-6 * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=tol)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    gA_ref, gB_ref = local_corr_backward(g, f_A, f_B, warp, r)
    gA, gB = _host_bwd(shim, g, f_A, f_B, warp, r)
    torch.testing.assert_close(gA, gA_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gB, gB_ref, rtol=1e-5, atol=1e-5)
    print(
        f"host shim B={B} C={C} H={H} W={W} r={r}: fwd max abs err {(out - ref).abs().max():.2e}, "
        f"gA {(gA - gA_ref).abs().max():.2e}, gB {(gB - gB_ref).abs().max():.2e}"
    )


def test_host_shim_identity_warp_hits_pixel_centres(shim):
    """Identity warp: every window tap is an exact pixel (integer shift), incl. the image border."""
    B, C, H, W, r = 1, 7, 3, 4, 1
    f_A, f_B, _ = _inputs(B, C, H, W, seed=2)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    warp = torch.stack(((2 * xs + 1) / W - 1, (2 * ys + 1) / H - 1), dim=-1)[None].float()
    torch.testing.assert_close(
        _host_fwd(shim, f_A, f_B, warp, r), local_corr(f_A, f_B, warp, r), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_host_shim_half_inputs_decode_exactly(shim, dtype):
    """fp16 / bf16 entry points: the 16-bit decoding + fp32 accumulation equal the fp32 op on the upcast inputs."""
    B, C, H, W, r = 1, 9, 3, 3, 1
    f_A, f_B, warp = _inputs(B, C, H, W, seed=4)
    f_A, f_B = f_A.to(dtype), f_B.to(dtype)
    if dtype == torch.float16:  # include fp16 subnormals, +-0 and the largest finite value
        f_A.view(-1)[:4] = torch.tensor([6e-8, -0.0, 65504.0, -3e-5], dtype=dtype)
    ref = local_corr(f_A.float(), f_B.float(), warp, r)
    torch.testing.assert_close(
        _host_fwd(shim, f_A, f_B, warp, r), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()
    )
    if dtype == torch.bfloat16:
        g = torch.randn(ref.shape)
        gA_ref, gB_ref = local_corr_backward(g, f_A.float(), f_B.float(), warp, r)
        gA, gB = _host_bwd(shim, g, f_A, f_B, warp, r)
        torch.testing.assert_close(gA, gA_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gB, gB_ref, rtol=1e-5, atol=1e-5)


def _shim_kernels(lib):
    """A stand-in for the ``romav2_plugin.kernels`` runtime whose ``launch`` runs the kernel on the host
    shim: the Python launch code of ``ops/local_corr.py`` (layouts, dtype casts, argument order, grid size)
    then runs unchanged on CPU tensors."""
    import types

    codes = {"f32": 0, "f16": 1, "bf16": 2}
    launched = []

    def launch(source, kernel, grid, block, args, *, device_index, shared_mem=0):
        assert source == "local_corr.cu" and block == (256, 1, 1)
        _, _, _, op, sfx = kernel.split("_")  # rv2_local_corr_{fwd,bwd}_{sfx}
        B, H, W = (args[i][0] for i in range(-5, -2))
        assert grid[0] * (block[0] // 32) >= B * H * W  # one warp per pixel
        fn = lib.host_local_corr_fwd if op == "fwd" else lib.host_local_corr_bwd
        cargs = [t(v) if v is not None else t() for v, t in args]
        assert fn(codes[sfx], *cargs) == 0, f"{kernel}: not supported by the host shim"
        launched.append(kernel)

    return types.SimpleNamespace(launch=launch, ptr=kernels.ptr, launched=launched)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_launch_code_runs_the_kernel_on_the_host_shim(shim, dtype):
    """``_kernel_forward`` / ``_kernel_backward`` (what runs on a GPU) driven through the host shim agree with
    the torch path; the self-check's comparison accepts them."""
    fake = _shim_kernels(shim)
    B, C, H, W, r = 2, 40, 3, 5, 1
    f_A, f_B, warp = _inputs(B, C, H, W, seed=31)
    f_A, f_B = f_A.to(dtype), f_B.to(dtype)
    out = lcm._kernel_forward(fake, f_A, f_B, warp, r, dtype)
    ref = lcm._local_corr_torch(f_A, f_B, warp, r, lcm.DEFAULT_CHUNK_BYTES)
    assert out.dtype == torch.float32 and lcm._rel_err(out, ref) <= lcm.SELF_CHECK_TOL[torch.float32]
    if dtype != torch.float16:  # the host shim has no fp16 backward entry point
        g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(32))
        got = lcm._kernel_backward(fake, g, f_A, f_B, warp, r, dtype, True, True)
        want = lcm._local_corr_backward_torch(g, f_A, f_B, warp, r, lcm.DEFAULT_CHUNK_BYTES, True, True)
        for x, y in zip(got, want):
            assert x.dtype == y.dtype == dtype and lcm._rel_err(x, y) <= lcm.SELF_CHECK_TOL[dtype]
    sfx = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    assert fake.launched[0] == f"rv2_local_corr_fwd_{sfx}"


def test_self_check_catches_a_wrong_argument_order_on_the_host_shim(shim):
    """A launch that swaps f_A and f_B (a plausible slip) changes the gradients; the self-check sees it."""
    fake = _shim_kernels(shim)
    real_launch = fake.launch

    def swapped(source, kernel, grid, block, args, **kw):
        if "_bwd_" in kernel:
            args = [args[0], args[2], args[1], *args[3:]]
        return real_launch(source, kernel, grid, block, args, **kw)

    fake.launch = swapped
    f_A, f_B, warp = _inputs(1, 12, 4, 3, seed=33)
    g = torch.randn(1, 9, 4, 3)
    got = lcm._kernel_backward(fake, g, f_A, f_B, warp, 1, torch.float32, True, True)
    want = lcm._local_corr_backward_torch(g, f_A, f_B, warp, 1, lcm.DEFAULT_CHUNK_BYTES, True, True)
    assert lcm._rel_err(got[0], want[0]) > lcm.SELF_CHECK_TOL[torch.float32]


def test_host_shim_nan_and_huge_coordinates_are_zero(shim):
    f_A, f_B, warp = _inputs(1, 3, 2, 2, seed=6)
    warp[0, 0, 0] = torch.tensor([float("nan"), 0.0])
    warp[0, 0, 1] = torch.tensor([3e9, -3e9])
    out = _host_fwd(shim, f_A, f_B, warp, 1)
    assert torch.isfinite(out).all()
    assert (out[0, :, 0, :] == 0).all()


@pytest.mark.slow  # subprocesses
def test_gpu_benchmark_script_dry_run_and_no_gpu_exit(tmp_path):
    """python -m benchmarks.gpu_kernels: --dry-run works without a GPU; a plain run without CUDA exits 0 with a
    message."""
    script = ["-m", "benchmarks.gpu_kernels"]
    env = {**os.environ, "ROMAV2_PLUGIN_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, *script, "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "CPU op vs native torch path" in res.stdout
    if not torch.cuda.is_available():
        res = subprocess.run(
            [sys.executable, *script, "--out", str(tmp_path / "out")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0 and "no CUDA device" in res.stdout, res.stdout + res.stderr


def test_gpu_benchmark_build_step_reports_self_check_and_errors(monkeypatch):
    """benchmarks/gpu_kernels.py step 1 goes through the op's own loader and self-check (a stale name there
    once made a clean H200 run print status FAIL): ok, a self-check mismatch, and a load error."""
    sys.path.insert(0, str(ROOT))
    try:
        gk = importlib.import_module("benchmarks.gpu_kernels")
    finally:
        sys.path.remove(str(ROOT))
    seen = []
    monkeypatch.setattr(lcm, "_load_kernels", lambda device: seen.append(device) or "runtime")
    monkeypatch.setattr(lcm, "self_check", lambda k, device: [] if k == "runtime" else ["not the runtime"])
    got = gk.build_kernels(torch.device("cpu"))
    assert got["kernel_ok"] and got["kernel_self_check_failures"] == [] and "kernel_error" not in got
    assert seen == [torch.device("cpu")] and got["kernel_build_s"] >= 0
    monkeypatch.setattr(lcm, "self_check", lambda k, device: ["forward float32: max rel error 1e-02 > 1e-04"])
    got = gk.build_kernels(torch.device("cpu"))
    assert not got["kernel_ok"] and got["kernel_self_check_failures"][0].startswith("forward float32")

    def broken(device):
        raise RuntimeError("NVRTC: no such arch")

    monkeypatch.setattr(lcm, "_load_kernels", broken)
    got = gk.build_kernels(torch.device("cpu"))
    assert not got["kernel_ok"] and got["kernel_error"] == "RuntimeError: NVRTC: no such arch"


@needs_nvrtc
def test_compiling_leaves_torch_load_working(tmp_path, monkeypatch, random_checkpoint):
    """Regression: NVRTC 13 run inside the torch process broke later torch.load of the (1.1 GB, official
    layout) checkpoint ("record size ... does not match expected size"); the compiler now runs in a child
    process. (Small files did not show the failure, hence the real-size checkpoint.)"""
    from romav2_plugin.weights.layout import load_checkpoint

    monkeypatch.setenv("ROMAV2_PLUGIN_CACHE", str(tmp_path))
    kernels.compile_kernel("local_corr.cu", "sm_80", use_cache=False)
    assert len(load_checkpoint(random_checkpoint)) == 907
