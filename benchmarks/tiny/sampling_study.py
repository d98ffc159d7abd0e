"""Which matches romav2-tiny should draw: a validation study of sampling weights on the *training* photographs.

    python -m benchmarks.tiny.sampling_study [--weights tiny] [--pairs 16] [--rendered 8] [--draws 5]
        [--candidates overlap,keep0.5,keep0.3,pow4,pow8] [--tag NAME]

``sample()`` draws matches with probability proportional to the predicted overlap (then thins dense regions,
the KDE balancing). RoMa v2 also predicts, per match, a 2x2 *precision* (inverse covariance, in pixels of the
prediction grid); the official sampler does not use it. This study tries sampling weights that do, on
validation pairs drawn from the training photographs (the settings study's pairs: synthetic homographies at
512 px and rendered 3D pairs at 384x512, seed 7; the held-out photographs are never read). With ``sigma`` the
predicted standard deviation along the least certain direction (``1 / sqrt(smallest eigenvalue)``):

* ``overlap``: the overlap alone (the official weights);
* ``keepQ``: the overlap, on the fraction ``Q`` of the pair's candidates with the smallest ``sigma`` only (the
  setting's ``precise_fraction``; this study's first run, ``tiny_sampling_study_part11``, cut at the quantile
  of all grid cells' ``sigma``, the same cells up to the interpolation of ``torch.quantile``);
* ``powK``: the overlap times ``sigma ** -K`` (a soft preference for precise matches);
* ``unbalanced``: the overlap alone without the KDE balancing (the setting's ``balanced_sampling=False``).

The network runs once per pair; every candidate samples from the same prediction with the same seed. Writes
``benchmarks/results/tiny_sampling_study_cpu.{json,md}`` (``--tag`` replaces ``cpu``) with machine, command and date.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from benchmarks.tiny.settings_study import add_validation_arguments, load_validation, write_study

CANDIDATES = ["overlap", "keep0.5", "keep0.3", "pow4", "pow8"]


def _candidates(text: str) -> list[str]:
    out = [c.strip() for c in text.split(",") if c.strip()]
    for c in out:
        if not re.fullmatch(r"overlap|unbalanced|keep(0?\.\d+|1(\.0*)?)|pow\d+(\.\d+)?", c):
            raise argparse.ArgumentTypeError(
                f"bad candidate {c!r}: write overlap, unbalanced, keepQ (0 < Q <= 1, e.g. keep0.3) or powK "
                "(e.g. pow8)")
        if c.startswith("keep") and not 0 < float(c[4:]) <= 1:
            raise argparse.ArgumentTypeError(f"bad candidate {c!r}: Q must be in (0, 1]")
    return out


def reweight(overlap, precision, candidate: str):
    """The overlap weights of ``candidate`` (``powK``: times ``sigma ** -K``; the others: unchanged) from
    ``overlap (B, H, W, 1)`` and ``precision (B, H, W, 2, 2)``."""
    import torch

    from romav2_plugin.geometry import largest_sigma

    if not candidate.startswith("pow"):
        return overlap
    sigma = largest_sigma(precision)[..., None]
    k = float(candidate[3:])
    return overlap * torch.where(torch.isfinite(sigma), sigma.clamp_min(1e-6) ** -k, torch.zeros_like(sigma))


def apply_candidate(model, candidate: str) -> None:
    """Set the model's sampling options for ``candidate`` (``keepQ``: ``precise_fraction = Q``, the option as
    it ships; ``unbalanced``: ``balanced_sampling = False``; otherwise the official ones)."""
    model.precise_fraction = float(candidate[4:]) if candidate.startswith("keep") else 1.0
    model.balanced_sampling = candidate != "unbalanced"


class _Reweighted:
    """The model's API for :class:`~benchmarks.accuracy.matchers.RoMaV2Matcher`, with one network run per pair
    (cached) and the candidate's sampling weights."""

    def __init__(self, model, cache: dict) -> None:
        self.model, self.cache, self.candidate = model, cache, "overlap"
        self.device = model.device
        self.to_pixel_coordinates = model.to_pixel_coordinates

    def match(self, img_A, img_B):
        key = (id(img_A), id(img_B))
        if key not in self.cache:
            self.cache[key] = self.model.match(img_A, img_B)
        return self.cache[key]

    def sample(self, preds, num, *, generator=None):
        if preds.get("precision_AB") is None:
            raise ValueError("the prediction has no precision_AB: the study needs the refiners' precisions")
        preds = dict(preds, overlap_AB=reweight(preds["overlap_AB"], preds["precision_AB"], self.candidate))
        apply_candidate(self.model, self.candidate)
        return self.model.sample(preds, num, generator=generator)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_validation_arguments(ap)
    ap.add_argument("--draws", type=int, default=5, help="match draws per rendered pair (pose RANSAC runs)")
    ap.add_argument("--candidates", type=_candidates, default=CANDIDATES,
                    help="comma list of overlap, unbalanced, keepQ, powK (default: " + ",".join(CANDIDATES) + ")")
    args = ap.parse_args(argv)

    from benchmarks.accuracy.matchers import RoMaV2Matcher
    from benchmarks.accuracy.protocols import evaluate_rendered3d, evaluate_synthetic

    loaded = load_validation(args)
    if loaded is None:
        return 2
    model, syn, ren = loaded
    wrapped = _Reweighted(model, {})
    rows = []
    for cand in args.candidates:
        wrapped.candidate = cand
        print(f"[study] sampling weights {cand} ...", file=sys.stderr, flush=True)
        s = evaluate_synthetic(RoMaV2Matcher(wrapped, num=5000, seed=0, name=cand), syn)
        r = evaluate_rendered3d(RoMaV2Matcher(wrapped, num=5000, seed=0, name=cand), ren, draws=args.draws, seed=0)
        row = {"candidate": cand,
               "synthetic_precision@3px": s["precision@3px"],
               "synthetic_median_corner_px": s["median_corner_error_px"],
               "synthetic_auc@3/5/10px": [s["auc@3px"], s["auc@5px"], s["auc@10px"]],
               "synthetic_precision_per_pair": [p["precision"] for p in s["per_pair"]],
               "rendered_auc@5/10/20": [r["auc@5"], r["auc@10"], r["auc@20"]],
               "rendered_median_pose_error_deg": r["median_pose_error_deg"],
               "rendered_failures": r["failures"],
               "mean_matches": [s["mean_matches"], r["mean_matches"]]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    header = ("| sampling weights | precision@3px | synthetic median corner px | synthetic AUC@3/5/10px "
              "| rendered AUC@5/10/20 | rendered median pose error deg | failed draws |")
    lines = [f"| {r['candidate']} | {r['synthetic_precision@3px']:.3f} | {r['synthetic_median_corner_px']:.2f} | "
             + "/".join(f"{x:.3f}" for x in r["synthetic_auc@3/5/10px"]) + " | "
             + "/".join(f"{x:.3f}" for x in r["rendered_auc@5/10/20"])
             + f" | {r['rendered_median_pose_error_deg']:.2f} | {r['rendered_failures']} |" for r in rows]
    write_study(args, argv, "sampling_study", "romav2-tiny sampling weights", syn, ren, {"draws": args.draws},
                "validation on training photographs (fresh warps and scenes), 5000 matches a pair, the tiny "
                "setting's resolutions; one network run per pair shared by every candidate", rows, header, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
