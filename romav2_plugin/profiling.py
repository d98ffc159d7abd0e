"""Named ranges for ``torch.profiler`` around the model's stages (``romav2.backbone``, ``romav2.matcher``,
``romav2.dpt``, ``romav2.fine_features``, ``romav2.refiner.s<stride>``, ``romav2.sampling``).

:func:`stage` is a ``record_function`` while a profiler is running and a null context otherwise, so the
ranges cost one boolean check per stage when nobody profiles. ``benchmarks/gpu_model.py profile`` reads
them to give each stage's share of a batch.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["stage"]


def _profiling() -> bool:
    try:
        return bool(torch.autograd.profiler._is_profiler_enabled)
    except AttributeError:  # pragma: no cover - older / newer torch without the flag
        return False


def stage(name: str):
    """``torch.profiler.record_function(name)`` while profiling, else ``contextlib.nullcontext()``."""
    return torch.profiler.record_function(name) if _profiling() else contextlib.nullcontext()
