"""Exported ONNX graph (ONNX Runtime, CPU) vs the eager model: time and agreement, in one run.

For each setting: build the model (random official-layout weights unless ``--weights``), export it with
:func:`romav2_plugin.export.export_onnx`, then time the network on the same resized inputs, alternating
eager / ONNX Runtime runs after one warm-up each. Timed: the network only (inputs already resized; neither
side samples). Reported: medians, min-max, ratio, the median peak RSS increase of a run (ONNX Runtime's
memory arena off, so that every run allocates what it needs), and the max output difference.

    python -m benchmarks.onnx_speed                       # turbo, base; 5 runs each
    python -m benchmarks.onnx_speed --settings turbo --repeats 3 --out /tmp/onnx
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import (
    RESULTS,
    benchmark_pair,
    command_line,
    hwm_mb,
    machine_info,
    now_utc,
    provenance_markdown,
    release_memory,
    reset_peak_rss,
    rss_mb,
)


def _bench_setting(setting, weights, img_A, img_B, repeats: int, threads: int | None, tmp: Path) -> dict:
    import onnxruntime as ort

    from romav2_plugin import RoMaV2
    from romav2_plugin.export import export_onnx, output_names, preds_from_outputs, prepare_inputs

    model = RoMaV2.from_pretrained(weights, setting=setting, amp=False)
    t0 = time.perf_counter()
    path = export_onnx(model, tmp / f"{setting}.onnx")
    export_s = time.perf_counter() - t0
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False  # otherwise the arena keeps its peak and later runs show no increase
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inputs = prepare_inputs(model, img_A, img_B)
    feed = {k: v.numpy() for k, v in inputs.items()}

    def eager():
        with torch.inference_mode():
            return model(*inputs.values())

    def onnx():
        return sess.run(None, feed)

    eager(), onnx()  # warm-up
    times = {"eager": [], "onnxruntime": []}
    peaks = {"eager": [], "onnxruntime": []}
    for _ in range(repeats):
        for name, fn in (("eager", eager), ("onnxruntime", onnx)):
            release_memory()
            before = rss_mb()
            reset_peak_rss()
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            peaks[name].append(hwm_mb() - before if before is not None else float("nan"))
            del out
    ref = model.match(img_A, img_B)
    got = preds_from_outputs(model, onnx())
    diff = {n: float((ref[n] - got[n]).abs().max()) for n in output_names(model)}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "setting": setting,
        "export_s": round(export_s, 1),
        "eager_median_s": round(med["eager"], 3),
        "eager_range_s": [round(min(times["eager"]), 3), round(max(times["eager"]), 3)],
        "onnxruntime_median_s": round(med["onnxruntime"], 3),
        "onnxruntime_range_s": [round(min(times["onnxruntime"]), 3), round(max(times["onnxruntime"]), 3)],
        "ratio_onnxruntime_over_eager": round(med["onnxruntime"] / med["eager"], 3),
        "eager_peak_rss_increase_mib": round(statistics.median(peaks["eager"])),
        "onnxruntime_peak_rss_increase_mib": round(statistics.median(peaks["onnxruntime"])),
        "max_abs_diff": {k: float(f"{v:.2e}") for k, v in diff.items()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", default=["turbo", "base"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--weights", default=None, help="official-layout checkpoint (default: seeded random weights)")
    p.add_argument("--threads", type=int, default=None, help="torch and onnxruntime intra-op threads")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="cpu")
    args = p.parse_args(argv)

    import onnxruntime as ort

    from romav2_plugin.testing import make_random_official_state_dict

    if args.threads:
        torch.set_num_threads(args.threads)
    img_A, img_B, pair_name = benchmark_pair()
    weights = args.weights if args.weights else make_random_official_state_dict(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            rows.append(_bench_setting(setting, weights, img_A, img_B, args.repeats, args.threads, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)

    info = machine_info("cpu")
    info["versions"]["onnxruntime"] = ort.__version__
    cmd, date = command_line(), now_utc()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"onnx_speed_{args.tag}"
    stem.with_suffix(".json").write_text(
        json.dumps({"machine": info, "command": cmd, "date": date, "pair": pair_name, "repeats": args.repeats, "rows": rows}, indent=2)
        + "\n"
    )
    lines = [
        "# ONNX Runtime (CPU) vs eager PyTorch, network only",
        "",
        provenance_markdown(info, cmd, date),
        f"- Pair: {pair_name}; weights: {'given' if args.weights else 'seeded random (official layout)'}; "
        f"{args.repeats} alternating runs after one warm-up each; peak RSS increase per run (median; VmHWM reset "
        "before each run, ONNX Runtime's memory arena off)",
        "",
        "| setting | eager (median, min-max) | ONNX Runtime (median, min-max) | time ratio "
        "| peak RSS increase eager / ORT | max abs diff (warp / overlap / precision) | export |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["max_abs_diff"]
        lines.append(
            f"| {r['setting']} | {r['eager_median_s']:.2f} s ({r['eager_range_s'][0]:.2f}-{r['eager_range_s'][1]:.2f}) "
            f"| {r['onnxruntime_median_s']:.2f} s ({r['onnxruntime_range_s'][0]:.2f}-{r['onnxruntime_range_s'][1]:.2f}) "
            f"| {r['ratio_onnxruntime_over_eager']:.2f}x "
            f"| {r['eager_peak_rss_increase_mib']} / {r['onnxruntime_peak_rss_increase_mib']} MiB "
            f"| {d['warp_AB']:.1e} / {d['overlap_AB']:.1e} / {d['precision_AB']:.1e} | {r['export_s']:.0f} s |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md, {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
