"""romav2-match's paths and options: a ``#`` inside an image name is part of the
name (only a ``#`` at the start of a line or after white space starts a comment); a FIFO or ``/dev/stdin``
as image or pairs path says what it is instead of "not found"; Ray-only options without ``--engine ray``
are refused (exit 2) instead of being ignored."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from romav2_plugin.app import cli, matching, pairs
from romav2_plugin.app.errors import CommandError

ASSETS = Path(__file__).resolve().parents[1] / "romav2_plugin" / "assets"


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(matching, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))


def test_hash_inside_a_name_is_part_of_it(tmp_path):
    p = tmp_path / "pairs.txt"
    p.write_text("hash#1.jpg b.jpg\n# a comment line\na.jpg c#2.jpg # a trailing comment\n  #indented comment\na.jpg\tb.jpg\t#tab comment\n")
    assert pairs.read_pairs(p) == [("hash#1.jpg", "b.jpg"), ("a.jpg", "c#2.jpg"), ("a.jpg", "b.jpg")]


def test_pairs_with_hash_names_run_to_the_images(tmp_path, no_model, capsys):
    for n in ("hash#1.jpg", "b.jpg"):
        (tmp_path / n).write_bytes((ASSETS / "demo_A.jpg").read_bytes())
    (tmp_path / "pairs.txt").write_text("hash#1.jpg missing#2.jpg\n")
    code = cli.main(["--pairs", str(tmp_path / "pairs.txt"), "--out", str(tmp_path / "r.h5")])
    err = capsys.readouterr().err
    assert code == 3 and "Image not found" in err and "missing#2.jpg" in err, err  # the whole name was looked up (was 'hash' / 'missing')


@pytest.fixture
def fifo(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    path = tmp_path / "pipe.txt"
    os.mkfifo(path)
    return path


def test_fifo_as_pairs_file_says_what_it_is(fifo):
    with pytest.raises(CommandError) as e:
        pairs.read_pairs(fifo)
    assert e.value.code == 2 and "is a named pipe (FIFO), not a regular file" in str(e.value)
    assert "not found" not in str(e.value)


def test_fifo_or_device_as_image_says_what_it_is(fifo, tmp_path, no_model, capsys):
    code = cli.main([str(fifo), str(ASSETS / "demo_B.jpg"), "--out", str(tmp_path / "o.h5")])
    err = capsys.readouterr().err
    assert code == 2 and "named pipe (FIFO), not a regular file" in err and "not found" not in err, err
    from romav2_plugin.io import probe_image

    with pytest.raises(ValueError, match="is a character device, not a regular file"):
        probe_image("/dev/null")


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--workers", "4"], "--workers"),
        (["--address", "auto"], "--address"),
        (["--gpus-per-worker", "0.5", "--batch-size", "8"], "--gpus-per-worker, --batch-size"),
        (["--connect-timeout", "5"], "--connect-timeout"),
        (["--engine", "local", "--cpus-per-worker", "2"], "--cpus-per-worker"),
    ],
)
def test_ray_only_options_without_engine_ray_are_refused(tmp_path, no_model, capsys, extra, named):
    (tmp_path / "pairs.txt").write_text("a.jpg b.jpg\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["--pairs", str(tmp_path / "pairs.txt"), "--out", str(tmp_path / "r.h5"), *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{named} only apply with --engine ray" in err, err
    assert not list(tmp_path.glob("r.h5*"))


def test_hloc_command_refuses_ray_only_options_without_engine_ray(tmp_path, hloc, capsys):
    from romav2_plugin.app import hloc_command as command

    (tmp_path / "pairs.txt").write_text("a.jpg b.jpg\n")
    argv = ["match_dense", "--pairs", str(tmp_path / "pairs.txt"), "--image_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        command.main(argv + ["--export_dir", str(tmp_path / "out"), "--workers", "2"])
    assert e.value.code == 2 and "--workers only apply with --engine ray" in capsys.readouterr().err
