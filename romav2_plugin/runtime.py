"""Runtime knobs: memory budgets, path and precision choices that change speed or memory.

These are the only settings outside the frozen model configs (:mod:`romav2_plugin.config`). Each is a
module-level default that a single object can override where noted. All but ``$ROMAV2_CPU_BF16`` leave
the numbers unchanged; that one picks the default precision (bf16 autocast or fp32) on the CPU.

=============================  ===========================================================================
knob                           effect
=============================  ===========================================================================
:data:`MAX_BATCH_PIXELS_CPU`   the fine-feature CNN and the refiners process at most this many pixels per
:data:`MAX_BATCH_PIXELS_GPU`   call (images / directions are batched up to it, run one by one above it).
                               Per model: ``model.max_batch_pixels = N`` (``None``: these defaults).
                               Lower it if high resolutions do not fit; raise it for GPU throughput.
:data:`LOCAL_CORR_CHUNK_BYTES`  budget of the temporaries of one band of rows in the torch (CPU / fallback)
                               local correlation, forward and backward. Per call: ``chunk_bytes=``.
``$ROMAV2_LOCAL_CORR``         ``auto`` (default: the NVRTC kernel on CUDA after a self-check, else torch),
                               ``cuda`` (the kernel, unchecked) or ``torch``
:data:`LOCAL_CORR_AUTOTUNE`   on CUDA, time the tiles of the specialised local-correlation kernel on first
                               use per GPU, shape and dtype and cache the choice
                               (:mod:`romav2_plugin.ops.local_corr_tune`); ``$ROMAV2_LOCAL_CORR_AUTOTUNE=0``
                               (or the constant ``False``): a fixed default tile, still checked
:data:`CHANNELS_LAST_CUDA`    on CUDA, run the fine-feature CNN and the refiners' convolutions channels-last;
``$ROMAV2_CHANNELS_LAST``      opt-in (default off), to be measured: ``benchmarks/gpu_model.py levers``
``$ROMAV2_PLUGIN_CACHE``       cache folder (downloaded weights, compiled kernels); default
                               ``~/.cache/romav2_plugin`` (:func:`romav2_plugin.cache.cache_dir`)
``$ROMAV2_WEIGHTS``            default weights (path or URL) when none are given
``$ROMAV2_CPU_BF16``           what ``amp=None`` (the default of the model, the commands, the kornia and
                               hloc confs) means on the CPU (:func:`amp_default`): ``auto`` (default: bf16
                               autocast when the CPU runs bf16 natively, see :func:`native_cpu_bf16`),
                               ``1`` (bf16 autocast on any CPU; emulated, i.e. very slow, without native
                               support) or ``0`` (fp32). ``amp=True/False`` on the model wins over it.
=============================  ===========================================================================

**Default precision** (:func:`amp_default`, used wherever ``amp`` is ``None``): bf16 autocast, placed
where the official code places it on CUDA, on CUDA devices and on CPUs with native bf16 instructions; fp32
elsewhere (other CPUs, MPS, ...). Native bf16 is what PyTorch's own CPU capability checks report
(``torch.cpu._is_avx512_bf16_supported()``: AVX512-BF16, e.g. AMD Zen 4 and later, Intel Cooper Lake and
Sapphire Rapids; ``torch.cpu._is_amx_tile_supported()``: Intel AMX); where a PyTorch lacks these private
functions the answer is "no". On other CPUs bf16 is emulated in fp32 and rounded, several times slower than
fp32, so the default stays fp32 there. Check a machine with ``python -c "from romav2_plugin import runtime;
print(runtime.native_cpu_bf16(), runtime.amp_default('cpu'))"``.
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "MAX_BATCH_PIXELS_CPU",
    "MAX_BATCH_PIXELS_GPU",
    "LOCAL_CORR_CHUNK_BYTES",
    "CHANNELS_LAST_CUDA",
    "LOCAL_CORR_AUTOTUNE",
    "channels_last_cuda",
    "amp_default",
    "local_corr_autotune",
    "check_device",
    "max_batch_pixels",
    "native_cpu_bf16",
]

#: batching bound on CPU: batching buys nothing there, memory does
MAX_BATCH_PIXELS_CPU: int = 2**17
#: batching bound on GPUs (and other accelerators)
MAX_BATCH_PIXELS_GPU: int = 2**22
#: bytes of temporaries per band of rows in the torch local correlation (about 64 MiB)
LOCAL_CORR_CHUNK_BYTES: int = 64 * 2**20
#: autotune the specialised local-correlation kernel's tiles on CUDA (``$ROMAV2_LOCAL_CORR_AUTOTUNE`` wins)
LOCAL_CORR_AUTOTUNE: bool = True


#: channels-last convolutions in the fine features and refiners on CUDA (``$ROMAV2_CHANNELS_LAST`` wins)
CHANNELS_LAST_CUDA: bool = False


def channels_last_cuda() -> bool:
    """Whether CUDA models move their fine-feature CNN and refiners to channels-last: ``$ROMAV2_CHANNELS_LAST``
    (``1`` / ``0``) if set and not empty, else :data:`CHANNELS_LAST_CUDA`. Read at each forward."""
    return _env_switch("ROMAV2_CHANNELS_LAST", CHANNELS_LAST_CUDA, "1 (channels-last on CUDA) or 0 (off, the default)")


def local_corr_autotune() -> bool:
    """Whether to autotune the specialised local-correlation kernel: ``$ROMAV2_LOCAL_CORR_AUTOTUNE`` (``1`` /
    ``0``, also on/off/true/false) if set and not empty, else :data:`LOCAL_CORR_AUTOTUNE`. Read at each call."""
    return _env_switch(
        "ROMAV2_LOCAL_CORR_AUTOTUNE", LOCAL_CORR_AUTOTUNE, "1 (autotune, the default) or 0 (a fixed default tile)"
    )


def _env_switch(name: str, default: bool, choices: str) -> bool:
    """An on/off environment variable: ``1``/``on``/``true`` or ``0``/``off``/``false`` (any case); unset or
    empty gives ``default``; anything else is a ``ValueError`` naming the variable and ``choices``."""
    raw = os.environ.get(name, "")
    key = raw.strip().lower()
    if not key:
        return bool(default)
    if key in _CPU_BF16_ON or key in _CPU_BF16_OFF:
        return key in _CPU_BF16_ON
    raise ValueError(f"${name}={raw!r}: use {choices}")


def max_batch_pixels(device: torch.device, override: int | None = None) -> int:
    """The batching bound for ``device`` (``override`` wins when given)."""
    if override is not None:
        return int(override)
    return MAX_BATCH_PIXELS_CPU if device.type == "cpu" else MAX_BATCH_PIXELS_GPU


def check_device(name: str, *, here: bool = True) -> torch.device:
    """``torch.device(name)`` for a device that can run the model, else ``ValueError`` naming what is wrong:
    not a device string, ``meta`` (shapes only, no data), or (``here=True``) a device type this PyTorch
    build / machine lacks (``xpu`` without an XPU, ``cuda:9``...). ``here=False`` checks the string only
    (a device that exists on other machines, e.g. Ray workers)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{name!r} is not a device torch knows ({e}); use cpu, cuda, cuda:N or mps") from None
    if dev.type == "meta":
        raise ValueError("meta holds no data (shapes only) and cannot run the model; use cpu, cuda or mps")
    if not here or dev.type == "cpu":
        return dev
    if dev.type == "mps":
        ok = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
        count = 1 if ok else 0
    else:
        mod = getattr(torch, dev.type, None)
        ok = bool(mod is not None and callable(getattr(mod, "is_available", None)) and mod.is_available())
        count = mod.device_count() if ok and callable(getattr(mod, "device_count", None)) else (1 if ok else 0)
    if not ok:
        raise ValueError(f"{dev.type} is not available in this PyTorch installation / machine; use cpu")
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"only {count} {dev.type} device(s) present")
    return dev


def native_cpu_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (AVX512-BF16 or AMX), as PyTorch reports it.

    ``False`` where this PyTorch has neither private check (older releases) or a check fails."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, name, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # a capability probe must never break model construction
            pass
    return False


#: accepted values of ``$ROMAV2_CPU_BF16`` (case-insensitive) besides ``auto`` / empty
_CPU_BF16_ON, _CPU_BF16_OFF = ("1", "on", "true"), ("0", "off", "false")


def amp_default(device: torch.device | str) -> bool:
    """What ``amp=None`` means for ``device``: bf16 autocast on CUDA, and on the CPU when it runs bf16
    natively (:func:`native_cpu_bf16`) unless ``$ROMAV2_CPU_BF16`` says otherwise (``auto``, ``1``, ``0``);
    fp32 on every other device. Read at each call, so the variable can change between calls."""
    kind = torch.device(device).type
    if kind == "cuda":
        return True
    if kind != "cpu":
        return False
    raw = os.environ.get("ROMAV2_CPU_BF16", "auto")
    key = raw.strip().lower()
    if key in _CPU_BF16_ON or key in _CPU_BF16_OFF:
        return key in _CPU_BF16_ON
    if key not in ("auto", ""):
        raise ValueError(f"$ROMAV2_CPU_BF16={raw!r}: use auto (the default), 1 (bf16 on the CPU) or 0 (fp32)")
    return native_cpu_bf16()
