"""Pairs for users without a list: which images of a folder to match (``romav2-sfm --pairs-from``, and
``romav2-match --pairs-from`` with ``--image-dir``).

Specs:

* ``exhaustive``: every unordered pair, ``n (n - 1) / 2`` of them (fine up to a few hundred images);
* ``sequential:N``: each image with the next ``N`` in name order (video frames, ordered captures; names are
  sorted naturally, so ``frame2`` comes before ``frame10``);
* ``retrieval:FILE``: the pairs listed in ``FILE`` (``nameA nameB`` per line, as hloc's
  ``pairs_from_retrieval`` or ``colmap vocab_tree_matcher`` exports write them), names relative to the image
  folder; a pair listed in both orders is matched once.

Images are the files of the folder and its subfolders whose suffix PIL commonly reads (:data:`IMAGE_SUFFIXES`),
named by their path relative to the folder with ``/`` separators, hidden files and folders skipped.
"""

from __future__ import annotations

import re
from itertools import combinations
from pathlib import Path

from romav2_plugin.app.errors import EXIT_USAGE, CommandError

__all__ = ["IMAGE_SUFFIXES", "PAIRS_FROM_HELP", "list_images", "natural_key", "exhaustive", "sequential", "pairs_from"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
PAIRS_FROM_HELP = (
    "exhaustive (every pair), sequential:N (each image with the next N in name order: video, ordered "
    "captures) or retrieval:FILE (the 'nameA nameB' pairs listed in FILE)"
)


def natural_key(name: str) -> list:
    """Sort key that orders the digits in names by value (``frame2`` < ``frame10``)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_images(image_dir: Path) -> list[str]:
    """Image names under ``image_dir`` (relative, ``/``-separated), in natural order."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise CommandError(f"image folder {image_dir} is not a folder", EXIT_USAGE)
    names = []
    for p in image_dir.rglob("*"):
        rel = p.relative_to(image_dir)
        if any(part.startswith(".") for part in rel.parts) or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.is_file():
            names.append(rel.as_posix())
    names.sort(key=natural_key)
    if len(names) < 2:
        raise CommandError(
            f"{image_dir} holds {len(names)} image(s) ({', '.join(IMAGE_SUFFIXES)}); at least two are needed",
            EXIT_USAGE,
        )
    return names


def exhaustive(names: list[str]) -> list[tuple[str, str]]:
    """Every unordered pair, in the order of ``names``."""
    return list(combinations(names, 2))


def sequential(names: list[str], overlap: int) -> list[tuple[str, str]]:
    """Each image with the next ``overlap`` images of ``names``."""
    if overlap < 1:
        raise CommandError(f"sequential:N needs N >= 1, got {overlap}", EXIT_USAGE)
    return [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, min(i + 1 + overlap, len(names)))]


def pairs_from(spec: str, image_dir: Path) -> list[tuple[str, str]]:
    """The pairs of ``spec`` (see the module) for the images of ``image_dir``."""
    kind, _, arg = spec.partition(":")
    if kind == "exhaustive" and not arg:
        return exhaustive(list_images(image_dir))
    if kind == "sequential":
        try:
            n = int(arg)
        except ValueError:
            raise CommandError(f"--pairs-from {spec}: give sequential:N with a whole number N, e.g. sequential:10",
                               EXIT_USAGE) from None
        return sequential(list_images(image_dir), n)
    if kind == "retrieval" and arg:
        from romav2_plugin.app.pairs import read_pairs

        seen: set[frozenset] = set()
        out = []
        for a, b in read_pairs(Path(arg).expanduser()):
            key = frozenset((a, b))
            if a != b and key not in seen:
                seen.add(key)
                out.append((a, b))
        return out
    raise CommandError(f"--pairs-from {spec!r}: expected {PAIRS_FROM_HELP}", EXIT_USAGE)
