"""The one-screen summaries that ``romav2-match`` prints (plain functions of explicit values)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "CONFIDENT", "reprojection_errors", "single_summary", "pairs_summary", "meaningless_note", "geometry_line",
    "UNRELIABLE_ADVICE",
]

CONFIDENT = 0.5  # a sampled match counts as "confident" when its overlap exceeds this
_MAX_LISTED = 20  # unreliable pairs named in the pairs summary


def reprojection_errors(H: np.ndarray, kpts_A: np.ndarray, kpts_B: np.ndarray) -> np.ndarray:
    """``|H(kpts_A) - kpts_B|`` in pixels of B (OpenCV convention)."""
    pa = (
        np.concatenate((kpts_A.astype(np.float64), np.ones((len(kpts_A), 1))), axis=1)
        @ np.asarray(H, dtype=np.float64).T
    )
    proj = pa[:, :2] / pa[:, 2:]
    return np.linalg.norm(proj - kpts_B.astype(np.float64), axis=1)


def meaningless_note(n_confident: int, coverage_A: float) -> str | None:
    """A warning when the output is plainly meaningless (no confident match at all)."""
    if n_confident > 0:
        return None
    return (
        f"no confident match (none with overlap > {CONFIDENT}; {100 * coverage_A:.0f}% of A covisible): "
        "the images look unrelated to the model, or the weights are not suited (random or a test model). "
        "Do not use these matches."
    )


UNRELIABLE_ADVICE = (
    "look at the matches picture before using them; the images may not show the same scene, or the baseline is "
    "too wide for these weights and setting (try the official weights, a larger --setting)"
)


def geometry_line(inlier_ratio: float, inliers: int, n: int, model: str, threshold_px: float, share: float) -> str:
    """The summary's line on the geometric check (:mod:`romav2_plugin.verify`)."""
    share_txt = "" if share != share else f"; {100 * share:.0f}% of the grid confident (overlap > {CONFIDENT})"
    if inlier_ratio != inlier_ratio:  # NaN: undefined
        return f"check undefined (too few or degenerate matches){share_txt}"
    model = {"fundamental": "fundamental matrix"}.get(model, model)
    return (
        f"{100 * inlier_ratio:.0f}% of {n} matches fit one {model} ({inliers} inliers at {threshold_px:.2g} px)"
        f"{share_txt}"
    )


def _image_line(label: str, path, hw: tuple[int, int], exif: int) -> str:
    rot = "" if exif == 1 else ", EXIF-rotated"
    return f"  {label}    {path}  ({hw[1]}x{hw[0]}{rot})"


def single_summary(
    *,
    path_A,
    path_B,
    hw_A: tuple[int, int],
    hw_B: tuple[int, int],
    exif_A: int,
    exif_B: int,
    setting: str,
    resolution: str,
    bidirectional: bool,
    device,
    weights: str,
    weights_sha256: str,
    weights_note: str,
    times: dict[str, float],
    t_load: float,
    confidence: np.ndarray,
    seed: int,
    min_overlap: float | None,
    coverage_A: float,
    written: Sequence[Path],
    reprojection: np.ndarray | None = None,
    check: dict | None = None,
    unreliable: str | None = None,
) -> str:
    """``check``: the per-pair check values (:func:`romav2_plugin.app.matching.check_metadata`);
    ``unreliable``: why the pair looks unreliable (a WARNING line), or ``None``."""
    n = len(confidence)
    n_conf = int((confidence > CONFIDENT).sum())
    direction = "bidirectional" if bidirectional else "A->B only"
    sha = f" (sha256 {weights_sha256})" if weights_sha256 else ""
    t = ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
    filt = "" if min_overlap is None else f", overlap > {min_overlap:g}"
    lines = [
        "RoMa v2 matches",
        _image_line("image A", path_A, hw_A, exif_A),
        _image_line("image B", path_B, hw_B, exif_B),
        f"  setting    {setting}: {resolution}, {direction}; device {device}",
        f"  weights    {weights}{sha}{weights_note}",
        f"  time       load {t_load:.1f} s, {t}",
        f"  matches    {n} sampled (seed {seed}{filt}), {n_conf} confident (overlap > {CONFIDENT}); "
        f"{100 * coverage_A:.0f}% of A covisible",
    ]
    if check is not None:
        lines.append("  geometry   " + geometry_line(
            check["geometry_inlier_ratio"], check["geometry_inliers"], n, check["geometry_model"],
            check["geometry_threshold_px"], check["confident_share"],
        ))  # fmt: skip
    note = meaningless_note(n_conf, coverage_A)
    if note:
        lines.append(f"  WARNING    {note}")
    elif unreliable:
        lines.append(f"  WARNING    this pair looks unreliable: {unreliable}. {UNRELIABLE_ADVICE[0].upper()}{UNRELIABLE_ADVICE[1:]}.")
    if reprojection is not None and len(reprojection):
        e = reprojection
        lines.append(
            f"  vs truth   reprojection error against the known homography: median {np.median(e):.2f} px, "
            f"{100 * np.mean(e < 1):.0f}% < 1 px, {100 * np.mean(e < 3):.0f}% < 3 px, {100 * np.mean(e < 10):.0f}% < 10 px"
        )
    lines.append(
        "  wrote      " + ("\n             ".join(str(p) for p in written) if written else "nothing")
    )
    return "\n".join(lines)


def pairs_summary(
    *,
    n_listed: int,
    n_done: int,
    n_skipped: int,
    failures: Sequence[tuple[str, str, str]],
    setting: str,
    device,
    weights: str,
    weights_sha256: str,
    elapsed: float,
    total_matches: int,
    num_samples: int,
    n_meaningless: int,
    out: Path,
    out_exists: bool,
    stopped: str | None = None,
    unreliable: Sequence[tuple[str, str, str]] = (),
) -> str:
    """``unreliable``: ``(name A, name B, why)`` of the pairs matched now that look unreliable."""
    sha = f" (sha256 {weights_sha256})" if weights_sha256 else ""
    not_run = n_listed - n_done - n_skipped - len(failures)
    tail = f", {not_run} not run" if not_run > 0 else ""
    lines = [
        "RoMa v2 pairs",
        f"  pairs      {n_listed} listed: {n_done} matched now, {n_skipped} already done, {len(failures)} failed{tail}",
        f"  setting    {setting}; device {device}; weights {weights}{sha}",
        f"  time       {elapsed:.1f} s ({elapsed / max(n_done, 1):.1f} s per pair, model load included)",
        f"  matches    {total_matches} written ({num_samples} requested per pair)",
    ]
    if n_meaningless:
        lines.append(
            f"  WARNING    {n_meaningless} of {n_done} pairs have no confident match (overlap > {CONFIDENT}): "
            "unrelated images, or weights not suited to them"
        )
    if unreliable:
        shown = "\n             ".join(f"{na} {nb}: {why}" for na, nb, why in unreliable[:_MAX_LISTED])
        more = len(unreliable) - _MAX_LISTED
        lines.append(
            f"  WARNING    {len(unreliable)} of {n_done} pairs look unreliable (their matches fit no single two-view "
            f"geometry): {UNRELIABLE_ADVICE}; each pair's geometry_inlier_ratio is in the results file\n"
            f"             {shown}" + (f"\n             ... and {more} more" if more > 0 else "")
        )
    if stopped:
        lines.append(f"  STOPPED    {stopped}")
    if n_done or out_exists:
        lines.append(f"  wrote      {out}" if n_done else f"  file       {out} (nothing new written)")
    else:
        lines.append("  wrote      nothing")
    if failures:
        lines.append(
            "  failed     " + "\n             ".join(f"{na} {nb}: {msg}" for na, nb, msg in failures)
        )
        lines.append("             (fix them and rerun the same command: finished pairs are skipped)")
    return "\n".join(lines)
