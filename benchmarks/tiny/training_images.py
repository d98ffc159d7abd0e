"""romav2-tiny's photographs, one row each: package, author(s), licence (SPDX) and where that is stated.

    python -m benchmarks.tiny.training_images            # rewrite romav2_plugin/assets/romav2_tiny_training_images.csv
    python -m benchmarks.tiny.training_images --check    # exit 1 unless the shipped table equals this machine's
    python -m benchmarks.tiny.training_images --card     # also rewrite the licence keys of the model card

Everything is read from the installed packages (``python -m benchmarks.tiny.fetch_images --install`` installs
them), nothing is typed in by hand:

* ``mate-backgrounds``, ``ukui-wallpapers``: the Debian machine-readable copyright file
  (``/usr/share/doc/<package>/copyright``), the last ``Files:`` paragraph that matches the picture; MATE's
  wallpaper lists (``/usr/share/mate-background-properties/*.xml``) where the copyright file names nobody;
* ``plasma-workspace-wallpapers``: each wallpaper's own ``metadata.json`` (``KPlugin.License`` and
  ``KPlugin.Authors``) or ``metadata.desktop``; the Debian copyright file's package-wide line (``Files: *``,
  GPL-2+) disagrees with most of them and is kept in its own column;
* scikit-image: the docstring of the ``skimage.data`` function that loads the picture.

A statement this script does not know how to map to SPDX stops it (exit 1, naming the file): add the mapping
to :data:`SPDX` after reading the statement, never a guess.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import inspect
import io
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "romav2_plugin" / "assets" / "romav2_tiny_training_images.csv"
CARD = ROOT / "romav2_plugin" / "assets" / "romav2_tiny.json"
COLUMNS = ["file", "split", "package", "source_path", "authors", "licence", "licence_as_stated",
           "statement_source", "package_copyright_licence"]
MATE_ROOT = "/usr/share/backgrounds/mate/"

#: licence names as the sources write them -> SPDX identifiers (public domain has none: a LicenseRef)
SPDX = {
    "GPL-2+": "GPL-2.0-or-later",
    "CC-BY-SA-3.0": "CC-BY-SA-3.0",
    "CC-BY-SA-4.0": "CC-BY-SA-4.0",
    "LGPLv3": "LGPL-3.0-only",  # KDE metadata "LGPLv3", no "or later"
    "CC0": "CC0-1.0",
    "public domain": "LicenseRef-public-domain",
}
#: licences whose terms require adaptations to be shared under the same (or a compatible) licence
COPYLEFT = {"CC-BY-SA-3.0", "CC-BY-SA-4.0", "GPL-2.0-or-later", "LGPL-3.0-only"}


class StatementError(ValueError):
    pass


def _spdx(stated: str, file: str) -> str:
    if stated not in SPDX:
        raise StatementError(f"{file}: licence stated as {stated!r}, which benchmarks/tiny/training_images.py "
                             "does not map to SPDX; read the statement and add it to SPDX")
    return SPDX[stated]


def _dep5(package: str, doc: Path = Path("/usr/share/doc")) -> list[dict[str, str]]:
    """The paragraphs of a machine-readable Debian copyright file, continuation lines joined with newlines."""
    text = (doc / package / "copyright").read_text(encoding="utf-8", errors="replace")
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if "Files" in fields:
            paragraphs.append(fields)
    return paragraphs


def _dep5_match(paragraphs: list[dict[str, str]], rel: str) -> dict[str, str] | None:
    """The last ``Files:`` paragraph whose patterns match ``rel`` (the format's rule)."""
    found = None
    for p in paragraphs:
        if any(fnmatch.fnmatchcase(rel, pat) for pat in p["Files"].split()):
            found = p
    return found


def _holders(copyright_field: str) -> list[str]:
    """Names of a ``Copyright:`` field: years, e-mail addresses and quotes dropped."""
    names = []
    for line in copyright_field.splitlines():
        line = re.sub(r"^\s*[\d\s,\-]+,?\s*", "", line)  # "2008, " / "2013-2020 "
        line = re.sub(r"<[^>]*>", "", line).strip(" ,´'\"")
        if line and line != "*No copyright*":
            names.append(" ".join(line.split()))
    return names


def _mate_lists() -> dict[str, dict[str, str]]:
    """filename -> {"artist", "comment"} from MATE's wallpaper lists."""
    out: dict[str, dict[str, str]] = {}
    for xml in sorted(Path("/usr/share/mate-background-properties").glob("*.xml")):
        for block in re.findall(r"<wallpaper\b.*?</wallpaper>", xml.read_text(encoding="utf-8"), flags=re.S):
            name = re.search(r"<filename>(.*?)</filename>", block)
            if name:
                artist = re.search(r"<artist>(.*?)</artist>", block)
                comment = re.search(r"<!--\s*(.*?)\s*-->", block, flags=re.S)
                out[name.group(1)] = {"artist": artist.group(1) if artist else "",
                                      "comment": comment.group(1) if comment else "", "list": str(xml)}
    return out


def _plasma(source: Path) -> tuple[list[str], str, str]:
    """(authors, licence as stated, statement file) of a plasma wallpaper's own metadata."""
    folder = source
    while folder.name != "contents":
        folder = folder.parent
    folder = folder.parent
    meta = folder / "metadata.json"
    if meta.is_file():
        plugin = json.loads(meta.read_text(encoding="utf-8"))["KPlugin"]
        return [a["Name"] for a in plugin.get("Authors", [])], plugin.get("License", ""), str(meta)
    meta = folder / "metadata.desktop"
    fields = dict(line.split("=", 1) for line in meta.read_text(encoding="utf-8").splitlines() if "=" in line)
    return [fields.get("X-KDE-PluginInfo-Author", "")], fields.get("X-KDE-PluginInfo-License", ""), str(meta)


def _skimage(function: str) -> tuple[list[str], str, str]:
    """(authors, licence as stated, statement) from the docstring of ``skimage.data.<function>``."""
    import skimage.data

    raw = inspect.getdoc(getattr(skimage.data, function)) or ""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", raw)]
    statement = " ".join(p for p in paragraphs if re.search(r"CC0|public domain|copyright", p, flags=re.I)
                         and not re.match(r"\.\. |Notes -+$", p))
    statement = re.sub(r"^Notes -+ ", "", statement)
    doc = " ".join(raw.split())
    stated = "CC0" if "CC0" in statement else "public domain" if "public domain" in statement.lower() else ""
    person = re.search(r"(?:photographer|owner|author)\s*\(([^)]+)\)", doc)
    org = re.search(r"(?:captured by|from the) (NASA|SpaceX)\b", doc)
    site = re.search(r"downloaded from\s*`?([^<`]+?)\s*<([^>]+)>", doc)
    if person:
        authors = [person.group(1)]
    elif org:
        authors = [org.group(1)]
    elif site:
        authors = [f"not named (source: {site.group(1)}, {site.group(2)})"]
    else:
        authors = ["not named"]
    return authors, stated, statement


def describe(entries: list[dict[str, str]]) -> list[dict[str, str]]:
    """The table's rows for :func:`benchmarks.tiny.fetch_images.pictures` entries, in their order."""
    from benchmarks.tiny.fetch_images import SKIMAGE

    dep5 = {pkg: _dep5(pkg) for pkg in {e["package"] for e in entries} if not pkg.startswith("scikit-image")}
    mate = _mate_lists() if "mate-backgrounds" in dep5 else {}
    rows = []
    for e in entries:
        source = Path(e["source"])
        pkg = e["package"]
        row = {"file": e["file"], "split": e["split"], "package": pkg, "source_path": str(source)}
        if pkg.startswith("scikit-image"):
            # inside site-packages, wherever that is; no version, so that the table does not change with it
            row.update(package="scikit-image", source_path=f"skimage/data/{source.name}")
            fn = SKIMAGE[source.name]
            authors, stated, statement = _skimage(fn)
            where = f"docstring of skimage.data.{fn}: {statement}"
            package_line = ""
        else:
            rel = str(source)[len(MATE_ROOT):] if pkg == "mate-backgrounds" else source.name
            para = _dep5_match(dep5[pkg], rel)
            if para is None:
                raise StatementError(f"{e['file']}: no Files: paragraph of /usr/share/doc/{pkg}/copyright "
                                     f"matches {rel}")
            package_line = _spdx(para["License"].split("\n")[0], e["file"])
            if pkg == "plasma-workspace-wallpapers":
                authors, stated, where = _plasma(source)
            else:
                authors, stated = _holders(para["Copyright"]), para["License"].split("\n")[0]
                pattern = " ".join(p for p in para["Files"].split() if fnmatch.fnmatchcase(rel, p))
                where = f"/usr/share/doc/{pkg}/copyright (Files: {pattern})"
                listed = mate.get(str(source), {})
                if not authors and listed.get("artist"):
                    authors = [listed["artist"]]
                    where += f"; artist: {listed['list']}"
                elif not authors:
                    note = f"; {listed['list']}: {listed['comment']}" if listed.get("comment") else ""
                    authors = [f"not named (the copyright file says: No copyright{note})"]
        row.update(authors="; ".join(authors), licence=_spdx(stated, e["file"]), licence_as_stated=stated,
                   statement_source=where, package_copyright_licence=package_line)
        rows.append(row)
    return rows


def to_csv(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def read_table(path: Path = TABLE) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def licence_counts(rows: list[dict[str, str]], split: str = "train") -> dict[str, int]:
    return dict(sorted(Counter(r["licence"] for r in rows if r["split"] == split).items()))


def card_training_data(rows: list[dict[str, str]]) -> dict:
    """The licence keys of the model card's ``training_data``, from the table."""
    train = [r for r in rows if r["split"] == "train"]
    per_package: dict[str, Counter] = {}
    for r in train:
        per_package.setdefault(r["package"], Counter())[r["licence"]] += 1
    return {
        "images_table": TABLE.name,
        "licence_counts": licence_counts(rows),
        "copyleft_photographs": sum(r["licence"] in COPYLEFT for r in train),
        "cc_by_sa_photographs": sum(r["licence"].startswith("CC-BY-SA") for r in train),
        "packages_and_licences": [{"package": p, "licences": dict(sorted(c.items()))}
                                  for p, c in sorted(per_package.items())],
        "licence_source": ("per picture, the most specific statement on the machine; plasma-workspace-wallpapers: "
                           "each wallpaper's metadata (Debian's copyright file says GPL-2+ for the whole package; "
                           "column package_copyright_licence)"),
        "weights_licence": "see LICENSES.md beside this card",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the shipped table; write nothing")
    ap.add_argument("--card", action="store_true", help="also rewrite the licence keys of the model card")
    args = ap.parse_args(argv)
    from benchmarks.tiny.fetch_images import DEBIAN, pictures

    entries = pictures()
    missing = [p for p in DEBIAN if not any(e["package"] == p for e in entries)]
    if missing:
        print(f"error: not installed: {', '.join(missing)}; run python -m benchmarks.tiny.fetch_images "
              "--install (root)", file=sys.stderr)
        return 1
    try:
        rows = describe(entries)
    except StatementError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = to_csv(rows)
    if args.check:
        same = TABLE.is_file() and TABLE.read_text(encoding="utf-8") == text
        print(f"{TABLE.name}: {'equals' if same else 'DIFFERS from'} this machine's {len(rows)} pictures")
        return 0 if same else 1
    TABLE.write_text(text, encoding="utf-8")
    if args.card:
        card = json.loads(CARD.read_text(encoding="utf-8"))
        card["training_data"].update(card_training_data(rows))
        CARD.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {TABLE} ({len(rows)} pictures; training: {licence_counts(rows)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
