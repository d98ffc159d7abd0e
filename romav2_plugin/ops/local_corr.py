"""Memory-lean local correlation of the RoMa v2 refiner, as a ``torch.library`` custom op.

``local_corr(f_A, f_B, warp, radius)`` computes, for every pixel ``p = (y, x)`` of ``f_A`` and window offset
``k = i * (2r + 1) + j``::

    out[b, k, y, x] = sum_c f_A[b, c, y, x] / sqrt(C) * grid_sample(f_B, warp[b, y, x] + o_k)[b, c]
    o_k = ((j - r) * 2 / W, (i - r) * 2 / H)        # normalized (x, y) offsets

with ``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``; this is the maths of the
official ``romav2.local_correlation.local_correlation`` (its ``scale_factor`` argument is unused there).

Implementations:

* CUDA: the NVRTC kernel ``kernels/local_corr.cu`` (fp32 / fp16 / bf16 inputs, fp32 accumulation); it
  never materialises the ``(B, C, H, W, K)`` window. The forward runs specialised for the problem's
  channels and radius with an autotuned tile (:mod:`romav2_plugin.ops.local_corr_tune`) where one passes its
  check, else this generic kernel. Before its first use on a device it is run once on a
  small seeded problem against the torch path (:func:`self_check`: forward and both gradients, every input
  dtype). If it cannot be compiled, loaded or launched (no cuda-python, no driver, ...) or disagrees, one
  warning with the figures is emitted and that device uses the chunked torch path below.
  ``$ROMAV2_LOCAL_CORR`` = ``auto`` (default) | ``cuda`` (the kernel, unchecked) | ``torch`` forces a path.
* every other device (CPU), radius >= :data:`GATHER_MIN_RADIUS` (the stride-4 refiner's 3), and radius 1
  from :data:`GATHER_R1_MIN_CHANNELS` channels on (the official stride-2 refiner's 48): the window offsets
  are whole pixels, so all ``K`` samples of a pixel share one pair of bilinear weights. The forward takes
  the dot products of ``f_A`` with the ``(2r + 2)^2`` whole-pixel neighbours of B around ``floor(warp)``
  and blends them with those weights: the same function as the official ``grid_sample`` formulation, with
  ``(2r + 2)^2`` channel vectors read per pixel instead of its ``4 (2r + 1)^2`` corners (64 against 196 at
  r = 3). The neighbours are gathered for 64 pixels at a time (``index_select``, multiply, sum), so they
  stay in the cache. The pixel position is computed once, in float64, where the official rounds it in
  float32 per offset: against a float64 reference the result is more exact (~9e-7 at 320x320, C=192, r=3;
  the official's float32 formulation is off by ~1e-4 at 320x240), and it differs from the official by that rounding of the official's. Timings:
  benchmarks/results/cpu_levers_cpu.md (``gathercorr``, ``corrblock``). Rows are processed in chunks so the
  temporaries stay under a memory budget (:data:`DEFAULT_CHUNK_BYTES`, or the ``chunk_bytes`` keyword). The
  backward is the ``grid_sample`` formulation's exact adjoint
  (:func:`torch.ops.aten.grid_sampler_2d_backward`), chunked too. Radius 1 with fewer channels (romav2-tiny's
  stride-2 refiner: 16) uses that formulation forward too, where it is faster: per chunk exactly the official
  native computation.

Autograd: gradients flow to ``f_A`` and ``f_B``; ``warp`` gets none (the official refiner detaches it).
A fake (meta) implementation makes the op traceable by ``torch.compile``. While exporting (``torch.export``,
ONNX), :func:`local_corr` is written with standard operators instead (:func:`local_corr_reference`), since
exported graphs cannot carry the custom op.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import warnings

import torch
from torch import Tensor

from romav2_plugin.ops import local_corr_tune as _tune
from romav2_plugin.ops.local_corr_torch import (  # noqa: F401 (re-exported for the tests and benchmarks)
    GATHER_MIN_RADIUS,
    GATHER_R1_MIN_CHANNELS,
    _compute_dtype,
    _corr_rows,
    _corr_rows_gather,
    _local_corr_backward_torch,
    _local_corr_gather,
    _local_corr_grid,
    _local_corr_torch,
    _rows_per_chunk,
    _window,
)
from romav2_plugin.runtime import LOCAL_CORR_CHUNK_BYTES

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MODE_ENV",
    "kernel_mode",
    "local_corr",
    "local_corr_backward",
    "local_corr_reference",
    "self_check",
]

#: default budget (bytes) for the temporaries of one chunk of rows in the torch (CPU / fallback) path
#: (:data:`romav2_plugin.runtime.LOCAL_CORR_CHUNK_BYTES`)
DEFAULT_CHUNK_BYTES: int = LOCAL_CORR_CHUNK_BYTES

_KERNEL_SOURCE = "local_corr.cu"
_THREADS = 256  # 8 warps per block, one warp per output pixel
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


# --------------------------------------------------------------------------------------------------------
# shared helpers
def _check_inputs(f_A: Tensor, f_B: Tensor, warp: Tensor, radius: int) -> None:
    if f_A.dim() != 4 or f_B.shape != f_A.shape:
        raise ValueError(
            f"f_A and f_B must both be (B, C, H, W), got {tuple(f_A.shape)} and {tuple(f_B.shape)}"
        )
    B, _, H, W = f_A.shape
    if tuple(warp.shape) != (B, H, W, 2):
        raise ValueError(f"warp must be (B, H, W, 2) = {(B, H, W, 2)}, got {tuple(warp.shape)}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")


# --------------------------------------------------------------------------------------------------------
# NVRTC kernel path, checked against the torch path before first use on each device
#: environment variable choosing the implementation on CUDA devices (see :func:`kernel_mode`)
MODE_ENV = "ROMAV2_LOCAL_CORR"
_MODES = ("auto", "cuda", "torch")

#: self-check problem (B, C, H, W, r): C > 256 spans two register chunks of the kernel and a partial one;
#: H != W; warps up to 1.3 put some windows partly or fully outside the image
SELF_CHECK_SHAPE = (2, 260, 5, 7, 2)
#: largest accepted ``max|kernel - torch| / max|torch|`` per output dtype (fp32 accumulation order differs;
#: gradients are returned in the input dtype, i.e. rounded to fp16 / bf16)
SELF_CHECK_TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}

_state_lock = threading.Lock()
_device_path: dict[str, str] = {}  # device key -> "cuda" | "torch" (decided once per device in "auto")
_device_kernels: dict[str, object] = {}  # device key -> kernels runtime module


def kernel_mode() -> str:
    """``$ROMAV2_LOCAL_CORR``: ``auto`` (default: the NVRTC kernel after it passed its self-check on the
    device, else the torch path), ``cuda`` (the kernel, no self-check, errors raised) or ``torch``."""
    mode = os.environ.get(MODE_ENV, "").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(
            f"{MODE_ENV}={os.environ.get(MODE_ENV)!r} is not one of {', '.join(_MODES)}; set one of them or unset it."
        )
    return mode


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _device_index(device: torch.device) -> int:
    if device.type != "cuda":
        return -1  # only reached with an injected launcher (tests drive the CUDA path on CPU tensors)
    return device.index if device.index is not None else torch.cuda.current_device()


def _load_kernels(device: torch.device):
    """Compile (or read from the disk cache) and load every entry point for ``device``; returns the
    ``romav2_plugin.kernels`` runtime. Raises ``ImportError`` / ``RuntimeError`` / ``OSError``."""
    from romav2_plugin import kernels

    idx = _device_index(device)
    for sfx in _SUFFIX.values():
        for op in ("local_corr_fwd", "local_corr_bwd"):
            kernels.get_function(_KERNEL_SOURCE, f"rv2_{op}_{sfx}", idx)
    return kernels


def _kernel_dtype(*ts: Tensor) -> torch.dtype | None:
    dts = {t.dtype for t in ts}
    if len(dts) == 1 and next(iter(dts)) in _SUFFIX:
        return next(iter(dts))
    if dts <= set(_SUFFIX):
        return torch.float32
    return None  # float64 etc.: torch path


def _launch(kernels, name: str, n_pix: int, args, device: torch.device) -> None:
    c_int = ctypes.c_int
    warps = _THREADS // 32
    grid = ((n_pix + warps - 1) // warps, 1, 1)
    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        kernels.launch(
            _KERNEL_SOURCE,
            name,
            grid,
            (_THREADS, 1, 1),
            [a if isinstance(a, tuple) else (a, c_int) for a in args],
            device_index=_device_index(device),
        )


def _kernel_forward(kernels, f_A: Tensor, f_B: Tensor, warp: Tensor, radius: int, kdt: torch.dtype) -> Tensor:
    """The NVRTC forward: channels-last inputs in ``kdt``, ``(B, K, H, W)`` float32 output."""
    B, C, H, W = f_A.shape
    K = (2 * radius + 1) ** 2
    a = f_A.to(kdt).permute(0, 2, 3, 1).contiguous()  # (B, H, W, C): free when f_A is channels-last
    bb = f_B.to(kdt).permute(0, 2, 3, 1).contiguous()
    w = warp.to(torch.float32).contiguous()
    out = torch.empty((B, K, H, W), device=f_A.device, dtype=torch.float32)
    if out.numel():
        _launch(
            kernels,
            f"rv2_local_corr_fwd_{_SUFFIX[kdt]}",
            B * H * W,
            [kernels.ptr(a), kernels.ptr(bb), kernels.ptr(w), kernels.ptr(out), B, H, W, C, radius],
            f_A.device,
        )
    return out


def _kernel_backward(
    kernels,
    grad: Tensor,
    f_A: Tensor,
    f_B: Tensor,
    warp: Tensor,
    radius: int,
    kdt: torch.dtype,
    need_a: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor]:
    """The NVRTC backward: ``(g_A, g_B)`` in the inputs' dtypes (empty where not needed)."""
    B, C, H, W = f_A.shape
    a = f_A.to(kdt).permute(0, 2, 3, 1).contiguous()
    bb = f_B.to(kdt).permute(0, 2, 3, 1).contiguous()
    w = warp.to(torch.float32).contiguous()
    g = grad.to(torch.float32).contiguous()
    g_A = torch.empty((B, H, W, C), device=f_A.device, dtype=torch.float32) if need_a else None
    g_B = torch.zeros((B, H, W, C), device=f_A.device, dtype=torch.float32) if need_b else None
    if (need_a or need_b) and a.numel():
        _launch(
            kernels,
            f"rv2_local_corr_bwd_{_SUFFIX[kdt]}",
            B * H * W,
            [
                *(kernels.ptr(t) for t in (g, a, bb, w, g_A, g_B)),
                B,
                H,
                W,
                C,
                radius,
            ],
            f_A.device,
        )
    empty = f_A.new_empty((0,))
    return (
        g_A.permute(0, 3, 1, 2).to(f_A.dtype, memory_format=torch.contiguous_format) if need_a else empty,
        g_B.permute(0, 3, 1, 2).to(f_B.dtype, memory_format=torch.contiguous_format) if need_b else empty,
    )


_rel_err = _tune.rel_err  # max|x - ref| / max|ref| (inf for NaN/inf or a shape mismatch)


def self_check(kernels, device: torch.device) -> list[str]:
    """Run the kernels once on a small seeded problem on ``device`` against the torch path: the forward
    and both backward outputs, for fp32, fp16 and bf16 inputs. Returns the failures (empty: all agree);
    launch errors propagate."""
    B, C, H, W, r = SELF_CHECK_SHAPE
    K = (2 * r + 1) ** 2
    gen = torch.Generator().manual_seed(0)
    f_A = torch.randn(B, C, H, W, generator=gen)
    f_B = torch.randn(B, C, H, W, generator=gen)
    warp = (torch.rand(B, H, W, 2, generator=gen) * 2 - 1) * 1.3
    grad = torch.randn(B, K, H, W, generator=gen)
    warp, grad = warp.to(device), grad.to(device)
    failures = []
    for dt in _SUFFIX:
        a, b = f_A.to(device, dt), f_B.to(device, dt)
        got = (
            _kernel_forward(kernels, a, b, warp, r, dt),
            *_kernel_backward(kernels, grad, a, b, warp, r, dt, True, True),
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # asynchronous launch errors surface here
        want = (
            _local_corr_torch(a, b, warp, r, DEFAULT_CHUNK_BYTES),
            *_local_corr_backward_torch(grad, a, b, warp, r, DEFAULT_CHUNK_BYTES, True, True),
        )
        for what, x, ref in zip(("forward", "grad f_A", "grad f_B"), got, want):
            err, tol = _rel_err(x, ref), SELF_CHECK_TOL[ref.dtype]
            if not err <= tol:
                failures.append(f"{what} {str(dt).removeprefix('torch.')}: max rel error {err:.2e} > {tol:.0e}")
    return failures


def _reference(f_A: Tensor, f_B: Tensor, warp: Tensor, radius: int) -> Tensor:
    return _local_corr_torch(f_A, f_B, warp, radius, DEFAULT_CHUNK_BYTES)


_SELF_CHECK = _tune.SelfCheck(_reference, SELF_CHECK_SHAPE, SELF_CHECK_TOL)


def _kernels_for(device: torch.device):
    """The kernels runtime to use on ``device``, or ``None`` for the torch path.

    ``auto``: the first call for a device loads the kernels and runs :func:`self_check`; on a load or
    launch error or a mismatch it warns once with the figures and the device uses the torch path from then
    on. ``cuda``: the kernels without a check (errors are raised). ``torch``: always ``None``.
    """
    mode = kernel_mode()
    if mode == "torch":
        return None
    if mode == "cuda":
        return _load_kernels(device)
    key = _device_key(device)
    path = _device_path.get(key)
    if path is not None:
        return _device_kernels.get(key) if path == "cuda" else None
    with _state_lock:
        if key in _device_path:
            return _device_kernels.get(key) if _device_path[key] == "cuda" else None
        problem = None
        try:
            kernels = _load_kernels(device)
        except (ImportError, RuntimeError, OSError) as exc:
            problem = f"the kernel is unavailable ({exc})"
        else:
            try:
                failures = self_check(kernels, device)
            except (RuntimeError, OSError, ValueError) as exc:
                problem = f"its self-check launch failed ({type(exc).__name__}: {exc})"
            else:
                if failures:
                    problem = "its self-check disagrees with the torch path: " + "; ".join(failures)
        if problem is None:
            _device_kernels[key] = kernels
            _device_path[key] = "cuda"
            return kernels
        _device_path[key] = "torch"
    warnings.warn(
        f"romav2_plugin: NVRTC local-correlation kernel not used on {key}: {problem}. Falling back to the "
        f"chunked torch implementation on this device (same results, more memory); {MODE_ENV}=torch silences "
        f"this, {MODE_ENV}=cuda forces the kernel.",
        RuntimeWarning,
        stacklevel=4,
    )
    return None


def _local_corr_cuda(f_A: Tensor, f_B: Tensor, warp: Tensor, radius: int, chunk_bytes: int) -> Tensor:
    kdt = _kernel_dtype(f_A, f_B)
    kernels = _kernels_for(f_A.device) if kdt is not None else None
    if kernels is None:
        return _local_corr_torch(f_A, f_B, warp, radius, chunk_bytes)
    if f_A.device.type == "cuda" and kernel_mode() == "auto":  # run-time specialisation, autotuned tile
        out = _tune.specialised_forward(kernels, f_A, f_B, warp, radius, kdt, _SELF_CHECK)
        if out is not None:
            return out
    return _kernel_forward(kernels, f_A, f_B, warp, radius, kdt)


def _local_corr_backward_cuda(
    grad: Tensor,
    f_A: Tensor,
    f_B: Tensor,
    warp: Tensor,
    radius: int,
    chunk_bytes: int,
    need_a: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor]:
    kdt = _kernel_dtype(f_A, f_B)
    kernels = _kernels_for(f_A.device) if kdt is not None else None
    if kernels is None:
        return _local_corr_backward_torch(grad, f_A, f_B, warp, radius, chunk_bytes, need_a, need_b)
    return _kernel_backward(kernels, grad, f_A, f_B, warp, radius, kdt, need_a, need_b)


# --------------------------------------------------------------------------------------------------------
# torch.library registration
@torch.library.custom_op("romav2_plugin::local_corr", mutates_args=())
def _local_corr_op(f_A: Tensor, f_B: Tensor, warp: Tensor, radius: int, chunk_bytes: int) -> Tensor:
    return _local_corr_torch(f_A, f_B, warp, radius, chunk_bytes)


@torch.library.custom_op("romav2_plugin::local_corr_backward", mutates_args=())
def _local_corr_backward_op(
    grad: Tensor,
    f_A: Tensor,
    f_B: Tensor,
    warp: Tensor,
    radius: int,
    chunk_bytes: int,
    need_a: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor]:
    return _local_corr_backward_torch(grad, f_A, f_B, warp, radius, chunk_bytes, need_a, need_b)


_local_corr_op.register_kernel("cuda")(_local_corr_cuda)
_local_corr_backward_op.register_kernel("cuda")(_local_corr_backward_cuda)


@_local_corr_op.register_fake
def _(f_A, f_B, warp, radius, chunk_bytes):
    B, _, H, W = f_A.shape
    return f_A.new_empty((B, (2 * radius + 1) ** 2, H, W), dtype=_compute_dtype(f_A, f_B, warp))


@_local_corr_backward_op.register_fake
def _(grad, f_A, f_B, warp, radius, chunk_bytes, need_a, need_b):
    return (
        f_A.new_empty(f_A.shape) if need_a else f_A.new_empty((0,)),
        f_B.new_empty(f_B.shape) if need_b else f_A.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    f_A, f_B, warp, radius, chunk_bytes = inputs
    ctx.save_for_backward(f_A, f_B, warp)
    ctx.radius = radius
    ctx.chunk_bytes = chunk_bytes


def _backward(ctx, grad):
    f_A, f_B, warp = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_a or need_b):
        return None, None, None, None, None
    g_A, g_B = _local_corr_backward_op(grad, f_A, f_B, warp, ctx.radius, ctx.chunk_bytes, need_a, need_b)
    return (g_A if need_a else None), (g_B if need_b else None), None, None, None


_local_corr_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------
# public API
def local_corr(
    f_A: Tensor, f_B: Tensor, warp: Tensor, radius: int, *, chunk_bytes: int | None = None
) -> Tensor:
    """Local correlation of the RoMa v2 refiner.

    Args:
        f_A: ``(B, C, H, W)`` features of image A (float32; fp16 / bf16 accepted on CUDA).
        f_B: ``(B, C, H, W)`` features of image B, same shape and device as ``f_A``.
        warp: ``(B, H, W, 2)`` normalized ``[-1, 1]`` (x, y) positions in B of every pixel of A. Receives no
            gradient (the official refiner detaches it).
        radius: window radius ``r``; the window has ``K = (2r + 1) ** 2`` offsets, ``k = i * (2r + 1) + j``.
        chunk_bytes: temporaries budget of the chunked torch path (CPU / fallback); default
            :data:`DEFAULT_CHUNK_BYTES`. Ignored by the CUDA kernel, which needs no temporaries.

    Returns:
        ``(B, K, H, W)`` float32 (float64 if an input is float64). The official ``native_torch_local_corr``
        returns ``f_A.dtype`` and the official fused ``local_corr`` path float32; the two agree for the
        float32 features the refiner feeds it.
    """
    _check_inputs(f_A, f_B, warp, radius)
    cb = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    if torch.compiler.is_exporting():
        return local_corr_reference(f_A, f_B, warp.detach(), int(radius), chunk_bytes=cb)
    return _local_corr_op(f_A, f_B, warp.detach(), int(radius), cb)


def local_corr_reference(
    f_A: Tensor, f_B: Tensor, warp: Tensor, radius: int, *, chunk_bytes: int | None = None
) -> Tensor:
    """:func:`local_corr` in standard operators only (``grid_sample``, multiply, sum, ``cat``).

    Used while exporting (the custom op cannot be exported). Rows are processed in chunks whose
    ``grid_sample`` temporaries stay under ``chunk_bytes`` (default :data:`DEFAULT_CHUNK_BYTES`), all batch
    elements at once; with fixed shapes the chunks become separate graph nodes, so an exported graph never
    materialises the whole ``(B, C, H, W, K)`` window either. Shapes and dtype as in :func:`local_corr`.
    """
    B, C, H, W = f_A.shape
    K = (2 * radius + 1) ** 2
    dt = _compute_dtype(f_A, f_B, warp)
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    rows = max(1, _rows_per_chunk(C, W, K, torch.finfo(dt).bits // 8, budget) // B)
    window = _window(radius, H, W, f_A.device, dt)
    f_B = f_B.to(dt)
    outs = [
        _corr_rows(f_A[:, :, y0 : y0 + rows], f_B, warp[:, y0 : y0 + rows], window, dt) for y0 in range(0, H, rows)
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def local_corr_backward(
    grad: Tensor, f_A: Tensor, f_B: Tensor, warp: Tensor, radius: int, *, chunk_bytes: int | None = None
) -> tuple[Tensor, Tensor]:
    """Gradients ``(dL/df_A, dL/df_B)``, each ``(B, C, H, W)``, of :func:`local_corr` for an upstream
    ``grad`` of shape ``(B, K, H, W)``; ``warp`` is ``(B, H, W, 2)`` normalized ``[-1, 1]``."""
    _check_inputs(f_A, f_B, warp, radius)
    cb = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    return _local_corr_backward_op(grad, f_A, f_B, warp.detach(), int(radius), cb, True, True)
