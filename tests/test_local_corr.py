"""Proof tests of ``romav2_plugin.ops.local_corr`` on the CPU (parity, autograd, memory, torch.library)."""

from __future__ import annotations

import ctypes
import importlib
import math
import re
import time
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from romav2_plugin.ops import local_corr as lc_fn
from romav2_plugin.ops import local_corr_backward

# the submodule (the package attribute `local_corr` is the function of the same name)
lcm = importlib.import_module("romav2_plugin.ops.local_corr")
_REAL_LOAD_KERNELS = lcm._load_kernels

try:  # the official package is the numerical reference of some tests only (opcheck, gradcheck, memory: none)
    romav2_lc = importlib.import_module("romav2.local_correlation")
except ImportError:
    romav2_lc = None
needs_official = pytest.mark.skipif(
    romav2_lc is None, reason="official romav2 reference not installed (pip install --no-deps romav2==2.0.1)"
)


def _official(f_A, f_B, warp, r):
    """Official native path (the fused ``local_corr`` extension must be absent)."""
    assert romav2_lc.local_corr is None, "the official fused local_corr extension is installed"
    return romav2_lc.local_correlation(f_A, f_B, local_radius=r, warp=warp, scale_factor=None)


def _inputs(B, C, H, W, dtype=torch.float32, spread=1.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    f_A = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    f_B = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    # warps beyond [-1, 1] so that whole windows (and partial ones) fall outside the image
    warp = (torch.rand(B, H, W, 2, generator=g, dtype=dtype) * 2 - 1) * spread
    return f_A, f_B, warp


CASES = [  # B, C, H, W, r
    (2, 5, 6, 9, 1),
    (2, 12, 7, 5, 3),
    (2, 5, 11, 8, 3),
    (2, 12, 9, 13, 1),
    (1, 33, 4, 6, 2),
]


@needs_official
@pytest.mark.parametrize("B,C,H,W,r", CASES)
@pytest.mark.parametrize("chunk_bytes", [None, 1])  # default budget / one row per chunk
def test_forward_matches_official_native(B, C, H, W, r, chunk_bytes):
    f_A, f_B, warp = _inputs(B, C, H, W, seed=B * 100 + C + r)
    ref = _official(f_A, f_B, warp, r)
    out = lc_fn(f_A, f_B, warp, r, chunk_bytes=chunk_bytes)
    assert out.shape == (B, (2 * r + 1) ** 2, H, W)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # some windows really are (partly) outside the image: the zero padding is exercised
    assert (ref == 0).any()


@needs_official
@pytest.mark.parametrize("B,C,H,W,r", CASES)
@pytest.mark.parametrize("chunk_bytes", [None, 1, 3000])  # one chunk / one row per chunk / a few rows
def test_reference_path_matches_official_native(B, C, H, W, r, chunk_bytes):
    """The standard-operator version used while exporting (ONNX) computes the same numbers."""
    f_A, f_B, warp = _inputs(B, C, H, W, seed=B * 100 + C + r)
    ref = _official(f_A, f_B, warp, r)
    out = lcm.local_corr_reference(f_A, f_B, warp, r, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_reference_path_bounds_its_temporaries():
    """Its largest temporary stays near the budget instead of the (B, C, H, W, K) window."""
    B, C, H, W, r = 2, 32, 40, 48, 3
    f_A, f_B, warp = _inputs(B, C, H, W)
    window_bytes = B * C * H * W * (2 * r + 1) ** 2 * 4
    budget = window_bytes // 20
    biggest = 0

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal biggest
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    biggest = max(biggest, t.numel() * t.element_size())
            return out

    with Sizes():
        lcm.local_corr_reference(f_A, f_B, warp, r, chunk_bytes=budget)
    assert biggest <= budget, (biggest, budget, window_bytes)


def test_exporting_routes_to_the_reference_path(monkeypatch):
    f_A, f_B, warp = _inputs(1, 4, 5, 6)
    calls = []
    real = lcm.local_corr_reference
    monkeypatch.setattr(lcm, "local_corr_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    lc_fn(f_A, f_B, warp, 1)
    assert calls == []
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    torch.testing.assert_close(lc_fn(f_A, f_B, warp, 1), real(f_A, f_B, warp, 1))
    assert calls == [1]


def test_forward_window_geometry_integer_shift():
    """With an identity warp the offsets are integer pixel shifts: k = i*(2r+1)+j samples (y+i-r, x+j-r)."""
    B, C, H, W, r = 1, 3, 5, 7, 2
    f_A, f_B, _ = _inputs(B, C, H, W)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    warp = torch.stack(((2 * xs + 1) / W - 1, (2 * ys + 1) / H - 1), dim=-1)[None].float()
    out = lc_fn(f_A, f_B, warp, r)
    D = 2 * r + 1
    for k in range(D * D):
        i, j = divmod(k, D)
        dy, dx = i - r, j - r
        shifted = torch.zeros_like(f_B)
        y_dst, x_dst = slice(max(0, -dy), H - max(0, dy)), slice(max(0, -dx), W - max(0, dx))
        y_src, x_src = slice(max(0, dy), H + min(0, dy)), slice(max(0, dx), W + min(0, dx))
        shifted[:, :, y_dst, x_dst] = f_B[:, :, y_src, x_src]
        expect = (f_A * shifted).sum(1) / math.sqrt(C)
        torch.testing.assert_close(out[:, k], expect, rtol=1e-5, atol=1e-5)


@needs_official
def test_grad_f_A_matches_official_and_grid_sample_formulation():
    B, C, H, W, r = 2, 5, 6, 7, 1
    f_A, f_B, warp = _inputs(B, C, H, W, seed=3)
    g = torch.randn(B, (2 * r + 1) ** 2, H, W)
    # official native: f_B is sampled under no_grad, so only f_A gets a gradient there
    a_ref = f_A.clone().requires_grad_()
    _official(a_ref, f_B, warp, r).backward(g)
    # plain differentiable grid_sample formulation for the f_B gradient
    b_ref = f_B.clone().requires_grad_()
    window = lcm._window(r, H, W, "cpu", torch.float32)
    coords = (warp[:, :, :, None] + window).reshape(B, H, W * window.shape[0], 2)
    wf = F.grid_sample(b_ref, coords, mode="bilinear", padding_mode="zeros", align_corners=False)
    (
        (f_A[..., None] / math.sqrt(C) * wf.reshape(B, C, H, W, -1)).sum(1).permute(0, 3, 1, 2) * g
    ).sum().backward()

    a = f_A.clone().requires_grad_()
    b = f_B.clone().requires_grad_()
    w = warp.clone().requires_grad_()
    lc_fn(a, b, w, r).backward(g)
    torch.testing.assert_close(a.grad, a_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-5, atol=1e-6)
    assert w.grad is None  # no gradient to the warp (detached, like the official refiner)
    gA, gB = local_corr_backward(g, f_A, f_B, warp, r)
    torch.testing.assert_close(gA, a_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gB, b_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("B,C,H,W,r", [(2, 3, 3, 4, 1), (1, 5, 4, 3, 2)])
def test_gradcheck_float64(B, C, H, W, r):
    f_A, f_B, warp = _inputs(B, C, H, W, dtype=torch.float64, seed=7)
    f_A.requires_grad_()
    f_B.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: lc_fn(a, b, warp, r, chunk_bytes=1), (f_A, f_B))
    assert torch.autograd.gradcheck(lambda a, b: lc_fn(a, b, warp, r), (f_A, f_B))


def test_only_one_input_requires_grad():
    f_A, f_B, warp = _inputs(1, 4, 3, 5, seed=5)
    b = f_B.clone().requires_grad_()
    lc_fn(f_A, b, warp, 1).sum().backward()
    assert b.grad is not None and b.grad.shape == f_B.shape


def test_opcheck():
    f_A, f_B, warp = _inputs(2, 5, 4, 6, seed=11)
    args = (f_A.requires_grad_(), f_B.requires_grad_(), warp, 1, lcm.DEFAULT_CHUNK_BYTES)
    torch.library.opcheck(torch.ops.romav2_plugin.local_corr.default, args)
    g = torch.randn(2, 9, 4, 6)
    torch.library.opcheck(
        torch.ops.romav2_plugin.local_corr_backward.default,
        (g, f_A.detach(), f_B.detach(), warp, 1, lcm.DEFAULT_CHUNK_BYTES, True, True),
    )


def test_torch_compile_aot_eager_forward_backward():
    f_A, f_B, warp = _inputs(2, 6, 5, 7, seed=13)

    def f(a, b, w):
        return (lc_fn(a, b, w, 2) ** 2).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    a1, b1 = f_A.clone().requires_grad_(), f_B.clone().requires_grad_()
    a2, b2 = f_A.clone().requires_grad_(), f_B.clone().requires_grad_()
    l1 = f(a1, b1, warp)
    l2 = compiled(a2, b2, warp)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l2, l1)
    torch.testing.assert_close(a2.grad, a1.grad)
    torch.testing.assert_close(b2.grad, b1.grad)


def test_input_validation():
    f_A, f_B, warp = _inputs(1, 3, 4, 5)
    with pytest.raises(ValueError, match=r"\(B, H, W, 2\)"):
        lc_fn(f_A, f_B, warp[:, :3], 1)
    with pytest.raises(ValueError):
        lc_fn(f_A, f_B[:, :2], warp, 1)


# ------------------------------------------------------------------------------------------------------
# CUDA path: self-check before first use, fallback, ROMAV2_LOCAL_CORR. No GPU needed: the CUDA
# implementations are called with CPU tensors and the kernel launchers are replaced.
_KERNELS = object()  # stands for the loaded kernels runtime


@pytest.fixture
def cuda_path(monkeypatch):
    """Fresh per-device state, kernels that 'load', and launchers counting their calls (correct by default:
    they run the torch path)."""
    monkeypatch.delenv(lcm.MODE_ENV, raising=False)
    monkeypatch.setattr(lcm, "_device_path", {})
    monkeypatch.setattr(lcm, "_device_kernels", {})
    monkeypatch.setattr(lcm, "_load_kernels", lambda device: _KERNELS)
    calls = {"fwd": 0, "bwd": 0}

    def fwd(kernels, f_A, f_B, warp, r, kdt):
        assert kernels is _KERNELS
        calls["fwd"] += 1
        return lcm._local_corr_torch(f_A, f_B, warp, r, lcm.DEFAULT_CHUNK_BYTES)

    def bwd(kernels, grad, f_A, f_B, warp, r, kdt, need_a, need_b):
        calls["bwd"] += 1
        return lcm._local_corr_backward_torch(grad, f_A, f_B, warp, r, lcm.DEFAULT_CHUNK_BYTES, need_a, need_b)

    monkeypatch.setattr(lcm, "_kernel_forward", fwd)
    monkeypatch.setattr(lcm, "_kernel_backward", bwd)
    return calls


def _run_cuda_impl(n=2):
    """Forward and backward through the CUDA implementations ``n`` times; returns outputs and the
    RuntimeWarnings raised."""
    f_A, f_B, warp = _inputs(1, 6, 4, 5, seed=21)
    g = torch.randn(1, 9, 4, 5, generator=torch.Generator().manual_seed(22))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        outs = []
        for _ in range(n):
            outs.append(lcm._local_corr_cuda(f_A, f_B, warp, 1, lcm.DEFAULT_CHUNK_BYTES))
            outs.append(lcm._local_corr_backward_cuda(g, f_A, f_B, warp, 1, lcm.DEFAULT_CHUNK_BYTES, True, True))
    ref = (lc_fn(f_A, f_B, warp, 1), local_corr_backward(g, f_A, f_B, warp, 1))
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    return outs, ref, msgs


def _assert_torch_results(outs, ref):
    for i, o in enumerate(outs):
        want = ref[i % 2]
        if isinstance(o, tuple):
            for x, y in zip(o, want):
                torch.testing.assert_close(x, y)
        else:
            torch.testing.assert_close(o, want)


def test_self_check_passes_then_the_kernel_is_used(cuda_path):
    outs, ref, msgs = _run_cuda_impl(n=2)
    assert msgs == []
    # self-check: forward + backward for fp32, fp16 and bf16 once; then 2 forward and 2 backward calls
    assert cuda_path == {"fwd": 3 + 2, "bwd": 3 + 2}
    assert lcm._device_path == {"cpu": "cuda"}
    _assert_torch_results(outs, ref)


def test_kernel_that_cannot_load_falls_back_with_one_warning(cuda_path, monkeypatch):
    from romav2_plugin import kernels

    def no_driver(*a, **k):
        raise RuntimeError("CUDA driver call cuInit failed: CUDA_ERROR_NO_DEVICE (simulated)")

    monkeypatch.setattr(lcm, "_load_kernels", _REAL_LOAD_KERNELS)
    monkeypatch.setattr(kernels, "get_function", no_driver)
    outs, ref, msgs = _run_cuda_impl()
    assert len(msgs) == 1 and "unavailable" in msgs[0] and "CUDA_ERROR_NO_DEVICE" in msgs[0], msgs
    assert "Falling back" in msgs[0] and "ROMAV2_LOCAL_CORR" in msgs[0]
    assert cuda_path == {"fwd": 0, "bwd": 0}
    _assert_torch_results(outs, ref)


def test_kernel_whose_launch_fails_falls_back_with_one_warning(cuda_path, monkeypatch):
    def launch_fails(*a, **k):
        cuda_path["fwd"] += 1
        raise RuntimeError("CUDA driver call cuLaunchKernel(rv2_local_corr_fwd_f32) failed: CUDA_ERROR_LAUNCH_FAILED")

    monkeypatch.setattr(lcm, "_kernel_forward", launch_fails)
    outs, ref, msgs = _run_cuda_impl()
    assert len(msgs) == 1 and "self-check launch failed" in msgs[0] and "CUDA_ERROR_LAUNCH_FAILED" in msgs[0]
    assert cuda_path == {"fwd": 1, "bwd": 0}  # tried once, in the self-check; never again on this device
    assert lcm._device_path == {"cpu": "torch"}
    _assert_torch_results(outs, ref)


@pytest.mark.parametrize("what", ["forward fp16", "grad f_B bf16", "nan grad f_A fp32"])
def test_kernel_with_wrong_results_falls_back_with_the_figures(cuda_path, monkeypatch, what):
    fwd, bwd = lcm._kernel_forward, lcm._kernel_backward  # the correct (torch) launchers of the fixture

    def wrong_fwd(kernels, f_A, f_B, warp, r, kdt):
        out = fwd(kernels, f_A, f_B, warp, r, kdt)
        if what == "forward fp16" and kdt == torch.float16:
            out[:, :, 0, 0] += 0.05 * out.abs().max()  # one pixel wrong, like an indexing slip at the border
        return out

    def wrong_bwd(kernels, grad, f_A, f_B, warp, r, kdt, need_a, need_b):
        g_A, g_B = bwd(kernels, grad, f_A, f_B, warp, r, kdt, need_a, need_b)
        if what == "grad f_B bf16" and kdt == torch.bfloat16:
            g_B = g_B * 1.1  # e.g. a lost or doubled atomicAdd
        if what == "nan grad f_A fp32" and kdt == torch.float32:
            g_A = g_A.clone()
            g_A[0, 0, 0, 0] = float("nan")
        return g_A, g_B

    monkeypatch.setattr(lcm, "_kernel_forward", wrong_fwd)
    monkeypatch.setattr(lcm, "_kernel_backward", wrong_bwd)
    outs, ref, msgs = _run_cuda_impl()
    assert len(msgs) == 1 and "disagrees with the torch path" in msgs[0], msgs
    expect = {
        "forward fp16": r"forward float16: max rel error 5\.00e-02 > 1e-04",
        "grad f_B bf16": r"grad f_B bfloat16: max rel error 9\.\d+e-02 > 3e-02",
        "nan grad f_A fp32": r"grad f_A float32: max rel error inf > 1e-04",
    }[what]
    assert re.search(expect, msgs[0]), msgs[0]
    assert lcm._device_path == {"cpu": "torch"}
    _assert_torch_results(outs, ref)  # every later call, fp32 included, takes the torch path


def test_env_var_forces_either_path(cuda_path, monkeypatch):
    monkeypatch.setenv(lcm.MODE_ENV, "torch")
    outs, ref, msgs = _run_cuda_impl()
    assert msgs == [] and cuda_path == {"fwd": 0, "bwd": 0} and lcm._device_path == {}
    _assert_torch_results(outs, ref)
    # cuda: no self-check (a wrong kernel is used as is) and no fallback (load errors are raised)
    monkeypatch.setenv(lcm.MODE_ENV, " CUDA ")
    monkeypatch.setattr(lcm, "self_check", lambda *a: pytest.fail("self-check run although forced"))
    outs, ref, msgs = _run_cuda_impl(n=1)
    assert msgs == [] and cuda_path == {"fwd": 1, "bwd": 1}

    def no_driver(device):
        raise RuntimeError("no driver (simulated)")

    monkeypatch.setattr(lcm, "_load_kernels", no_driver)
    with pytest.raises(RuntimeError, match="no driver"):
        _run_cuda_impl(n=1)
    monkeypatch.setenv(lcm.MODE_ENV, "fast")
    with pytest.raises(ValueError, match=r"ROMAV2_LOCAL_CORR='fast' is not one of auto, cuda, torch"):
        _run_cuda_impl(n=1)
    monkeypatch.setenv(lcm.MODE_ENV, "")
    assert lcm.kernel_mode() == "auto"


def test_float64_inputs_never_reach_the_kernel(cuda_path):
    f_A, f_B, warp = _inputs(1, 3, 3, 4, dtype=torch.float64)
    out = lcm._local_corr_cuda(f_A, f_B, warp, 1, lcm.DEFAULT_CHUNK_BYTES)
    assert out.dtype == torch.float64 and cuda_path == {"fwd": 0, "bwd": 0} and lcm._device_path == {}


# ------------------------------------------------------------------------------------------------------
# memory at the `precise` stride-4 shape
class _LiveTensorPeak(TorchDispatchMode):
    """Sums the bytes of live tensor storages created by ops run under the mode and records the peak.
    Storages of the ``ignore`` tensors (the inputs) are not counted."""

    def __init__(self, *ignore: torch.Tensor):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.largest = 0
        self._known = {t.untyped_storage().data_ptr(): 0 for t in ignore}

    def _free(self, key, n):
        self._known.pop(key, None)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key in self._known:
                    continue  # a view of a live storage
                n = st.nbytes()
                self._known[key] = n
                self.live += n
                self.peak = max(self.peak, self.live)
                self.largest = max(self.largest, n)
                weakref.finalize(st, self._free, key, n)
        return out


def _rss(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        return True
    except OSError:
        return False


@pytest.mark.slow  # measured 12-31 s on the 2-core dev machine (load dependent)
def test_cpu_peak_memory_precise_stride4_under_10_percent_of_native():
    # ~12-31 s on 2 CPU cores (the native path is never run at this shape: it would need ~4 GB)
    B, C, H, W, r = 1, 192, 320, 320, 3
    K = (2 * r + 1) ** 2
    native_window_bytes = B * C * H * W * K * 4  # what native_torch_local_corr materialises (~3.85 GB)
    f_A, f_B, warp = _inputs(B, C, H, W, spread=1.0, seed=1)
    rss_ok = _reset_peak_rss()
    rss0 = _rss("VmRSS")
    t0 = time.perf_counter()
    with _LiveTensorPeak(f_A, f_B, warp) as tracker:
        out = lcm._local_corr_torch(f_A, f_B, warp, r, lcm.DEFAULT_CHUNK_BYTES)
    dt = time.perf_counter() - t0
    hwm = _rss("VmHWM")
    assert out.shape == (B, K, H, W)
    ratio = tracker.peak / native_window_bytes
    msg = (
        f"precise stride-4 CPU local_corr: peak live tensors {tracker.peak / 2**20:.1f} MiB "
        f"(largest {tracker.largest / 2**20:.1f} MiB, incl. the {out.nbytes / 2**20:.1f} MiB output) = "
        f"{100 * ratio:.2f}% of the native window buffer {native_window_bytes / 1e9:.3f} GB; {dt:.1f} s"
    )
    if rss_ok and rss0 is not None and hwm is not None:
        msg += f"; process RSS high-water growth {(hwm - rss0) / 2**20:.1f} MiB"
        assert hwm - rss0 < 0.10 * native_window_bytes, msg
    print(msg)
    assert ratio < 0.10, msg
    # spot-check the numbers on a few rows against the official formulation in float64 (in float32 its
    # per-offset pixel positions round by ~3e-5 px at this width: the gather path is closer to float64)
    rows = slice(100, 102)
    window = lcm._window(r, H, W, "cpu", torch.float64)
    coords = (warp[0, rows, :, None].double() + window).reshape(1, 2, W * K, 2)
    wf = F.grid_sample(f_B.double(), coords, mode="bilinear", padding_mode="zeros", align_corners=False)
    expect = (f_A[0, :, rows, :, None].double() / C**0.5 * wf.reshape(C, 2, W, K)).sum(0).permute(2, 0, 1)
    torch.testing.assert_close(out[0, :, rows].double(), expect, rtol=1e-5, atol=1e-5)


def test_forward_far_outside_and_wide_images_against_float64():
    # warps up to 3x the image (blocks wholly outside by many pixels) and a 320-px width where the official
    # float32 per-offset pixel positions round by ~3e-5 px: the whole-pixel gather is compared with the
    # grid_sample formulation computed in float64, and must be closer to it than that formulation in float32
    # (several blocks of gathered pixels per band, the last one partial: 99 pixels at 9x11)
    for (B, C, H, W, r, spread) in [(1, 16, 12, 320, 3, 1.05), (2, 8, 9, 11, 3, 3.0), (1, 4, 5, 7, 2, 8.0),
                                    (1, 32, 12, 320, 1, 1.05), (2, 48, 9, 11, 1, 3.0)]:
        f_A, f_B, warp = _inputs(B, C, H, W, spread=spread, seed=3)
        window = lcm._window(r, H, W, "cpu", torch.float64)
        ref = lcm._corr_rows(f_A.double(), f_B.double(), warp.double(), window, torch.float64)
        out = lc_fn(f_A, f_B, warp, r)
        official_way = lcm._corr_rows(f_A, f_B, warp, lcm._window(r, H, W, "cpu", torch.float32), torch.float32)
        err = (out.double() - ref).abs().max().item()
        assert err <= 2e-6 * max(1.0, ref.abs().max().item()), (B, C, H, W, r, spread, err)
        assert err <= (official_way.double() - ref).abs().max().item() + 1e-6
        if spread > 2:  # some pixels' whole window is outside: exactly zero there
            far = (warp.abs() > 1 + 2 * (r + 2) / min(H, W)).any(-1)  # (B, H, W)
            assert far.any()
            assert (out.permute(0, 2, 3, 1)[far] == 0).all()


def test_radius_one_with_few_channels_keeps_the_official_grid_sample_formulation():
    # romav2-tiny's stride-2 refiner (r = 1, 16 channels): grid_sample is faster there, so the CPU forward is
    # exactly the official float32 computation; from GATHER_R1_MIN_CHANNELS channels on, the gathers (closer
    # to float64 than the official's float32 pixel positions at this 320-px width)
    for C, gathers in ((16, False), (lcm.GATHER_R1_MIN_CHANNELS, True)):
        f_A, f_B, warp = _inputs(1, C, 6, 320, spread=1.05, seed=5)
        out = lc_fn(f_A, f_B, warp, 1)
        official_way = lcm._corr_rows(f_A, f_B, warp, lcm._window(1, 6, 320, "cpu", torch.float32), torch.float32)
        ref = lcm._corr_rows(f_A.double(), f_B.double(), warp.double(), lcm._window(1, 6, 320, "cpu",
                             torch.float64), torch.float64)
        if gathers:
            assert (out.double() - ref).abs().max() < (official_way.double() - ref).abs().max()
        else:
            assert torch.equal(out, official_way)
