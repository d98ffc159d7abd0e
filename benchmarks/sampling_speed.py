"""CPU time of ``sample()`` against ``match()`` at every setting, medians of runs in turns, in one process.

    python -m benchmarks.sampling_speed [--settings tiny,turbo,fast,base,mega1500,precise] [--runs 3]
        [--heavy-runs 1] [--before-runs 1] [--num 5000] [--threads N] [--weights FILE]

``tiny``: romav2-tiny (shipped weights) on the demo pair, as a new user runs it. The official settings: the
official-size model with seeded random official-layout weights (``--weights`` for a file; random weights do
not change the cost) on the toronto pair (or two scikit-image photos where it is absent). ``mega1500`` stands
for ``scannet1500``, ``wxbs`` and ``satast`` too (the same setting). The model runs with its defaults
(``amp=None``: bf16 on CPUs with native bf16).

Per setting, after one untimed ``match()`` (whose predictions every ``sample()`` uses) and one warm-up
``sample()``: ``--runs`` turns of ``match()`` then ``sample(preds, NUM, generator=0)`` (``--heavy-runs`` at the
800-px settings), then ``--before-runs`` of the sampler this project shipped before (the official settings:
the official half-precision KDE operations in row chunks, ``N x N`` work; ``tiny``: the full float32 KDE,
``grid_kde=False``). For the official settings the draws of both samplers are compared (they must be the
official ones, bit for bit). Writes ``benchmarks/results/sampling_speed_cpu.{json,md}`` with machine, command,
commit and date; the file is rewritten after every setting, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks._common import (
    RESULTS,
    benchmark_pair,
    command_line,
    machine_info,
    now_utc,
    provenance_markdown,
    tiny_on_demo_pair,
)

HEAVY = {"precise", "mega1500", "scannet1500", "wxbs", "satast"}


@contextlib.contextmanager
def _shipped_before(model):
    """The sampler as shipped before: the official half-precision operations over ``N x N`` (official
    settings) or the full float32 KDE (``tiny``)."""
    from romav2_plugin import sampling

    fast, grid_kde = sampling._kde_density_half_cpu, model.grid_kde
    sampling._kde_density_half_cpu = lambda x, std, chunk_size, **_: sampling._kde_density_half_official(
        x, std, chunk_size)
    model.grid_kde = False
    try:
        yield
    finally:
        sampling._kde_density_half_cpu, model.grid_kde = fast, grid_kde


def _timed(f):
    t0 = time.perf_counter()
    out = f()
    return time.perf_counter() - t0, out


def measure(model, A, B, *, num: int, runs: int, before_runs: int) -> dict:
    """Times of ``match()``, ``sample()`` and the sampler shipped before, for the model's current setting."""
    preds = model.match(A, B)
    model.sample(preds, num, generator=0)  # warm-up (tables, allocator)
    t_match, t_sample = [], []
    for _ in range(runs):
        t_match.append(_timed(lambda: model.match(A, B))[0])
        t, drawn = _timed(lambda: model.sample(preds, num, generator=0))
        t_sample.append(t)
    t_before, same = [], None
    with _shipped_before(model):
        for _ in range(before_runs):
            t, old = _timed(lambda: model.sample(preds, num, generator=0))
            t_before.append(t)
    if before_runs and model.half_precision_kde and not model.grid_kde:
        same = all(torch.equal(a, b) for a, b in zip(drawn[:2], old[:2]))
    med = {k: statistics.median(v) if v else None
           for k, v in (("match", t_match), ("sample", t_sample), ("sample_before", t_before))}
    return {
        "seconds": {"match": t_match, "sample": t_sample, "sample_before": t_before},
        "median": med,
        "ratio_sample_over_match": med["sample"] / med["match"],
        "ratio_before_over_match": med["sample_before"] / med["match"] if t_before else None,
        "speedup_sample": med["sample_before"] / med["sample"] if t_before else None,
        "same_draws_as_before": same,
        "sampler": _sampler_name(model),
    }


def _sampler_name(model) -> str:
    if model.grid_kde:
        return "grid density (float32)"
    return "official half-precision KDE (official draws)" if model.half_precision_kde else "float32 KDE"


def _markdown(record: dict) -> str:
    md = [
        "# sample() against match(), every setting, CPU", "",
        provenance_markdown(record["machine"], record["command"], record["date"]),
        f"- {record['threads']} torch threads; bf16 autocast by default on this CPU: {record['amp_default']}; "
        f"sample(preds, {record['num']}, generator=0) = balanced sampling from {4 * record['num']} candidates. "
        "tiny: romav2-tiny on the demo pair; the official settings: official-size model, seeded random "
        f"official-layout weights, {record['pair']}. Per setting: match() and sample() timed in turns "
        "(medians), then the sampler shipped before (the official half-precision KDE as `N x N` row chunks; "
        "tiny: the full float32 KDE).",
        f"- {record['load_note']}",
        *(f"- Rows {', '.join(r['settings'])} from another run: `{r['command']}`, {r['date']}, commit {r['commit']}"
          for r in record.get("earlier_runs", []) if r["settings"]), "",
        "| setting | sampler | match() s | sample() s | sample/match | before: sample() s | before: sample/match "
        "| sample speed-up | same draws as before | runs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in record["settings"].items():
        m = r["median"]
        before = "-" if m["sample_before"] is None else f"{m['sample_before']:.2f}"
        rb = "-" if r["ratio_before_over_match"] is None else f"{100 * r['ratio_before_over_match']:.0f}%"
        sp = "-" if r["speedup_sample"] is None else f"{r['speedup_sample']:.1f}x"
        same = {None: "-", True: "yes", False: "NO"}[r["same_draws_as_before"]]
        md.append(f"| {name} | {r['sampler']} | {m['match']:.2f} | {m['sample']:.2f} | "
                  f"{100 * r['ratio_sample_over_match']:.0f}% | {before} | {rb} | {sp} | {same} | "
                  f"{len(r['seconds']['match'])}/{len(r['seconds']['sample_before'])} |")
    md += ["", "Runs: timed match()/sample() turns / runs of the sampler shipped before. Times in seconds.", ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="tiny,turbo,fast,base,mega1500,precise")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--heavy-runs", type=int, default=1, help="runs at the 800-px settings")
    ap.add_argument("--before-runs", type=int, default=1)
    ap.add_argument("--num", type=int, default=5000, help="matches sampled (the CLI's and kornia's default)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--weights", default=None, help="official-layout weights (default: seeded random)")
    ap.add_argument("--load-note", default="Contended: the 2 cores were shared with other jobs during the run; "
                    "ratios are from one run, absolute times depend on the load.")
    ap.add_argument("--pair", nargs=2, default=None, metavar=("A", "B"),
                    help="image pair of the official settings (default: the shared toronto pair)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other settings' rows of the existing results file (their commands are kept)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from romav2_plugin import RoMaV2, runtime

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    info, command, date = machine_info(), command_line(), now_utc()
    A_img, B_img, pair = benchmark_pair(tuple(args.pair) if args.pair else None)
    record = {"machine": info, "command": command, "date": date, "threads": torch.get_num_threads(),
              "amp_default": runtime.amp_default("cpu"), "num": args.num, "pair": pair,
              "load_note": args.load_note, "settings": {}, "earlier_runs": []}
    old = args.out / "sampling_speed_cpu.json"
    if args.merge and old.is_file():
        prev = json.loads(old.read_text())
        if "settings" in prev:  # rows of settings this run does not measure, with the run that measured them
            kept = {k: v for k, v in prev["settings"].items() if k not in settings}
            record["settings"].update(kept)
            # each kept row stays with the run that measured it: an earlier run's, or the previous run's own
            older = prev.get("earlier_runs", [])
            prev_own = set(prev["settings"]) - set().union(*(set(r["settings"]) for r in older))
            runs = [*older, {"command": prev["command"], "date": prev["date"],
                             "commit": prev["machine"].get("commit"), "settings": sorted(prev_own)}]
            record["earlier_runs"] = [{**r, "settings": sorted(set(r["settings"]) & set(kept))} for r in runs
                                      if set(r["settings"]) & set(kept)]
    official = None
    args.out.mkdir(parents=True, exist_ok=True)
    for name in settings:
        if name == "tiny":
            model, A, B = tiny_on_demo_pair()
        else:
            if official is None:
                from benchmarks.speed import _load_weights

                official = RoMaV2.from_pretrained(_load_weights(args.weights), setting=name, device="cpu")
            model, A, B = official, A_img, B_img
            model.apply_setting(name)
        runs = args.heavy_runs if name in HEAVY else args.runs
        record["settings"][name] = r = measure(model, A, B, num=args.num, runs=runs, before_runs=args.before_runs)
        print(f"[sampling_speed] {name}: match {r['median']['match']:.2f} s, sample {r['median']['sample']:.2f} s "
              f"({100 * r['ratio_sample_over_match']:.0f}%)", flush=True)
        (args.out / "sampling_speed_cpu.json").write_text(json.dumps(record, indent=1))
        (args.out / "sampling_speed_cpu.md").write_text(_markdown(record))
    print(_markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
