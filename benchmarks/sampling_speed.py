"""CPU time of ``sample()``: the official half-precision KDE against the float32 one, in turns, medians.

    python -m benchmarks.sampling_speed [--runs 5] [--num 5000] [--threads N]

romav2-tiny matches the demo pair once (setting ``tiny``); then ``sample(preds, NUM)`` is timed with
``half_precision_kde`` on (the official KDE, the default of every official setting) and off (float32, the
``tiny`` setting's), alternating, after one warm-up each; ``match()`` is timed in the same turns for scale. The
KDE runs on the ``4 * NUM`` candidates that balanced sampling draws first; both KDEs are also compared with a
float64 reference on one such draw (largest relative error). Writes
``benchmarks/results/sampling_speed_cpu.{json,md}`` with machine, command and date. Run it on an idle machine:
the ratio is measured in one run, the absolute times depend on the load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks._common import (
    RESULTS,
    command_line,
    machine_info,
    now_utc,
    provenance_markdown,
    tiny_on_demo_pair,
)


def _float64_density(x: torch.Tensor, std: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    x = x.double()
    return torch.cat([(-torch.cdist(x[s : s + chunk], x) ** 2 / (2 * std**2)).exp().sum(-1)
                      for s in range(0, len(x), chunk)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--num", type=int, default=5000, help="matches sampled (the accuracy benchmarks' 5000)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from romav2_plugin.sampling import kde_density

    model, A, B = tiny_on_demo_pair()
    preds = model.match(A, B)

    def timed(half: bool | None) -> float:
        t0 = time.perf_counter()
        if half is None:
            model.match(A, B)
        else:
            model.half_precision_kde = half
            model.sample(preds, args.num, generator=0)
        return time.perf_counter() - t0

    variants = {"half": True, "float32": False, "match": None}
    for h in variants.values():
        timed(h)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.runs):
        for k, h in variants.items():
            times[k].append(timed(h))
    med = {k: statistics.median(v) for k, v in times.items()}

    # accuracy on the candidates of one draw (4 * num of the grid matches, drawn by overlap)
    from romav2_plugin.postprocess import candidates

    m, conf, _, _ = candidates(preds)
    idx = torch.multinomial(conf, min(4 * args.num, int((conf > 0).sum())), generator=torch.Generator().manual_seed(0))
    x = m[idx]
    ref = _float64_density(x)
    dens = {k: kde_density(x, half=h).double() for k, h in (("half", True), ("float32", False))}
    err = {k: float(((d - ref).abs() / ref).max()) for k, d in dens.items()}
    flips = {k: int(((d < 10) != (ref < 10)).sum()) for k, d in dens.items()}

    info, command, date = machine_info(), command_line(), now_utc()
    record = {"machine": info, "command": command, "date": date, "threads": torch.get_num_threads(),
              "num": args.num, "candidates": len(x), "seconds": times, "median": med,
              "ratio_half_over_float32": med["half"] / med["float32"], "max_rel_error_vs_float64": err,
              "density_threshold_flips_vs_float64": flips}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampling_speed_cpu.json").write_text(json.dumps(record, indent=1))
    md = [
        "# sample(): half-precision (official) against float32 KDE, CPU", "",
        provenance_markdown(info, command, date),
        f"- romav2-tiny, demo pair, setting tiny, {torch.get_num_threads()} torch threads; sample(preds, {args.num}) "
        f"= KDE over {len(x)} candidates; {args.runs} runs in turns after one warm-up each; medians.", "",
        "| | median s | runs (s) | max relative error of the density vs float64 | candidates on the other side of "
        "the density-10 cut |",
        "|---|---|---|---|---|",
    ]
    for k in ("half", "float32"):
        md.append(f"| sample(), {k} KDE | {med[k]:.2f} | {', '.join(f'{t:.2f}' for t in times[k])} | "
                  f"{err[k]:.2e} | {flips[k]} of {len(x)} |")
    md.append(f"| match() (for scale) | {med['match']:.2f} | {', '.join(f'{t:.2f}' for t in times['match'])} | - | - |")
    md += ["", f"Ratio half / float32: {med['half'] / med['float32']:.2f}x.", ""]
    (args.out / "sampling_speed_cpu.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
