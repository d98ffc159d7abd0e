"""CPU time of ``match()`` with romav2-tiny at its default resolution (the demo pair), several runs, median.

    python -m benchmarks.tiny.speed [--runs 7] [--threads N] [--out benchmarks/results]
    python -m benchmarks.tiny.speed --second-pass 384,512   # the cost of an optional second refinement pass

The figure is absolute (no reference model in the run); the machine, thread count and date are recorded, and
the load of the machine at the time matters: run it on an otherwise idle machine. With ``--second-pass``, the
coarse 256x256 pass alone (no second pass) is the reference of the same run: the variants are timed in turns
with it and written to ``tiny_speed_second_pass_cpu.{json,md}`` with their ratios to it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--second-pass", default=None, metavar="N[,N...]",
                    help="also time these second refinement passes (NxN) against the default, in turns")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from benchmarks._common import tiny_on_demo_pair

    model, A, B = tiny_on_demo_pair()
    model.match(A, B)  # warm-up
    if args.second_pass:
        return _second_pass(model, A, B, [int(n) for n in args.second_pass.split(",")], args, argv)
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        model.match(A, B)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    meta = _meta(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tiny_speed_cpu.json").write_text(json.dumps({"meta": meta, "seconds": times, "median": med}, indent=1))
    text = (f"# romav2-tiny: CPU time of match() ({meta['date']})\n\nMachine: {meta['machine']}, {meta['cpus']} CPUs "
            f"({meta['torch_threads']} torch threads), torch {meta['torch']}. Command: `{meta['command']}`.\n"
            f"Demo pair (600x400 and 640x480), setting tiny ({_resolution(model)}, one direction), {_precision(model)}, after one "
            f"warm-up.\n\n"
            f"| runs | median | min | max |\n|---|---|---|---|\n| {len(times)} | {med:.3f} s | {min(times):.3f} s | "
            f"{max(times):.3f} s |\n")
    (out / "tiny_speed_cpu.md").write_text(text)
    print(text)
    return 0


def _precision(model) -> str:
    """``bf16 autocast`` or ``fp32``: what the model runs in on the CPU (its ``amp``, else the default)."""
    from romav2_plugin import runtime

    return "bf16 autocast" if (runtime.amp_default("cpu") if model.amp is None else model.amp) else "fp32"


def _resolution(model) -> str:
    """The model's working resolutions in words, e.g. ``256x256 + second pass 384x384``."""
    text = f"{model.H_lr}x{model.W_lr}"
    return text + (f" + second pass {model.H_hr}x{model.W_hr}" if model.H_hr else "")


def _meta(argv) -> dict:
    """Date, machine, threads, torch version and the command line of this run."""
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "command": "python -m benchmarks.tiny.speed " + " ".join(argv if argv is not None else sys.argv[1:])}


def _second_pass(model, A, B, sizes: list[int], args, argv) -> int:
    variants = [None, *sizes]
    times: dict[str, list[float]] = {str(v): [] for v in variants}
    for _ in range(args.runs):
        for v in variants:  # in turns, so that a change of the machine's load touches every variant alike
            model.H_hr = model.W_hr = v
            t0 = time.perf_counter()
            model.match(A, B)
            times[str(v)].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    meta = _meta(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tiny_speed_second_pass_cpu.json").write_text(
        json.dumps({"meta": meta, "seconds": times, "median": med}, indent=1))
    rows = [f"| {'-' if k == 'None' else f'{k}x{k}'} | {med[k]:.3f} s | {min(times[k]):.3f} s | "
            f"{max(times[k]):.3f} s | {med[k] / med['None']:.2f} |" for k in times]
    text = (f"# romav2-tiny: CPU time of match() with a second refinement pass ({meta['date']})\n\n"
            f"Machine: {meta['machine']}, {meta['cpus']} CPUs ({meta['torch_threads']} torch threads), torch "
            f"{meta['torch']}. Command: `{meta['command']}`.\nDemo pair, coarse pass 256x256 (setting tiny), one "
            f"direction, {_precision(model)}, after one warm-up; {args.runs} runs of each variant, in turns.\n\n"
            "| second pass | median | min | max | ratio to none |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    (out / "tiny_speed_second_pass_cpu.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
