"""hloc's dense matching, with RoMa v2 confs, from Python (:func:`run_match_dense`) or the command line
(:mod:`romav2_plugin.app.hloc_command`).

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

import logging
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["InputError", "run_match_dense", "resolve_outputs"]

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
