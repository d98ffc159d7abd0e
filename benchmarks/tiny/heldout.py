"""romav2-tiny's held-out figures, gathered into one file: ``benchmarks/results/tiny_heldout_cpu.json``.

    python -m benchmarks.tiny.heldout [--weights tiny] [--label "after part 3"] [--no-hloc] [--no-rendered3d]

Measures, with the given weights and no network:

- the demo pair (``romav2_plugin/assets/demo_*``): median reprojection error of 5000 sampled matches against
  its shipped homography, and the same for an untrained model of the same architecture (seed 0);
- kornia: ``KF.RoMaV2`` + kornia's RANSAC on a held-out synthetic homography pair of scikit-image's coffee
  photo (held out of training), mean corner error, trained and untrained;
- hloc (where importable): ``match_dense`` with the ``romav2_tiny`` conf + ``reconstruction.main`` on the
  rendered five-view scene of ``tests/synthetic_scene.py``: registered cameras and 3D points;

and copies in, with their dates and commands, the rows ``tiny`` and ``sift`` of
``accuracy_synthetic_cpu.json`` and ``accuracy_rendered3d_cpu.json`` (``python -m benchmarks.accuracy``) and the
median of ``tiny_speed_cpu.json`` (``python -m benchmarks.tiny.speed``): run those first. ``--no-rendered3d``
leaves the rendered-3D rows out (recorded as not measured) when that file does not hold these weights' rows
yet. The figures of the file being replaced are kept under ``earlier`` with their label (replaced, not
kept, when the label is the same: a re-measurement of the same weights).
``tests/test_tiny.py`` uses the same functions, so a test and this file measure the same thing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import RESULTS, command_line, machine_info, now_utc

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "romav2_plugin" / "assets"

#: The issue's targets (held-out images, 512 px long side).
TARGETS = {"demo_px": 3.0, "synthetic_corner_px": 3.0, "synthetic_precision_at_3px": 0.7, "rendered3d_auc10": 0.5,
           "match_seconds": 1.0}


def demo_median_error(model) -> float:
    """Median reprojection error (px) of 5000 sampled matches (seed 0) of the shipped demo pair against its
    homography; pixel centres at 0 on both sides, as the homography is stored."""
    from PIL import Image

    from romav2_plugin.app.summary import reprojection_errors

    meta = json.loads((ASSETS / "demo_pair.json").read_text())
    A, B = Image.open(ASSETS / "demo_A.jpg"), Image.open(ASSETS / "demo_B.jpg")
    preds = model.match(A, B)
    m, _, _, _ = model.sample(preds, 5000, generator=0)
    ka, kb = model.to_pixel_coordinates(m, A.height, A.width, B.height, B.width, pixel_center=0.0)
    return float(np.median(reprojection_errors(np.array(meta["homography_A_to_B"]), ka.double().numpy(),
                                               kb.double().numpy())))


def heldout_pair(seed: int):
    """A synthetic homography pair of scikit-image's coffee photo (held out of training: the demo pair derives
    from it). Returns ``img_A, img_B`` (3, H, W) float in [0, 1] and ``Hm`` (3, 3) float64 mapping A to B in
    pixel coordinates with pixel centres at +0.5."""
    import skimage.data

    from romav2_plugin.train.augment import random_homography
    from romav2_plugin.train.data import _sample_image

    img = torch.from_numpy(skimage.data.coffee()).permute(2, 0, 1).float() / 255
    h, w = img.shape[-2:]
    g = torch.Generator().manual_seed(seed)
    Hm = random_homography(g, (h, w), max_rotation_deg=10, scale_range=(0.85, 1.15), max_translation=0.05,
                           max_perspective=0.05)
    img_B, _ = _sample_image(img, torch.linalg.inv(Hm), (h, w))  # B shows A through Hm
    return img, img_B, Hm


def kornia_corner_error(matcher, img_A, img_B, Hm) -> float:
    """Mean corner error (px) of the homography kornia's RANSAC (3 px, seed 0) fits to ``matcher``'s matches."""
    from kornia.geometry.ransac import RANSAC

    out = matcher({"image0": img_A[None], "image1": img_B[None]})
    if len(out["keypoints0"]) < 4:
        return float("inf")
    H_est, _ = RANSAC("homography", inl_th=3.0, max_iter=20, seed=0)(out["keypoints0"], out["keypoints1"])
    h, w = img_A.shape[-2:]
    corners = torch.tensor([[0.0, 0, 1], [w - 1, 0, 1], [w - 1, h - 1, 1], [0, h - 1, 1]], dtype=torch.float64)
    # kornia keypoints: pixel centre at 0; Hm acts on centre-at-0.5 pixels
    shift = torch.tensor([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]], dtype=torch.float64)
    H_true = torch.linalg.inv(shift) @ Hm @ shift

    def proj(Hx):
        p = corners @ Hx.T
        return p[:, :2] / p[:, 2:]

    return float((proj(H_est.double()) - proj(H_true)).norm(dim=-1).mean())


def hloc_scene_reconstruction(workdir: Path, conf_name: str = "romav2_tiny", weights: str | None = None,
                              amp: bool | None = None):
    """hloc ``match_dense`` (conf ``conf_name``, optionally other ``weights``; ``amp`` its conf key, ``None``:
    the device's default) + ``reconstruction.main`` on the
    rendered five-view scene of ``tests/synthetic_scene.py``; returns the pycolmap reconstruction or None.
    Needs hloc (installed, or the copy in ``../shared/thirdparty/hloc``) and pycolmap."""
    import importlib.util

    import cv2

    shared_hloc = REPO.parent / "shared" / "thirdparty" / "hloc"  # as tests/conftest.py: hloc is not on PyPI
    if importlib.util.find_spec("hloc") is None and (shared_hloc / "hloc" / "__init__.py").is_file():
        sys.path.insert(0, str(shared_hloc))
    from hloc import pairs_from_exhaustive, reconstruction

    sys.path.insert(0, str(REPO / "tests"))
    try:
        from synthetic_scene import default_cameras, default_scene
    finally:
        sys.path.remove(str(REPO / "tests"))
    from romav2_plugin.adapters import hloc as adapter

    scene, cameras = default_scene(), default_cameras(5)
    images = workdir / "images"
    images.mkdir(parents=True)
    names = [f"view{i}.png" for i in range(5)]
    for name, cam in zip(names, cameras):
        cv2.imwrite(str(images / name), scene.render(cam)[..., ::-1])
    pairs = workdir / "pairs.txt"
    pairs_from_exhaustive.main(pairs, image_list=names)
    match_dense = adapter.ensure_registered()
    conf = copy.deepcopy(match_dense.confs[conf_name])
    if weights is not None:
        conf["model"]["weights"] = weights
    conf["model"]["amp"] = amp
    (workdir / "out").mkdir()
    features, matches = match_dense.main(conf, pairs, images, export_dir=workdir / "out")
    return reconstruction.main(workdir / "sfm", images, pairs, features, matches)


def untrained_tiny():
    """romav2-tiny's architecture with seeded random weights (seed 0; the global RNG is left as it was)."""
    from romav2_plugin import RoMaV2
    from romav2_plugin.config import tiny_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return RoMaV2(tiny_config(), amp=False)


def _rows(name: str) -> dict:
    path = RESULTS / f"accuracy_{name}_cpu.json"
    if not path.is_file():
        return {}
    d = json.loads(path.read_text())
    rows = {r["matcher"]: {k: v for k, v in r.items() if k != "per_pair"} for r in d["rows"]}
    return {"command": d["meta"]["command"], "date": d["meta"]["date"],
            **{m: rows[m] for m in ("tiny", "sift") if m in rows}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="tiny", help="'tiny' (the shipped model) or a .pt file of the same setting")
    ap.add_argument("--label", default=None, help="what these weights are, e.g. 'after part 3'")
    ap.add_argument("--no-hloc", action="store_true", help="skip the hloc reconstruction")
    ap.add_argument("--no-rendered3d", action="store_true",
                    help="leave out the rendered-3D rows (accuracy_rendered3d_cpu.json not yet run with these weights)")
    ap.add_argument("--fp32", action="store_true",
                    help="amp=False everywhere (default: the CPU's default precision, bf16 where it is native)")
    ap.add_argument("--out", default=str(RESULTS / "tiny_heldout_cpu.json"))
    args = ap.parse_args(argv)

    import kornia

    import romav2_plugin  # noqa: F401  registers KF.RoMaV2
    from romav2_plugin import RoMaV2, runtime
    from romav2_plugin.config import get_setting

    amp = False if args.fp32 else None
    model = RoMaV2.from_pretrained(args.weights, setting="tiny", device="cpu", amp=amp)
    fig: dict = {"label": args.label, "weights": args.weights, "date": now_utc(), "command": command_line(),
                 "machine": machine_info("cpu"),
                 "precision": "fp32" if args.fp32 or not runtime.amp_default("cpu") else "bf16 autocast",
                 "native_cpu_bf16": runtime.native_cpu_bf16(),
                 # the sampling options change which matches are drawn, so the figures name them
                 "setting": {"name": "tiny", **dataclasses.asdict(get_setting("tiny"))}}
    fig["demo_pair_median_reprojection_px"] = round(demo_median_error(model), 2)
    fig["demo_pair_median_reprojection_px_untrained"] = round(demo_median_error(untrained_tiny()), 1)
    print("demo pair:", fig["demo_pair_median_reprojection_px"], "px; untrained",
          fig["demo_pair_median_reprojection_px_untrained"], "px", flush=True)

    img_A, img_B, Hm = heldout_pair(0)
    kf = kornia.feature.RoMaV2
    fig["kornia_ransac_heldout_pair_mean_corner_error_px"] = round(
        kornia_corner_error(kf(model=model, num_samples=2000, seed=0), img_A, img_B, Hm), 2)
    untrained = kornia_corner_error(kf(model=untrained_tiny(), num_samples=2000, seed=0), img_A, img_B, Hm)
    # inf: under 4 matches passed the adapter's overlap threshold, so no homography (JSON has no inf)
    fig["kornia_ransac_heldout_pair_mean_corner_error_px_untrained"] = (
        round(untrained, 1) if np.isfinite(untrained) else "no homography (under 4 matches)")
    print("kornia corner error:", fig["kornia_ransac_heldout_pair_mean_corner_error_px"], "px", flush=True)

    if not args.no_hloc:
        with tempfile.TemporaryDirectory() as tmp:
            weights = None if args.weights == "tiny" else str(Path(args.weights).resolve())
            rec = hloc_scene_reconstruction(Path(tmp), weights=weights, amp=amp)
            fig["hloc_rendered_5_views"] = {"registered": rec.num_reg_images() if rec else 0,
                                            "points": rec.num_points3D() if rec else 0}
        print("hloc:", fig["hloc_rendered_5_views"], flush=True)

    fig["synthetic_homography"] = _rows("synthetic")
    fig["rendered3d"] = {"not_measured": "left out (--no-rendered3d)"} if args.no_rendered3d else _rows("rendered3d")
    speed = RESULTS / "tiny_speed_cpu.json"
    if speed.is_file():
        s = json.loads(speed.read_text())
        fig["match_seconds_median_cpu"] = {"median": round(s["median"], 3), "date": s["meta"]["date"],
                                           "command": s["meta"]["command"]}
    syn, r3d = fig["synthetic_homography"].get("tiny"), fig["rendered3d"]
    fig["targets"] = TARGETS
    fig["targets_met"] = {
        "demo": fig["demo_pair_median_reprojection_px"] <= TARGETS["demo_px"],
        "synthetic": None if syn is None else (syn["median_corner_error_px"] <= TARGETS["synthetic_corner_px"]
                                               and syn["precision@3px"] >= TARGETS["synthetic_precision_at_3px"]),
        "rendered3d": None if "tiny" not in r3d else r3d["tiny"]["auc@10"] >= TARGETS["rendered3d_auc10"],
        "ahead_of_sift_on_rendered3d": None if not {"tiny", "sift"} <= set(r3d)
        else r3d["tiny"]["auc@10"] > r3d["sift"]["auc@10"],
        "match_under_1s": None if "match_seconds_median_cpu" not in fig
        else fig["match_seconds_median_cpu"]["median"] < TARGETS["match_seconds"],
    }
    out = Path(args.out)
    if out.is_file():
        fig["earlier"] = earlier_figures(json.loads(out.read_text()), fig.get("label"))
    out.write_text(json.dumps(fig, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def earlier_figures(old: dict, label: str | None) -> dict:
    """The ``earlier`` section of a new figures file replacing ``old``: ``old``'s own ``earlier`` plus
    ``old`` under its label, unless ``old`` has the new ``label`` (a re-measurement of the same weights
    replaces it)."""
    old = dict(old)
    earlier = dict(old.pop("earlier", {}))
    key = old.get("label") or old.get("measured") or "earlier"
    if key != label:
        earlier[key] = old
    return earlier


if __name__ == "__main__":
    sys.exit(main())
