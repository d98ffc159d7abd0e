"""hloc's dense matching, with RoMa v2 confs, from the command line or Python.

``python -m hloc.match_dense`` takes its ``--conf`` choices from a dict built when hloc runs it as
``__main__``, so no plugin can extend it. This module takes the same arguments (all of hloc's confs plus
ours) and runs hloc's own ``hloc.match_dense.main``::

    python -m romav2_plugin.hloc match_dense --conf romav2 --pairs pairs.txt --image_dir images/ \\
        --export_dir outputs/ [--matches M.h5] [--features F.h5|prefix] [--weights W] [--setting S] [--overwrite]

On top of hloc's ``main``:

* inputs are checked first: a missing or undecodable image listed in the pairs, an unreadable pairs file or
  an unreadable existing output stops the run with a clear message (exit status 2) before anything is
  computed or written;
* resumable: pairs already in the matches file are skipped (hloc's own rule) unless ``--overwrite``;
* nothing already written is lost: hloc writes into copies (``<file>.partial``) of the two output files,
  which replace the originals only once the run has finished; an interrupted or failed run (Ctrl-C,
  SIGTERM, exception) leaves the outputs exactly as they were and the next run redoes the missing pairs.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = ["run_match_dense", "resolve_outputs", "main"]

_LOG = logging.getLogger("hloc")


class InputError(ValueError):
    """Bad inputs, found before anything was computed or written."""


def resolve_outputs(
    conf: dict[str, Any],
    pairs: Path,
    export_dir: Path | None,
    matches: Path | None = None,
    features: str | Path | None = None,
) -> tuple[Path, Path]:
    """The features and matches files ``hloc.match_dense.main`` would write (same rules).

    ``features``: a path (``*.h5`` or ``Path``; then ``matches`` is required) or a name prefix (default
    ``"feats_"``: ``export_dir/feats_<output>.h5``). ``matches`` defaults to ``export_dir/<output>_<pairs stem>.h5``.
    """
    if features is None:
        features = "feats_"
    if isinstance(features, str) and features.endswith(".h5"):
        features = Path(features)
    if isinstance(features, Path):
        if matches is None:
            raise InputError("Either provide both features and matches as Path or both as names.")
        return features, Path(matches)
    if export_dir is None:
        raise InputError(
            f"Provide an export_dir if features and matches are not file paths: {features}, {matches}."
        )
    features_q = Path(export_dir, f"{features}{conf['output']}.h5")
    if matches is None:
        matches = Path(export_dir, f"{conf['output']}_{Path(pairs).stem}.h5")
    return features_q, Path(matches)


def _check_h5(path: Path) -> None:
    import h5py

    if not path.exists():
        return
    try:
        with h5py.File(str(path), "r"):
            pass
    except OSError as e:
        raise InputError(
            f"Existing output {path} is not a readable HDF5 file ({e}). It was left untouched: move it away "
            "or choose another --export_dir/--matches/--features."
        ) from e


def _pairs_to_do(pairs_path: Path, matches: Path, overwrite: bool) -> tuple[list[tuple[str, str]], int]:
    from hloc.match_features import find_unique_new_pairs
    from hloc.utils.parsers import parse_retrieval

    if not pairs_path.is_file():
        raise InputError(f"Pairs file {pairs_path} does not exist.")
    try:
        retrieval = parse_retrieval(pairs_path)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(
            f"Cannot parse pairs file {pairs_path}: each line must be 'name0 name1' ({e})."
        ) from e
    pairs = [(q, r) for q, rs in retrieval.items() for r in rs]
    unique = find_unique_new_pairs(pairs, None)
    todo = find_unique_new_pairs(pairs, None if overwrite else matches)
    return todo, len(unique)


def _check_images(image_dir: Path, pairs: list[tuple[str, str]], min_side: int | None = None) -> None:
    """Every image of ``pairs`` exists and OpenCV can read it; with ``min_side`` (RoMa v2 confs: one 16x16
    patch, :data:`romav2_plugin.io.MIN_SIDE`) each side is at least that long, read from the header only."""
    import cv2

    if not image_dir.is_dir():
        raise InputError(f"Image directory {image_dir} does not exist.")
    names = sorted({n for p in pairs for n in p})
    missing = [n for n in names if not (image_dir / n).is_file()]
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing) - 10} more)" if len(missing) > 10 else "")
        raise InputError(
            f"{len(missing)} image(s) listed in the pairs are missing under {image_dir}: {shown}"
        )
    bad = [n for n in names if not cv2.haveImageReader(str(image_dir / n))]
    if bad:
        shown = ", ".join(bad[:10]) + (f", ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
        raise InputError(
            f"{len(bad)} image(s) under {image_dir} are not in a format OpenCV can read: {shown}"
        )
    if min_side is not None:
        _check_min_sides(image_dir, names, min_side)


def _check_min_sides(image_dir: Path, names: list[str], min_side: int) -> None:
    from PIL import Image

    from romav2_plugin.io import check_min_size

    for n in names:
        try:
            with Image.open(image_dir / n) as img:
                w, h = img.size
        except (OSError, SyntaxError, Image.DecompressionBombError):
            continue  # a format only OpenCV reads: hloc's own reading decides
        try:
            check_min_size(w, h, n, min_side)
        except ValueError as e:
            raise InputError(f"{e} (under {image_dir})") from None


def _staging(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def run_match_dense(
    conf: dict[str, Any],
    pairs: Path,
    image_dir: Path,
    export_dir: Path | None = None,
    matches: Path | None = None,
    features: str | Path | None = None,
    features_ref: Path | list[Path] | None = None,
    max_kps: int | None = 8192,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """``hloc.match_dense.main`` with input checks and all-or-nothing writes (see the module docstring).

    Returns:
        ``(features, matches)`` paths, as hloc's ``main``.

    Raises:
        InputError (a ``ValueError``): bad inputs; nothing was computed or written.
    """
    from romav2_plugin.adapters.hloc import ensure_registered

    match_dense = ensure_registered()
    pairs, image_dir = Path(pairs), Path(image_dir)
    features_q, matches = resolve_outputs(conf, pairs, export_dir, matches, features)
    for path in (features_q, matches):
        _check_h5(path)
    todo, n_unique = _pairs_to_do(pairs, matches, overwrite)
    if n_unique == 0:
        raise InputError(f"{pairs}: no pairs found (one 'name0 name1' per line); nothing was written.")
    if not todo:
        _LOG.info(
            f"All {n_unique} pairs are already in {matches}: nothing to do (--overwrite recomputes them)."
        )
        return features_q, matches
    _LOG.info(f"{len(todo)} of {n_unique} pairs to match ({n_unique - len(todo)} already in {matches}).")
    from romav2_plugin.io import MIN_SIDE

    _check_images(image_dir, todo, MIN_SIDE if conf.get("model", {}).get("name") == "romav2" else None)

    staged = [(features_q, _staging(features_q)), (matches, _staging(matches))]
    for final, stage in staged:
        final.parent.mkdir(parents=True, exist_ok=True)
        stage.unlink(missing_ok=True)  # left over by a killed run of ours
        if final.exists():
            shutil.copyfile(final, stage)
    try:
        match_dense.main(
            conf,
            pairs,
            image_dir,
            matches=staged[1][1],
            features=staged[0][1],
            features_ref=features_ref,
            max_kps=max_kps,
            overwrite=overwrite,
        )
    except BaseException:
        for _, stage in staged:
            stage.unlink(missing_ok=True)
        raise
    # Features first: old matches stay valid with new features (hloc only adds images unless overwriting).
    for final, stage in staged:
        if stage.exists():
            os.replace(stage, final)
    return features_q, matches


# --------------------------------------------------------------------------- command line
PROG = "python -m romav2_plugin.hloc"


def _parser(
    conf_names: list[str] | None, default_conf: str, hloc_missing: str | None = None
) -> argparse.ArgumentParser:
    from romav2_plugin.commands import EXIT_CODES_HELP, WEIGHTS_HELP
    from romav2_plugin.config import SETTINGS

    note = f"\n\nhloc is not installed here: {hloc_missing}" if hloc_missing else ""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="hloc tools with the RoMa v2 matchers registered." + note,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "match_dense",
        help="hloc.match_dense.main with all of hloc's confs plus RoMa v2's",
        description="Dense matching with hloc.match_dense.main (hloc's arguments, plus --weights, --setting, "
        "--overwrite). Pairs already in the matches file are skipped; an interrupted run leaves the "
        "outputs as they were." + note,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pairs", type=Path, required=True, help="pairs file: one 'name0 name1' per line")
    p.add_argument("--image_dir", type=Path, required=True)
    p.add_argument("--export_dir", type=Path, required=True)
    p.add_argument(
        "--matches",
        type=Path,
        default=None,
        help="matches file (default: EXPORT_DIR/<output>_<pairs stem>.h5)",
    )
    p.add_argument(
        "--features",
        type=str,
        default=None,
        help="features file (*.h5, needs --matches) or name prefix (default 'feats_': EXPORT_DIR/feats_<output>.h5)",
    )
    conf_help = "hloc conf (default: romav2)" + ("" if conf_names else "; the list needs hloc installed")
    p.add_argument("--conf", type=str, default=default_conf, choices=conf_names, help=conf_help)
    p.add_argument("--weights", default=None, metavar="PATH|URL|tiny", help="RoMa v2 " + WEIGHTS_HELP)
    p.add_argument(
        "--setting", default=None, choices=list(SETTINGS), help="RoMa v2 setting (overrides the conf)"
    )
    p.add_argument("--overwrite", action="store_true", help="recompute pairs already in the matches file")
    from romav2_plugin.distributed import add_engine_arguments

    add_engine_arguments(p, what="dense matching")  # --engine ray, ... (romav2_plugin.distributed)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (the codes of :mod:`romav2_plugin.commands`)."""
    from romav2_plugin.commands import (
        EXIT_RUNTIME,
        EXIT_SETUP,
        EXIT_USAGE,
        CommandError,
        choose_weights,
        interrupt_code,
        is_disk_full,
        is_weights_error,
        run_command,
        weights_error,
    )

    hloc_missing = None
    confs: dict[str, Any] | None = None
    try:
        from romav2_plugin.adapters.hloc import ensure_registered

        confs = ensure_registered().confs
    except ImportError as e:
        hloc_missing = str(e)
    parser = _parser(list(confs) if confs else None, "romav2", hloc_missing)
    args = parser.parse_args(argv)

    def body() -> int:
        if confs is None:
            raise CommandError(str(hloc_missing), EXIT_SETUP)
        if args.conf not in confs:
            parser.error(f"unknown --conf {args.conf!r}")
        from romav2_plugin.distributed import ray_only_options_given

        ray_only = ray_only_options_given(args)
        if ray_only:
            parser.error(f"{', '.join(ray_only)} only apply with --engine ray (add --engine ray, or leave them out)")
        conf = copy.deepcopy(confs[args.conf])
        choice = None
        if conf["model"].get("name") == "romav2":
            choice = choose_weights(
                args.weights if args.weights is not None else conf["model"].get("weights")
            )
        if args.weights is not None or args.setting is not None:
            if choice is None:
                parser.error(f"--weights/--setting apply to RoMa v2 confs only, not {args.conf!r}")
            if args.weights is not None:
                conf["model"]["weights"] = args.weights
            if args.setting is not None:
                conf["model"]["setting"] = args.setting
        try:
            run = run_match_dense
            if getattr(args, "engine", "local") == "ray":  # the same files; the dense stage on Ray workers
                from romav2_plugin.distributed import hloc_runner

                run = hloc_runner(args)
            features, matches = run(
                conf,
                args.pairs,
                args.image_dir,
                args.export_dir,
                args.matches,
                args.features,
                overwrite=args.overwrite,
            )
        except InputError as e:
            raise CommandError(str(e), EXIT_USAGE) from None
        except KeyboardInterrupt as e:
            raise CommandError(
                "interrupted: the output files were left as they were; run the same command again to resume.",
                interrupt_code(e),
            ) from None
        except ImportError as e:
            raise CommandError(f"{e} ({_hint_extra()})", EXIT_SETUP) from None
        except (OSError, ValueError, RuntimeError, IndexError, KeyError) as e:
            if is_weights_error(e) or (
                choice is not None and isinstance(e, ValueError) and "checkpoint" in str(e)
            ):
                raise weights_error(e, choice) from None
            what = "the disk is full" if is_disk_full(e) else str(e)
            raise CommandError(f"{what}\nThe output files were left as they were.", EXIT_RUNTIME) from None
        print(f"features: {features}\nmatches: {matches}")
        return 0

    return run_command(PROG, body)


def _hint_extra() -> str:
    return 'pip install "romav2-plugin[hloc]" and hloc itself'


if __name__ == "__main__":
    sys.exit(main())
