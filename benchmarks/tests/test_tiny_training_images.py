"""benchmarks/tiny/training_images.py: the table of romav2-tiny's photographs (author(s), SPDX licence, where
stated) that ships as romav2_plugin/assets/romav2_tiny_training_images.csv.

The parsing rules run everywhere on small made-up inputs; the comparison with the real sources needs the
Debian wallpaper packages installed (``python -m benchmarks.tiny.fetch_images --install``) and skips, saying
so, where they are not."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from benchmarks.tiny import fetch_images, training_images

DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: x

Files: *
Copyright: 2013-2020 Some community contributors
License: GPL-2+

Files: desktop/Pretty-*-no-logo.png
Copyright: 2014 Ann Artist <ann@example.org>
           2015, "nick" <nick@example.org>
License: CC-BY-SA-4.0
Comment: more text

Files: desktop/Pretty-Plain-no-logo.png
Copyright: *No copyright*
License: LGPLv3
"""


@pytest.fixture
def dep5(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "copyright").write_text(DEP5, encoding="utf-8")
    return training_images._dep5("pkg", tmp_path)


def test_last_matching_files_paragraph_wins_and_holders_lose_years_and_emails(dep5):
    assert [p["License"] for p in dep5] == ["GPL-2+", "CC-BY-SA-4.0", "LGPLv3"]
    para = training_images._dep5_match(dep5, "desktop/Pretty-Warm-no-logo.png")
    assert para["License"] == "CC-BY-SA-4.0"
    assert training_images._holders(para["Copyright"]) == ["Ann Artist", "nick"]
    assert training_images._dep5_match(dep5, "desktop/Pretty-Plain-no-logo.png")["License"] == "LGPLv3"
    assert training_images._holders("*No copyright*") == []
    other = training_images._dep5_match(dep5, "nature/Tree.jpg")
    assert other["License"] == "GPL-2+"
    assert training_images._holders(other["Copyright"]) == ["Some community contributors"]


def test_an_unknown_licence_statement_stops_the_table_naming_the_file():
    assert training_images._spdx("GPL-2+", "a.png") == "GPL-2.0-or-later"
    with pytest.raises(training_images.StatementError, match=r"b\.png: licence stated as 'Beerware'.*SPDX"):
        training_images._spdx("Beerware", "b.png")


def test_skimage_docstrings_give_licence_and_photographer():
    pytest.importorskip("skimage")
    assert training_images._skimage("coffee")[:2] == (["Rachel Michetti"], "CC0")
    authors, stated, statement = training_images._skimage("astronaut")
    assert (authors, stated) == (["NASA"], "public domain") and "public domain" in statement


def _installed() -> bool:
    return shutil.which("dpkg") is not None and all(
        subprocess.run(["dpkg", "-s", p], capture_output=True, check=False).returncode == 0 for p in fetch_images.DEBIAN)


@pytest.mark.skipif(not _installed(), reason="the Debian wallpaper packages are not installed here "
                    "(python -m benchmarks.tiny.fetch_images --install, root); the shipped table cannot be "
                    "compared with its sources")
def test_shipped_table_is_exactly_this_machines_pictures_and_statements():
    pytest.importorskip("skimage")
    entries = fetch_images.pictures()
    shipped = training_images.read_table()
    # the recipe's pictures (fetch_images links exactly these into .tiny-data/train and /heldout), same split
    assert [(e["file"], e["split"]) for e in entries] == [(r["file"], r["split"]) for r in shipped]
    assert sum(e["split"] == "train" for e in entries) == 61
    assert training_images.to_csv(training_images.describe(entries)) == training_images.TABLE.read_text(
        encoding="utf-8")
