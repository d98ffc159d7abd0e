"""Throughput of ``romav2-match --pairs --engine ray`` with 1 and 2 (or N) workers on this machine.

    python -m benchmarks.ray_scaling [--pairs 8] [--runs 3] [--workers 1 2] [--weights tiny|PATH]
        [--setting tiny] [--gpus-per-worker G] [--out benchmarks/results/ray_scaling_cpu]  (stem; default by model/device)

One local Ray cluster for all runs; each run starts fresh workers (the model loads once per worker) and
matches the same pair list into a new results file. Throughput = pairs / seconds from "every worker ready"
to "last pair written" (the steady state a long SfM pair list sees; model loading is reported apart).
Medians over ``--runs``. Default model: a very small seeded random model (official layout) at the 'tiny'
setting, so that the run is short on a CPU; ``--weights tiny`` / a path measures a real model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks._common import command_line, machine_info, now_utc, provenance_markdown

RESULTS = Path(__file__).resolve().parent / "results"


def _micro_weights(folder: Path) -> Path:
    from romav2_plugin.testing import make_micro_weights

    return make_micro_weights(folder / "micro.pt")


def _images(folder: Path, n_pairs: int) -> Path:
    rng = np.random.default_rng(0)
    names = [f"im{i}.png" for i in range(n_pairs + 1)]
    for name in names:
        small = (rng.random((12, 16, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((160, 120), Image.BICUBIC).save(folder / name)
    pairs = folder / "pairs.txt"
    pairs.write_text("".join(f"{names[i]} {names[i + 1]}\n" for i in range(n_pairs)))
    return pairs


def _report(args, rows: list[dict], date: str, load, ray_start_s: float, gpu: bool) -> None:
    done = [n for n in args.workers if any(x["workers"] == n for x in rows)]
    med = {
        n: {
            k: statistics.median(x[k] for x in rows if x["workers"] == n)
            for k in ("pairs_per_s", "wall_s", "startup_s")
        }
        for n in done
    }
    base = med[done[0]]["pairs_per_s"]
    for n in done:
        med[n]["ratio"] = med[n]["pairs_per_s"] / base
    info = machine_info("cuda" if gpu else "cpu")
    cmd = command_line()
    load_after = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": date, "command": cmd, "machine": info, "load_average_before": load, "load_average_after": load_after,
        "weights": args.weights or "micro (seeded random, 2-block 32-wide backbone)", "setting": args.setting,
        "num_samples": args.num_samples, "pairs": args.pairs, "runs": args.runs, "batch_size": args.batch_size,
        "cpus_per_worker": args.cpus_per_worker, "gpus_per_worker": args.gpus_per_worker, "note": args.note,
        "ray_start_s": ray_start_s, "runs_done": len(rows), "rows": rows, "medians": {str(k): v for k, v in med.items()},
    }  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# Ray scaling (`romav2-match --pairs --engine ray`)",
        "",
        provenance_markdown(info, cmd, date),
        f"- Load average (1/5/15 min) before: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; after: "
        f"{load_after[0]:.1f} / {load_after[1]:.1f} / {load_after[2]:.1f}",
        f"- Model: {payload['weights']}, setting {args.setting}, {args.num_samples} samples; {args.pairs} pairs of "
        f"160x120 images; batch size {args.batch_size}; {args.cpus_per_worker:g} CPU per worker"
        + (f", {args.gpus_per_worker:g} GPU per worker" if gpu else ""),
        f"- Local Ray cluster start (once, not in the table): {ray_start_s:.0f} s",
        "- Throughput: pairs / seconds from every worker ready to the last pair written (model loads excluded; "
        "startup = cluster connection + worker start + model load, per run)",
    ]
    if args.note:
        lines.append(f"- Note: {args.note}")
    lines += [
        "",
        f"| workers | pairs/s (median) | ratio to {done[0]} worker(s) | wall s (median) "
        "| startup s (median) | runs done (pairs/s each) |",
        "|---|---|---|---|---|---|",
    ]
    for n in done:
        runs = ", ".join(f"{x['pairs_per_s']:.3f}" for x in rows if x["workers"] == n)
        m = med[n]
        lines.append(
            f"| {n} | {m['pairs_per_s']:.3f} | {m['ratio']:.2f} | {m['wall_s']:.1f} | {m['startup_s']:.1f} | {runs} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ray_scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--weights", default=None, help="default: a very small seeded random model")
    p.add_argument("--setting", default="tiny")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--gpus-per-worker", type=float, default=None)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--note", default="", help="a sentence for the results file (e.g. the machine was busy)")
    p.add_argument("--out", type=Path, default=None,
                   help="file stem (default benchmarks/results/ray_scaling_cpu; with --weights tiny: ray_scaling_tiny_cpu; "
                   "on GPUs the GPU model instead of cpu)")
    args = p.parse_args(argv)
    if args.out is None:
        from benchmarks._common import device_label

        device = device_label("cuda") if args.gpus_per_worker else "cpu"
        args.out = RESULTS / f"ray_scaling{'_' + args.weights if args.weights == 'tiny' else ''}_{device}"

    os.environ.setdefault("RAY_gcs_server_request_timeout_seconds", "300")  # busy machine; read at import
    import ray

    from romav2_plugin.distributed.cluster import _children, _shutdown_failed_start
    from romav2_plugin.distributed.pairs import match_pairs

    load = os.getloadavg()
    date = now_utc()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = args.weights or str(_micro_weights(tmp))
        pairs = _images(tmp, args.pairs)
        gpu = args.gpus_per_worker is not None and args.gpus_per_worker > 0
        t_ray = time.perf_counter()
        for attempt in range(3):  # the raylet can miss Ray's 30 s start-up deadline on a busy machine
            before = _children()
            try:
                ray.init(address="local", include_dashboard=False, object_store_memory=200 << 20,
                         log_to_driver=False, num_cpus=None if gpu else max(args.workers) * int(args.cpus_per_worker))  # fmt: skip
                break
            except Exception:
                _shutdown_failed_start(ray, before)
                if attempt == 2:
                    raise
        ray_start_s = time.perf_counter() - t_ray
        rows = []
        try:
            for r in range(args.runs):  # interleaved, so that a change in the machine's load hits both alike
                for n in args.workers:
                    out = tmp / f"out_{n}_{r}.h5"
                    t = time.perf_counter()
                    run = match_pairs(
                        pairs, tmp, out, weights=weights, setting=args.setting, num_samples=args.num_samples,
                        num_workers=n, num_gpus_per_worker=args.gpus_per_worker,
                        num_cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size, progress=False,
                    )  # fmt: skip
                    wall = time.perf_counter() - t
                    assert run.n_done == args.pairs and not run.failures, run.summary
                    rows.append({"workers": n, "run": r, "pairs": run.n_done, "match_s": run.match_seconds,
                                 "pairs_per_s": run.n_done / run.match_seconds, "wall_s": wall,
                                 "startup_s": wall - run.match_seconds})  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
                    _report(args, rows, date, load, ray_start_s, gpu)  # after each run: a partial run is kept
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
