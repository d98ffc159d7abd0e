"""``romav2-match``: driven as a user would (subprocess, seeded random official-layout weights), plus
fast in-process checks with the exact-homography test double (coordinates, pictures, error paths)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from romav2_plugin.app import cli, matching
from romav2_plugin.app.results import pair_key
from romav2_plugin.app.visualize import PANEL_HEIGHT, draw_warp, panel_size
from romav2_plugin.testing import HomographyWarpDouble
from romav2_plugin.weights.layout import OFFICIAL_URL

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "romav2_plugin" / "assets"
DEMO_H = np.asarray(json.loads((ASSETS / "demo_pair.json").read_text())["homography_A_to_B"])
SIZE_A, SIZE_B = (600, 400), (640, 480)  # (w, h) of demo_A.jpg / demo_B.jpg
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(args, tmp_path, env_extra=None, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["ROMAV2_PLUGIN_CACHE"] = str(tmp_path / "cache")
    env.pop("ROMAV2_WEIGHTS", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "romav2_plugin.app.cli", *map(str, args)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def pair_width(wh_A, wh_B):
    return panel_size(*wh_A)[0] + panel_size(*wh_B)[0]


@pytest.fixture
def double(monkeypatch):
    """Replace the network by the exact-homography double (demo H) for in-process runs."""
    calls = []

    def fake_load_model(weights, setting, device, amp):
        calls.append(setting)
        return HomographyWarpDouble(DEMO_H, setting=setting or "precise"), {
            "weights": "double.pt",
            "weights_sha256": "0123456789abcdef",
        }

    monkeypatch.setattr(matching, "load_model", fake_load_model)
    return calls


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(matching, "load_model", refuse)


# ------------------------------------------------------------------------------------- in-process, fast
def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("exit codes", "ROMAV2_WEIGHTS", "--pairs", "--demo", "OpenCV convention", "130 interrupted"):
        assert text in out


def test_demo_exact_double_keypoints_are_opencv_pixels_of_original_images(double, tmp_path, capsys):
    """With the exact warp of the demo homography, the saved keypoints reproject with ~0 px error: the
    file holds OpenCV-convention pixels at each image's original size; pictures have the documented sizes."""
    rc = cli.main(["--demo", "--setting", "turbo", "--out", str(tmp_path / "o"), "--num-samples", "800"])
    assert rc == 0
    out = capsys.readouterr().out
    d = np.load(tmp_path / "o" / "matches.npz")
    n = len(d["confidence"])
    assert 700 <= n <= 800
    assert d["keypoints_A"].shape == d["keypoints_B"].shape == (n, 2)
    assert d["precision_A"].shape == d["precision_B"].shape == (n, 2, 2)
    assert np.isnan(d["precision_A"]).all() and np.isfinite(d["precision_B"]).all()  # turbo: B side only
    err = cli.reprojection_errors(DEMO_H, d["keypoints_A"], d["keypoints_B"])
    assert err.max() < 0.01
    assert d["keypoints_A"][:, 0].min() > -0.5 and d["keypoints_A"][:, 0].max() < SIZE_A[0] - 0.5
    assert tuple(d["image_hw_A"]) == (400, 600) and tuple(d["image_hw_B"]) == (480, 640)
    assert str(d["setting"]) == "turbo" and str(d["pixel_convention"]).startswith("opencv")
    assert str(d["weights"]) == "double.pt" and str(d["weights_sha256"]) == "0123456789abcdef"
    assert str(d["package_version"]) == __import__("romav2_plugin").__version__
    assert png_size(tmp_path / "o" / "matches.png") == (pair_width(SIZE_A, SIZE_B), PANEL_HEIGHT)
    # turbo is unidirectional: warp.png has one row (A | B warped into A)
    w = max(2 * panel_size(*SIZE_A)[0], 2 * panel_size(*SIZE_B)[0])
    assert png_size(tmp_path / "o" / "warp.png") == (w, PANEL_HEIGHT)
    assert "median 0.00 px, 100% < 1 px" in out and "turbo: 320x320" in out and "confident" in out
    # same seed, same matches
    assert (
        cli.main(
            [
                "--demo",
                "--setting",
                "turbo",
                "--out",
                str(tmp_path / "o2"),
                "--num-samples",
                "800",
                "--no-pictures",
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(np.load(tmp_path / "o2" / "matches.npz")["keypoints_A"], d["keypoints_A"])
    assert not (tmp_path / "o2" / "matches.png").exists()


def test_bidirectional_setting_both_precisions_and_two_row_warp(double, tmp_path):
    rc = cli.main(["--demo", "--out", str(tmp_path), "--num-samples", "300"])  # default setting: precise
    assert rc == 0 and double == [None]  # no --setting: the weights' own (precise for the official model)
    d = np.load(tmp_path / "matches.npz")
    assert np.isfinite(d["precision_A"]).all() and np.isfinite(d["precision_B"]).all()
    assert cli.reprojection_errors(DEMO_H, d["keypoints_A"], d["keypoints_B"]).max() < 0.01
    w = max(2 * panel_size(*SIZE_A)[0], 2 * panel_size(*SIZE_B)[0])
    assert png_size(tmp_path / "warp.png") == (w, 2 * PANEL_HEIGHT)


def test_h5_single_pair_and_warp_both(double, tmp_path, capsys):
    pytest.importorskip("h5py")
    import h5py

    out = tmp_path / "res.h5"
    A, B = ASSETS / "demo_A.jpg", ASSETS / "demo_B.jpg"
    rc = cli.main(
        [str(A), str(B), "--setting", "turbo", "--out", str(out), "--num-samples", "300", "--warp-both"]
    )
    assert rc == 0
    with h5py.File(out, "r") as f:
        g = f[pair_key(str(A), str(B))]
        assert g.attrs["complete"] and g["keypoints_A"].shape == (len(g["confidence"]), 2)
        assert f.attrs["setting"] == "turbo" and f.attrs["weights_sha256"] == "0123456789abcdef"
    assert png_size(tmp_path / "res_matches.png") == (pair_width(SIZE_A, SIZE_B), PANEL_HEIGHT)
    w = max(2 * panel_size(*SIZE_A)[0], 2 * panel_size(*SIZE_B)[0])
    assert png_size(tmp_path / "res_warp.png") == (w, 2 * PANEL_HEIGHT)  # --warp-both: second row
    assert "match B->A" in capsys.readouterr().out


def test_warp_picture_shows_each_image_warped_into_the_other():
    """warp.png content: with an exact warp, "B warped into A" equals A where they overlap (and vice versa)."""
    from romav2_plugin.assets.make_demo_pair import warp_homography

    img_A = Image.open(ASSETS / "demo_A.jpg").convert("RGB")
    b = warp_homography(np.asarray(img_A, dtype=np.float64) / 255, DEMO_H, SIZE_B)
    img_B = Image.fromarray((b * 255 + 0.5).astype(np.uint8))
    model = HomographyWarpDouble(DEMO_H, setting="turbo")
    model.bidirectional = True
    p = model.match(img_A, img_B)
    pic = np.asarray(
        draw_warp(img_A, img_B, p["warp_AB"][0], p["overlap_AB"][0], p["warp_BA"][0], p["overlap_BA"][0])
    )
    wa, wb = panel_size(*SIZE_A)[0], panel_size(*SIZE_B)[0]
    assert pic.shape == (2 * PANEL_HEIGHT, max(2 * wa, 2 * wb), 3)
    pa, pa_warped = pic[:PANEL_HEIGHT, :wa] / 255, pic[:PANEL_HEIGHT, wa : 2 * wa] / 255
    pb, pb_warped = pic[PANEL_HEIGHT:, :wb] / 255, pic[PANEL_HEIGHT:, wb : 2 * wb] / 255
    m = 30  # away from the borders (bilinear edges, the text labels)
    assert np.abs(pa[m:-m, m:-m] - pa_warped[m:-m, m:-m]).mean() < 0.03
    c = min(wa, wb)
    assert np.abs(pa[m:-m, m : c - m] - pb[m:-m, m : c - m]).mean() > 0.1  # control: unwarped B differs
    inside = pb.sum(-1) > 0.3  # B is black where it sees nothing of A
    inside[:m], inside[-m:], inside[:, :m], inside[:, -m:] = False, False, False, False
    assert inside.mean() > 0.5
    assert np.abs(pb - pb_warped)[inside].mean() < 0.04
    # no overlap -> white
    assert (pb_warped[~(pb.sum(-1) > 0.05)] > 0.95).mean() > 0.9


def test_16bit_png_is_refused_with_exit_2(no_model, tmp_path, capsys):
    p16 = tmp_path / "deep.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(p16)
    with Image.open(p16) as im:
        assert im.mode.startswith("I")
    rc = cli.main([str(p16), str(ASSETS / "demo_B.jpg"), "--out", str(tmp_path / "o")])
    assert rc == cli.EXIT_USAGE == 2
    err = capsys.readouterr().err
    assert "16-bit" in err and "deep.png" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda d: (d / "notes.png").write_text("this is not an image"), "Cannot read image"),
        (lambda d: None, "Image not found"),
    ],
    ids=["not-an-image", "missing"],
)
def test_unusable_image_exit_2(no_model, tmp_path, capsys, make, expect):
    make(tmp_path)
    rc = cli.main([str(tmp_path / "notes.png"), str(ASSETS / "demo_B.jpg"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert expect in capsys.readouterr().err


def test_huge_image_refused_naming_the_limit(no_model, tmp_path, capsys, monkeypatch):
    import romav2_plugin.io

    monkeypatch.setattr(romav2_plugin.io, "MAX_PIXELS", 100_000)  # demo_A is 600 x 400 = 240000 pixels
    rc = cli.main([str(ASSETS / "demo_A.jpg"), str(ASSETS / "demo_B.jpg"), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "600x400 exceeds the limit of 100000 pixels" in err


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["only_one.jpg"], "expected two images"),
        (["--demo", "a.jpg", "b.jpg"], "exclude each other"),
        ([], "give IMAGE_A IMAGE_B"),
        (["--demo", "--num-samples", "0"], "--num-samples must be positive"),
        (["--demo", "--setting", "ultra"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(no_model, capsys, argv, expect):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert expect in capsys.readouterr().err


def test_h5_without_h5py_names_the_extra(no_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py -> ImportError
    rc = cli.main([str(ASSETS / "demo_A.jpg"), str(ASSETS / "demo_B.jpg"), "--out", str(tmp_path / "r.h5")])
    assert rc == cli.EXIT_SETUP == 4  # missing optional dependency: same code in the three commands
    assert 'pip install "romav2-plugin[h5]"' in capsys.readouterr().err


def test_unavailable_device_exit_2(no_model, capsys):
    assert cli.main(["--demo", "--device", "cuda:99"]) == 2
    assert "--device cuda:99" in capsys.readouterr().err


def test_pairs_file_errors_exit_2(no_model, tmp_path, capsys):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("# comment\na.jpg b.jpg\na.jpg b.jpg c.jpg\n")
    assert cli.main(["--pairs", str(pairs), "--out", str(tmp_path / "r.h5")]) == 2
    assert "pairs.txt:3: expected 'nameA nameB'" in capsys.readouterr().err
    assert cli.main(["--pairs", str(tmp_path / "nope.txt")]) == 2
    assert "pairs file not found" in capsys.readouterr().err
    pairs.write_text("a.jpg b.jpg\n")
    assert cli.main(["--pairs", str(pairs), "--out", str(tmp_path / "r.npz")]) == 2
    assert "--pairs writes HDF5" in capsys.readouterr().err


def test_pairs_resume_options_mismatch_and_overwrite_inprocess(double, tmp_path, capsys):
    pytest.importorskip("h5py")
    import h5py

    d = tmp_path / "imgs"
    d.mkdir()
    for n in ("a.jpg", "b.jpg"):
        (d / n).write_bytes((ASSETS / f"demo_{n[0].upper()}.jpg").read_bytes())
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg b.jpg\nb.jpg a.jpg\n")
    out = tmp_path / "r.h5"
    base = [
        "--pairs",
        str(pairs),
        "--image-dir",
        str(d),
        "--out",
        str(out),
        "--setting",
        "turbo",
        "--num-samples",
        "200",
    ]
    assert cli.main(base) == 0
    assert len(double) == 1
    assert cli.main(base) == 0  # everything done: no model load
    assert len(double) == 1 and "nothing to do" in capsys.readouterr().out
    pairs.write_text("a.jpg b.jpg\nb.jpg a.jpg\na.jpg a.jpg\n")
    assert cli.main([*base[:-1], "300"]) == 2  # other options than the file's: refused
    assert "other options" in capsys.readouterr().err
    assert len(double) == 1  # refused before the model loads
    assert cli.main([*base, "--overwrite"]) == 0
    with h5py.File(out, "r") as f:
        assert sorted(f) == ["a.jpg", "b.jpg"] and sorted(f["a.jpg"]) == ["a.jpg", "b.jpg"]
    assert "3 matched now, 0 already done" in capsys.readouterr().out


# ------------------------------------------------------------------- subprocess, as a user runs it
@pytest.mark.slow  # a subprocess, as a user runs it
def test_offline_without_weights_prints_one_paragraph_exit_4(tmp_path):
    (tmp_path / "torch_home").mkdir()
    r = run_cli(
        ["--demo", "--setting", "turbo", "--out", tmp_path / "o"],
        tmp_path,
        {"ROMAV2_WEIGHTS": "http://127.0.0.1:9/romav2.0.1.pt", "TORCH_HOME": str(tmp_path / "torch_home")},
        timeout=300,
    )
    assert r.returncode == cli.EXIT_SETUP, r.stderr
    assert "Traceback" not in r.stderr
    assert "ROMAV2_WEIGHTS" in r.stderr and OFFICIAL_URL in r.stderr and "--weights PATH" in r.stderr
    assert "--weights tiny" in r.stderr
    assert not (tmp_path / "o" / "matches.npz").exists()


@pytest.mark.slow  # a subprocess, as a user runs it
def test_wrong_weights_file_exit_4(tmp_path):
    bogus = tmp_path / "romav2.0.1.pt"
    bogus.write_bytes(b"not a checkpoint")
    r = run_cli(
        [ASSETS / "demo_A.jpg", ASSETS / "demo_B.jpg", "--weights", bogus, "--setting", "turbo"],
        tmp_path,
        timeout=300,
    )
    assert r.returncode == cli.EXIT_SETUP, r.stderr
    assert "not a loadable PyTorch checkpoint" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # ~30-90 s on 2 shared CPU cores (model load + one turbo match per pair)
def test_single_pair_subprocess_exif_and_palette(random_checkpoint, tmp_path):
    """A real (random-weight) run on a user's files: an EXIF-rotated JPEG and a palette PNG."""
    a = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    Image.open(ASSETS / "demo_A.jpg").save(a, exif=exif, quality=90)
    b = tmp_path / "palette.png"
    Image.open(ASSETS / "demo_B.jpg").convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(b)
    r = run_cli(
        [
            a,
            b,
            "--weights",
            random_checkpoint,
            "--setting",
            "turbo",
            "--device",
            "cpu",
            "--num-samples",
            "1000",
            "--min-overlap",
            "0",
            "--out",
            tmp_path / "out",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "RoMa v2 matches" in r.stdout and "EXIF-rotated" in r.stdout and "(400x600" in r.stdout
    d = np.load(tmp_path / "out" / "matches.npz")
    assert tuple(d["image_hw_A"]) == (600, 400) and int(d["exif_orientation_A"]) == 6
    n = len(d["confidence"])
    assert 0 < n <= 1000 and np.isfinite(d["keypoints_A"]).all()
    kA = d["keypoints_A"]
    assert kA[:, 0].min() >= -0.5 and kA[:, 0].max() <= 399.5 and kA[:, 1].max() <= 599.5
    assert str(d["weights"]) == random_checkpoint.name and len(str(d["weights_sha256"])) == 16
    assert png_size(tmp_path / "out" / "matches.png") == (pair_width((400, 600), SIZE_B), PANEL_HEIGHT)
    assert png_size(tmp_path / "out" / "warp.png") == (2 * panel_size(*SIZE_B)[0], PANEL_HEIGHT)


@pytest.mark.slow  # ~30-90 s on 2 shared CPU cores (model load + one turbo match per pair)
def test_pairs_subprocess_failure_skipped_then_resumed(random_checkpoint, tmp_path):
    pytest.importorskip("h5py")
    import h5py

    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    (d / "a.jpg").write_bytes((ASSETS / "demo_A.jpg").read_bytes())
    (d / "sub" / "b.jpg").write_bytes((ASSETS / "demo_B.jpg").read_bytes())
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg sub/b.jpg\na.jpg broken.jpg   # fixed later\nsub/b.jpg a.jpg\n")
    out = tmp_path / "results.h5"
    args = [
        "--pairs",
        pairs,
        "--image-dir",
        d,
        "--out",
        out,
        "--weights",
        random_checkpoint,
        "--setting",
        "turbo",
        "--device",
        "cpu",
        "--num-samples",
        "500",
        "--min-overlap",
        "0",
    ]
    r1 = run_cli(args, tmp_path)
    assert r1.returncode == cli.EXIT_PAIRS_FAILED == 3, r1.stderr
    # the unreadable image is found from its header before the model loads; the other pairs run
    assert "pair a.jpg broken.jpg will be skipped" in r1.stderr and "Cannot read image" in r1.stderr
    assert "Traceback" not in r1.stderr and "matching: 100%" in r1.stderr and "2/2 [" in r1.stderr  # tqdm bar
    assert "2 matched now, 0 already done, 1 failed" in r1.stdout
    with h5py.File(out, "r") as f:
        assert set(f["a.jpg"]) == {"sub%2Fb.jpg"} and set(f["sub%2Fb.jpg"]) == {"a.jpg"}
        before = {
            k: (f[k].attrs["time_match_s"], f[k]["keypoints_A"][:])
            for k in ("a.jpg/sub%2Fb.jpg", "sub%2Fb.jpg/a.jpg")
        }
        assert f["a.jpg/sub%2Fb.jpg"].attrs["image_B"] == "sub/b.jpg"
    # the user fixes the broken image and reruns the same command: only that pair is computed
    (d / "broken.jpg").write_bytes((ASSETS / "demo_B.jpg").read_bytes())
    r2 = run_cli(args, tmp_path)
    assert r2.returncode == 0, r2.stderr
    assert "2 of 3 pairs already in" in r2.stderr and "1 matched now, 2 already done, 0 failed" in r2.stdout
    with h5py.File(out, "r") as f:
        assert f["a.jpg/broken.jpg"].attrs["complete"]
        for k, (t, kp) in before.items():
            assert f[k].attrs["time_match_s"] == t  # untouched, not recomputed
            np.testing.assert_array_equal(f[k]["keypoints_A"][:], kp)


@pytest.mark.slow  # ~30-90 s on 2 shared CPU cores (model load + one turbo match per pair)
def test_demo_subprocess_with_random_weights(random_checkpoint, tmp_path):
    r = run_cli(
        [
            "--demo",
            "--weights",
            random_checkpoint,
            "--setting",
            "turbo",
            "--device",
            "cpu",
            "--num-samples",
            "1000",
            "--min-overlap",
            "0",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / cli.DEFAULT_OUT
    assert "vs truth" in r.stdout and "demo_A.jpg" in r.stdout and "turbo" in r.stdout
    assert (out / "matches.npz").is_file()
    assert png_size(out / "matches.png") == (pair_width(SIZE_A, SIZE_B), PANEL_HEIGHT)
    assert png_size(out / "warp.png")[1] == PANEL_HEIGHT
    assert torch.from_numpy(np.load(out / "matches.npz")["confidence"]).isfinite().all()
