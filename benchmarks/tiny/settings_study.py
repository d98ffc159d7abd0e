"""Which inference resolutions suit romav2-tiny: a validation study on the *training* photographs.

    python -m benchmarks.tiny.settings_study [--weights tiny] [--pairs 16] [--rendered 8]
        [--candidates 256,256+512,384,384+512,256+384:both] [--tag NAME]

The model was trained at 256x256. This runs it with other coarse resolutions and with the optional second
refinement pass (the official ``precise`` setting's high-resolution pass), and optionally both directions
(``:both``, as ``precise`` does; the tiny setting matches A->B only), on validation pairs drawn from the
training photographs (``.tiny-data/train``) with seeds that neither training nor the held-out benchmarks use:
synthetic homography pairs at 512 px (the synthetic benchmark's generator, seed 7) and rendered 3D pairs at
384x512 (the rendered3d generator, seed 7). The held-out photographs are never read, so the chosen setting is
not tuned on the held-out figures. Writes ``benchmarks/results/tiny_settings_study_cpu.{json,md}`` (``--tag`` replaces ``cpu``) with
machine, command and date.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

#: (coarse H=W, second-pass H=W or None, both directions); the first row is the preset ``tiny`` the model was
#: trained at.
CANDIDATES = [(256, None, False), (256, 512, False), (384, None, False), (384, 512, False)]


def _candidates(text: str) -> list[tuple[int, int | None, bool]]:
    """``"256,256+384,256+384:both"`` -> ``[(256, None, False), (256, 384, False), (256, 384, True)]``."""
    out = []
    for item in text.split(","):
        res, colon, flag = item.strip().partition(":")
        lr, _, hr = res.partition("+")
        if not lr.isdigit() or (hr and not hr.isdigit()) or (colon and flag != "both"):
            raise argparse.ArgumentTypeError(
                f"bad candidate {item!r}: write COARSE or COARSE+SECOND, optionally with :both, e.g. 256+512:both")
        out.append((int(lr), int(hr) if hr else None, bool(colon)))
    return out


def _name(lr: int, hr: int | None, both: bool) -> str:
    return f"{lr}" + (f"+{hr}" if hr else "") + (":both" if both else "")


def _set(model, lr: int, hr: int | None, both: bool) -> None:
    model.H_lr = model.W_lr = lr
    model.H_hr = model.W_hr = hr
    model.bidirectional = both


def add_validation_arguments(ap: argparse.ArgumentParser) -> None:
    """The options the validation studies share (weights, pairs, training photographs, threads, output)."""
    ap.add_argument("--weights", default="tiny")
    ap.add_argument("--pairs", type=int, default=16, help="synthetic homography pairs")
    ap.add_argument("--rendered", type=int, default=8, help="rendered 3D pairs")
    ap.add_argument("--images", default=".tiny-data/train")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    ap.add_argument("--tag", default="cpu", help="the result files are tiny_<study>_<tag>; the default, cpu, "
                    "replaces the current result")


def load_validation(args):
    """``(model, synthetic pairs, rendered pairs)`` of the training photographs (seed 7), or ``None`` (after
    saying why on stderr) when ``--images`` points at the held-out photographs."""
    import torch

    from benchmarks.accuracy.data import rendered_pairs, synthetic_pairs
    from romav2_plugin import RoMaV2

    if "heldout" in Path(args.images).parts:
        print("error: this study validates on training photographs, never the held-out ones", file=sys.stderr)
        return None
    torch.set_num_threads(args.threads)
    model = RoMaV2.from_pretrained(args.weights, amp=False).eval()
    syn = synthetic_pairs(args.pairs, seed=7, long_side=512, images=args.images)
    ren = rendered_pairs(args.rendered, folder=args.images, seed=7)
    return model, syn, ren


def write_study(args, argv, module: str, title: str, syn, ren, pairs_extra: dict, note: str, rows: list,
                header: str, lines: list[str]) -> None:
    """Write ``benchmarks/results/tiny_<module>_<tag>.{json,md}`` with machine, command and date, and print the
    table (``header``: its first row; ``lines``: one per candidate)."""
    from benchmarks._common import machine_info

    info = machine_info()
    out = {"command": " ".join([f"python -m benchmarks.tiny.{module}", *(argv or sys.argv[1:])]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": info,
           "weights": args.weights, "images": args.images, "threads": args.threads,
           "pairs": {"synthetic": len(syn), "rendered": len(ren), **pairs_extra, "seed": 7}, "note": note,
           "rows": rows}
    path = Path(args.out) / f"tiny_{module}_{args.tag}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    draws = f" ({pairs_extra['draws']} draws)" if "draws" in pairs_extra else ""
    md = [f"# {title}, validated on training photographs", "",
          f"{out['date']}, {info['cpu']}, {args.threads} threads; `{out['command']}`; weights `{args.weights}`; "
          f"{len(syn)} synthetic pairs at 512 px and {len(ren)} rendered pairs at 384x512{draws} from "
          f"`{args.images}` (seed 7). {note}.", "", header, "|" + "---|" * (header.count("|") - 1), *lines]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_validation_arguments(ap)
    ap.add_argument("--candidates", type=_candidates, default=CANDIDATES,
                    help="comma list of COARSE or COARSE+SECOND, each optionally with :both (both directions; "
                         "default: 256,256+512,384,384+512)")
    args = ap.parse_args(argv)

    from benchmarks.accuracy.matchers import RoMaV2Matcher
    from benchmarks.accuracy.protocols import evaluate_rendered3d, evaluate_synthetic

    loaded = load_validation(args)
    if loaded is None:
        return 2
    model, syn, ren = loaded
    rows = []
    for lr, hr, both in args.candidates:
        _set(model, lr, hr, both)
        print(f"[study] coarse {lr}, second pass {hr}, both directions {both} ...", file=sys.stderr, flush=True)
        m = RoMaV2Matcher(model, num=5000, seed=0, name=_name(lr, hr, both))
        s = evaluate_synthetic(m, syn)
        r = evaluate_rendered3d(m, ren, draws=5, seed=0)
        a, b = syn[0].img_A, syn[0].img_B
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            model.match(a, b)
            times.append(time.perf_counter() - t0)
        row = {"coarse": lr, "second_pass": hr, "both_directions": both,
               "synthetic_median_corner_px": s["median_corner_error_px"],
               "synthetic_precision@3px": s["precision@3px"],
               "synthetic_auc@3/5/10px": [s["auc@3px"], s["auc@5px"], s["auc@10px"]],
               "rendered_auc@5/10/20": [r["auc@5"], r["auc@10"], r["auc@20"]],
               "match_seconds_median_of_3": float(np.median(times))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    header = ("| coarse | second pass | directions | synthetic median corner px | precision@3px | rendered AUC@5/10/20 "
              "| match() s |")
    lines = [f"| {r['coarse']} | {r['second_pass'] or '-'} | {'both' if r['both_directions'] else 'A->B'} | "
             f"{r['synthetic_median_corner_px']:.1f} | {r['synthetic_precision@3px']:.3f} | "
             + "/".join(f"{x:.3f}" for x in r["rendered_auc@5/10/20"])
             + f" | {r['match_seconds_median_of_3']:.2f} |" for r in rows]
    write_study(args, argv, "settings_study", "romav2-tiny inference resolutions", syn, ren, {},
                "validation on training photographs (fresh warps and scenes); match() times are one run of 3 "
                "repeats and only indicative: compare them with benchmarks.tiny.speed on an idle machine",
                rows, header, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
