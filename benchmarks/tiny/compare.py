"""Candidate romav2-tiny weights against each other on the held-out sets: ``tiny_candidates_cpu.{md,json}``.

    python -m benchmarks.tiny.compare --candidate "v1 recipe=runs/cmp_v1" --candidate "v2 recipe=runs/cmp_v2" \\
        [--shipped] [--limit N]

Each ``--candidate LABEL=RUN`` is a training run's folder (its ``model.pt``, ``model.json`` and ``log.csv``).
For each, ``python -m benchmarks.accuracy`` runs the synthetic homographies (28 held-out pairs) and the
rendered 3D pairs (50) with ``--matchers tiny --tiny-weights RUN/model.pt`` (fp32), into a scratch folder (the
accuracy results files are not touched), and the figures are set side by side with the run's training
time and steps (from ``log.csv``: the sum over logged intervals of steps / pairs-per-second x batch). With
``--shipped``, the package's ``tiny`` weights are measured in the same way as a row of their own. Per pair
differences of every row against the shipped row (else against the first) are given too (pairs are the same
draws for every row), with the difference of the two medians and its 95% paired bootstrap interval (pairs
resampled together, 10,000 times, seed 0): how much of a gap in a median the held-out set resolves. Each
``--versus CANDIDATE=BASELINE`` (labels) adds the same per-pair lines for that pair of rows, e.g. a candidate
against the recipe it is measured against at equal training time; with ``--render`` they are added to a
results file already measured (nothing is rerun).

With ``--real-images DIR`` (e.g. ``../shared/data``: the held-out toronto pair), each row also reconstructs
those photographs through hloc (``python -m benchmarks.hloc_peers --images DIR --methods tiny --tiny-weights
...``, hloc on the import path) and records the registered images and COLMAP's verified inliers against all
matches.

Nothing here trains or ships; the held-out sets are only measured. ``--limit`` evaluates the first N pairs
(smoke tests).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import RESULTS, command_line, git_commit, machine_info, now_utc, provenance_markdown

BENCHMARKS = ("synthetic", "rendered3d")


def training_time(run: Path) -> dict:
    """Steps and seconds per stage from ``run/log.csv`` (logged intervals: ``n`` steps at ``pairs_per_s``)."""
    out: dict[str, dict[str, float]] = {}
    log = run / "log.csv"
    if not log.is_file():
        return out
    with log.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    batch = _batch_sizes(run)
    last: dict[str, int] = {}
    for r in rows:
        st, step = r["stage"], int(r["step"])
        n = step - last.get(st, 0)
        last[st] = step
        pps = float(r["pairs_per_s"])
        d = out.setdefault(st, {"steps": 0, "seconds": 0.0})
        d["steps"] = step
        if pps > 0:
            d["seconds"] += n * batch.get(st, 1) / pps
    return out


def _batch_sizes(run: Path) -> dict[str, int]:
    card = run / "model.json"
    if not card.is_file():
        return {}
    cfg = json.loads(card.read_text()).get("train_config", {})
    return {s["name"]: int(s["batch_size"]) for s in cfg.get("stages", [])}


def measure(weights: str, benchmark: str, scratch: Path, limit: int | None) -> dict:
    out = scratch / f"{benchmark}"
    cmd = [sys.executable, "-m", "benchmarks.accuracy", "--benchmark", benchmark, "--matchers", "tiny",
           "--tiny-weights", weights, "--dtype", "fp32", "--out", str(out)]
    if limit:
        cmd += ["--limit", str(limit)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    data = json.loads((out / f"accuracy_{benchmark}_cpu.json").read_text())
    return next(r for r in data["rows"] if r["matcher"] == "tiny")


def measure_real(weights: str, images: Path, scratch: Path) -> dict:
    """Registered images and verified inliers / matches of ``images`` through hloc with these tiny weights."""
    out = scratch / "real"
    cmd = [sys.executable, "-m", "benchmarks.hloc_peers", "--images", str(images), "--scene", "real",
           "--methods", "tiny", "--out", str(out)] + ([] if weights == "tiny" else ["--tiny-weights", weights])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    data = json.loads(next(out.glob("hloc_peers_real_*.json")).read_text())
    r = next(r for r in data["rows"] if r["method"] == "tiny")
    return {"images": data["views"], **{k: r.get(k) for k in ("registered", "verified_pairs", "inlier_matches",
                                                               "matches")}}


SUMMARY = {
    "synthetic": (("median_corner_error_px", "median corner error px", 3), ("precision@3px", "precision@3px", 3),
                  ("auc@3px", "AUC@3px", 3), ("auc@10px", "AUC@10px", 3)),
    "rendered3d": (("auc@5", "AUC@5", 3), ("auc@10", "AUC@10", 3), ("auc@20", "AUC@20", 3),
                   ("median_pose_error_deg", "median pose error deg", 2), ("failures", "draws without a pose", 0)),
}


def per_pair(a: dict, b: dict, key: str) -> dict:
    d = [y[key] - x[key] for x, y in zip(a["per_pair"], b["per_pair"]) if x[key] is not None and y[key] is not None]
    return {"median": statistics.median(d) if d else None, "worse": sum(v > 0 for v in d),
            "better": sum(v < 0 for v in d)}


def median_gap(a: dict, b: dict, key: str, resamples: int = 10_000, seed: int = 0) -> dict:
    """``median(b) - median(a)`` over the pairs both have, and its 95% paired bootstrap interval."""
    import numpy as np

    both = [(x[key], y[key]) for x, y in zip(a["per_pair"], b["per_pair"]) if x[key] is not None and y[key] is not None]
    if not both:
        return {"gap": None, "low": None, "high": None}
    x, y = np.array(both, dtype=np.float64).T
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    boot = np.median(y[idx], axis=1) - np.median(x[idx], axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"gap": float(np.median(y) - np.median(x)), "low": float(low), "high": float(high)}


def write(rows: list[dict], meta: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tiny_candidates_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = ["# romav2-tiny candidates on the held-out sets", ""]
    if isinstance(meta.get("machine"), dict):
        info = {**meta["machine"], "commit": meta.get("commit")}
        md.append(provenance_markdown(info, meta.get("command", ""), meta.get("date", "")))
    else:
        fields = ("note", "versus", "versus_added_by", "real_images")  # in the text and tables, not provenance
        md += [f"- {k.capitalize()}: {v}" for k, v in meta.items() if k not in fields]
    md += ["", meta.get("note", ""), ""]
    if meta.get("versus_added_by"):
        md += ["Per-pair lines of `--versus` added from the JSON (nothing rerun) by: "
               f"`{meta['versus_added_by']}`", ""]
    head = ["candidate", "weights", "matcher steps", "refiner steps", "training h"]
    cols = [(b, k, label, nd) for b in BENCHMARKS for k, label, nd in SUMMARY[b]]
    real = any("real" in r for r in rows)
    extra = ["real photographs: registered", "real photographs: verified inliers / matches"] if real else []
    md.append("| " + " | ".join(head + [f"{b}: {label}" for b, _, label, _ in cols] + extra) + " |")
    md.append("|" + "---|" * (len(head) + len(cols) + len(extra)))
    for r in rows:
        tt = r["training"]
        hours = sum(v["seconds"] for v in tt.values()) / 3600 if tt else None
        cells = [r["label"], r["weights"], str(tt.get("matcher", {}).get("steps", "-")),
                 str(tt.get("refiners", {}).get("steps", "-")), f"{hours:.2f}" if hours else "-"]
        for b, k, _, nd in cols:
            v = r[b][k]
            cells.append(f"{v:.{nd}f}" if nd else str(v))
        if real:
            x = r.get("real")
            cells += ["-", "-"] if x is None else [
                f"{x['registered']} / {x['images']}",
                "-" if x["inlier_matches"] is None else f"{x['inlier_matches']} / {x['matches']}"]
        md.append("| " + " | ".join(cells) + " |")
    base = next((r for r in rows if r["weights"] == "tiny"), rows[0]) if rows else None
    by_label = {r["label"]: r for r in rows}
    pairs = [(base, r) for r in rows if r is not base]
    pairs += [(by_label[a], by_label[b]) for b, a in meta.get("versus", [])]
    for a, b in pairs:
        md += ["", f"Per pair, {b['label']} against {a['label']} (positive = worse):", ""]
        s = per_pair(a["synthetic"], b["synthetic"], "corner_error_px")
        g = median_gap(a["synthetic"], b["synthetic"], "corner_error_px")
        md.append(f"- synthetic corner error: median {s['median']:+.3f} px, {s['worse']} pairs worse, "
                  f"{s['better']} better; difference of the medians {g['gap']:+.3f} px (95% paired bootstrap "
                  f"{g['low']:+.3f} to {g['high']:+.3f})")
        p = per_pair(a["rendered3d"], b["rendered3d"], "pose_error_deg")
        g = median_gap(a["rendered3d"], b["rendered3d"], "pose_error_deg")
        md.append(f"- rendered 3D pose error: median {p['median']:+.2f} deg, {p['worse']} pairs worse, "
                  f"{p['better']} better; difference of the medians {g['gap']:+.2f} deg (95% paired bootstrap "
                  f"{g['low']:+.2f} to {g['high']:+.2f})")
    (out / "tiny_candidates_cpu.md").write_text("\n".join(md) + "\n")
    return out / "tiny_candidates_cpu.md"


def render(out: Path, versus: list[tuple[str, str]] | None = None) -> Path:
    """Rewrite the markdown of ``out/tiny_candidates_cpu.json`` (nothing measured); ``versus`` (candidate,
    baseline) label pairs are added to those the file records."""
    data = json.loads((out / "tiny_candidates_cpu.json").read_text())
    meta = data["meta"]
    if versus:
        check_versus(versus, [r["label"] for r in data["rows"]])
        known = [tuple(v) for v in meta.get("versus", [])]
        meta = {**meta, "versus": known + [list(v) for v in versus if tuple(v) not in known],
                "versus_added_by": command_line()}
    return write(data["rows"], meta, out)


def parse_versus(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for v in items:
        cand, sep, baseline = v.partition("=")
        if not sep or not cand or not baseline:
            raise SystemExit(f"--versus {v!r}: give CANDIDATE=BASELINE, two row labels (as given to --candidate)")
        out.append((cand, baseline))
    return out


def check_versus(versus: list[tuple[str, str]], labels: list[str]) -> None:
    for cand, baseline in versus:
        missing = [x for x in (cand, baseline) if x not in labels]
        if missing:
            raise SystemExit(f"--versus {cand}={baseline}: no row labelled {missing[0]!r}; the rows are "
                             + ", ".join(repr(x) for x in labels))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidate", action="append", default=[], metavar="LABEL=RUN",
                    help="a training run's folder (model.pt, model.json, log.csv), with a label")
    ap.add_argument("--shipped", action="store_true", help="also measure the package's tiny weights")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--real-images", type=Path, default=None, metavar="DIR",
                    help="also reconstruct these photographs through hloc per row (e.g. ../shared/data)")
    ap.add_argument("--versus", action="append", default=[], metavar="CANDIDATE=BASELINE",
                    help="also give the per-pair differences of these two rows (labels), e.g. at equal training time")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON in --out")
    args = ap.parse_args(argv)
    versus = parse_versus(args.versus)
    if args.render:
        print(render(args.out, versus).read_text())
        return 0
    cands = []
    for c in args.candidate:
        label, sep, run = c.partition("=")
        if not sep or not (Path(run) / "model.pt").is_file():
            ap.error(f"--candidate {c!r}: give LABEL=RUN with RUN/model.pt present")
        cands.append((label, Path(run)))
    if args.shipped:
        cands.append(("shipped (v1, parts 1-12)", None))
    if not cands:
        ap.error("give at least one --candidate (or --shipped)")
    check_versus(versus, [label for label, _ in cands])
    if args.real_images is not None:
        from benchmarks.hloc_peers import _hloc

        if not args.real_images.is_dir():
            ap.error(f"--real-images {args.real_images}: not a folder (give the folder of the photographs)")
        _hloc()  # hloc importable, else the fix is named before anything runs
    meta = {"machine": machine_info("cpu"), "command": command_line(), "commit": git_commit(), "date": now_utc(),
            "note": args.note, "versus": [list(v) for v in versus],
            "real_images": None if args.real_images is None else str(args.real_images)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, run) in enumerate(cands):
            weights = "tiny" if run is None else str(run / "model.pt")
            row = {"label": label, "weights": "tiny" if run is None else str(run),
                   "training": {} if run is None else training_time(run)}
            for b in BENCHMARKS:
                print(f"[compare] {label}: {b}", file=sys.stderr, flush=True)
                row[b] = measure(weights, b, Path(tmp) / str(i), args.limit)
            if args.real_images is not None:
                print(f"[compare] {label}: {args.real_images} through hloc", file=sys.stderr, flush=True)
                row["real"] = measure_real(weights, args.real_images, Path(tmp) / str(i))
            rows.append(row)
    print(write(rows, meta, args.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
