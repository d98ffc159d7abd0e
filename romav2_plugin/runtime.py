"""Runtime knobs: memory budgets and path choices that change speed or memory, never the numbers.

These are the only settings outside the frozen model configs (:mod:`romav2_plugin.config`). Each is a
module-level default that a single object can override where noted.

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
``$ROMAV2_PLUGIN_CACHE``       cache folder (downloaded weights, compiled kernels); default
                               ``~/.cache/romav2_plugin`` (:func:`romav2_plugin.cache.cache_dir`)
``$ROMAV2_WEIGHTS``            default weights (path or URL) when none are given
=============================  ===========================================================================
"""

from __future__ import annotations

import torch

__all__ = ["MAX_BATCH_PIXELS_CPU", "MAX_BATCH_PIXELS_GPU", "LOCAL_CORR_CHUNK_BYTES", "max_batch_pixels", "check_device"]

#: batching bound on CPU: batching buys nothing there, memory does
MAX_BATCH_PIXELS_CPU: int = 2**17
#: batching bound on GPUs (and other accelerators)
MAX_BATCH_PIXELS_GPU: int = 2**22
#: bytes of temporaries per band of rows in the torch local correlation (about 64 MiB)
LOCAL_CORR_CHUNK_BYTES: int = 64 * 2**20


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
