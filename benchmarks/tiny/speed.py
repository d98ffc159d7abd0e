"""CPU time of ``match()`` with romav2-tiny at its default resolution (the demo pair), several runs, median.

    python -m benchmarks.tiny.speed [--runs 7] [--threads N] [--out benchmarks/results]

The figure is absolute (no reference model in the run); the machine, thread count and date are recorded, and
the load of the machine at the time matters: run it on an otherwise idle machine.
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
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from PIL import Image

    from romav2_plugin import RoMaV2

    assets = Path(__file__).resolve().parents[2] / "romav2_plugin" / "assets"
    A, B = Image.open(assets / "demo_A.jpg").convert("RGB"), Image.open(assets / "demo_B.jpg").convert("RGB")
    model = RoMaV2.from_pretrained("tiny", device="cpu")
    model.match(A, B)  # warm-up
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        model.match(A, B)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "command": "python -m benchmarks.tiny.speed " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tiny_speed_cpu.json").write_text(json.dumps({"meta": meta, "seconds": times, "median": med}, indent=1))
    text = (f"# romav2-tiny: CPU time of match() ({meta['date']})\n\nMachine: {meta['machine']}, {meta['cpus']} CPUs "
            f"({meta['torch_threads']} torch threads), torch {meta['torch']}. Command: `{meta['command']}`.\n"
            f"Demo pair (600x400 and 640x480), setting tiny (256x256, one direction), fp32, after one warm-up.\n\n"
            f"| runs | median | min | max |\n|---|---|---|---|\n| {len(times)} | {med:.3f} s | {min(times):.3f} s | "
            f"{max(times):.3f} s |\n")
    (out / "tiny_speed_cpu.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
