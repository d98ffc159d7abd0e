"""``romav2-match``: match two images (or a list of pairs) with RoMa v2 and look at the result.

Run ``romav2-match --help`` for the options; :func:`main` is callable in-process (returns the exit code).
Exit codes and error reporting are shared with the other commands (:mod:`romav2_plugin.app.errors`); one pair
is matched by :mod:`romav2_plugin.app.matching`, a list of pairs by the pairs job
(:mod:`romav2_plugin.app.pairs`) on this process or on Ray workers (:mod:`romav2_plugin.distributed`); result
files are written by :mod:`romav2_plugin.app.results`, summaries by :mod:`romav2_plugin.app.summary`. Everything
that does not need the model (arguments, images, pairs file, output path, free space, an existing results
file) is checked before the model loads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from importlib import resources
from pathlib import Path

import numpy as np

from romav2_plugin.app import matching
from romav2_plugin.app.colmap_db import CAMERA_MODES
from romav2_plugin.app.errors import (
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PAIRS_FAILED,
    EXIT_RUNTIME,
    EXIT_SETUP,
    EXIT_USAGE,
    CommandError,
    check_output,
    interrupt_code,
    run_command,
)
from romav2_plugin.app.matching import PROG, LoadedImage, PairResult, open_image, say
from romav2_plugin.app.pair_lists import PAIRS_FROM_HELP
from romav2_plugin.app.pairs import DEFAULT_OUT, LocalExecutor, PairsJob, read_or_repair, run_pairs
from romav2_plugin.app.results import (
    ResultsFile,
    WriteFailed,
    estimate_pair_bytes,
    import_h5py,
    one_writer,
    write_npz,
)
from romav2_plugin.app.summary import reprojection_errors, single_summary
from romav2_plugin.app.visualize import PANEL_HEIGHT
from romav2_plugin.app.weights_option import (
    WEIGHTS_HELP,
    WeightsChoice,
    cached_official_weights,
    choose_weights,
)
from romav2_plugin.keypoints import DEFAULT_CELL_SIZE, DEFAULT_MAX_ERROR

__all__ = [
    "main",
    "build_parser",
    "EXIT_OK",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "EXIT_PAIRS_FAILED",
    "EXIT_SETUP",
    "EXIT_INTERRUPTED",
]

DEFAULT_MIN_OVERLAP = 0.5
PICTURES_BYTES = 8 << 20  # two PNGs, generous

EPILOG = f"""\
outputs:
  single pair: --out DIR (default ./{DEFAULT_OUT}) gets matches.npz, matches.png and warp.png;
  --out FILE.npz or FILE.h5 writes the matches there and the pictures next to it (FILE_matches.png,
  FILE_warp.png). Arrays: keypoints_A, keypoints_B (N, 2) pixel coordinates in the original images
  (OpenCV convention: top-left pixel centre at (0, 0)), confidence (N,) (the overlap), precision_A,
  precision_B (N, 2, 2) (NaN where the setting does not predict them), matches_normalized (N, 4);
  metadata: setting, image sizes (image_hw_A/B = height, width), pixel_convention, weights (file name
  or 'tiny') and sha256 prefix, package version, seed, num_samples, min_overlap.
  --pairs: one HDF5 group per pair, "<name A>/<name B>" with '%' written '%25' and '/' inside a name
  written '%2F' (exact names in the group attributes image_A, image_B), written and flushed after each
  pair; rerunning the same command skips finished pairs (--overwrite redoes them). Files of earlier
  versions are migrated in place.
sampling: --num-samples matches drawn among those with overlap > --min-overlap (default
  {DEFAULT_MIN_OVERLAP}), so unrelated images give few or no matches; --min-overlap 0 samples like the
  official RoMaV2.sample(). The summary warns when no match is confident.
pictures (PNG): every panel is {PANEL_HEIGHT} px high. matches.png: A | B, up to --max-draw matches coloured
  by confidence (red low, yellow, green high). warp.png: top row A | B warped into A's frame (masked by
  the overlap, white where it is low); bottom row B | A warped into B's frame, only for bidirectional
  settings (precise, mega1500, ...) or with --warp-both (runs a second match B->A).
images: any format PIL reads; EXIF orientation is applied (coordinates refer to the image as displayed);
  grayscale, palette and RGBA images are converted to RGB; 16-bit and float images are refused (convert
  them to 8 bit first), as are images above romav2_plugin.io.MAX_PIXELS pixels and below 16x16.
  --pairs writes no pictures.
weights: --weights PATH, URL or 'tiny' (small model shipped with the package), else $ROMAV2_WEIGHTS,
  else the official release (https://github.com/Parskatt/RoMaV2/releases/download/v2.0.1/romav2.0.1.pt),
  downloaded once into $ROMAV2_PLUGIN_CACHE (default ~/.cache/romav2_plugin). --demo uses the official
  weights when they are on this machine (--weights, $ROMAV2_WEIGHTS or the cache; it never downloads)
  and 'tiny' otherwise, and says which.
{EXIT_CODES_HELP}
"""


# ----------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from romav2_plugin.config import SETTINGS

    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Match two images with RoMa v2; write the sampled matches and two pictures.\n"
            "  romav2-match IMAGE_A IMAGE_B [--out DIR]    one pair\n"
            "  romav2-match --pairs pairs.txt --image-dir DIR --out results.h5\n"
            "                                               many pairs, one model load, resumable\n"
            "  romav2-match --demo                          the image pair shipped with the package\n"
            "                                               (reports the error against its true homography)"
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="*", metavar="IMAGE", help="IMAGE_A IMAGE_B (any format PIL reads)")
    p.add_argument("--demo", action="store_true", help="match the image pair shipped with the package")
    p.add_argument(
        "--pairs", metavar="FILE", help="text file (UTF-8), one 'nameA nameB' pair per line; '#' at the start of a line or after a "
        "space starts a comment ('a#1.jpg' is a name)"
    )
    p.add_argument(
        "--pairs-from", metavar="SPEC", help=f"instead of --pairs, the images of --image-dir paired by SPEC: "
        f"{PAIRS_FROM_HELP}"
    )
    p.add_argument(
        "--image-dir",
        metavar="DIR",
        help="--pairs: folder the names are relative to (default: the pairs file's folder)",
    )
    p.add_argument(
        "--out",
        metavar="PATH",
        help=f"output folder, or .npz / .h5 file (default ./{DEFAULT_OUT}; --pairs: DIR/results.h5)",
    )
    p.add_argument(
        "--setting",
        default=None,
        choices=list(SETTINGS),
        help="resolution preset (default: the weights' own: precise for the official model, tiny for 'tiny')",
    )
    p.add_argument("--weights", metavar="PATH|URL|tiny", help=WEIGHTS_HELP)
    p.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps, ..."
    )
    p.add_argument(
        "--fp32",
        action="store_true",
        help="no bf16 autocast (default: bf16 on CUDA and on CPUs with native bf16, AVX512-BF16 or AMX; "
        "$ROMAV2_CPU_BF16=0 turns it off on the CPU). Slower, full precision",
    )
    p.add_argument(
        "--num-samples", type=int, default=5000, metavar="N", help="matches to sample (default 5000)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed, for reproducible output (default 0)")
    p.add_argument(
        "--min-overlap",
        type=float,
        default=DEFAULT_MIN_OVERLAP,
        metavar="T",
        help=f"only sample matches with overlap > T, in [0, 1) (default {DEFAULT_MIN_OVERLAP})",
    )
    p.add_argument(
        "--max-draw", type=int, default=300, metavar="N", help="matches drawn in matches.png (default 300)"
    )
    p.add_argument("--no-pictures", action="store_true", help="write only the matches file")
    p.add_argument(
        "--warp-both",
        action="store_true",
        help="unidirectional settings: also match B->A for warp.png's bottom row",
    )
    p.add_argument("--overwrite", action="store_true", help="--pairs: redo pairs already in the output file")
    g = p.add_argument_group("COLMAP database (--pairs; docs/sfm.md)")
    g.add_argument(
        "--colmap-db", metavar="FILE", help="write a COLMAP database instead of the results file: cameras, images, "
        "keypoints shared across each image's pairs, one-to-one matches and verified two-view geometries "
        "(needs pycolmap: pip install \"romav2-plugin[colmap]\"); resumable"
    )
    g.add_argument(
        "--colmap-db-add", action="store_true",
        help="add to a --colmap-db that holds cameras/images this command did not write (refused otherwise)",
    )
    g.add_argument(
        "--cell-size", type=float, default=DEFAULT_CELL_SIZE, metavar="PX",
        help=f"keypoint grid: at most one keypoint per cell of PX pixels (default {DEFAULT_CELL_SIZE:g})",
    )
    g.add_argument(
        "--max-error", type=float, default=DEFAULT_MAX_ERROR, metavar="PX",
        help="a match joins an image's existing keypoint within PX pixels, <= --cell-size "
        f"(default {DEFAULT_MAX_ERROR:g})",
    )
    g.add_argument(
        "--camera-mode", choices=CAMERA_MODES, default="auto",
        help="auto: one camera per folder and image size (default); per-image: one each",
    )
    from romav2_plugin.distributed.options import add_engine_arguments

    add_engine_arguments(p)  # --engine ray, --address, --workers, ... (romav2_plugin.distributed)
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.pairs_from is not None:
        if args.pairs is not None:
            p.error("--pairs and --pairs-from exclude each other")
        if args.image_dir is None:
            p.error("--pairs-from needs --image-dir (the folder whose images are paired)")
        args.pairs = ""  # the pairs mode; the list is made from --image-dir
    modes = sum((bool(args.images), args.demo, args.pairs is not None))
    if modes == 0:
        p.error("give IMAGE_A IMAGE_B, or --pairs FILE, or --demo")
    if modes > 1:
        p.error("IMAGE_A IMAGE_B, --pairs and --demo exclude each other")
    if args.images and len(args.images) != 2:
        p.error(f"expected two images (IMAGE_A IMAGE_B), got {len(args.images)}")
    if args.image_dir is not None and args.pairs is None:
        p.error("--image-dir only applies to --pairs")
    if args.num_samples <= 0:
        p.error("--num-samples must be positive")
    if not 0 <= args.seed < 2**63:  # what HDF5's int64 attribute, torch and numpy all accept
        p.error(f"--seed must be in [0, 2**63), got {args.seed}")
    if not 0.0 <= args.min_overlap < 1.0:
        p.error(f"--min-overlap must lie in [0, 1), got {args.min_overlap:g}")
    if args.max_draw < 0:
        p.error("--max-draw must be >= 0")
    if args.colmap_db is not None:
        if args.pairs is None:
            p.error("--colmap-db applies to --pairs only")
        if args.out is not None:
            p.error("--colmap-db writes the database instead of the results file: leave out --out")
        if args.overwrite:
            p.error("--overwrite does not apply to --colmap-db: a rerun resumes; to start afresh, give another "
                    "--colmap-db (or delete the database yourself)")
    elif args.colmap_db_add or args.camera_mode != "auto" or args.cell_size != DEFAULT_CELL_SIZE or (
        args.max_error != DEFAULT_MAX_ERROR
    ):
        p.error("--colmap-db-add, --camera-mode, --cell-size and --max-error apply to --colmap-db only")
    if args.colmap_db is not None and not (0 < args.cell_size < float("inf") and 0 <= args.max_error <= args.cell_size):
        p.error(f"--cell-size must be positive and 0 <= --max-error <= --cell-size, got {args.cell_size:g}, "
                f"{args.max_error:g}")
    if getattr(args, "engine", "local") != "local" and args.pairs is None:
        p.error(f"--engine {args.engine} applies to --pairs only")
    from romav2_plugin.distributed.options import ray_only_options_given

    ray_only = ray_only_options_given(args)
    if ray_only:
        p.error(f"{', '.join(ray_only)} only apply with --engine ray (add --engine ray, or leave them out)")


def write_pictures(
    res: PairResult,
    a: LoadedImage,
    b: LoadedImage,
    matches_png: Path,
    warp_png: Path,
    *,
    max_draw: int,
    seed: int,
) -> list[Path]:
    """Draw both pictures; each is written atomically. Returns what was written."""
    from romav2_plugin.app.visualize import draw_matches, draw_warp

    p = res.preds
    pic_m = draw_matches(
        a.image,
        b.image,
        res.arrays["keypoints_A"],
        res.arrays["keypoints_B"],
        res.confidence,
        max_draw=max_draw,
        seed=seed,
    )
    if p.get("warp_BA") is not None:
        w_BA, o_BA = p["warp_BA"][0], p["overlap_BA"][0]
    elif res.preds_BA is not None:
        w_BA, o_BA = res.preds_BA["warp_AB"][0], res.preds_BA["overlap_AB"][0]
    else:
        w_BA = o_BA = None
    pic_w = draw_warp(a.image, b.image, p["warp_AB"][0], p["overlap_AB"][0], w_BA, o_BA)
    written = []
    for pic, path in ((pic_m, matches_png), (pic_w, warp_png)):
        tmp = path.with_name(path.name + ".part")
        try:
            pic.save(tmp, format="PNG")
            tmp.replace(path)
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise WriteFailed(f"cannot write the picture {path} ({e})", EXIT_RUNTIME) from None
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------ modes
def _out_paths(out: str | None) -> tuple[Path, Path, Path]:
    o = Path(out if out is not None else DEFAULT_OUT).expanduser()
    if o.suffix.lower() in (".npz", ".h5", ".hdf5"):
        return o, o.with_name(o.stem + "_matches.png"), o.with_name(o.stem + "_warp.png")
    if o.exists() and not o.is_dir():
        raise CommandError(
            f"--out {o} exists and is not a folder; give a folder or a .npz / .h5 file name", EXIT_USAGE
        )
    return o / "matches.npz", o / "matches.png", o / "warp.png"


def _demo_weights(arg: str | None) -> tuple[WeightsChoice, str]:
    """--demo: the official weights when present (no download), else the shipped 'tiny' model."""
    choice = choose_weights(arg)
    if choice.spec is not None:
        return choice, f" (from {choice.source})"
    cached = cached_official_weights()
    if cached is not None:
        return WeightsChoice(str(cached), "cache"), " (official weights found in the cache)"
    return (
        WeightsChoice("tiny", "demo", named=True),
        " (the official weights are not on this machine, so the demo uses the small shipped model 'tiny'; "
        "pass --weights PATH or set ROMAV2_WEIGHTS for the real ones)",
    )


@one_writer
def _run_single(args: argparse.Namespace) -> int:
    gt_H = None
    with ExitStack() as stack:
        if args.demo:
            assets = resources.files("romav2_plugin.assets")
            path_A = stack.enter_context(resources.as_file(assets / "demo_A.jpg"))
            path_B = stack.enter_context(resources.as_file(assets / "demo_B.jpg"))
            gt_H = np.asarray(json.loads((assets / "demo_pair.json").read_text())["homography_A_to_B"])
            choice, weights_note = _demo_weights(args.weights)
            say(f"--demo: weights {choice.label}{weights_note}")
        else:
            path_A, path_B = Path(args.images[0]), Path(args.images[1])
            choice, weights_note = choose_weights(args.weights), ""
        matches_path, matches_png, warp_png = _out_paths(args.out)
        is_h5 = matches_path.suffix.lower() in (".h5", ".hdf5")
        if is_h5:
            import_h5py()
        a, b = open_image(path_A), open_image(path_B)
        need = estimate_pair_bytes(matching.capped_num_samples(args.num_samples, args.setting))
        need += 0 if args.no_pictures else PICTURES_BYTES
        check_output(matches_path, need)
        results = ResultsFile(matches_path) if is_h5 else None
        if results is not None:
            results.hold_lock()  # one writer per results file, until this run ends
        if results is not None and matches_path.exists():
            read_or_repair(results)  # locked / not HDF5: refused now, not after matching
        device = matching.resolve_device(args.device)
        t0 = time.perf_counter()
        model, info = matching.load_model(choice, args.setting, device, False if args.fp32 else None)
        t_load = time.perf_counter() - t0
        setting = matching.setting_of(model, args.setting)
        matching.cpu_note(setting, device)
        try:
            res = matching.match_pair(
                model,
                a,
                b,
                num_samples=args.num_samples,
                seed=args.seed,
                min_overlap=args.min_overlap,
                warp_both=args.warp_both and not args.no_pictures,
            )
        except ValueError as e:
            raise CommandError(str(e), EXIT_USAGE) from None
        except RuntimeError as e:  # e.g. out of device memory
            raise CommandError(f"matching failed: {e}", EXIT_RUNTIME) from None
        meta = matching.run_metadata(
            setting=setting,
            model=model,
            info=info,
            seed=args.seed,
            num_samples=args.num_samples,
            min_overlap=args.min_overlap,
        )
        name_A = "demo_A.jpg" if args.demo else str(path_A)
        name_B = "demo_B.jpg" if args.demo else str(path_B)
        pmeta = matching.pair_metadata(a, b, name_A, name_B)
        pmeta.update(res.check_metadata())  # the geometric check, per pair
        written: list[Path] = []
        if results is not None:
            results.write_pair(
                name_A, name_B, res.arrays, meta, pmeta, saved_note="Nothing else was changed."
            )
        else:
            write_npz(matches_path, res.arrays, {**meta, **pmeta})
        written.append(matches_path)
        if not args.no_pictures:
            try:
                written += write_pictures(
                    res, a, b, matches_png, warp_png, max_draw=args.max_draw, seed=args.seed
                )
            except WriteFailed as e:
                raise WriteFailed(
                    f"{e.message}; the matches were written to {matches_path}", e.code
                ) from None
        hr = f" then {model.H_hr}x{model.W_hr}" if model.H_hr is not None else ""
        print(
            single_summary(
                path_A=a.path,
                path_B=b.path,
                hw_A=a.hw,
                hw_B=b.hw,
                exif_A=a.exif_orientation,
                exif_B=b.exif_orientation,
                setting=setting,
                resolution=f"{model.H_lr}x{model.W_lr}{hr}",
                bidirectional=bool(model.bidirectional),
                device=device,
                weights=info["weights"],
                weights_sha256=info["weights_sha256"],
                weights_note=weights_note,
                times=res.times,
                t_load=t_load,
                confidence=res.confidence,
                seed=args.seed,
                min_overlap=args.min_overlap,
                coverage_A=res.coverage_A,
                written=written,
                reprojection=None
                if gt_H is None
                else reprojection_errors(gt_H, res.arrays["keypoints_A"], res.arrays["keypoints_B"]),
                check=res.check_metadata(),
                unreliable=res.unreliable,
            ),
            flush=True,
        )
    return EXIT_OK




def _run_pairs(args: argparse.Namespace) -> int:
    """--pairs: the pairs job, on this process or (``--engine ray``) on Ray workers."""
    ray = getattr(args, "engine", "local") == "ray"
    if ray:
        from romav2_plugin.distributed.pairs import RayExecutor

        executor = RayExecutor.from_args(args)  # Ray missing: refused now, before anything is read
    else:
        executor = LocalExecutor()
    if args.pairs_from is not None:
        from romav2_plugin.app.pair_lists import pairs_from

        image_dir = Path(args.image_dir).expanduser()
        pairs_path = pairs_from(args.pairs_from, image_dir)  # the pairs themselves
    else:
        pairs_path = Path(args.pairs).expanduser()
        image_dir = Path(args.image_dir).expanduser() if args.image_dir else pairs_path.parent
    job = PairsJob(
        pairs_path, image_dir.resolve() if ray else image_dir, Path(args.out if args.out is not None else DEFAULT_OUT),
        weights=args.weights, setting=args.setting, seed=args.seed, num_samples=args.num_samples,
        min_overlap=args.min_overlap, overwrite=args.overwrite, device=args.device, fp32=args.fp32,
        colmap_db=args.colmap_db, colmap_add=args.colmap_db_add, cell_size=args.cell_size,
        max_error=args.max_error, camera_mode=args.camera_mode,
    )  # fmt: skip
    try:
        return run_pairs(job, executor).code
    except KeyboardInterrupt as e:
        if not job.started:
            raise
        return interrupt_code(e)  # what is saved was said


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see ``romav2-match --help``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return run_command(PROG, lambda: _run_pairs(args) if args.pairs is not None else _run_single(args))


if __name__ == "__main__":
    sys.exit(main())
