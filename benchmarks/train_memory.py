"""Peak memory of one refiner training step: our local-correlation op vs plain autograd.

    python -m benchmarks.train_memory [--runs 3] [--scope corr refiner] [--size 320] [--out benchmarks/results]
        [--name train_memory_<scopes>_cpu]

The refiner of RoMa v2 correlates each pixel of A with a (2r+1)^2 window of B around the current warp. Written
with plain autograd (sample the window with ``grid_sample``, multiply, sum), the backward pass keeps the whole
sampled window, ``(2r+1)^2`` times the feature map (49x at stride 4). Our ``romav2_plugin::local_corr`` op
recomputes it in row chunks in its backward. Shapes: the official ``precise`` setting's second pass at stride
4 (1280 / 4 = 320 px square, 192 projected channels, r = 3), one direction.

Scopes: ``corr``: forward + backward of the correlation alone; ``refiner``: a whole training step of the
official stride-4 ConvRefiner (fine features 256 ch in, loss on the warp and confidence, backward to the
refiner's weights and both feature maps). Each measurement runs in its own process; the figure is the peak
resident memory increase over the process after its inputs are allocated (``ru_maxrss``). Several runs
alternate the variants; medians are reported.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def plain_local_corr(f_A, f_B, warp, radius: int):
    """The same maths with plain autograd: ``(B, (2r+1)^2, H, W)``; the sampled window is kept for backward."""
    import torch
    import torch.nn.functional as F

    B, C, H, W = f_A.shape
    d = torch.arange(-radius, radius + 1, dtype=warp.dtype, device=warp.device)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    offs = torch.stack((dx.reshape(-1) * 2 / W, dy.reshape(-1) * 2 / H), -1)  # window steps of one pixel of B
    grids = warp[:, :, :, None, :] + offs  # (B, H, W, K, 2)
    sampled = F.grid_sample(f_B, grids.reshape(B, H, W * len(offs), 2), mode="bilinear", align_corners=False)
    sampled = sampled.reshape(B, C, H, W, len(offs))
    return (f_A[..., None] / C**0.5 * sampled).sum(1).permute(0, 3, 1, 2)


def _child(variant: str, scope: str, size: int) -> dict:
    import torch

    torch.manual_seed(0)
    from romav2_plugin.config import RoMaV2Config
    from romav2_plugin.geometry import normalized_grid
    from romav2_plugin.nn import refiner as refiner_mod
    from romav2_plugin.ops import local_corr

    corr = local_corr if variant == "op" else plain_local_corr
    H = W = size
    cfg = RoMaV2Config().refiners[0]  # stride 4: proj 192, r = 3
    warp = (normalized_grid(1, H, W) + 0.01 * torch.randn(1, H, W, 2)).clamp(-1, 1)
    if scope == "corr":
        f_A = torch.randn(1, cfg.proj_dim, H, W, requires_grad=True)
        f_B = torch.randn(1, cfg.proj_dim, H, W, requires_grad=True)
        base = _rss_mib()
        t0 = time.perf_counter()
        out = corr(f_A, f_B, warp, cfg.local_corr_radius)
        out.square().mean().backward()
    else:
        refiner_mod.local_corr = corr  # the refiner looks the op up in its module at call time
        ref = refiner_mod.ConvRefiner(cfg).train()
        f_A = torch.randn(1, H, W, cfg.feat_dim, requires_grad=True)
        f_B = torch.randn(1, H, W, cfg.feat_dim, requires_grad=True)
        conf = torch.zeros(1, H, W, 1)
        scale = torch.tensor((4 * W / 512, 4 * H / 512))
        base = _rss_mib()
        t0 = time.perf_counter()
        w, c = ref(f_A, f_B, warp, conf, scale)
        (w.square().mean() + c.square().mean()).backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "scope": scope, "size": size, "peak_increase_mib": peak - base, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scope", nargs="+", default=["corr", "refiner"], choices=["corr", "refiner"])
    ap.add_argument("--size", type=int, default=320, help="feature map side at stride 4 (precise: 320)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default=None,
                    help="file stem of the .md/.json written under --out (default train_memory_<scopes>_cpu, e.g. "
                    "train_memory_corr_cpu)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], int(args.child[2]))))
        return 0
    rows = []
    name = args.name or f"train_memory_{'_'.join(args.scope)}_cpu"
    for scope in args.scope:
        for run in range(args.runs):
            for variant in ("op", "plain"):
                res = subprocess.run([sys.executable, "-m", "benchmarks.train_memory", "--child", variant, scope,
                                      str(args.size)], capture_output=True, text=True, check=True)
                r = json.loads(res.stdout.strip().splitlines()[-1])
                r["run"] = run
                rows.append(r)
                print(f"{scope:8s} {variant:5s} run {run}: +{r['peak_increase_mib']:.0f} MiB, {r['seconds']:.1f} s",
                      flush=True)
    summary = {}
    name = args.name or f"train_memory_{'_'.join(args.scope)}_cpu"
    for scope in args.scope:
        med = {v: {k: statistics.median(r[k] for r in rows if r["scope"] == scope and r["variant"] == v)
                   for k in ("peak_increase_mib", "seconds")} for v in ("op", "plain")}
        summary[scope] = med | {"memory_ratio": med["op"]["peak_increase_mib"] / med["plain"]["peak_increase_mib"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "command": "python -m benchmarks.train_memory " + " ".join(argv or sys.argv[1:]),
            "torch": __import__("torch").__version__}
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1))
    lines = [f"# Refiner training-step memory: local-correlation op vs plain autograd ({meta['date']})", "",
             f"Machine: {meta['machine']}, {meta['cpus']} CPUs, torch {meta['torch']}. Command: `{meta['command']}`.",
             f"Shape: stride-4 refiner of the precise setting's second pass ({args.size}x{args.size}, 192 projected "
             f"channels, radius 3), batch 1, fp32; {args.runs} alternating runs, medians.", "",
             "| scope | op: peak increase | plain autograd: peak increase | ratio | op time | plain time |",
             "|---|---|---|---|---|---|"]
    for scope, s in summary.items():
        lines.append(f"| {scope} | {s['op']['peak_increase_mib']:.0f} MiB | {s['plain']['peak_increase_mib']:.0f} MiB | "
                     f"{s['memory_ratio']:.2f}x | {s['op']['seconds']:.1f} s | {s['plain']['seconds']:.1f} s |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
