"""Run-time specialised local-correlation forward on CUDA, with a tile autotuner.

The forward of ``kernels/local_corr.cu`` is compiled through NVRTC per ``(channels, radius)`` with both as
compile-time constants (:func:`romav2_plugin.kernels.spec_defines`); the element type (fp32 / fp16 / bf16) is
a template parameter, and so is the tile: ``lanes`` threads per output pixel and ``vec`` channels per vector
load; the block size ``threads`` is chosen at launch. :func:`candidates` lists the tiles that fit a problem.

On first use per (GPU name, shape, dtype) :func:`autotune` runs every candidate once on the self-check
problem against the torch path (:func:`romav2_plugin.ops.local_corr.self_check`'s inputs and tolerance,
passed in as a :class:`SelfCheck`); only
a candidate that passes may be timed, and the fastest passing one is chosen. The choice, the timings and the
rejections are written to ``local_corr_autotune.json`` in the compiled-kernel cache folder
(:func:`romav2_plugin.kernels.cache_dir`), keyed with the kernel source's hash, so the next process reads it
instead of tuning. ``$ROMAV2_LOCAL_CORR_AUTOTUNE=0`` (:func:`romav2_plugin.runtime.local_corr_autotune`)
skips the timing: the heuristic :func:`default_tile` is used, after the same check. Where no candidate
passes (or a specialisation cannot be compiled) the generic, self-checked kernel runs instead.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["CACHE_FILE", "SelfCheck", "Tile", "autotune", "candidates", "default_tile", "rel_err", "specialised_forward"]

#: the autotuner's cache, next to the compiled kernels
CACHE_FILE = "local_corr_autotune.json"
#: block sizes tried (threads per block; a multiple of 32, at most the kernel's launch bound of 256)
THREADS: tuple[int, ...] = (128, 256)
#: largest number of A-vector values a lane keeps in registers
MAX_REGS = 64
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Tile:
    """One launch configuration of the specialised forward: ``lanes`` threads per pixel, ``vec`` channels
    per load, ``threads`` per block."""

    lanes: int
    vec: int
    threads: int

    @property
    def name(self) -> str:
        return f"l{self.lanes}_v{self.vec}_t{self.threads}"

    def entry(self, sfx: str) -> str:
        return f"rv2_lc_fwd_{sfx}_l{self.lanes}_v{self.vec}"

    @classmethod
    def parse(cls, name: str) -> Tile:
        lanes, vec, threads = (int(p[1:]) for p in name.split("_"))
        return cls(lanes, vec, threads)


def candidates(channels: int, sfx: str) -> list[Tile]:
    """The tiles worth trying for ``channels`` and element suffix ``sfx``: the vector width divides the
    channels, a lane holds at most :data:`MAX_REGS` values, and one load step (``lanes * vec``) does not
    exceed the channels (idle lanes). Empty when none fits (very few or odd channels in 16 bits)."""
    from romav2_plugin.kernels import SPEC_LANES, SPEC_VECS

    out = []
    for vec in SPEC_VECS[sfx]:
        if channels % vec:
            continue
        for lanes in SPEC_LANES:
            steps = -(-channels // (lanes * vec))
            if lanes * vec > channels or steps * vec > MAX_REGS:
                continue
            out += [Tile(lanes, vec, t) for t in THREADS]
    return out


def default_tile(channels: int, sfx: str) -> Tile | None:
    """The tile used without autotuning: the widest load, then the fewest lanes that keep at most two loads
    per lane (short shuffle reductions, several pixels per warp), 256 threads."""
    cands = [t for t in candidates(channels, sfx) if t.threads == 256]
    if not cands:
        return None
    vec = max(t.vec for t in cands)
    same = sorted((t for t in cands if t.vec == vec), key=lambda t: t.lanes)
    for t in same:
        if -(-channels // (t.lanes * t.vec)) <= 2:
            return t
    return same[-1]


# --------------------------------------------------------------------------------------------------------
# the autotuner (device-agnostic: the check and the timer are passed in)
_file_lock = threading.Lock()


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, key: str, entry: dict) -> None:
    """Merge ``entry`` under ``key`` into the JSON file (atomic replace; a read-only cache is skipped)."""
    with _file_lock:
        data = _read(path)
        data[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError:  # the cache is an optimisation only
            pass


def autotune(
    key: str,
    cands: Sequence[Tile],
    *,
    check: Callable[[Tile], list[str]],
    time_s: Callable[[Tile], float],
    path: Path,
    tune: bool = True,
    default: Tile | None = None,
) -> Tile | None:
    """The tile to use for ``key``: the cached choice if ``path`` has one for ``key`` (among ``cands``), else
    (``tune``) the fastest by ``time_s`` of the candidates whose ``check`` returns no failures, recorded in
    ``path`` with every timing and rejection; ``None`` when none passes. With ``tune=False`` only
    ``default`` is checked (and nothing is written): it, or ``None`` if it fails."""
    names = {t.name: t for t in cands}
    if not tune:
        return default if default is not None and default in cands and not check(default) else None
    hit = _read(path).get(key)
    if isinstance(hit, dict) and "chosen" in hit:
        chosen = hit["chosen"]
        if chosen is None:
            return None
        if chosen in names:
            return names[chosen]
    timings: dict[str, float] = {}
    rejected: dict[str, list[str]] = {}
    for t in cands:
        failures = check(t)
        if failures:
            rejected[t.name] = list(failures)
            continue
        timings[t.name] = float(time_s(t))
    best = min(timings, key=timings.__getitem__) if timings else None
    _write(path, key, {
        "chosen": best,
        "ms": {k: round(v * 1e3, 5) for k, v in timings.items()},
        "rejected": rejected,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    return names[best] if best is not None else None


# --------------------------------------------------------------------------------------------------------
# CUDA: launch, check and time the specialised forward
def _launch(kernels, tile: Tile, sfx: str, defines, a: Tensor, b: Tensor, w: Tensor, out: Tensor) -> None:
    import ctypes

    B, H, W, _ = a.shape
    per_block = tile.threads // tile.lanes
    grid = (-(-B * H * W // per_block), 1, 1)
    c_int = ctypes.c_int
    with torch.cuda.device(a.device):
        kernels.launch(
            "local_corr.cu",
            tile.entry(sfx),
            grid,
            (tile.threads, 1, 1),
            [kernels.ptr(a), kernels.ptr(b), kernels.ptr(w), kernels.ptr(out), (B, c_int), (H, c_int), (W, c_int)],
            device_index=a.device.index if a.device.index is not None else torch.cuda.current_device(),
            defines=defines,
        )


def _aligned(t: Tensor, vec: int) -> Tensor:
    """``t`` itself when its data pointer is aligned for ``vec``-element vector loads, else an aligned copy
    (a contiguous view can start at any element offset; a misaligned vector load is a fatal CUDA error)."""
    return t if t.data_ptr() % (vec * t.element_size()) == 0 else t.clone()


def _run(kernels, tile: Tile, f_A: Tensor, f_B: Tensor, warp: Tensor, radius: int, kdt: torch.dtype) -> Tensor:
    B, C, H, W = f_A.shape
    a = _aligned(f_A.to(kdt).permute(0, 2, 3, 1).contiguous(), tile.vec)  # (B, H, W, C)
    b = _aligned(f_B.to(kdt).permute(0, 2, 3, 1).contiguous(), tile.vec)
    w = warp.to(torch.float32).contiguous()
    out = torch.empty((B, (2 * radius + 1) ** 2, H, W), device=f_A.device, dtype=torch.float32)
    if out.numel():
        _launch(kernels, tile, _SUFFIX[kdt], kernels.spec_defines(C, radius), a, b, w, out)
    return out


def rel_err(x: Tensor, ref: Tensor) -> float:
    """``max|x - ref| / max|ref|`` in float64 on the CPU; ``inf`` for a shape mismatch or any NaN/inf."""
    if x.shape != ref.shape:
        return float("inf")
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    diff = (x - ref).abs()
    if not bool(torch.isfinite(diff).all()):
        return float("inf")
    return float(diff.max()) / max(float(ref.abs().max()), 1e-30) if diff.numel() else 0.0


@dataclass(frozen=True)
class SelfCheck:
    """What :mod:`romav2_plugin.ops.local_corr` checks its kernels with: ``reference(f_A, f_B, warp, r)``
    (the torch path), the problem ``shape`` ``(B, C, H, W, r)`` (its ``B, H, W`` are used) and ``tol``
    (largest relative error per output dtype)."""

    reference: Callable[[Tensor, Tensor, Tensor, int], Tensor]
    shape: tuple[int, int, int, int, int]
    tol: dict


def _check(kernels, tile: Tile, device: torch.device, C: int, radius: int, kdt: torch.dtype, sc: SelfCheck) -> list[str]:
    """The op's self-check (its seeded problem, with this specialisation's channels and radius) for the
    forward of one tile; launch errors count as failures."""
    B, _, H, W, _ = sc.shape
    gen = torch.Generator().manual_seed(0)
    f_A = torch.randn(B, C, H, W, generator=gen).to(device, kdt)
    f_B = torch.randn(B, C, H, W, generator=gen).to(device, kdt)
    warp = ((torch.rand(B, H, W, 2, generator=gen) * 2 - 1) * 1.3).to(device)
    try:
        got = _run(kernels, tile, f_A, f_B, warp, radius, kdt)
        torch.cuda.synchronize(device)
    except (RuntimeError, OSError, ValueError) as exc:
        return [f"launch failed ({type(exc).__name__}: {exc})"]
    want = sc.reference(f_A, f_B, warp, radius)
    err, tol = rel_err(got, want), sc.tol[want.dtype]
    return [] if err <= tol else [f"forward {str(kdt).removeprefix('torch.')}: max rel error {err:.2e} > {tol:.0e}"]


def _time(kernels, tile: Tile, f_A: Tensor, f_B: Tensor, warp: Tensor, radius: int, kdt, iters: int = 7) -> float:
    """Median seconds of one forward on the real inputs (CUDA events, after one warm-up)."""
    _run(kernels, tile, f_A, f_B, warp, radius, kdt)
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        _run(kernels, tile, f_A, f_B, warp, radius, kdt)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return sorted(times)[len(times) // 2]


#: in-process mirror of the cache file's choices (key -> tile or None); the file is the source of truth
_chosen: dict[str, Tile | None] = {}
_lock = threading.Lock()


def tune_key(device: torch.device, shape: tuple[int, ...], radius: int, kdt: torch.dtype) -> str:
    """``"<GPU name>|sm<XY>|<dtype>|B<..>C<..>H<..>W<..>r<..>|<source hash>"`` of a problem."""
    from romav2_plugin import kernels

    B, C, H, W = shape
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    src = kernels.source_key("local_corr.cu", kernels.spec_defines(C, radius))
    return f"{name}|sm{major}{minor}|{_SUFFIX[kdt]}|B{B}C{C}H{H}W{W}r{radius}|{src}"


def specialised_forward(
    kernels, f_A: Tensor, f_B: Tensor, warp: Tensor, radius: int, kdt: torch.dtype, sc: SelfCheck
) -> Tensor | None:
    """The forward through the specialised kernel with the tuned (or default) tile, or ``None`` when there
    is none for this problem (then the caller runs the generic kernel). ``f_A``, ``f_B``: ``(B, C, H, W)``
    on a CUDA device; ``sc``: the op's self-check. Returns ``(B, K, H, W)`` float32."""
    from romav2_plugin.runtime import local_corr_autotune

    B, C, H, W = f_A.shape
    sfx = _SUFFIX[kdt]
    key = tune_key(f_A.device, (B, C, H, W), radius, kdt)
    tune = local_corr_autotune()
    mkey = key + ("" if tune else "|default")
    if mkey not in _chosen:
        with _lock:
            if mkey not in _chosen:
                cands = candidates(C, sfx)
                try:
                    idx = f_A.device.index if f_A.device.index is not None else torch.cuda.current_device()
                    for entry in sorted({t.entry(sfx) for t in cands}):  # compile + load once, errors here
                        kernels.get_function("local_corr.cu", entry, idx, kernels.spec_defines(C, radius))
                    tile = autotune(
                        key,
                        cands,
                        check=lambda t: _check(kernels, t, f_A.device, C, radius, kdt, sc),
                        time_s=lambda t: _time(kernels, t, f_A, f_B, warp, radius, kdt),
                        path=kernels.cache_dir() / CACHE_FILE,
                        tune=tune,
                        default=default_tile(C, sfx),
                    )
                except (ImportError, RuntimeError, OSError) as exc:  # compile / load of the specialisation
                    warnings.warn(
                        f"romav2_plugin: specialised local-correlation kernel for C={C}, r={radius} unavailable "
                        f"({exc}); the generic kernel is used.",
                        RuntimeWarning,
                        stacklevel=5,
                    )
                    tile = None
                _chosen[mkey] = tile
    tile = _chosen[mkey]
    return None if tile is None else _run(kernels, tile, f_A, f_B, warp, radius, kdt)
