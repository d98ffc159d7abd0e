"""Fetch the photographs romav2-tiny is trained and evaluated on, with the package managers, and split them.

    python -m benchmarks.tiny.fetch_images --out .tiny-data [--install]

``--install`` runs ``apt-get update`` and ``apt-get install`` for the Debian wallpaper packages below (root
needed) and checks that scikit-image is importable (``pip install scikit-image``). The script then links one
file per picture (the largest of each wallpaper's resolutions) into ``OUT/train/`` and ``OUT/heldout/`` and
writes ``OUT/manifest.json`` listing every file with its package, licence and split.

The held-out split is fixed by rule, never by results: every 5th picture of each source in sorted order,
plus scikit-image's ``coffee`` (the demo pair is made from it). Training never reads ``heldout/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

DEBIAN = {
    # package: folder (licences: benchmarks/tiny/training_images.py, per picture)
    "mate-backgrounds": "/usr/share/backgrounds/mate",
    "ukui-wallpapers": "/usr/share/backgrounds",
    "plasma-workspace-wallpapers": "/usr/share/wallpapers",
}
# scikit-image's bundled photographs (not the synthetic or microscopy images): file -> the skimage.data function
# whose docstring states its licence (benchmarks/tiny/training_images.py reads it). The order fixes the split.
SKIMAGE = {
    "astronaut.png": "astronaut",
    "chelsea.png": "chelsea",
    "coffee.png": "coffee",
    "rocket.jpg": "rocket",
    "brick.png": "brick",
    "grass.png": "grass",
    "gravel.png": "gravel",
    "camera.png": "camera",
}
ALWAYS_HELD_OUT = {"skimage__coffee.png"}
RULE = "held out: every 5th picture per source (sorted), plus skimage coffee"
SUFFIXES = (".jpg", ".jpeg", ".png")
_RES = re.compile(r"[_-]?\d{3,5}x\d{3,5}")


def _pictures(package: str, folder: str) -> dict[str, Path]:
    """One file per picture: plasma keeps each wallpaper in <Name>/contents/images*/<WxH>.<ext>; others
    name resolutions ``<name>_<W>x<H>``. Keep the largest file of each group."""
    files = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False).stdout.split()
    groups: dict[str, list[Path]] = {}
    for f in files:
        p = Path(f)
        if p.suffix.lower() not in SUFFIXES or not p.is_file() or not str(p).startswith(folder):
            continue
        rel = p.relative_to(folder)
        key = rel.parts[0] if "contents" in rel.parts else _RES.sub("", rel.stem)
        if "dark" in str(rel).lower():  # plasma's dark variants repeat the picture
            continue
        groups.setdefault(key, []).append(p)
    return {k: max(v, key=lambda q: q.stat().st_size) for k, v in sorted(groups.items())}


def pictures() -> list[dict[str, str]]:
    """Every picture the recipe uses, in the fixed order that decides the split: ``file`` (the name under
    ``OUT/train`` or ``OUT/heldout``), ``split``, ``package`` and ``source`` (the installed file). Pictures of
    packages that are not installed are missing; scikit-image must be importable."""
    import skimage

    sources: list[tuple[str, dict[str, Path]]] = [(pkg, _pictures(pkg, folder)) for pkg, folder in DEBIAN.items()]
    sk = Path(skimage.__file__).parent / "data"
    sources.append((f"scikit-image {skimage.__version__}",
                    {Path(n).stem: sk / n for n in SKIMAGE if (sk / n).is_file()}))
    entries = []
    for pkg, pics in sources:
        short = "skimage" if pkg.startswith("scikit-image") else pkg.split("-")[0]
        for i, (key, path) in enumerate(pics.items()):
            name = f"{short}__{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}{path.suffix.lower()}"
            split = "heldout" if (i % 5 == 4 or name in ALWAYS_HELD_OUT) else "train"
            entries.append({"file": name, "split": split, "package": pkg, "source": str(path)})
    return entries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".tiny-data", help="output folder (git-ignored)")
    ap.add_argument("--install", action="store_true", help="apt-get install the wallpaper packages first (root)")
    args = ap.parse_args(argv)
    if args.install:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *DEBIAN], check=True, env=env)
    try:
        import skimage  # noqa: F401  (pictures() imports it)
    except ImportError:
        print("scikit-image is missing: pip install scikit-image", file=sys.stderr)
        return 1
    out = Path(args.out)
    entries = pictures()
    for pkg in DEBIAN:
        if not any(e["package"] == pkg for e in entries):
            print(f"warning: no pictures from {pkg} (install it: apt-get install {pkg})", file=sys.stderr)
    for split in ("train", "heldout"):
        (out / split).mkdir(parents=True, exist_ok=True)
        for old in (out / split).iterdir():
            old.unlink()
    from benchmarks.tiny.training_images import describe

    for e, row in zip(entries, describe(entries)):
        (out / e["split"] / e["file"]).symlink_to(e["source"])
        e["licence"] = row["licence"]
        e["authors"] = row["authors"]
    manifest = {"rule": RULE, "files": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    n = {s: sum(e["split"] == s for e in entries) for s in ("train", "heldout")}
    print(f"{out}: {n['train']} training and {n['heldout']} held-out pictures; manifest.json lists licences")
    return 0


if __name__ == "__main__":
    sys.exit(main())
