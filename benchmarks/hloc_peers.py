"""hloc reconstruction of the rendered multi-view scene by romav2-tiny, SIFT and the learned peers.

    PYTHONPATH=../shared/thirdparty/hloc python -m benchmarks.hloc_peers [--views 5]
        [--methods tiny,sift,aliked-lg,disk-lg,xfeat-lg,xfeat-star] [--out benchmarks/results]
    PYTHONPATH=../shared/thirdparty/hloc python -m benchmarks.hloc_peers --images ../shared/data --scene toronto
        [--tiny-weights runs/X/model.pt]   (the tiny row with a candidate's weights, e.g. into --out /tmp/x)

``--images DIR`` reconstructs the photographs in DIR instead (every ``.jpg``/``.jpeg``/``.png``, sorted,
exhaustive pairs; no true cameras, so no centre error) into ``hloc_peers_<scene>_<device>.{md,json}``: the
only real multi-view scene this workplace has offline is the shared two-view toronto pair (held out: training
never reads it).

The scene is the one of ``tests/test_hloc_reconstruction.py`` (``tests/synthetic_scene.py``: floor, two walls
and a box with noise textures; ``--views`` views on an arc, 320x240, focal length 280 px unknown to COLMAP),
with exhaustive pairs. Every method ends in the same ``hloc.reconstruction.main`` (COLMAP incremental
mapping, one shared camera):

- ``tiny``: hloc's ``match_dense`` with our ``romav2_tiny`` conf (sampling, quantisation into tracks);
- ``sift``: hloc's own ``sift`` features (pycolmap DoG, 1600 px) and ``NN-ratio`` matcher;
- ``aliked-lg``, ``disk-lg``, ``xfeat-lg``: the peers of ``benchmarks/accuracy/peers.py``, features once per
  image and LightGlue / LighterGlue per pair, written in hloc's layout (features.h5: keypoints with pixel
  centres at 0, as hloc's extractors; matches.h5: ``matches0``);
- ``xfeat-star``: XFeat*'s per-pair matches, with keypoints merged per image on a 1-pixel grid (rounded), as
  ``match_dense`` does for dense matchers (``max_error`` 1).

Reported per method: registered images, 3D points, mean track length, mean reprojection error, and the
largest camera-centre error after a similarity fit to the true centres (fraction of the cameras' spread);
matching time (wall clock, contended machines included). Writes ``hloc_peers_<device>.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._common import REPO, RESULTS, command_line, machine_info, now_utc, provenance_markdown
from romav2_plugin.geometry import similarity_fit

METHODS = ("tiny", "sift", "aliked-lg", "disk-lg", "xfeat-lg", "xfeat-star")


def _hloc():
    shared = REPO.parent / "shared" / "thirdparty" / "hloc"  # hloc is not on PyPI (as tests/conftest.py)
    if importlib.util.find_spec("hloc") is None and (shared / "hloc" / "__init__.py").is_file():
        sys.path.insert(0, str(shared))
    if importlib.util.find_spec("hloc") is None:
        raise SystemExit("hloc is not importable: pip install -e \".[hloc]\" (see the README), or put a checkout "
                         "on PYTHONPATH")


def _scene(n_views: int):
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from synthetic_scene import default_cameras, default_scene
    finally:
        sys.path.remove(str(REPO / "tests"))
    scene, cameras = default_scene(), default_cameras(n_views)
    return scene, cameras, [scene.render(c) for c in cameras]


def _write_sparse(peer, images: dict[str, np.ndarray], pairs: list[tuple[str, str]], work: Path):
    """Per-image features and per-pair matches of a sparse peer in hloc's h5 layout."""
    import h5py
    from hloc.utils.parsers import names_to_pair

    feats = {n: peer.features(im) for n, im in images.items()}
    features, matches = work / "features.h5", work / "matches.h5"
    with h5py.File(features, "w") as fd:
        for n, f in feats.items():
            k = f["keypoints"]
            fd.create_group(n).create_dataset("keypoints", data=(k[0] if k.ndim == 3 else k).double().cpu().numpy())
    with h5py.File(matches, "w") as fd:
        for a, b in pairs:
            idx, score = peer.match_features(feats[a], feats[b])
            n0 = (feats[a]["keypoints"].shape[-2])
            m0 = -np.ones(n0, dtype=np.int32)
            s0 = np.zeros(n0, dtype=np.float32)
            idx = idx.cpu().numpy()
            m0[idx[:, 0]], s0[idx[:, 0]] = idx[:, 1], score.float().cpu().numpy()
            g = fd.create_group(names_to_pair(a, b))
            g.create_dataset("matches0", data=m0)
            g.create_dataset("matching_scores0", data=s0)
    return features, matches


def _write_per_pair(peer, images: dict[str, np.ndarray], pairs: list[tuple[str, str]], work: Path):
    """Per-pair matches (XFeat*) merged into per-image keypoints on a 1-pixel grid, in hloc's layout."""
    import h5py
    from hloc.utils.parsers import names_to_pair

    kps: dict[str, dict[tuple[int, int], int]] = {n: {} for n in images}

    def index(n, pts):
        table = kps[n]
        return np.array([table.setdefault((int(x), int(y)), len(table)) for x, y in np.round(pts)], dtype=np.int64)

    per_pair = {}
    for a, b in pairs:
        kA, kB, _ = peer.match_pair(images[a], images[b])
        per_pair[a, b] = index(a, kA), index(b, kB)
    features, matches = work / "features.h5", work / "matches.h5"
    with h5py.File(features, "w") as fd:
        for n, table in kps.items():
            k = np.array(sorted(table, key=table.get), dtype=np.float64).reshape(-1, 2)
            fd.create_group(n).create_dataset("keypoints", data=k)
    with h5py.File(matches, "w") as fd:
        for (a, b), (iA, iB) in per_pair.items():
            m0 = -np.ones(len(kps[a]), dtype=np.int32)
            m0[iA] = iB  # a grid point matched twice keeps its last partner
            g = fd.create_group(names_to_pair(a, b))
            g.create_dataset("matches0", data=m0)
            g.create_dataset("matching_scores0", data=(m0 >= 0).astype(np.float32))
    return features, matches


def _match(method: str, image_dir: Path, names: list[str], renders, pair_file: Path, work: Path,
           tiny_weights: str = "tiny"):
    from hloc.utils.parsers import parse_retrieval

    pairs = [(a, b) for a, bs in parse_retrieval(pair_file).items() for b in bs]
    if method == "tiny":
        from romav2_plugin.adapters import hloc as adapter

        match_dense = adapter.ensure_registered()
        conf = copy.deepcopy(match_dense.confs["romav2_tiny"])
        conf["model"]["weights"] = tiny_weights
        return match_dense.main(conf, pair_file, image_dir, export_dir=work)
    if method == "sift":
        from hloc import extract_features, match_features

        feats = extract_features.main(extract_features.confs["sift"], image_dir, export_dir=work, image_list=names)
        return feats, match_features.main(match_features.confs["NN-ratio"], pair_file, features=feats,
                                          matches=work / "matches-sift.h5")
    from benchmarks.accuracy.peers import build_peer

    peer = build_peer(method)
    images = dict(zip(names, renders))
    if method == "xfeat-star":
        return _write_per_pair(peer, images, pairs, work)
    return _write_sparse(peer, images, pairs, work)



def _photos(folder: Path):
    """The photographs of ``--images``: names and RGB arrays; a clear error when there are fewer than two."""
    import cv2

    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(names) < 2:
        raise SystemExit(f"--images {folder}: {len(names)} images (.jpg/.jpeg/.png) found; a reconstruction needs "
                         "at least two")
    images = []
    for n in names:
        im = cv2.imread(str(folder / n))
        if im is None:
            raise SystemExit(f"--images {folder}: {n} cannot be read as an image; remove it or convert it")
        images.append(im[..., ::-1].copy())
    return names, images


def _verified(database: Path) -> dict:
    """COLMAP's two-view geometric verification of the matches (hloc's reconstruction database), before
    mapping: pairs with a verified geometry (inliers > 0), their inlier matches against all matches, and per
    pair the model (E, F, H, ...), inliers and triangulation angle. Tells apart methods that all fail to map."""
    import pycolmap

    if not database.is_file():
        return {"verified_pairs": None, "inlier_matches": None, "matches": None, "pairs": None}
    with pycolmap.Database.open(database) as db:
        _, geoms = db.read_two_view_geometries()
        per_pair = [{"config": pycolmap.TwoViewGeometryConfiguration(int(g.config)).name,
                     "inliers": len(g.inlier_matches),
                     "tri_angle_deg": float(np.degrees(g.tri_angle)) if g.tri_angle >= 0 else None} for g in geoms]
        return {"verified_pairs": sum(p["inliers"] > 0 for p in per_pair),
                "inlier_matches": sum(p["inliers"] for p in per_pair), "matches": db.num_matches(),
                "pairs": per_pair}


def _summary(rec, names, cameras) -> dict:
    if rec is None:
        return {"registered": 0, "points3D": 0, "mean_track_length": None, "reprojection_px": None,
                "centre_error": None}
    by_name = {im.name: im for im in rec.images.values() if im.has_pose}
    reg = [n for n in names if n in by_name]
    centre = None
    if cameras is not None and len(reg) >= 3:
        est = np.stack([by_name[n].projection_center() for n in reg])
        true = np.stack([cameras[names.index(n)].C for n in reg])
        s, R, t = similarity_fit(est, true)
        spread = np.linalg.norm(true - true.mean(0), axis=1).max()
        centre = float(np.linalg.norm((s * (R @ est.T)).T + t - true, axis=1).max() / spread)
    return {"registered": len(reg), "points3D": rec.num_points3D(),
            "mean_track_length": float(rec.compute_mean_track_length()),
            "reprojection_px": float(rec.compute_mean_reprojection_error()), "centre_error": centre}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hloc_peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--views", type=int, default=5)
    ap.add_argument("--images", type=Path, default=None,
                    help="reconstruct the photographs in this folder instead of the rendered scene")
    ap.add_argument("--tiny-weights", default="tiny",
                    help="weights of the tiny row: 'tiny' (shipped) or a model.pt of romav2-train (a candidate)")
    ap.add_argument("--scene", default=None, help="name of the --images scene in the results file name and title")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--merge", type=Path, action="append", default=[], metavar="JSON",
                    help="keep the rows of this earlier hloc_peers json (same --views) for the methods this run "
                    "does not measure, with their run's command and date (repeatable; --methods '' only merges)")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}: choose from {', '.join(METHODS)}")
    _hloc()
    import tempfile

    import cv2
    import pycolmap
    from hloc import pairs_from_exhaustive, reconstruction

    if args.images is not None:
        if not args.scene:
            raise SystemExit("--images needs --scene NAME (the results file is hloc_peers_NAME_<tag>)")
        names, renders = _photos(args.images)
        cameras, args.views = None, len(names)
    else:
        _, cameras, renders = _scene(args.views)
        names = [f"view{i}.png" for i in range(args.views)]
    rows, earlier = [], []
    for path in args.merge:
        old = json.loads(path.read_text())
        if old["views"] != args.views or old.get("scene") != args.scene:
            raise SystemExit(f"--merge {path}: scene {old.get('scene') or 'rendered'} with {old['views']} views, "
                             f"this run {args.scene or 'rendered'} with {args.views}")
        for r in old["rows"]:
            if r["method"] not in methods and r["method"] not in [x["method"] for x in earlier]:
                earlier.append({**r, "run": r.get("run") or {k: old["meta"][k] for k in ("command", "date")}})
    meta = {"machine": machine_info("cpu"), "command": command_line(), "date": now_utc(), "images": names,
            "load": f"1-min load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores at the start"}
    with tempfile.TemporaryDirectory() as tmp:
        image_dir = Path(tmp) / "images"
        image_dir.mkdir()
        for n, im in zip(names, renders):
            if args.images is not None:
                (image_dir / n).symlink_to((args.images / n).resolve())  # the photograph as it is, not re-encoded
            else:
                cv2.imwrite(str(image_dir / n), im[..., ::-1])
        pair_file = Path(tmp) / "pairs.txt"
        pairs_from_exhaustive.main(pair_file, image_list=names)
        # the renders share one camera; photographs get hloc's default (one camera per size and EXIF focal)
        mode = pycolmap.CameraMode.AUTO if args.images is not None else pycolmap.CameraMode.SINGLE
        for m in methods:
            work = Path(tmp) / m
            work.mkdir()
            print(f"[hloc_peers] {m} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            features, matches = _match(m, image_dir, names, renders, pair_file, work, args.tiny_weights)
            t_match = time.perf_counter() - t0
            rec = reconstruction.main(work / "sfm", image_dir, pair_file, features, matches, camera_mode=mode)
            rows.append({"method": m, **_summary(rec, names, cameras), **_verified(work / "sfm" / "database.db"),
                         "match_seconds": t_match, **({"weights": args.tiny_weights} if m == "tiny" else {})})
            print(f"[hloc_peers] {rows[-1]}", file=sys.stderr, flush=True)
            _write(args, meta, earlier + rows)  # after every method: a long run loses nothing
    if not methods:
        _write(args, meta, earlier)
    return 0


def _write(args, meta: dict, rows: list[dict]) -> None:
    order = {m: i for i, m in enumerate(METHODS)}
    rows = sorted(rows, key=lambda r: order[r["method"]])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (f"hloc_peers_{args.scene}_{args.tag}" if args.scene else f"hloc_peers_{args.tag}")
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "views": args.views, "scene": args.scene,
                                                     "rows": rows}, indent=1))

    def fmt(v, f):
        return "-" if v is None else format(v, f)

    if args.scene:
        title = f"the real {args.views}-view scene '{args.scene}'"
        scene = (f"- Scene: the {args.views} photographs of `--images` ({', '.join(meta.get('images', []))}), "
                 "as they are, exhaustive pairs; `hloc.reconstruction.main` with its default cameras (one per image size "
                 "and EXIF focal length, the prior from EXIF where present); no true cameras, so no centre error.")
    else:
        title = f"the rendered {args.views}-view scene"
        scene = (f"- Scene: tests/synthetic_scene.py (floor, two walls, a box; noise textures), {args.views} views "
                 "of 320x240 on an arc, exhaustive pairs; COLMAP's focal length prior from the image size (the "
                 "true 280 px is unknown to it); `hloc.reconstruction.main` with one shared camera for every method.")
    md = [f"# hloc reconstruction of {title}: romav2-tiny, SIFT, learned peers", "",
          provenance_markdown(meta["machine"], meta["command"], meta["date"]),
          scene,
          "- Methods: see the docstring of benchmarks/hloc_peers.py (tiny through match_dense `romav2_tiny`; "
          "hloc's own SIFT + NN-ratio; the peers' features and matches written in hloc's h5 layout; XFeat* "
          "merged per image on a 1-pixel grid).",
          "- centre error: largest camera-centre error after a similarity fit to the true centres, as a "
          "fraction of the cameras' spread. Matching time is wall clock ("
          + (meta["load"] + ")." if meta.get("load") else "a shared, contended machine).") + " Rows of earlier runs "
          "(`--merge`, below) carry their own run's conditions.", "",
          "- verified pairs, inliers / matches: COLMAP's two-view geometric verification of the matches (hloc's "
          "database, before mapping): pairs with inliers, and inlier matches against all matches; per pair "
          "model and triangulation angle in the json; '-' for rows of runs that did not record them.", "",
          "| method | registered | 3D points | mean track length | reprojection (px) | centre error | "
          "verified pairs | inliers / matches | matching (s) |", "|---|---|---|---|---|---|---|---|---|"]
    n_pairs = args.views * (args.views - 1) // 2
    for r in rows:
        pairs = "-" if r.get("verified_pairs") is None else f"{r['verified_pairs']} / {n_pairs}"
        inl = "-" if r.get("matches") is None else f"{r['inlier_matches']} / {r['matches']}"
        name = r["method"] + (f" ({r['weights']})" if r.get("weights", "tiny") != "tiny" else "")
        md.append(f"| {name} | {r['registered']} / {args.views} | {r['points3D']} | "
                  f"{fmt(r['mean_track_length'], '.2f')} | {fmt(r['reprojection_px'], '.3f')} | "
                  f"{fmt(r['centre_error'], '.1e')} | {pairs} | {inl} | "
                  f"{r['match_seconds']:.1f} |")
    runs = [r for r in rows if "run" in r]
    if runs:
        md += ["", "Rows measured by earlier runs of the same scene (`--merge`):", *(
            f"- {r['method']}: `{r['run']['command']}`, {r['run']['date']}" for r in runs)]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
