"""``romav2-sfm IMAGES OUT``: from a folder of images to a COLMAP model, without hloc.

Steps (each said on stderr, with progress bars): the pairs (:mod:`romav2_plugin.app.pair_lists`, default
exhaustive) -> matching into ``OUT/database.db`` (the one pairs job of ``romav2-match --pairs --colmap-db``,
here or on Ray workers; resumable) -> pycolmap's incremental or global mapping into ``OUT/sparse/<k>/`` (COLMAP
binary model; ``0`` is the largest) -> ``OUT/summary.json`` and a summary on stdout (registered images,
3D points, mean track length, mean reprojection error) -> ``OUT/reconstruction.png`` (camera poses and points
seen from above and from the side; needs matplotlib, ``pip install "romav2-plugin[plot]"``, checked last).

Rerunning the same command resumes the matching (finished pairs are skipped) and maps again. Files in OUT
that an earlier ``romav2-sfm`` did not write are never replaced: an ``OUT/sparse`` without our
``OUT/summary.json`` is refused (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from romav2_plugin.app.colmap_db import CAMERA_MODES, import_pycolmap
from romav2_plugin.app.errors import (
    EXIT_CODES_HELP,
    EXIT_OK,
    EXIT_PAIRS_FAILED,
    EXIT_RUNTIME,
    EXIT_USAGE,
    CommandError,
    interrupt_code,
    missing_dependency,
    run_command,
)
from romav2_plugin.app.pair_lists import PAIRS_FROM_HELP, pairs_from
from romav2_plugin.app.pairs import LocalExecutor, PairsJob, run_pairs
from romav2_plugin.app.weights_option import WEIGHTS_HELP
from romav2_plugin.keypoints import DEFAULT_CELL_SIZE, DEFAULT_MAX_ERROR

__all__ = ["PROG", "main", "build_parser", "reconstruct", "map_database", "model_summary", "draw_reconstruction"]

PROG = "romav2-sfm"
SUMMARY_MARK = "romav2_sfm"  # a key of OUT/summary.json: this folder's sparse/ is ours


def say(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- mapping
class _QuietColmap:
    """COLMAP's log goes to ``OUT/colmap.LOG.*`` instead of the terminal while mapping; restored after."""

    def __init__(self, pycolmap, log_prefix: Path) -> None:
        self.logging, self.prefix = pycolmap.logging, log_prefix

    def __enter__(self):
        self.saved = self.logging.alsologtostderr
        self.logging.set_log_destination(self.logging.INFO, self.prefix)
        self.logging.alsologtostderr = False

    def __exit__(self, *exc):
        self.logging.alsologtostderr = self.saved


def map_database(database: Path, image_dir: Path, sparse: Path, *, mapper: str = "incremental",
                 progress: bool = True, num_threads: int = -1) -> dict[int, Any]:
    """pycolmap mapping of ``database`` into ``sparse/<k>``; returns ``{k: Reconstruction}``, ``0`` the largest
    (models are renumbered by size). ``mapper``: ``incremental`` or ``global`` (GLOMAP; where the installed
    pycolmap has ``global_mapping``, e.g. 4.2.1)."""
    pycolmap = import_pycolmap("mapping")
    from tqdm import tqdm

    sparse.mkdir(parents=True, exist_ok=True)
    with pycolmap.Database.open(database) as db:
        n_images = db.num_images()
    with _QuietColmap(pycolmap, sparse.parent / "colmap.LOG."):
        if mapper == "global":
            if not hasattr(pycolmap, "global_mapping"):
                raise CommandError(
                    f"--mapper global: the installed pycolmap {pycolmap.__version__} has no global_mapping; "
                    "use --mapper incremental, or upgrade pycolmap (4.2.1 has it).", EXIT_USAGE)
            say(f"global mapping of {n_images} images (GLOMAP in pycolmap {pycolmap.__version__})...")
            opts = pycolmap.GlobalPipelineOptions()
            opts.num_threads = num_threads
            recs = pycolmap.global_mapping(database, image_dir, sparse, options=opts)
        else:
            bars: list = []

            def restart():
                if bars:
                    bars[-1].close()
                bars.append(tqdm(total=n_images, desc=f"mapping (model {len(bars)})", unit="image",
                                 file=sys.stderr, dynamic_ncols=True, disable=not progress))
                bars[-1].update(2)

            opts = pycolmap.IncrementalPipelineOptions()
            opts.num_threads = num_threads
            try:
                recs = pycolmap.incremental_mapping(
                    database, image_dir, sparse, options=opts, initial_image_pair_callback=restart,
                    next_image_callback=lambda: bars[-1].update(1) if bars else None,
                )  # fmt: skip
            finally:
                for b in bars:
                    b.close()
    order = sorted(recs, key=lambda k: -recs[k].num_reg_images())
    out = {}
    for new, old in enumerate(order):  # 0 = the largest, written where the mapper put model `old`
        out[new] = recs[old]
        tmp = sparse / f"{new}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        out[new].write(tmp)
    for k in list(sparse.iterdir()):  # the mapper's numbering (and an earlier run's models)
        if k.is_dir() and k.name.isdigit():
            shutil.rmtree(k)
    for new in out:
        (sparse / f"{new}.tmp").rename(sparse / str(new))
    return out


def model_summary(rec) -> dict[str, Any]:
    """Registered images, 3D points, mean track length, observations per image, mean reprojection error (px)."""
    return {
        "registered_images": int(rec.num_reg_images()),
        "images": int(rec.num_images()),
        "points3D": int(rec.num_points3D()),
        "mean_track_length": float(rec.compute_mean_track_length()),
        "mean_observations_per_image": float(rec.compute_mean_observations_per_reg_image()),
        "mean_reprojection_error_px": float(rec.compute_mean_reprojection_error()),
    }


# ------------------------------------------------------------------------------------------- picture
def draw_reconstruction(rec, path: Path, *, max_points: int = 20000, title: str = "") -> Path:
    """PNG of the cameras (centre and viewing direction) and the 3D points (their colours) from above and from
    the side, orthographic. "Up" is against the cameras' mean image-down axis (upright cameras), the side view
    looks along their mean viewing direction."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_dependency("the picture of the reconstruction", "matplotlib", "plot", "pass --no-picture") from None
    import numpy as np

    pts = list(rec.points3D.values())
    X = np.array([p.xyz for p in pts]).reshape(-1, 3)
    col = np.array([p.color for p in pts]).reshape(-1, 3) / 255.0
    if len(X) > max_points:
        keep = np.random.default_rng(0).choice(len(X), max_points, replace=False)
        X, col = X[keep], col[keep]
    ims = [im for im in rec.images.values() if im.has_pose]
    C = np.array([im.projection_center() for im in ims]).reshape(-1, 3)
    D = np.array([im.viewing_direction() for im in ims]).reshape(-1, 3)
    centre = np.median(X, axis=0) if len(X) else C.mean(0)
    # "up": against the cameras' mean image-down axis (cameras are held upright in most captures)
    down = np.array([im.cam_from_world().rotation.matrix()[1] for im in ims]).reshape(-1, 3)
    up = -down.mean(0) if len(down) else np.array([0.0, 0.0, 1.0])
    up /= np.linalg.norm(up) + 1e-12
    fwd = D.mean(0) - np.dot(D.mean(0), up) * up if len(D) else np.array([1.0, 0.0, 0.0])
    fwd /= np.linalg.norm(fwd) + 1e-12
    right = np.cross(fwd, up)
    views = [("from above", right, fwd), ("from the side", right, up)]
    P, Q = X - centre, C - centre
    lim = 1.1 * max(np.quantile(np.abs(P), 0.98) if len(P) else 0.0, np.abs(Q).max() if len(Q) else 0.0, 1e-6)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), dpi=80)
    scale = 0.08 * lim
    for ax, (name, u, v) in zip(axes, views):
        ax.scatter(P @ u, P @ v, s=1.5, c=col, linewidths=0)
        ax.scatter(Q @ u, Q @ v, s=12, c="red", marker="^")
        ax.quiver(Q @ u, Q @ v, D @ u, D @ v, color="red", angles="xy", scale_units="xy", scale=1 / scale, width=0.004)
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xticks([])
        ax.set_yticks([])
    s = model_summary(rec)
    fig.suptitle(title or f"{s['registered_images']} cameras (red), {s['points3D']} points, track length "
                 f"{s['mean_track_length']:.2f}, reprojection error {s['mean_reprojection_error_px']:.2f} px")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".part")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------- the command
def _check_out(out: Path) -> None:
    """``OUT`` may be new, empty, or an earlier run's; a ``sparse`` we did not write is refused."""
    if out.exists() and not out.is_dir():
        raise CommandError(f"OUT {out} exists and is not a folder; give a folder.", EXIT_USAGE)
    sparse, summary = out / "sparse", out / "summary.json"
    ours = False
    if summary.is_file():
        try:
            ours = SUMMARY_MARK in json.loads(summary.read_text())
        except (OSError, ValueError):
            ours = False
    if (sparse.exists() or summary.exists()) and not ours:
        raise CommandError(
            f"{out} holds a sparse/ or summary.json that romav2-sfm did not write; it was left as it is. Choose "
            "another OUT folder.", EXIT_USAGE)


def _write_pairs(path: Path, pairs: list[tuple[str, str]]) -> None:
    text = "".join(f"{a} {b}\n" for a, b in pairs)
    if path.exists() and path.read_text(errors="replace") != text:
        raise CommandError(
            f"{path} lists other pairs than this run (other images or --pairs-from); it was left as it is. Use "
            "the same images and --pairs-from to resume, or another OUT folder.", EXIT_USAGE)
    path.write_text(text)


def reconstruct(
    images: str | os.PathLike, out: str | os.PathLike, *, weights: str | None = None, setting: str | None = None,
    pairs: str = "exhaustive", mapper: str = "incremental", num_samples: int = 5000, seed: int = 0,
    min_overlap: float = 0.5, cell_size: float = DEFAULT_CELL_SIZE, max_error: float = DEFAULT_MAX_ERROR,
    camera_mode: str = "auto", device: str = "auto", fp32: bool = False, picture: bool = True,
    progress: bool = True, executor=None,
) -> dict[str, Any]:
    """Images -> ``OUT/database.db`` -> ``OUT/sparse/0`` (+ summary.json, reconstruction.png); returns the
    summary (also written as ``OUT/summary.json``). Raises :class:`CommandError` (exit code in ``.code``)."""
    image_dir, out = Path(images).expanduser(), Path(out).expanduser()
    if not image_dir.is_dir():
        raise CommandError(f"IMAGES {image_dir} is not a folder", EXIT_USAGE)
    if mapper not in ("incremental", "global"):
        raise CommandError(f"--mapper must be incremental or global, got {mapper!r}", EXIT_USAGE)
    pycolmap = import_pycolmap(PROG)
    if mapper == "global" and not hasattr(pycolmap, "global_mapping"):
        raise CommandError(f"--mapper global: the installed pycolmap {pycolmap.__version__} has no "
                           "global_mapping; use --mapper incremental, or upgrade pycolmap (4.2.1 has it).", EXIT_USAGE)
    _check_out(out)
    pair_list = pairs_from(pairs, image_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_pairs(out / "pairs.txt", pair_list)
    say(f"{len(pair_list)} pairs ({pairs}) of the images in {image_dir}")
    t0 = time.perf_counter()
    job = PairsJob(
        pair_list, image_dir, out, weights=weights, setting=setting, seed=seed, num_samples=num_samples,
        min_overlap=min_overlap, device=device, fp32=fp32, progress=progress, colmap_db=out / "database.db",
        cell_size=cell_size, max_error=max_error, camera_mode=camera_mode,
    )  # fmt: skip
    run = run_pairs(job, executor if executor is not None else LocalExecutor())
    if run.stopped:
        raise CommandError(run.stopped, run.code)
    t_match = time.perf_counter() - t0
    t1 = time.perf_counter()
    # marks OUT/sparse as ours before the mapper writes there (a rerun after a failed mapping may replace it)
    (out / "summary.json").write_text(json.dumps({SUMMARY_MARK: 1, "status": "mapping"}) + "\n")
    recs = map_database(out / "database.db", image_dir, out / "sparse", mapper=mapper, progress=progress)
    t_map = time.perf_counter() - t1
    if not recs:
        raise CommandError(
            f"the mapper reconstructed no model from {out / 'database.db'} (too few verified matches?). Check "
            "that the images overlap; try --pairs-from exhaustive or more --num-samples.", EXIT_RUNTIME)
    best = recs[0]
    summary = {
        SUMMARY_MARK: 1, "images_in_folder": len({n for p in pair_list for n in p}), "pairs": len(pair_list),
        "pairs_failed": len(run.failures), "mapper": mapper, "pycolmap": pycolmap.__version__, "models": len(recs),
        **model_summary(best), "model": str(out / "sparse" / "0"), "database": str(out / "database.db"),
        "time_matching_s": round(t_match, 2), "time_mapping_s": round(t_map, 2),
        "cell_size": cell_size, "max_error": max_error, "weights": job.meta.get("weights", weights),
        "setting": job.meta.get("setting", setting),
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"model {out / 'sparse' / '0'}: {summary['registered_images']} of {summary['images_in_folder']} images "
        f"registered, {summary['points3D']} points, mean track length {summary['mean_track_length']:.2f}, mean "
        f"reprojection error {summary['mean_reprojection_error_px']:.3f} px ({len(recs)} model(s); "
        f"{mapper} mapping, {t_map:.1f} s; matching {t_match:.1f} s)", flush=True)
    if picture:
        summary["picture"] = str(draw_reconstruction(best, out / "reconstruction.png"))
        say(f"picture: {summary['picture']}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    from romav2_plugin.config import SETTINGS
    from romav2_plugin.distributed.options import add_engine_arguments

    p = argparse.ArgumentParser(
        prog=PROG,
        description="From a folder of images to a COLMAP model: pairs -> RoMa v2 matches -> OUT/database.db -> "
        "pycolmap mapping -> OUT/sparse/0 (binary model), OUT/summary.json, OUT/reconstruction.png. "
        "Rerunning resumes the matching.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("images", metavar="IMAGES", help="folder of images (subfolders included)")
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument("--weights", metavar="PATH|URL|tiny", help=WEIGHTS_HELP)
    p.add_argument("--setting", default=None, choices=list(SETTINGS), help="resolution preset (default: the weights' own)")
    p.add_argument("--pairs-from", default="exhaustive", metavar="SPEC", help=PAIRS_FROM_HELP + " (default exhaustive)")
    p.add_argument("--mapper", choices=("incremental", "global"), default="incremental",
                   help="pycolmap's incremental mapping (default) or global (GLOMAP; pycolmap 4.x, e.g. 4.2.1)")
    p.add_argument("--num-samples", type=int, default=5000, metavar="N", help="matches per pair (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--min-overlap", type=float, default=0.5, metavar="T", help="sample matches with overlap > T")
    p.add_argument("--cell-size", type=float, default=DEFAULT_CELL_SIZE, metavar="PX",
                   help=f"keypoint grid cell, pixels (default {DEFAULT_CELL_SIZE:g})")
    p.add_argument("--max-error", type=float, default=DEFAULT_MAX_ERROR, metavar="PX",
                   help=f"a match joins a keypoint within PX pixels (default {DEFAULT_MAX_ERROR:g})")
    p.add_argument("--camera-mode", choices=CAMERA_MODES, default="auto",
                   help="auto: one camera per folder and size (default); per-image")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--no-picture", action="store_true", help="no reconstruction.png (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_engine_arguments(p, what="matching")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``romav2-sfm``; returns the exit code."""
    from romav2_plugin.distributed.options import ray_only_options_given

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_samples <= 0:
        parser.error("--num-samples must be positive")
    if not 0 < args.cell_size < float("inf") or not 0 <= args.max_error <= args.cell_size:
        parser.error("--cell-size must be positive and 0 <= --max-error <= --cell-size")
    if not 0.0 <= args.min_overlap < 1.0:
        parser.error("--min-overlap must lie in [0, 1)")
    if args.engine == "local" and (given := ray_only_options_given(args)):
        parser.error(f"{', '.join(given)} only apply with --engine ray")

    def body() -> int:
        executor = None
        if args.engine == "ray":
            from romav2_plugin.distributed.pairs import RayExecutor

            executor = RayExecutor.from_args(args)
        try:
            summary = reconstruct(
                Path(args.images).resolve() if executor else args.images, args.out, weights=args.weights,
                setting=args.setting, pairs=args.pairs_from, mapper=args.mapper, num_samples=args.num_samples,
                seed=args.seed, min_overlap=args.min_overlap, cell_size=args.cell_size, max_error=args.max_error,
                camera_mode=args.camera_mode, device=args.device, fp32=args.fp32, picture=not args.no_picture,
                progress=not args.no_progress, executor=executor,
            )  # fmt: skip
        except KeyboardInterrupt as e:
            say("interrupted; the finished pairs are in OUT/database.db: rerun the same command to resume.")
            return interrupt_code(e)
        return EXIT_PAIRS_FAILED if summary["pairs_failed"] else EXIT_OK

    return run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
