"""CPU time of ``match()`` with romav2-tiny at its default resolution (the demo pair), several runs, median.

    python -m benchmarks.tiny.speed [--runs 7] [--threads N] [--out benchmarks/results]
    python -m benchmarks.tiny.speed --second-pass 384,512   # the cost of an optional second refinement pass
    python -m benchmarks.tiny.speed --peers [--runs 5]       # against SIFT and the learned peers ([peers] extra)

The figure is absolute (no reference model in the run); the machine, thread count and date are recorded, and
the load of the machine at the time matters: run it on an otherwise idle machine. With ``--second-pass``, the
coarse 256x256 pass alone (no second pass) is the reference of the same run: the variants are timed in turns
with it and written to ``tiny_speed_second_pass_cpu.{json,md}`` with their ratios to it. With ``--peers``,
romav2-tiny's ``match()`` + ``sample(preds, 5000)`` is timed in turns with OpenCV SIFT and the learned peers of
``benchmarks/accuracy/peers.py`` (each: both images' features and the matching) in one process, and each
method's matches are checked against the demo pair's homography (median reprojection error, fraction within
3 px); written to ``tiny_speed_peers_cpu.{json,md}`` with ratios to romav2-tiny.
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
    ap.add_argument("--peers", nargs="?", const="sift,aliked-lg,disk-lg,xfeat-lg,xfeat-star", default=None,
                    metavar="M[,M...]", help="time romav2-tiny's match + sample against these methods, in turns "
                    "(default: sift and every peer)")
    ap.add_argument("--second-pass", default=None, metavar="N[,N...]",
                    help="also time these second refinement passes (NxN) against the default, in turns")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from benchmarks._common import tiny_on_demo_pair

    model, A, B = tiny_on_demo_pair()
    if args.peers:
        return _peers(model, A, B, [m.strip() for m in args.peers.split(",") if m.strip()], args, argv)
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


def _peers(model, A, B, names: list[str], args, argv) -> int:
    import numpy as np

    from benchmarks.accuracy.matchers import RoMaV2Matcher, SIFTMatcher
    from benchmarks.accuracy.peers import PEER_LABELS, build_peer, peer_versions
    from benchmarks.tiny.heldout import ASSETS
    from romav2_plugin.app.summary import reprojection_errors

    H = np.array(json.loads((ASSETS / "demo_pair.json").read_text())["homography_A_to_B"])
    a, b = np.asarray(A), np.asarray(B)
    methods = {"tiny": RoMaV2Matcher(model, num=5000, seed=0, name="tiny")}
    for n in names:
        methods[n] = SIFTMatcher() if n == "sift" else build_peer(n)
    times: dict[str, list[float]] = {n: [] for n in methods}
    out: dict[str, tuple] = {}
    for n, m in methods.items():  # warm-up
        out[n] = m.match_pair(a, b)
    for _ in range(args.runs):
        for n, m in methods.items():  # in turns: a change of the machine's load touches every method alike
            t0 = time.perf_counter()
            out[n] = m.match_pair(a, b)
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    acc = {}
    for n, (kA, kB, _) in out.items():
        e = reprojection_errors(H, kA, kB)
        acc[n] = {"matches": len(kA), "median_px": float(np.median(e)) if len(e) else None,
                  "within_3px": float((e < 3).mean()) if len(e) else 0.0}
    meta = {**_meta(argv), "peers": peer_versions()}
    res = {"meta": meta, "seconds": times, "median": med, "ratio_to_tiny": {n: med[n] / med["tiny"] for n in med},
           "demo_pair_accuracy": acc}
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tiny_speed_peers_cpu.json").write_text(json.dumps(res, indent=1))
    label = {"tiny": "romav2-tiny (match + sample 5000)", "sift": "OpenCV SIFT + ratio 0.8", **PEER_LABELS}
    rows = [f"| {label.get(n, n)} | {med[n]:.3f} s | {min(times[n]):.3f} s | {max(times[n]):.3f} s | "
            f"{med[n] / med['tiny']:.2f} | {acc[n]['matches']} | "
            f"{'-' if acc[n]['median_px'] is None else format(acc[n]['median_px'], '.2f')} | "
            f"{acc[n]['within_3px']:.3f} |" for n in methods]
    text = (f"# Demo pair on the CPU: romav2-tiny against SIFT and the learned peers ({meta['date']})\n\n"
            f"Machine: {meta['machine']}, {meta['cpus']} CPUs ({meta['torch_threads']} torch threads), torch "
            f"{meta['torch']}, {', '.join(f'{k} {v}' for k, v in meta['peers'].items())}. Command: "
            f"`{meta['command']}`.\nDemo pair (600x400 and 640x480, romav2_plugin/assets); romav2-tiny at setting "
            f"tiny ({_resolution(model)}), {_precision(model)}, `match()` + `sample(preds, 5000)`; every other "
            "method: both images' features and their matching, at the images' size. One warm-up each, then "
            f"{args.runs} runs of every method in turns, one process. Accuracy of each method's last matches "
            "against the pair's homography (pixel centres at 0).\n\n"
            "| method | median time | min | max | time / tiny | matches | median error | within 3 px |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    (path / "tiny_speed_peers_cpu.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
