"""romav2-match's input checks: a pairs file that is not UTF-8, a folder or a too small image, missing
images in a pairs file; each is refused, naming the problem, before the model loads."""

from __future__ import annotations

import numpy as np
from cli_support import ASSETS, pairs_args
from PIL import Image

from romav2_plugin.app import cli


def test_pairs_file_not_utf8_names_line_and_byte(cli_no_model, cli_images, tmp_path, capsys):
    pairs = tmp_path / "pairs.txt"
    pairs.write_bytes(b"a.jpg b.jpg\n# ok\ncaf\xe9.jpg b.jpg\n")
    assert cli.main(pairs_args(pairs, cli_images, tmp_path / "r.h5")) == 2
    err = capsys.readouterr().err
    assert "pairs.txt:3: not valid UTF-8" in err and "0xe9" in err and "byte offset 20" in err
    assert "Traceback" not in err


def test_folder_given_as_image_is_called_a_folder(cli_no_model, tmp_path, capsys):
    rc = cli.main([str(tmp_path), str(ASSETS / "demo_B.jpg"), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "is a folder, not an image file" in err and "not found" not in err


def test_image_smaller_than_one_patch_refused_before_the_model(cli_no_model, tmp_path, capsys):
    Image.fromarray(np.zeros((12, 40, 3), np.uint8)).save(tmp_path / "small.png")
    assert (
        cli.main([str(tmp_path / "small.png"), str(ASSETS / "demo_B.jpg"), "--out", str(tmp_path / "o")]) == 2
    )
    assert "40x12 is too small" in capsys.readouterr().err


def test_pairs_bad_images_found_before_the_model(cli_no_model, cli_images, tmp_path, capsys):
    (cli_images / "dir.jpg").mkdir()
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg gone.jpg\ndir.jpg b.jpg\n")
    assert cli.main(pairs_args(pairs, cli_images, tmp_path / "r.h5")) == 3  # every pair failed: no model load
    out = capsys.readouterr()
    assert "Image not found" in out.out and "is a folder" in out.out and "wrote      nothing" in out.out
