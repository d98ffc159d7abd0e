"""NVRTC runtime for the plugin's CUDA kernels (installed as ``romav2_plugin.kernels``).

The ``.cu`` sources next to this file are compiled at run time with NVRTC (``cuda.bindings.nvrtc``) for the
device's ``sm_XY``, the cubin (or PTX when NVRTC cannot emit a cubin for that architecture) is cached on disk
in ``~/.cache/romav2_plugin`` (``$ROMAV2_PLUGIN_CACHE`` if set and not empty, ``~`` expanded), keyed by the
source hash, the architecture, the compile options and the NVRTC version, and loaded once per process and
device with the CUDA driver API (``cuModuleLoadData``). Kernels are launched on torch's current CUDA stream.

Everything that touches cuda-python is imported lazily inside functions: importing this module has no side
effects and does not need cuda-python, a driver or a GPU. A missing cuda-python raises an ``ImportError``
naming the pip extra ``romav2-plugin[cuda]``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "KERNELS",
    "CompiledKernel",
    "cache_dir",
    "compile_kernel",
    "device_arch",
    "get_function",
    "launch",
    "read_source",
    "spec_defines",
    "spec_entries",
    "specialisations",
]

_HERE = Path(__file__).resolve().parent

#: source file -> kernel entry points (``extern "C"`` names) it defines
KERNELS: dict[str, tuple[str, ...]] = {
    "local_corr.cu": tuple(
        f"rv2_{op}_{sfx}"
        for sfx in ("f32", "f16", "bf16")
        for op in ("local_corr_fwd", "local_corr_bwd")
    ),
}

#: vector widths (channels per load) of the specialised forward, per element suffix: 4, 8 and 16 bytes
SPEC_VECS: dict[str, tuple[int, ...]] = {"f32": (1, 2, 4), "f16": (2, 4, 8), "bf16": (2, 4, 8)}
#: threads per output pixel of the specialised forward
SPEC_LANES: tuple[int, ...] = (4, 8, 16, 32)


def spec_defines(channels: int, radius: int) -> tuple[str, ...]:
    """NVRTC ``-D`` options of the ``local_corr.cu`` forward specialised for ``channels`` and ``radius``."""
    if channels < 1 or radius < 0:
        raise ValueError(f"a specialisation needs channels >= 1 and radius >= 0, got {channels}, {radius}")
    return (f"-DRV2_SPEC_C={int(channels)}", f"-DRV2_SPEC_R={int(radius)}")


def spec_entries(channels: int, sfx: str | None = None) -> tuple[str, ...]:
    """Entry points a specialisation for ``channels`` defines (one per element type, lane count and vector
    width dividing ``channels``): ``rv2_lc_fwd_<sfx>_l<LANES>_v<VEC>``; only ``sfx`` when given."""
    return tuple(
        f"rv2_lc_fwd_{s}_l{lanes}_v{vec}"
        for s, vecs in SPEC_VECS.items()
        if sfx is None or s == sfx
        for vec in vecs
        if channels % vec == 0
        for lanes in SPEC_LANES
    )


def specialisations() -> tuple[tuple[int, int], ...]:
    """``(channels, radius)`` of every local correlation of the shipped architectures (official, tiny):
    the specialisations ``python -m romav2_plugin.kernels --check`` compiles."""
    from romav2_plugin.config import ARCHITECTURES

    out = []
    for make in ARCHITECTURES.values():
        for r in make().refiners:
            if r.local_corr_radius is not None and (r.proj_dim, r.local_corr_radius) not in out:
                out.append((r.proj_dim, r.local_corr_radius))
    return tuple(out)


#: NVRTC options used for every compile (no fast math: parity with torch's grid_sample matters)
COMPILE_OPTIONS: tuple[str, ...] = ("-std=c++17", "--fmad=true", "-default-device")

_INSTALL_HINT = (
    "the CUDA kernels need cuda-python (cuda.bindings); install it with `pip install 'romav2-plugin[cuda]'`"
)

_lock = threading.Lock()
_modules: dict[tuple[str, tuple[str, ...], int], Any] = {}  # (source, defines, device index) -> CUmodule
_functions: dict[tuple[str, tuple[str, ...], str, int], Any] = {}  # (source, defines, kernel, device) -> CUfunction
_contexts: dict[int, Any] = {}  # device index -> primary CUcontext


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from exc
    return nvrtc


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from exc
    return driver


def _check_nvrtc(result, what: str):
    nvrtc = _nvrtc()
    err, *rest = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, msg = nvrtc.nvrtcGetErrorString(err)
        raise RuntimeError(f"NVRTC {what} failed: {err.name}: {msg.decode(errors='replace')}")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


def _check_cu(result, what: str):
    driver = _driver()
    err, *rest = result
    if err != driver.CUresult.CUDA_SUCCESS:
        try:
            _, msg = driver.cuGetErrorString(err)
            msg = msg.decode(errors="replace") if msg else ""
        except Exception:  # noqa: BLE001 - best effort message
            msg = ""
        raise RuntimeError(f"CUDA driver call {what} failed: {getattr(err, 'name', err)}: {msg}")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


def nvrtc_version() -> tuple[int, int]:
    """NVRTC ``(major, minor)``."""
    return tuple(_check_nvrtc(_nvrtc().nvrtcVersion(), "nvrtcVersion"))  # type: ignore[return-value]


def supported_archs() -> list[int]:
    """SM numbers (e.g. ``[75, 80, ..., 120]``) this NVRTC can emit cubins for."""
    return [int(a) for a in _check_nvrtc(_nvrtc().nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")]


def cache_dir() -> Path:
    """Directory of the on-disk cubin/PTX cache: :func:`romav2_plugin.cache.cache_dir` (``$ROMAV2_PLUGIN_CACHE``,
    ``~`` expanded, empty = unset; default ``~/.cache/romav2_plugin``)."""
    from romav2_plugin.cache import cache_dir as _shared_cache_dir

    return _shared_cache_dir()


def read_source(name: str) -> str:
    """Text of the kernel source ``name`` (e.g. ``"local_corr.cu"``) shipped with this package."""
    return (_HERE / name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class CompiledKernel:
    """A compiled kernel image: ``kind`` is ``"cubin"`` or ``"ptx"``; ``log`` is the NVRTC log."""

    source: str
    arch: str
    kind: str
    image: bytes
    log: str
    from_cache: bool = False


def _compile_uncached(name: str, arch: str, options: tuple[str, ...], source: str | None = None) -> tuple[str, bytes, str]:
    nvrtc = _nvrtc()
    src = (read_source(name) if source is None else source).encode()
    prog = _check_nvrtc(nvrtc.nvrtcCreateProgram(src, name.encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in (*options, f"--gpu-architecture={arch}")]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        size = _check_nvrtc(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        buf = b" " * size
        _check_nvrtc(nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = buf.rstrip(b"\x00").decode(errors="replace").strip()
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC failed to compile {name} for {arch} ({err.name}):\n{log}")
        size = _check_nvrtc(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        if size:
            image = b" " * size
            _check_nvrtc(nvrtc.nvrtcGetCUBIN(prog, image), "nvrtcGetCUBIN")
            return "cubin", image, log
        size = _check_nvrtc(nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
        image = b" " * size
        _check_nvrtc(nvrtc.nvrtcGetPTX(prog, image), "nvrtcGetPTX")
        return "ptx", image, log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


_CHILD = """
import json, sys
req = json.loads(sys.stdin.read())
from romav2_plugin.kernels import _compile_uncached
try:
    kind, image, log = _compile_uncached(req["name"], req["arch"], tuple(req["options"]), req["source"])
except RuntimeError as e:
    print(json.dumps({"error": str(e)}))
    sys.exit(0)
open(req["out"], "wb").write(image)
print(json.dumps({"kind": kind, "log": log}))
"""


def _compile_isolated(name: str, arch: str, options: tuple[str, ...], source: str) -> tuple[str, bytes, str]:
    """Run NVRTC in a child process.

    Compiling with NVRTC inside the torch process leaves it unable to ``torch.load`` zip checkpoints
    afterwards ("record size ... does not match expected size"; seen with NVRTC 13.0 and torch 2.14), so
    the compiler runs in a short-lived child and only the cubin/PTX bytes come back (loading them with the
    driver API is unaffected).
    """
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "image.bin"
        req = {"name": name, "arch": arch, "options": list(options), "source": source, "out": str(out)}
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD], input=json.dumps(req), capture_output=True, text=True, check=False
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"NVRTC compiler process failed for {name} ({arch}):\n{proc.stderr[-4000:]}")
        res = json.loads(lines[-1])
        if "error" in res:
            raise RuntimeError(res["error"])
        return res["kind"], out.read_bytes(), res["log"]


def source_key(name: str, defines: tuple[str, ...] = ()) -> str:
    """Hash of a kernel source, its compile options and ``defines``: part of every cache key, so an edited
    kernel is never served from a stale cache (the compiled images and the autotuner's choices)."""
    return hashlib.sha256("\0".join([read_source(name), *COMPILE_OPTIONS, *defines]).encode()).hexdigest()[:16]


def compile_kernel(name: str, arch: str, *, use_cache: bool = True, defines: tuple[str, ...] = ()) -> CompiledKernel:
    """Compile the source ``name`` for ``arch`` (``"sm_90"``, or ``"compute_90"`` for PTX only), with the
    extra NVRTC options ``defines`` (e.g. :func:`spec_defines`: a run-time specialisation).

    The result is cached on disk (see :func:`cache_dir`). Raises ``RuntimeError`` with the NVRTC log when the
    compile fails and ``ImportError`` when cuda-python is missing.
    """
    ver = nvrtc_version()
    src = read_source(name)
    options = (*COMPILE_OPTIONS, *defines)
    key = hashlib.sha256(
        "\0".join([src, arch, " ".join(options), f"nvrtc{ver[0]}.{ver[1]}"]).encode()
    ).hexdigest()[:32]
    spec = "".join("-" + d.split("=", 1)[-1] for d in defines if d.startswith("-D"))
    stem = f"{Path(name).stem}{spec}-{arch}-nvrtc{ver[0]}{ver[1]}-{key}"
    cdir = cache_dir()
    if use_cache:
        for kind in ("cubin", "ptx"):
            path = cdir / f"{stem}.{kind}"
            if path.is_file():
                return CompiledKernel(name, arch, kind, path.read_bytes(), "", from_cache=True)
    kind, image, log = _compile_isolated(name, arch, options, src)
    if use_cache:
        try:
            cdir.mkdir(parents=True, exist_ok=True)
            tmp = cdir / f".{stem}.{os.getpid()}.tmp"
            tmp.write_bytes(image)
            os.replace(tmp, cdir / f"{stem}.{kind}")
        except OSError:  # read-only home etc.: the cache is an optimisation only
            pass
    return CompiledKernel(name, arch, kind, image, log)


def device_arch(device_index: int) -> str:
    """NVRTC target for a torch CUDA device: ``sm_XY``, or ``compute_XY`` (PTX, JIT-compiled by the driver)
    with the newest architecture this NVRTC supports when it does not know the device."""
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    sm = major * 10 + minor
    archs = supported_archs()
    if sm in archs:
        return f"sm_{sm}"
    older = [a for a in archs if a <= sm]
    return f"compute_{max(older) if older else min(archs)}"


def _ensure_context(device_index: int) -> None:
    """Make the device's primary context (the one torch's runtime uses) current on this thread."""
    driver = _driver()
    ctx = _contexts.get(device_index)
    if ctx is None:
        import torch

        torch.cuda.init()
        _check_cu(driver.cuInit(0), "cuInit")
        dev = _check_cu(driver.cuDeviceGet(device_index), "cuDeviceGet")
        ctx = _check_cu(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        _contexts[device_index] = ctx
    _check_cu(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


def get_function(source: str, kernel: str, device_index: int, defines: tuple[str, ...] = ()):
    """``CUfunction`` of ``kernel`` from ``source`` compiled with ``defines`` on a CUDA device (compiled, cached
    and loaded once)."""
    defines = tuple(defines)
    fkey = (source, defines, kernel, device_index)
    fn = _functions.get(fkey)
    if fn is not None:
        return fn
    with _lock:
        fn = _functions.get(fkey)
        if fn is not None:
            return fn
        driver = _driver()
        _ensure_context(device_index)
        mkey = (source, defines, device_index)
        module = _modules.get(mkey)
        if module is None:
            compiled = compile_kernel(source, device_arch(device_index), defines=defines)
            image = compiled.image if compiled.kind == "cubin" else compiled.image.rstrip(b"\x00") + b"\x00"
            module = _check_cu(driver.cuModuleLoadData(image), f"cuModuleLoadData({source})")
            _modules[mkey] = module
        fn = _check_cu(driver.cuModuleGetFunction(module, kernel.encode()), f"cuModuleGetFunction({kernel})")
        _functions[fkey] = fn
        return fn


def launch(
    source: str,
    kernel: str,
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    args: list[tuple[Any, type]],
    *,
    device_index: int,
    shared_mem: int = 0,
    defines: tuple[str, ...] = (),
) -> None:
    """Launch ``kernel`` on torch's current stream of ``device_index``.

    ``args`` is a list of ``(value, ctypes_type)``, e.g. ``(tensor.data_ptr(), ctypes.c_void_p)`` or
    ``(n, ctypes.c_int)``. ``defines``: the specialisation the kernel comes from (see :func:`get_function`).
    """
    import torch

    driver = _driver()
    fn = get_function(source, kernel, device_index, tuple(defines))
    _ensure_context(device_index)
    stream = torch.cuda.current_stream(device_index).cuda_stream
    values = tuple(v for v, _ in args)
    types = tuple(t for _, t in args)
    _check_cu(
        driver.cuLaunchKernel(fn, *grid, *block, shared_mem, driver.CUstream(stream), (values, types), 0),
        f"cuLaunchKernel({kernel})",
    )


def ptr(t) -> tuple[int, type]:
    """Kernel argument for a tensor's data pointer (0 for ``None``)."""
    return (0 if t is None else t.data_ptr(), ctypes.c_void_p)
