"""``romav2-match``: match two images (or a list of pairs) with RoMa v2 and look at the result.

Run ``romav2-match --help`` for the options; :func:`main` is callable in-process (returns the exit code).
Exit codes and error reporting are shared with the other commands (:mod:`romav2_plugin.commands`); result
files are written by :mod:`romav2_plugin.results`, summaries by :mod:`romav2_plugin.summary`. Everything that
does not need the model (arguments, images, pairs file, output path, free space, an existing results file) is
checked before the model loads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from romav2_plugin.commands import (
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PAIRS_FAILED,
    EXIT_RUNTIME,
    EXIT_SETUP,
    EXIT_USAGE,
    WEIGHTS_HELP,
    CommandError,
    WeightsChoice,
    cached_official_weights,
    check_output,
    choose_weights,
    human_bytes,
    interrupt_code,
    is_weights_error,
    run_command,
    weights_error,
)
from romav2_plugin.results import (
    ResultsFile,
    Unreadable,
    WriteFailed,
    estimate_pair_bytes,
    import_h5py,
    pair_key,
    write_npz,
)
from romav2_plugin.summary import CONFIDENT, pairs_summary, reprojection_errors, single_summary
from romav2_plugin.visualize import PANEL_HEIGHT

__all__ = [
    "main",
    "build_parser",
    "load_model",
    "pair_key",
    "reprojection_errors",
    "EXIT_OK",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "EXIT_PAIRS_FAILED",
    "EXIT_SETUP",
    "EXIT_INTERRUPTED",
]

PROG = "romav2-match"
DEFAULT_OUT = "romav2-match-output"
DEFAULT_MIN_OVERLAP = 0.5
PIXEL_CONVENTION = (
    "opencv: pixel coordinates of the original images, top-left pixel centre at (0, 0), x right, y down"
)
PICTURES_BYTES = 8 << 20  # two PNGs, generous
CLIError = CommandError  # earlier name

EPILOG = f"""\
outputs:
  single pair: --out DIR (default ./{DEFAULT_OUT}) gets matches.npz, matches.png and warp.png;
  --out FILE.npz or FILE.h5 writes the matches there and the pictures next to it (FILE_matches.png,
  FILE_warp.png). Arrays: keypoints_A, keypoints_B (N, 2) pixel coordinates in the original images
  (OpenCV convention: top-left pixel centre at (0, 0)), confidence (N,) (the overlap), precision_A,
  precision_B (N, 2, 2) (NaN where the setting does not predict them), matches_normalized (N, 4);
  metadata: setting, image sizes (image_hw_A/B = height, width), pixel_convention, weights (file name
  or 'tiny') and sha256 prefix, package version, seed, num_samples, min_overlap.
  --pairs: one HDF5 group per pair, "<name A>/<name B>" with '%' written '%25' and '/' inside a name
  written '%2F' (exact names in the group attributes image_A, image_B), written and flushed after each
  pair; rerunning the same command skips finished pairs (--overwrite redoes them). Files of earlier
  versions are migrated in place.
sampling: --num-samples matches drawn among those with overlap > --min-overlap (default
  {DEFAULT_MIN_OVERLAP}), so unrelated images give few or no matches; --min-overlap 0 samples like the
  official RoMaV2.sample(). The summary warns when no match is confident.
pictures (PNG): every panel is {PANEL_HEIGHT} px high. matches.png: A | B, up to --max-draw matches coloured
  by confidence (red low, yellow, green high). warp.png: top row A | B warped into A's frame (masked by
  the overlap, white where it is low); bottom row B | A warped into B's frame, only for bidirectional
  settings (precise, mega1500, ...) or with --warp-both (runs a second match B->A).
images: any format PIL reads; EXIF orientation is applied (coordinates refer to the image as displayed);
  grayscale, palette and RGBA images are converted to RGB; 16-bit and float images are refused (convert
  them to 8 bit first), as are images above romav2_plugin.io.MAX_PIXELS pixels and below 16x16.
  --pairs writes no pictures.
weights: --weights PATH, URL or 'tiny' (small model shipped with the package), else $ROMAV2_WEIGHTS,
  else the official release (https://github.com/Parskatt/RoMaV2/releases/download/v2.0.1/romav2.0.1.pt),
  downloaded once into $ROMAV2_PLUGIN_CACHE (default ~/.cache/romav2_plugin). --demo uses the official
  weights when they are on this machine (--weights, $ROMAV2_WEIGHTS or the cache; it never downloads)
  and 'tiny' otherwise, and says which.
{EXIT_CODES_HELP}
"""


# ----------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from romav2_plugin.config import SETTINGS

    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Match two images with RoMa v2; write the sampled matches and two pictures.\n"
            "  romav2-match IMAGE_A IMAGE_B [--out DIR]    one pair\n"
            "  romav2-match --pairs pairs.txt --image-dir DIR --out results.h5\n"
            "                                               many pairs, one model load, resumable\n"
            "  romav2-match --demo                          the image pair shipped with the package\n"
            "                                               (reports the error against its true homography)"
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="*", metavar="IMAGE", help="IMAGE_A IMAGE_B (any format PIL reads)")
    p.add_argument("--demo", action="store_true", help="match the image pair shipped with the package")
    p.add_argument(
        "--pairs", metavar="FILE", help="text file (UTF-8), one 'nameA nameB' pair per line ('#' comments)"
    )
    p.add_argument(
        "--image-dir",
        metavar="DIR",
        help="--pairs: folder the names are relative to (default: the pairs file's folder)",
    )
    p.add_argument(
        "--out",
        metavar="PATH",
        help=f"output folder, or .npz / .h5 file (default ./{DEFAULT_OUT}; --pairs: DIR/results.h5)",
    )
    p.add_argument(
        "--setting",
        default=None,
        choices=list(SETTINGS),
        help="resolution preset (default: the weights' own: precise for the official model, tiny for 'tiny')",
    )
    p.add_argument("--weights", metavar="PATH|URL|tiny", help=WEIGHTS_HELP)
    p.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps, ..."
    )
    p.add_argument(
        "--fp32",
        action="store_true",
        help="no bf16 autocast (default: bf16 on CUDA and on CPUs with native bf16, AVX512-BF16 or AMX; "
        "$ROMAV2_CPU_BF16=0 turns it off on the CPU). Slower, full precision",
    )
    p.add_argument(
        "--num-samples", type=int, default=5000, metavar="N", help="matches to sample (default 5000)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed, for reproducible output (default 0)")
    p.add_argument(
        "--min-overlap",
        type=float,
        default=DEFAULT_MIN_OVERLAP,
        metavar="T",
        help=f"only sample matches with overlap > T, in [0, 1) (default {DEFAULT_MIN_OVERLAP})",
    )
    p.add_argument(
        "--max-draw", type=int, default=300, metavar="N", help="matches drawn in matches.png (default 300)"
    )
    p.add_argument("--no-pictures", action="store_true", help="write only the matches file")
    p.add_argument(
        "--warp-both",
        action="store_true",
        help="unidirectional settings: also match B->A for warp.png's bottom row",
    )
    p.add_argument("--overwrite", action="store_true", help="--pairs: redo pairs already in the output file")
    from romav2_plugin.distributed import add_engine_arguments

    add_engine_arguments(p)  # --engine ray, --address, --workers, ... (romav2_plugin.distributed)
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    modes = sum((bool(args.images), args.demo, args.pairs is not None))
    if modes == 0:
        p.error("give IMAGE_A IMAGE_B, or --pairs FILE, or --demo")
    if modes > 1:
        p.error("IMAGE_A IMAGE_B, --pairs and --demo exclude each other")
    if args.images and len(args.images) != 2:
        p.error(f"expected two images (IMAGE_A IMAGE_B), got {len(args.images)}")
    if args.image_dir is not None and args.pairs is None:
        p.error("--image-dir only applies to --pairs")
    if args.num_samples <= 0:
        p.error("--num-samples must be positive")
    if not 0.0 <= args.min_overlap < 1.0:
        p.error(f"--min-overlap must lie in [0, 1), got {args.min_overlap:g}")
    if args.max_draw < 0:
        p.error("--max-draw must be >= 0")
    if getattr(args, "engine", "local") != "local" and args.pairs is None:
        p.error(f"--engine {args.engine} applies to --pairs only")


# ------------------------------------------------------------------------------------------------ utils
def _err(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def check_run_options(results, out: Path, attrs: dict, options: dict, *, damaged: bool, overwrite: bool) -> list[str]:
    """The options in which ``out``'s earlier run differs from ``options`` (``[]`` for a new or damaged
    file); raises the usage error naming the fixes unless ``overwrite``."""
    diff = results.option_diff(attrs, options) if out.exists() and not damaged else []
    if diff and not overwrite:
        raise CommandError(
            f"{out} holds results made with other options ({'; '.join(diff)}). "
            "Use the same options to resume, --overwrite to start the file afresh, or another --out.",
            EXIT_USAGE,
        )
    return diff


def prepare_results_file(
    results, out: Path, attrs: dict, meta: dict, *, damaged: bool, fmt: int, overwrite: bool
) -> None:
    """Make ``out`` ready for a run with the run attributes ``meta`` (model loaded): refuse other options
    unless ``overwrite`` (then start afresh, a damaged file kept aside), migrate an earlier layout, create a
    new file, or record ``meta`` where the file lacks it; each step is said on stderr."""
    diff = check_run_options(results, out, attrs, meta, damaged=damaged, overwrite=overwrite)
    if damaged:
        aside = results.move_damaged_aside()
        _err(f"--overwrite: {out} could not be read; kept as {aside}, starting a new file")
    elif diff:
        _err(f"--overwrite: {out} was made with other options ({'; '.join(diff)}); starting it afresh")
        out.unlink()
    elif out.exists() and fmt < 2:
        moved = results.migrate()
        _err(f"{out}: migrated from the earlier layout ({moved} group(s) renamed to injective pair keys)")
    if not out.exists():
        results.create(meta)
    elif damaged or diff or "setting" not in attrs:
        results.set_run_attrs(meta)


def _package_version() -> str:
    from romav2_plugin import __version__

    return __version__


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise CommandError(f"--device {name!r} is not a device torch knows ({e})", EXIT_USAGE) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(
            f"--device {name}: CUDA is not available in this PyTorch installation / machine. Use --device cpu.",
            EXIT_USAGE,
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CommandError(
            f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present", EXIT_USAGE
        )
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CommandError(
            "--device mps: MPS is not available on this machine. Use --device cpu.", EXIT_USAGE
        )
    return dev


def load_model(weights: WeightsChoice | str | None, setting: str, device, amp: bool | None):
    """Load the model; returns ``(model, {"weights": file name or 'tiny', "weights_sha256": prefix})``.

    Weights problems become :class:`CommandError` with exit code 4 (:func:`commands.weights_error`).
    """
    from romav2_plugin import RoMaV2

    choice = weights if isinstance(weights, WeightsChoice) else choose_weights(weights)
    try:
        info = choice.info()  # downloads the official release once if needed
        model = RoMaV2.from_pretrained(choice.spec, setting=setting, device=device, amp=amp)
    except (OSError, ValueError, RuntimeError, IndexError, KeyError, TypeError) as e:
        if isinstance(e, OSError | ValueError) or is_weights_error(e):
            raise weights_error(e, choice) from None
        raise
    return model, info


def _exif_orientation(path: Path) -> int:
    try:
        with Image.open(path) as im:
            return int(im.getexif().get(0x0112, 1))
    except Exception:  # the image itself was readable; missing EXIF is not an error
        return 1


@dataclass
class LoadedImage:
    path: Path
    image: Image.Image
    exif_orientation: int

    @property
    def hw(self) -> tuple[int, int]:
        return self.image.height, self.image.width


def _load(path: Path) -> LoadedImage:
    from romav2_plugin.io import check_min_size, load_image

    try:
        img = load_image(path)
        check_min_size(img.width, img.height, str(path))
    except (ValueError, FileNotFoundError) as e:
        raise CommandError(str(e), EXIT_USAGE) from None
    return LoadedImage(path, img, _exif_orientation(path))


# -------------------------------------------------------------------------------------------- matching
@dataclass
class PairResult:
    arrays: dict[str, np.ndarray]
    preds: dict[str, Any]
    preds_BA: dict[str, Any] | None = None
    times: dict[str, float] = field(default_factory=dict)
    coverage_A: float = float("nan")

    @property
    def confidence(self) -> np.ndarray:
        return self.arrays["confidence"]

    @property
    def n_confident(self) -> int:
        return int((self.confidence > CONFIDENT).sum())


def match_pair(
    model,
    a: LoadedImage,
    b: LoadedImage,
    *,
    num_samples: int,
    seed: int,
    min_overlap: float | None,
    warp_both: bool = False,
) -> PairResult:
    t0 = time.perf_counter()
    preds = model.match(a.image, b.image)
    t1 = time.perf_counter()
    matches, conf, prec_A, prec_B = model.sample(preds, num_samples, generator=seed, min_overlap=min_overlap)
    t2 = time.perf_counter()
    (hA, wA), (hB, wB) = a.hw, b.hw
    # float64 on the CPU: MPS has no float64
    kA, kB = model.to_pixel_coordinates(matches.cpu().double(), hA, wA, hB, wB, pixel_center=0.0)
    n = matches.shape[0]
    nan = np.full((n, 2, 2), np.nan, dtype=np.float32)

    def arr(x):
        return nan if x is None else x.detach().float().cpu().numpy().astype(np.float32)

    arrays = {
        "keypoints_A": kA.cpu().numpy().astype(np.float32),
        "keypoints_B": kB.cpu().numpy().astype(np.float32),
        "confidence": conf.detach().float().cpu().numpy().astype(np.float32),
        "precision_A": arr(prec_A),
        "precision_B": arr(prec_B),
        "matches_normalized": matches.detach().float().cpu().numpy().astype(np.float32),
    }
    res = PairResult(arrays, preds, times={"match": t1 - t0, "sample": t2 - t1})
    res.coverage_A = float((preds["overlap_AB"][0] > CONFIDENT).float().mean())
    if warp_both and preds.get("warp_BA") is None:
        t3 = time.perf_counter()
        res.preds_BA = model.match(b.image, a.image)
        res.times["match B->A"] = time.perf_counter() - t3
    return res


def _run_metadata(
    *, setting: str, model, info: dict[str, str], seed: int, num_samples: int, min_overlap: float | None
) -> dict[str, Any]:
    hr = f" + {model.H_hr}x{model.W_hr}" if model.H_hr is not None else ""
    return {
        "setting": setting,
        "working_resolution": f"{model.H_lr}x{model.W_lr}{hr}",
        "bidirectional": bool(model.bidirectional),
        "pixel_convention": PIXEL_CONVENTION,
        "weights": info["weights"],
        "weights_sha256": info["weights_sha256"],
        "package_version": _package_version(),
        "seed": int(seed),
        "num_samples": int(num_samples),
        "min_overlap": float("nan") if min_overlap is None else float(min_overlap),
    }


def _pair_metadata(a: LoadedImage, b: LoadedImage, name_A: str, name_B: str) -> dict[str, Any]:
    return {
        "image_A": name_A,
        "image_B": name_B,
        "image_hw_A": np.array(a.hw, dtype=np.int64),
        "image_hw_B": np.array(b.hw, dtype=np.int64),
        "exif_orientation_A": a.exif_orientation,
        "exif_orientation_B": b.exif_orientation,
    }


def write_pictures(
    res: PairResult,
    a: LoadedImage,
    b: LoadedImage,
    matches_png: Path,
    warp_png: Path,
    *,
    max_draw: int,
    seed: int,
) -> list[Path]:
    """Draw both pictures; each is written atomically. Returns what was written."""
    from romav2_plugin.visualize import draw_matches, draw_warp

    p = res.preds
    pic_m = draw_matches(
        a.image,
        b.image,
        res.arrays["keypoints_A"],
        res.arrays["keypoints_B"],
        res.confidence,
        max_draw=max_draw,
        seed=seed,
    )
    if p.get("warp_BA") is not None:
        w_BA, o_BA = p["warp_BA"][0], p["overlap_BA"][0]
    elif res.preds_BA is not None:
        w_BA, o_BA = res.preds_BA["warp_AB"][0], res.preds_BA["overlap_AB"][0]
    else:
        w_BA = o_BA = None
    pic_w = draw_warp(a.image, b.image, p["warp_AB"][0], p["overlap_AB"][0], w_BA, o_BA)
    written = []
    for pic, path in ((pic_m, matches_png), (pic_w, warp_png)):
        tmp = path.with_name(path.name + ".part")
        try:
            pic.save(tmp, format="PNG")
            tmp.replace(path)
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise WriteFailed(f"cannot write the picture {path} ({e})", EXIT_RUNTIME) from None
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------ modes
def _out_paths(out: str | None) -> tuple[Path, Path, Path]:
    o = Path(out if out is not None else DEFAULT_OUT).expanduser()
    if o.suffix.lower() in (".npz", ".h5", ".hdf5"):
        return o, o.with_name(o.stem + "_matches.png"), o.with_name(o.stem + "_warp.png")
    if o.exists() and not o.is_dir():
        raise CommandError(
            f"--out {o} exists and is not a folder; give a folder or a .npz / .h5 file name", EXIT_USAGE
        )
    return o / "matches.npz", o / "matches.png", o / "warp.png"


def _setting_of(model, requested: str | None) -> str:
    """The setting the model runs (its own default when none was requested)."""
    return str(getattr(model, "setting", None) or requested or "precise")


def _cpu_note(setting: str, device) -> None:
    if device.type == "cpu" and setting not in ("turbo", "fast", "tiny"):
        _err(
            f"note: running setting '{setting}' on the CPU takes one to a few minutes per pair; --setting turbo is much faster."
        )


def _demo_weights(arg: str | None) -> tuple[WeightsChoice, str]:
    """--demo: the official weights when present (no download), else the shipped 'tiny' model."""
    choice = choose_weights(arg)
    if choice.spec is not None:
        return choice, f" (from {choice.source})"
    cached = cached_official_weights()
    if cached is not None:
        return WeightsChoice(str(cached), "cache"), " (official weights found in the cache)"
    return (
        WeightsChoice("tiny", "demo", named=True),
        " (the official weights are not on this machine, so the demo uses the small shipped model 'tiny'; "
        "pass --weights PATH or set ROMAV2_WEIGHTS for the real ones)",
    )


def _run_single(args: argparse.Namespace) -> int:
    gt_H = None
    with ExitStack() as stack:
        if args.demo:
            assets = resources.files("romav2_plugin.assets")
            path_A = stack.enter_context(resources.as_file(assets / "demo_A.jpg"))
            path_B = stack.enter_context(resources.as_file(assets / "demo_B.jpg"))
            gt_H = np.asarray(json.loads((assets / "demo_pair.json").read_text())["homography_A_to_B"])
            choice, weights_note = _demo_weights(args.weights)
            _err(f"--demo: weights {choice.label}{weights_note}")
        else:
            path_A, path_B = Path(args.images[0]), Path(args.images[1])
            choice, weights_note = choose_weights(args.weights), ""
        matches_path, matches_png, warp_png = _out_paths(args.out)
        is_h5 = matches_path.suffix.lower() in (".h5", ".hdf5")
        if is_h5:
            import_h5py()
        a, b = _load(path_A), _load(path_B)
        need = estimate_pair_bytes(args.num_samples) + (0 if args.no_pictures else PICTURES_BYTES)
        check_output(matches_path, need)
        results = ResultsFile(matches_path) if is_h5 else None
        if results is not None and matches_path.exists():
            _read_or_repair(results)  # locked / not HDF5: refused now, not after matching
        device = resolve_device(args.device)
        t0 = time.perf_counter()
        model, info = load_model(choice, args.setting, device, False if args.fp32 else None)
        t_load = time.perf_counter() - t0
        setting = _setting_of(model, args.setting)
        _cpu_note(setting, device)
        try:
            res = match_pair(
                model,
                a,
                b,
                num_samples=args.num_samples,
                seed=args.seed,
                min_overlap=args.min_overlap,
                warp_both=args.warp_both and not args.no_pictures,
            )
        except ValueError as e:
            raise CommandError(str(e), EXIT_USAGE) from None
        except RuntimeError as e:  # e.g. out of device memory
            raise CommandError(f"matching failed: {e}", EXIT_RUNTIME) from None
        meta = _run_metadata(
            setting=setting,
            model=model,
            info=info,
            seed=args.seed,
            num_samples=args.num_samples,
            min_overlap=args.min_overlap,
        )
        name_A = "demo_A.jpg" if args.demo else str(path_A)
        name_B = "demo_B.jpg" if args.demo else str(path_B)
        pmeta = _pair_metadata(a, b, name_A, name_B)
        written: list[Path] = []
        if results is not None:
            results.write_pair(
                name_A, name_B, res.arrays, meta, pmeta, saved_note="Nothing else was changed."
            )
        else:
            write_npz(matches_path, res.arrays, {**meta, **pmeta})
        written.append(matches_path)
        if not args.no_pictures:
            try:
                written += write_pictures(
                    res, a, b, matches_png, warp_png, max_draw=args.max_draw, seed=args.seed
                )
            except WriteFailed as e:
                raise WriteFailed(
                    f"{e.message}; the matches were written to {matches_path}", e.code
                ) from None
        hr = f" then {model.H_hr}x{model.W_hr}" if model.H_hr is not None else ""
        print(
            single_summary(
                path_A=a.path,
                path_B=b.path,
                hw_A=a.hw,
                hw_B=b.hw,
                exif_A=a.exif_orientation,
                exif_B=b.exif_orientation,
                setting=setting,
                resolution=f"{model.H_lr}x{model.W_lr}{hr}",
                bidirectional=bool(model.bidirectional),
                device=device,
                weights=info["weights"],
                weights_sha256=info["weights_sha256"],
                weights_note=weights_note,
                times=res.times,
                t_load=t_load,
                confidence=res.confidence,
                seed=args.seed,
                min_overlap=args.min_overlap,
                coverage_A=res.coverage_A,
                written=written,
                reprojection=None
                if gt_H is None
                else reprojection_errors(gt_H, res.arrays["keypoints_A"], res.arrays["keypoints_B"]),
            ),
            flush=True,
        )
    return EXIT_OK


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """Unique ``(name A, name B)`` pairs of a UTF-8 pairs file; problems name the line (and byte)."""
    if path.is_dir():
        raise CommandError(f"pairs file {path} is a folder", EXIT_USAGE)
    if not path.is_file():
        raise CommandError(f"pairs file not found: {path}", EXIT_USAGE)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CommandError(f"cannot read the pairs file {path} ({e.strerror or e})", EXIT_USAGE) from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    offset = 0
    for i, raw in enumerate(data.splitlines(keepends=True), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CommandError(
                f"{path}:{i}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}, byte offset "
                f"{offset + e.start} of the file). Save the pairs file as UTF-8 (e.g. iconv -f latin1 -t utf-8).",
                EXIT_USAGE,
            ) from None
        offset += len(raw)
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise CommandError(
                f"{path}:{i}: expected 'nameA nameB' (two names separated by white space), got {line!r}",
                EXIT_USAGE,
            )
        pair = (parts[0], parts[1])
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    if not pairs:
        raise CommandError(f"{path}: no pairs found", EXIT_USAGE)
    return pairs


def _read_or_repair(results: ResultsFile) -> tuple[dict[str, Any], set[tuple[str, str]], int]:
    """Read an existing results file; one that an interrupted write damaged is repaired (what reads back is
    kept, the damaged file is kept as ``.damaged``). A locked file or one that is not HDF5 is refused."""
    try:
        return results.read()
    except Unreadable:
        if not results.looks_like_hdf5():
            raise
    check_output(results.path, results.path.stat().st_size + (1 << 20), what="repairing")
    kept, aside = results.repair()
    _err(
        f"{results.path} was damaged (an interrupted or failed write); repaired: {kept} finished pair(s) kept, "
        f"the damaged file is kept as {aside}. Pairs that were lost are redone."
    )
    return results.read()


def _probe_images(image_dir: Path, pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Header-only check of every image of ``pairs``: name -> problem."""
    from romav2_plugin.io import probe_image

    bad: dict[str, str] = {}
    for name in sorted({n for p in pairs for n in p}):
        try:
            probe_image(image_dir / name)
        except (ValueError, FileNotFoundError) as e:
            bad[name] = str(e)
    return bad


def _run_pairs(args: argparse.Namespace) -> int:
    if getattr(args, "engine", "local") == "ray":  # the same file, matched by Ray workers
        from romav2_plugin.distributed import run_pairs_command

        return run_pairs_command(args)
    from tqdm import tqdm

    pairs_path = Path(args.pairs).expanduser()
    pairs = read_pairs(pairs_path)
    image_dir = Path(args.image_dir).expanduser() if args.image_dir else pairs_path.parent
    if not image_dir.is_dir():
        raise CommandError(f"--image-dir {image_dir} is not a folder", EXIT_USAGE)
    out = Path(args.out if args.out is not None else DEFAULT_OUT).expanduser()
    if out.suffix.lower() == ".npz":
        raise CommandError(
            "--pairs writes HDF5: give --out RESULTS.h5 (or a folder for FOLDER/results.h5)", EXIT_USAGE
        )
    if out.suffix.lower() not in (".h5", ".hdf5"):
        out = out / "results.h5"
    import_h5py()
    choice = choose_weights(args.weights)
    results = ResultsFile(out)
    per_pair = estimate_pair_bytes(args.num_samples)
    check_output(out, per_pair)
    attrs: dict[str, Any] = {}
    done: set[tuple[str, str]] = set()
    fmt = 2
    damaged = False
    if out.exists():
        try:
            attrs, done, fmt = _read_or_repair(results)
        except Unreadable:
            if not args.overwrite:
                raise
            damaged = True
    if args.overwrite:
        done = set()
    todo = [p for p in pairs if p not in done]
    skipped = len(pairs) - len(todo)
    if skipped:
        _err(f"{skipped} of {len(pairs)} pairs already in {out}: skipped (--overwrite redoes them)")
    if not todo:
        print(f"all {len(pairs)} pairs already in {out}; nothing to do")
        return EXIT_OK
    try:
        import shutil

        free = shutil.disk_usage(out.parent).free
        if free < per_pair * len(todo):
            _err(
                f"note: {len(todo)} pairs need about {human_bytes(per_pair * len(todo))}, {human_bytes(free)} are free: "
                "the run will stop cleanly when the disk is full (finished pairs are kept)."
            )
    except OSError:
        pass
    # the options that need no model are compared now (the weights' hash once the model is loaded)
    early: dict[str, Any] = {"seed": int(args.seed), "num_samples": int(args.num_samples)}
    early["min_overlap"] = float(args.min_overlap)
    if args.setting is not None:
        early["setting"] = args.setting
    check_run_options(results, out, attrs, early, damaged=damaged, overwrite=args.overwrite)
    failures: list[tuple[str, str, str]] = []
    bad = _probe_images(image_dir, todo)
    if bad:
        runnable = []
        for na, nb in todo:
            problem = bad.get(na) or bad.get(nb)
            if problem:
                failures.append((na, nb, problem))
                _err(f"pair {na} {nb} will be skipped: {problem}")
            else:
                runnable.append((na, nb))
        todo = runnable
    t0 = time.perf_counter()
    if not todo:
        print(
            pairs_summary(
                n_listed=len(pairs),
                n_done=0,
                n_skipped=skipped,
                failures=failures,
                setting=args.setting or "-",
                device="-",
                weights=choice.label,
                weights_sha256="",
                elapsed=0.0,
                total_matches=0,
                num_samples=args.num_samples,
                n_meaningless=0,
                out=out,
                out_exists=out.exists(),
            ),
            flush=True,
        )
        return EXIT_PAIRS_FAILED
    device = resolve_device(args.device)
    model, info = load_model(choice, args.setting, device, False if args.fp32 else None)
    setting = _setting_of(model, args.setting)
    _cpu_note(setting, device)
    meta = _run_metadata(
        setting=setting,
        model=model,
        info=info,
        seed=args.seed,
        num_samples=args.num_samples,
        min_overlap=args.min_overlap,
    )
    prepare_results_file(results, out, attrs, meta, damaged=damaged, fmt=fmt, overwrite=args.overwrite)
    _err(f"model loaded in {time.perf_counter() - t0:.1f} s ({setting}, {device}, {info['weights']})")
    n_done = total_matches = n_meaningless = 0
    stopped: str | None = None
    code = EXIT_OK
    bar = tqdm(todo, desc="matching", unit="pair", file=sys.stderr, dynamic_ncols=True)
    try:
        for na, nb in bar:
            try:
                a, b = _load(image_dir / na), _load(image_dir / nb)
                res = match_pair(
                    model, a, b, num_samples=args.num_samples, seed=args.seed, min_overlap=args.min_overlap
                )
            except CommandError as e:
                failures.append((na, nb, e.message))
                tqdm.write(f"{PROG}: pair {na} {nb} failed: {e.message}", file=sys.stderr)
                continue
            except Exception as e:  # a failing pair must not lose the others
                failures.append((na, nb, f"{type(e).__name__}: {e}"))
                tqdm.write(f"{PROG}: pair {na} {nb} failed: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            pmeta = _pair_metadata(a, b, na, nb)
            pmeta["time_match_s"] = res.times["match"]
            try:
                results.write_pair(
                    na,
                    nb,
                    res.arrays,
                    meta,
                    pmeta,
                    saved_note=f"The {skipped + n_done} pairs finished before are kept.",
                )
            except WriteFailed as e:  # disk full / I/O error: stop writing to this file at once
                stopped = e.message
                code = EXIT_RUNTIME
                break
            n_done += 1
            total_matches += len(res.confidence)
            n_meaningless += res.n_confident == 0
    except KeyboardInterrupt as e:
        bar.close()
        _err(
            f"interrupted; {n_done} pairs finished in this run are saved in {out}. Rerun the same command to resume."
        )
        return interrupt_code(e)
    bar.close()
    print(
        pairs_summary(
            n_listed=len(pairs),
            n_done=n_done,
            n_skipped=skipped,
            failures=failures,
            setting=setting,
            device=device,
            weights=info["weights"],
            weights_sha256=info["weights_sha256"],
            elapsed=time.perf_counter() - t0,
            total_matches=total_matches,
            num_samples=args.num_samples,
            n_meaningless=n_meaningless,
            out=out,
            out_exists=out.exists(),
            stopped=stopped,
        ),
        flush=True,
    )
    if stopped:
        _err(stopped)
        return code
    return EXIT_PAIRS_FAILED if failures else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see ``romav2-match --help``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return run_command(PROG, lambda: _run_pairs(args) if args.pairs is not None else _run_single(args))


if __name__ == "__main__":
    sys.exit(main())
