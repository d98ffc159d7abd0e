"""GPU check + benchmark of the NVRTC local-correlation kernel (one prepared script for a GPU session).

    python -m benchmarks.gpu_kernels                 # full run: build, parity, timing + peak memory
    python -m benchmarks.gpu_kernels --dry-run       # no GPU needed: NVRTC compile + CPU sanity, then exit
    python -m benchmarks.gpu_kernels --quick         # fewer timing iterations

Steps on a CUDA device:
1. build (NVRTC compile + module load) every kernel for the device;
2. parity of the kernel in fp32 / bf16 / fp16, forward and backward (f_A and f_B), against the CPU op and
   against the ``grid_sample`` formulation (official ``native_torch_local_corr``) on the GPU; the fused
   gather against ``F.grid_sample``;
3. time and peak memory at the refiner shapes of ``base`` (640x640 input) and ``precise`` (1280 hi-res):
   ours vs the official native torch path and, if importable, the official fused ``local_corr`` extension.
Targets: >= 90 % less memory than native, >= 1.5x faster than the official fused kernel.

    python -m benchmarks.gpu_kernels [--out benchmarks/results] [--quick] [--dry-run]

Writes ``gpu_kernels_<GPU model>.md`` and ``.json`` (e.g. ``gpu_kernels_h200``) under ``--out`` (default
``benchmarks/results/``) with the machine, torch version, command, commit and date. Exits 0 with a clear message when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._common import command_line, git_commit, gpu_label, machine_info
from romav2_plugin.ops import local_corr, local_corr_backward

lcm = importlib.import_module("romav2_plugin.ops.local_corr")

# name, B, C, H, W, r  (refiner inputs after the projection)
SHAPES = [
    ("base s4 (640 -> 160x160)", 1, 192, 160, 160, 3),
    ("base s2 (640 -> 320x320)", 1, 48, 320, 320, 1),
    ("precise s4 (1280 -> 320x320)", 1, 192, 320, 320, 3),
    ("precise s2 (1280 -> 640x640)", 1, 48, 640, 640, 1),
]


def _inputs(B, C, H, W, device, dtype=torch.float32, seed=0, spread=1.2):
    g = torch.Generator(device="cpu").manual_seed(seed)
    f_A = torch.randn(B, C, H, W, generator=g).to(device, dtype)
    f_B = torch.randn(B, C, H, W, generator=g).to(device, dtype)
    warp = ((torch.rand(B, H, W, 2, generator=g) * 2 - 1) * spread).to(device)
    return f_A, f_B, warp


def _official():
    try:
        return importlib.import_module("romav2.local_correlation")
    except ImportError:
        return None


def _fused_module():
    try:
        return importlib.import_module("local_corr")
    except ImportError:
        return None


def _native(f_A, f_B, warp, r):
    """The official native torch path (materialises the whole window)."""
    off = _official()
    B, C, H, W = f_A.shape
    K = (2 * r + 1) ** 2
    window = lcm._window(r, H, W, f_A.device, torch.float32)[None]
    if off is not None:
        return off.native_torch_local_corr(
            f_A, f_B, warp, window, B, K, C, r, H, W, f_A.device, dtype=f_A.dtype
        )
    out = torch.empty((B, K, H, W), device=f_A.device, dtype=f_A.dtype)
    for b in range(B):
        coords = (warp[b, :, :, None] + window[:, None, None]).reshape(1, H, W * K, 2)
        wf = F.grid_sample(f_B[b : b + 1], coords, padding_mode="zeros", align_corners=False).reshape(
            C, H, W, K
        )
        out[b] = (f_A[b, ..., None] / C**0.5 * wf).sum(0).permute(2, 0, 1)
    return out


def _fused(f_A, f_B, warp, r):
    off = _official()
    B, C, H, W = f_A.shape
    K = (2 * r + 1) ** 2
    window = lcm._window(r, H, W, f_A.device, torch.float32)[None]
    return off.local_corr_wrapper(f_A, f_B, warp, window, B, K, C, r, H, W, f_A.device)


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


# ------------------------------------------------------------------------------------------------------
def parity(device) -> list[dict]:
    rows = []
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
    for B, C, H, W, r in [(2, 5, 9, 13, 1), (2, 12, 16, 11, 3), (1, 192, 24, 20, 3), (2, 300, 8, 9, 2)]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            f_A, f_B, warp = _inputs(B, C, H, W, device, dtype, seed=C + r)
            a, b = f_A.float().cpu(), f_B.float().cpu()
            ref = local_corr(a, b, warp.cpu(), r)  # CPU op on the exactly upcast inputs
            out = local_corr(f_A, f_B, warp, r)
            torch.cuda.synchronize()
            g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
            gA_ref, gB_ref = local_corr_backward(g, a, b, warp.cpu(), r)
            fa = f_A.clone().requires_grad_()
            fb = f_B.clone().requires_grad_()
            local_corr(fa, fb, warp, r).backward(g.to(device))
            nat = _native(f_A.float(), f_B.float(), warp, r)  # grid_sample formulation on the GPU
            row = {
                "shape": f"B={B} C={C} H={H} W={W} r={r}",
                "dtype": str(dtype).replace("torch.", ""),
                "fwd_vs_cpu_rel": _rel(out.cpu(), ref),
                "fwd_vs_grid_sample_rel": _rel(out, nat),
                # bf16 / fp16 gradients are returned in the input dtype: compare at that precision
                "gA_vs_cpu_rel": _rel(fa.grad.cpu(), gA_ref),
                "gB_vs_cpu_rel": _rel(fb.grad.cpu(), gB_ref),
                "out_dtype": str(out.dtype).replace("torch.", ""),
            }
            gtol = tol[dtype] if dtype == torch.float32 else 1e-2
            row["ok"] = (
                row["fwd_vs_cpu_rel"] < tol[dtype]
                and row["fwd_vs_grid_sample_rel"] < 1e-5
                and row["gA_vs_cpu_rel"] < gtol
                and row["gB_vs_cpu_rel"] < gtol
            )
            rows.append(row)
    return rows


def _measure(fn, iters, warmup=2):
    """(median ms, peak extra bytes above the allocation at entry)."""
    torch.cuda.synchronize()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2], peak


def benchmark(device, iters) -> list[dict]:
    rows = []
    have_fused = _fused_module() is not None and _official() is not None
    for name, B, C, H, W, r in SHAPES:
        rows += _bench_shape(device, iters, have_fused, name, B, C, H, W, r)
        torch.cuda.empty_cache()
    return rows


def _spec_methods(device, f_A, f_B, warp, r) -> dict:
    """The run-time specialised forward (channels, radius compiled in; tile autotuned on its first call and
    cached, every candidate checked against the torch path first), fp32 and bf16 inputs; empty when the
    kernels do not load. Its output is compared with the generic kernel's here (printed)."""
    try:
        kernels = lcm._load_kernels(device)
    except Exception as exc:  # noqa: BLE001 - reported, the generic rows still run
        print(f"specialised kernels unavailable: {exc}")
        return {}
    out = {}
    for label, dt in (("ours spec fwd", torch.float32), ("ours spec bf16 fwd", torch.bfloat16)):
        a, b = f_A.to(dt), f_B.to(dt)

        def fn(a=a, b=b, dt=dt):
            res = lcm._tune.specialised_forward(kernels, a, b, warp, r, dt, lcm._SELF_CHECK)
            if res is None:
                raise RuntimeError("no specialised tile passed its check")
            return res

        try:
            got = fn()
            ref = lcm._kernel_forward(kernels, a, b, warp, r, dt)
            print(f"{label} C={f_A.shape[1]} r={r}: max rel diff vs the generic kernel {_rel(got, ref):.2e}")
        except Exception as exc:  # noqa: BLE001
            print(f"{label}: {type(exc).__name__}: {exc}")
            continue
        out[label] = fn
    return out


def autotune_table(gpu: str) -> tuple[str, list[dict]]:
    """The autotuner's cached choices for ``gpu`` (``local_corr_autotune.json`` in the kernel cache)."""
    from romav2_plugin import kernels

    path = kernels.cache_dir() / lcm._tune.CACHE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"(no autotuner cache at {path})", []
    rows = []
    for key, e in sorted(data.items()):
        if not key.startswith(gpu + "|"):
            continue
        ms = e.get("ms", {})
        best = e.get("chosen")
        worst = max(ms.values()) if ms else float("nan")
        rows.append({"problem": key.split("|", 2)[2].rsplit("|", 1)[0], "chosen": best,
                     "chosen_ms": ms.get(best, float("nan")), "slowest_ms": worst, "candidates": len(ms) + len(e.get("rejected", {})),
                     "rejected": len(e.get("rejected", {}))})
    return _table(rows, ["problem", "chosen", "chosen_ms", "slowest_ms", "candidates", "rejected"]), rows


def _bench_shape(device, iters, have_fused, name, B, C, H, W, r) -> list[dict]:
    rows = []
    f_A, f_B, warp = _inputs(B, C, H, W, device)
    K = (2 * r + 1) ** 2
    window_bytes = B * C * H * W * K * 4
    fa = f_A.clone().requires_grad_()
    fb = f_B.clone().requires_grad_()
    g = torch.randn(B, K, H, W, device=device)
    methods = {
        "ours fwd": lambda: local_corr(f_A, f_B, warp, r),
        "ours fwd+bwd": lambda: torch.autograd.grad(local_corr(fa, fb, warp, r), (fa, fb), g),
        "ours bf16 fwd": lambda: local_corr(f_A.bfloat16(), f_B.bfloat16(), warp, r),
        "native fwd": lambda: _native(f_A, f_B, warp, r),
    }
    spec = _spec_methods(device, f_A, f_B, warp, r)
    methods.update(spec)
    if have_fused:
        methods["official fused fwd"] = lambda: _fused(f_A, f_B, warp, r)
    res = {}
    for m, fn in methods.items():
        try:
            ms, peak = _measure(fn, iters)
            res[m] = (ms, peak)
        except torch.cuda.OutOfMemoryError:
            res[m] = (float("nan"), float("nan"))
        torch.cuda.empty_cache()
    for m, (ms, peak) in res.items():
        row = {
            "shape": name,
            "B": B,
            "C": C,
            "H": H,
            "W": W,
            "r": r,
            "method": m,
            "ms": ms,
            "peak_MiB": peak / 2**20,
            "window_buffer_MiB": window_bytes / 2**20,
        }
        if "native fwd" in res and not math.isnan(res["native fwd"][1]) and m.endswith("fwd"):
            row["mem_saving_vs_native_%"] = 100 * (1 - peak / res["native fwd"][1])
            row["speedup_vs_native"] = res["native fwd"][0] / ms
        if "official fused fwd" in res and m.endswith("fwd"):
            row["speedup_vs_fused"] = res["official fused fwd"][0] / ms
        rows.append(row)
    return rows


def _table(rows, cols) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def build_kernels(device) -> dict:
    """Step 1: compile + load every kernel entry point for ``device`` and run the op's own self-check
    against the torch path (the check the default ``auto`` mode runs before first use). Returns the meta
    fields: ``kernel_ok``, ``kernel_build_s``, ``kernel_arch``, ``kernel_self_check_failures`` and, when
    something raised, ``kernel_error`` (the traceback is printed)."""
    from romav2_plugin import kernels as runtime

    out: dict = {"kernel_ok": False}
    t0 = time.time()
    try:
        loaded = lcm._load_kernels(device)
        out["kernel_build_s"] = time.time() - t0
        idx = lcm._device_index(device)
        out["kernel_arch"] = runtime.device_arch(idx) if idx >= 0 else None
        out["kernel_self_check_failures"] = lcm.self_check(loaded, device)
    except Exception as exc:  # noqa: BLE001 - reported in the results, the run goes on to parity
        traceback.print_exc()
        out["kernel_error"] = f"{type(exc).__name__}: {exc}"
        return out
    out["kernel_ok"] = not out["kernel_self_check_failures"]
    return out


def dry_run() -> int:
    """What can be checked without a GPU: NVRTC compile for sm_80/sm_90 and a CPU op sanity check."""
    from romav2_plugin import kernels

    print("dry run (no GPU used)")
    try:
        for arch in ("sm_80", "sm_90"):
            ck = kernels.compile_kernel("local_corr.cu", arch)
            print(f"  NVRTC local_corr.cu [{arch}]: {ck.kind} {len(ck.image)} bytes")
        for c, r in kernels.specialisations():  # the run-time specialisations of the shipped models (sm_90)
            ck = kernels.compile_kernel("local_corr.cu", "sm_90", defines=kernels.spec_defines(c, r))
            ok = all(e.encode() in ck.image for e in kernels.spec_entries(c))
            print(f"  NVRTC specialisation C={c} r={r} [sm_90]: {ck.kind} {len(ck.image)} bytes, entry points ok: {ok}")
    except ImportError as exc:
        print(f"  NVRTC unavailable: {exc}")
    f_A, f_B, warp = _inputs(1, 5, 6, 7, "cpu")
    rel = _rel(local_corr(f_A, f_B, warp, 1), _native(f_A, f_B, warp, 1))
    print(f"  CPU op vs native torch path: max rel err {rel:.2e}")
    print(f"  CUDA available: {torch.cuda.is_available()}")
    return 0 if rel < 1e-5 else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output directory")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: compile through NVRTC + CPU sanity only")
    ap.add_argument("--name", default=None,
                    help="file name without suffix (default: gpu_kernels_<GPU model>, e.g. gpu_kernels_h200)")
    ap.add_argument("--quick", action="store_true", help="fewer timing iterations")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args(argv)
    # time the kernel itself: with the default "auto", a failed self-check would silently time the torch path
    os.environ.setdefault("ROMAV2_LOCAL_CORR", "cuda")
    if args.dry_run:
        return dry_run()
    if not torch.cuda.is_available():
        print(
            "gpu_kernels.py: no CUDA device present; nothing to benchmark (use --dry-run for the CPU-side checks)."
        )
        return 0
    device = torch.device("cuda")
    iters = 3 if args.quick else args.iters
    t0 = time.time()
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "commit": git_commit(),
        "machine": {
            "gpu": torch.cuda.get_device_name(0),
            "capability": list(torch.cuda.get_device_capability(0)),
            "host": platform.node(),
            "platform": platform.platform(),
        },
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "official_fused_local_corr": _fused_module() is not None,
    }
    build = build_kernels(device)
    meta.update(build)
    status = int(not build["kernel_ok"])
    print(
        f"kernels built in {build.get('kernel_build_s', float('nan')):.2f} s for {build.get('kernel_arch')};"
        f" self-check failures: {build.get('kernel_self_check_failures')}; error: {build.get('kernel_error')}"
    )
    par = parity(device)
    status |= int(not all(r["ok"] for r in par))
    par_md = _table(
        par,
        [
            "shape",
            "dtype",
            "out_dtype",
            "fwd_vs_cpu_rel",
            "fwd_vs_grid_sample_rel",
            "gA_vs_cpu_rel",
            "gB_vs_cpu_rel",
            "ok",
        ],
    )
    print(par_md)
    bench = benchmark(device, iters)
    bench_md = _table(
        bench,
        [
            "shape",
            "method",
            "ms",
            "peak_MiB",
            "window_buffer_MiB",
            "mem_saving_vs_native_%",
            "speedup_vs_native",
            "speedup_vs_fused",
        ],
    )
    print(bench_md)
    tune_md, tune_rows = autotune_table(meta["machine"]["gpu"])
    print(tune_md)
    meta["total_s"] = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = (
        f"# local_corr GPU kernels\n\n- date: {meta['date']}\n- command: `{meta['command']}`\n"
        f"- commit: {meta['commit'] or 'unknown (not a git checkout)'}\n"
        f"- host CPU: {machine_info()['cpu']}, {os.cpu_count()} cores\n"
        f"- machine: {meta['machine']}\n- torch {meta['torch']} (CUDA {meta['torch_cuda']})\n"
        f"- targets: >= 90% less memory than native, >= 1.5x faster than the official fused kernel\n\n"
        f"## parity\n\n{par_md}\n\n## time / peak memory\n\n{bench_md}\n\n"
        f"`ours fwd` is the generic kernel; `ours spec ...` the run-time specialisation (channels and radius "
        f"compiled in) with the autotuned tile below (each candidate checked against the torch path first).\n\n"
        f"## autotuner choices (local_corr_autotune.json)\n\n{tune_md}\n"
    )
    name = args.name or f"gpu_kernels_{gpu_label(meta['machine']['gpu'])}"
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(
        json.dumps({"meta": meta, "parity": par, "benchmark": bench, "autotune": tune_rows}, indent=1)
    )
    print(
        f"wrote {out / (name + '.md')} and {out / (name + '.json')}; status {'OK' if not status else 'FAIL'}"
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
