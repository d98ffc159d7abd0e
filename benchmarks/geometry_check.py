"""The unreliable-pair check of ``romav2-match``: its threshold chosen on validation pairs, then measured once
on held-out test pairs.

    python -m benchmarks.geometry_check --split validation   # chooses the threshold
    python -m benchmarks.geometry_check --split test         # applies it, once, to the held-out pairs

Pairs: :mod:`benchmarks.geometry_pairs` (made by code; the split is by source photo and fixed by its seed
before any run). Each pair is matched as ``romav2-match`` matches it
(:func:`romav2_plugin.app.matching.match_pair`: 5000 matches drawn with overlap > 0.5, seed 0), which runs
the check of :mod:`romav2_plugin.verify`. Rows are kept in ``--rows`` (one JSON line per pair) so that an
interrupted run resumes. Writes ``benchmarks/results/geometry_check_cpu.{json,md}`` (each split with its own
machine, command, commit and date); a new validation run drops an earlier test section.

The rule below was written and committed before the first run of this version (see ``git log`` of this file).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from benchmarks._common import RESULTS, SHARED_PAIR, command_line, machine_info, now_utc, provenance_markdown

#: The decision rule, fixed before the run (written into the results as is).
RULE = """\
* Statistic: the inlier ratio of `romav2_plugin.verify.check_matches` with its defaults (the better of a
  RANSAC fundamental matrix and homography, inlier threshold `default_threshold_px`) on the matches
  `romav2-match` draws (5000, seed 0, overlap > 0.5). Undefined (fewer than 8 matches or degenerate) counts
  as 0, i.e. always flagged, as `romav2-match` warns on it. The confident share is recorded, not used
  (`MIN_CONFIDENT_SHARE` stays 0).
* Labels: a pair unrelated by construction is *wrong*. A pair covisible by construction is *correct* when at
  least half of its drawn matches lie within 3 px of its known geometry (homography, or depth + pose), and
  *wrong* ("covisible, wrong matches") otherwise, also when it has no drawn match: the warning is about the
  matches, and a covisible pair whose matches are mostly wrong (the Toronto case) is what it must catch.
* Threshold, from the validation split only: the largest t in {0.00, 0.01, ..., 1.00} such that at most 5%
  of the correct validation pairs have an inlier ratio below t. A pair is flagged when its ratio < t.
* Test: that t, unchanged, applied once to the test split: false-alarm rate = correct test pairs flagged /
  correct test pairs, detection rate = wrong test pairs flagged / wrong test pairs (Wilson 95% intervals),
  also per category. Extra rows (the Toronto pair when present: no known geometry) are reported, not counted.
"""
MAX_FALSE_ALARM = 0.05
WITHIN_PX, MIN_RIGHT_SHARE = 3.0, 0.5
OUT_JSON = "geometry_check_cpu.json"


def choose_threshold(correct: list[float], max_false_alarm: float = MAX_FALSE_ALARM) -> float:
    """The largest t on a 0.01 grid with at most ``max_false_alarm`` of ``correct`` below t (NaN counts as 0)."""
    v = np.nan_to_num(np.asarray(correct, dtype=np.float64), nan=0.0)
    best = 0.0
    for t in np.round(np.arange(0, 101) / 100, 2):
        if (v < t).sum() <= max_false_alarm * len(v):
            best = float(t)
    return best


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def label(row: dict) -> str:
    if not row["covisible"]:
        return "wrong"
    t = row["truth_within_3px"]
    return "correct" if t is not None and t >= MIN_RIGHT_SHARE else "wrong"


def _ratio0(row: dict) -> float:
    r = row["inlier_ratio"]
    return 0.0 if r is None or not math.isfinite(r) else r


def run_pairs(pairs, model, rows_file: Path, num_samples: int, *, t_end: float = math.inf,
              quiet: bool = False) -> list[dict]:
    """Match and check every pair not yet in ``rows_file`` (appended as it goes), in an order shuffled with a
    fixed seed (so that a run stopped by ``budget_s`` seconds has done a representative part of every
    category); the rows done, in pair order. ``t_end``: ``time.monotonic()`` after which no pair starts. ``quiet``: print no value (matching a split ahead of its use)."""
    import time

    from PIL import Image

    from romav2_plugin.app.matching import LoadedImage, match_pair

    done = {}
    if rows_file.is_file():
        for line in rows_file.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["name"]] = r
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    for i in np.random.default_rng(0).permutation(len(pairs)):
        p = pairs[i]
        if p.name in done:
            continue
        if time.monotonic() > t_end:
            print(f"time budget spent: {len(done)} of {len(pairs)} pairs done", flush=True)
            break
        a = LoadedImage(Path("A"), Image.fromarray(p.img_A), 1)
        b = LoadedImage(Path("B"), Image.fromarray(p.img_B), 1)
        res = match_pair(model, a, b, num_samples=num_samples, seed=0, min_overlap=0.5)
        m, g = res.check_metadata(), res.geometry
        errs = p.truth(res.arrays["keypoints_A"], res.arrays["keypoints_B"]) if p.truth is not None else None
        fin = errs[np.isfinite(errs)] if errs is not None else None
        within = float(np.mean(fin < WITHIN_PX)) if fin is not None and len(fin) else None
        ratio = m["geometry_inlier_ratio"]
        row = {
            "name": p.name, "split": p.split, "category": p.category, "covisible": p.covisible,
            "size_A": list(a.hw), "size_B": list(b.hw), "matches": int(len(res.confidence)),
            "inlier_ratio": None if not math.isfinite(ratio) else ratio,
            "ratio_F": g.ratio_F if math.isfinite(g.ratio_F) else None,
            "ratio_H": g.ratio_H if math.isfinite(g.ratio_H) else None, "model": g.model,
            "confident_share": m["confident_share"] if math.isfinite(m["confident_share"]) else None,
            "truth_within_3px": within if p.covisible else None,
            "time_pair_s": res.times["match"] + res.times["sample"], "time_check_s": res.times["check"],
        }  # fmt: skip
        done[p.name] = row
        with rows_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        values = "" if quiet else f"ratio {row['inlier_ratio']} within3 {within} matches {row['matches']} "
        print(f"{len(done)}/{len(pairs)} {p.name:55s} {values}pair {row['time_pair_s']:.1f} s check "
              f"{1000 * row['time_check_s']:.0f} ms", flush=True)
    return [done[p.name] for p in pairs if p.name in done]


def summarise(rows: list[dict], t: float) -> dict:
    for r in rows:
        r["label"] = label(r) if r["category"] != "extra" else "extra"
        r["flagged"] = bool(_ratio0(r) < t)
    c = [r for r in rows if r["label"] == "correct"]
    w = [r for r in rows if r["label"] == "wrong"]
    fa, det = sum(r["flagged"] for r in c), sum(r["flagged"] for r in w)
    cats = {}
    for r in rows:
        key = (r["category"], r["label"])
        n, k = cats.get(key, (0, 0))
        cats[key] = (n + 1, k + int(r["flagged"]))
    cost = [r["time_check_s"] / r["time_pair_s"] for r in rows if r["time_pair_s"] > 0]
    return {
        "threshold": t, "correct": len(c), "correct_flagged": fa, "wrong": len(w), "wrong_flagged": det,
        "false_alarm_rate": fa / len(c) if c else float("nan"), "false_alarm_ci95": wilson(fa, len(c)),
        "detection_rate": det / len(w) if w else float("nan"), "detection_ci95": wilson(det, len(w)),
        "by_category": [{"category": k[0], "label": k[1], "pairs": v[0], "flagged": v[1]} for k, v in cats.items()],
        "check_time_share_median": float(np.median(cost)) if cost else float("nan"),
        "check_time_share_max": float(np.max(cost)) if cost else float("nan"),
    }  # fmt: skip


def _section_md(name: str, sec: dict) -> list[str]:
    s = sec["summary"]

    def f(x, p=2):
        return "undefined" if x is None or not math.isfinite(x) else f"{x:.{p}f}"

    lo, hi = s["false_alarm_ci95"]
    dlo, dhi = s["detection_ci95"]
    md = [f"## {name.capitalize()} split", "", provenance_markdown(sec["machine"], sec["command"], sec["date"]), "",
          f"Pairs run: {sec['pairs_run']} of {sec['pairs_planned']} planned"
          + ("" if sec["pairs_run"] == sec["pairs_planned"] else " (the rest not run: time limit on a shared CPU; "
             "pairs run in an order shuffled with a fixed seed, so those run are a seeded random subset)") + ".", "",
          f"Threshold applied: inlier ratio < **{s['threshold']:.2f}**" +
          (" (chosen on this split by the rule)" if name == "validation" else " (from the validation split, unchanged)"),
          "", "| label | pairs | flagged | rate | 95% interval |", "|---|---|---|---|---|",
          f"| correct (false alarms) | {s['correct']} | {s['correct_flagged']} | {f(s['false_alarm_rate'])} | {f(lo)}-{f(hi)} |",
          f"| wrong (detections) | {s['wrong']} | {s['wrong_flagged']} | {f(s['detection_rate'])} | {f(dlo)}-{f(dhi)} |",
          "", f"Cost of the check: median {100 * s['check_time_share_median']:.1f}% (max "
          f"{100 * s['check_time_share_max']:.1f}%) of a pair's match + sample time.", "",
          "| category | label | pairs | flagged |", "|---|---|---|---|"]  # fmt: skip
    for c in s["by_category"]:
        md.append(f"| {c['category']} | {c['label']} | {c['pairs']} | {c['flagged']} |")
    md += ["", "<details><summary>every pair</summary>", "",
           "| pair | label | inlier ratio | F | H | confident share | matches | truth < 3 px | flagged |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sec["pairs"]:
        md.append(f"| {r['name']} | {r['label']} | {f(r['inlier_ratio'])} | {f(r['ratio_F'])} | {f(r['ratio_H'])} | "
                  f"{f(r['confident_share'])} | {r['matches']} | {f(r['truth_within_3px'])} | "
                  f"{'yes' if r['flagged'] else 'no'} |")
    return md + ["", "</details>", ""]


def write_markdown(rec: dict, out: Path) -> None:
    from benchmarks.geometry_pairs import photo_groups

    g = photo_groups()
    md = [f"# Unreliable-pair check: validation and held-out test ({rec['weights']}, setting {rec['setting']}, CPU)",
          "", f"Model: `weights=\"{rec['weights']}\"` (romav2-tiny, shipped with the package; what users get "
          "offline), setting `" + rec["setting"] + "`. Pairs: `benchmarks/geometry_pairs.py` (made by code); "
          f"split by source photo, seed {rec['split_seed']}: validation photos {', '.join(g['validation'])}; "
          f"test photos {', '.join(g['test'])}; scikit-image's brick, grass, gravel textures in both (other crops).",
          "", "## Rule (stated and committed before the run)", "", rec["rule"].rstrip(), "",
          f"**Shipped threshold** (`romav2_plugin.verify.MIN_INLIER_RATIO`): {rec['threshold_inlier_ratio']:.2f}.", ""]  # fmt: skip
    for name in ("validation", "test"):
        if name in rec:
            md += _section_md(name, rec[name])
    (out / "geometry_check_cpu.md").write_text("\n".join(md))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", choices=("validation", "test"), required=True)
    ap.add_argument("--weights", default="tiny")
    ap.add_argument("--setting", default="tiny")
    ap.add_argument("--num-samples", type=int, default=5000)
    ap.add_argument("--rows", type=Path, default=Path("/tmp/geometry_check_rows"),
                    help="folder of the per-pair rows (resume an interrupted run)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--budget-s", type=float, default=math.inf,
                    help="start no new pair this many seconds after the start (pair making included); report the pairs done")
    ap.add_argument("--match-only", action="store_true",
                    help="only match the split's pairs into --rows, printing no value and writing no result "
                    "(the test split may be matched ahead; its result needs the validation threshold)")
    ap.add_argument("--extra", type=Path, nargs=2, default=SHARED_PAIR, metavar=("A", "B"),
                    help="test split: an extra row, not counted (default: the shared Toronto pair)")
    args = ap.parse_args(argv)

    import time

    import torch

    t_end = time.monotonic() + args.budget_s
    from benchmarks.geometry_pairs import SPLIT_SEED, LabelledPair, labelled_pairs
    from romav2_plugin import RoMaV2

    out_json = args.out / OUT_JSON
    torch.manual_seed(0)
    pairs = labelled_pairs(args.split)
    if args.split == "test" and all(p.is_file() for p in args.extra):
        from benchmarks._common import load_rgb

        A, B = (load_rgb(p) for p in args.extra)
        pairs.append(LabelledPair("test", "extra", True, "extra/toronto (real wide-baseline pair)", A, B, None))
    model = RoMaV2.from_pretrained(args.weights, setting=args.setting, device="cpu")
    rows_file = args.rows / f"{args.split}-{args.weights}-{args.setting}-{args.num_samples}.jsonl"
    # the test split's values are not printed: nothing of it is seen before its one summary below
    rows = run_pairs(pairs, model, rows_file, args.num_samples, t_end=t_end,
                     quiet=args.match_only or args.split == "test")
    if args.match_only:
        return 0
    # read after matching: the test split may be matched while the validation split runs; its summary uses
    # the threshold the validation run wrote
    rec = json.loads(out_json.read_text()) if out_json.is_file() else {}
    if args.split == "test" and "validation" not in rec.get("splits_run", []):
        raise SystemExit(f"run --split validation first: {out_json} has no threshold chosen on validation pairs "
                         f"(the test rows are kept in {rows_file})")
    if args.split == "validation":
        t = choose_threshold([_ratio0(r) for r in rows if r["category"] != "extra" and label(r) == "correct"])
        rec = {"weights": args.weights, "setting": args.setting, "num_samples": args.num_samples,
               "split_seed": SPLIT_SEED, "rule": RULE, "threshold_inlier_ratio": t, "threshold_confident_share": 0.0,
               "splits_run": ["validation"]}  # fmt: skip
    else:
        t = rec["threshold_inlier_ratio"]
        if "test" not in rec["splits_run"]:
            rec["splits_run"].append("test")
    info = machine_info()
    rec[args.split] = {"machine": info, "command": command_line(), "date": now_utc(), "summary": summarise(rows, t),
                       "pairs_planned": len(pairs), "pairs_run": len(rows), "pairs": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(rec, indent=1))
    write_markdown(rec, args.out)
    s = rec[args.split]["summary"]
    print(f"{args.split}: threshold {t:.2f}; correct {s['correct']} ({s['correct_flagged']} flagged), wrong "
          f"{s['wrong']} ({s['wrong_flagged']} flagged)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
