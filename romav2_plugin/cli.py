"""``romav2-match``: match two images (or a list of pairs) with RoMa v2 and look at the result.

Run ``romav2-match --help`` for the options; :func:`main` is callable in-process (returns the exit code).
"""

from __future__ import annotations

import argparse
import hashlib
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

from romav2_plugin.visualize import PANEL_HEIGHT

__all__ = ["main", "build_parser", "load_model", "EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE", "EXIT_PAIRS_FAILED"]

EXIT_OK = 0
EXIT_RUNTIME = 1  # weights missing/unreachable/wrong, model or device failure, missing optional dependency
EXIT_USAGE = 2  # bad arguments or unusable input files (argparse uses 2 as well)
EXIT_PAIRS_FAILED = 3  # --pairs: some pairs failed (reported); every other pair was written
EXIT_INTERRUPTED = 130

DEFAULT_OUT = "romav2-match-output"
CONFIDENT = 0.5  # a sampled match counts as "confident" when its overlap exceeds this
PIXEL_CONVENTION = (
    "opencv: pixel coordinates of the original images, top-left pixel centre at (0, 0), x right, y down"
)
H5_EXTRA = "romav2-plugin[h5]"

EPILOG = f"""\
outputs:
  single pair: --out DIR (default ./{DEFAULT_OUT}) gets matches.npz, matches.png and warp.png;
  --out FILE.npz or FILE.h5 writes the matches there and the pictures next to it (FILE_matches.png,
  FILE_warp.png). Arrays: keypoints_A, keypoints_B (N, 2) pixel coordinates in the original images
  (OpenCV convention: top-left pixel centre at (0, 0)), confidence (N,) (the overlap), precision_A,
  precision_B (N, 2, 2) (NaN where the setting does not predict them), matches_normalized (N, 4);
  metadata: setting, image sizes (image_hw_A/B = height, width), pixel_convention, weights file name
  and sha256 prefix, package version, seed.
  --pairs: one HDF5 group per pair, "<name A>/<name B>" ('/' inside a name becomes '-'), written and
  flushed after each pair; rerunning the same command skips finished pairs (--overwrite redoes them).
pictures (PNG): every panel is {PANEL_HEIGHT} px high. matches.png: A | B, up to --max-draw matches coloured
  by confidence (red low, yellow, green high). warp.png: top row A | B warped into A's frame (masked by
  the overlap, white where it is low); bottom row B | A warped into B's frame, only for bidirectional
  settings (precise, mega1500, ...) or with --warp-both (runs a second match B->A).
images: any format PIL reads; EXIF orientation is applied (coordinates refer to the image as displayed);
  grayscale, palette and RGBA images are converted to RGB; 16-bit and float images are refused (convert
  them to 8 bit first), as are images above romav2_plugin.io.MAX_PIXELS pixels. --pairs writes no pictures.
weights: --weights PATH or URL, else $ROMAV2_WEIGHTS, else the official release
  (https://github.com/Parskatt/RoMaV2/releases/download/v2.0.1/romav2.0.1.pt), downloaded once into
  $ROMAV2_PLUGIN_CACHE (default ~/.cache/romav2_plugin).
exit codes:
  0 success; 1 weights missing/unreachable/invalid, missing optional dependency (h5py) or a runtime
  failure; 2 bad arguments or unusable input (missing/unreadable/16-bit/too large image, bad pairs
  file); 3 --pairs finished but some pairs failed (listed; the others are saved); 130 interrupted.
"""


class CLIError(Exception):
    """A message for the user (printed without a traceback) and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from romav2_plugin.config import SETTINGS

    p = argparse.ArgumentParser(
        prog="romav2-match",
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
        "--pairs", metavar="FILE", help="text file, one 'nameA nameB' pair per line ('#' comments)"
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
        "--setting", default="precise", choices=list(SETTINGS), help="resolution preset (default: precise)"
    )
    p.add_argument(
        "--weights",
        metavar="PATH|URL",
        help="checkpoint (default: $ROMAV2_WEIGHTS, else the official release)",
    )
    p.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps, ..."
    )
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA (slower, full precision)")
    p.add_argument(
        "--num-samples", type=int, default=5000, metavar="N", help="matches to sample (default 5000)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed, for reproducible output (default 0)")
    p.add_argument(
        "--min-overlap", type=float, default=None, metavar="T", help="only sample matches with overlap > T"
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
    if args.min_overlap is not None and not 0.0 <= args.min_overlap < 1.0:
        p.error("--min-overlap must lie in [0, 1)")
    if args.max_draw < 0:
        p.error("--max-draw must be >= 0")


# ------------------------------------------------------------------------------------------------ utils
def _err(msg: str) -> None:
    print(f"romav2-match: {msg}", file=sys.stderr, flush=True)


def _package_version() -> str:
    from romav2_plugin import __version__

    return __version__


def _sha256_prefix(path: Path, n: int = 16) -> str:
    """First ``n`` hex digits of the file's sha256, cached by (path, size, mtime) in the weights cache."""
    from romav2_plugin.weights import cache_dir

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache = cache_dir() / "sha256.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key][:n]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    try:
        known = known if isinstance(known, dict) else {}
        known[key] = digest
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known))
    except OSError:
        pass
    return digest[:n]


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"--device {name!r} is not a device torch knows ({e})", EXIT_USAGE) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(
            f"--device {name}: CUDA is not available in this PyTorch installation / machine. Use --device cpu.",
            EXIT_USAGE,
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CLIError(
            f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present", EXIT_USAGE
        )
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CLIError("--device mps: MPS is not available on this machine. Use --device cpu.", EXIT_USAGE)
    return dev


def load_model(weights: str | None, setting: str, device, amp: bool | None):
    """Resolve and load the weights; returns ``(model, {"weights": file name, "weights_sha256": prefix})``.

    Errors become :class:`CLIError` with exit code 1 and the message of :mod:`romav2_plugin.weights`.
    """
    from romav2_plugin import RoMaV2
    from romav2_plugin.weights import resolve_weights

    try:
        path = resolve_weights(weights)
    except (RuntimeError, FileNotFoundError) as e:
        raise CLIError(str(e), EXIT_RUNTIME) from None
    info = {"weights": path.name, "weights_sha256": _sha256_prefix(path)}
    try:
        model = RoMaV2.from_pretrained(path, setting=setting, device=device, amp=amp)
    except ValueError as e:
        raise CLIError(str(e), EXIT_RUNTIME) from None
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
    from romav2_plugin.io import load_image

    img = load_image(path)  # ValueError / FileNotFoundError with a message for the user
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


def match_pair(
    model, a: LoadedImage, b: LoadedImage, args: argparse.Namespace, *, warp_both: bool = False
) -> PairResult:
    t0 = time.perf_counter()
    preds = model.match(a.image, b.image)
    t1 = time.perf_counter()
    matches, conf, prec_A, prec_B = model.sample(
        preds, args.num_samples, generator=args.seed, min_overlap=args.min_overlap
    )
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


def _metadata(args, model, info: dict[str, str]) -> dict[str, Any]:
    hr = f" + {model.H_hr}x{model.W_hr}" if model.H_hr is not None else ""
    return {
        "setting": args.setting,
        "working_resolution": f"{model.H_lr}x{model.W_lr}{hr}",
        "bidirectional": bool(model.bidirectional),
        "pixel_convention": PIXEL_CONVENTION,
        "weights": info["weights"],
        "weights_sha256": info["weights_sha256"],
        "package_version": _package_version(),
        "seed": int(args.seed),
        "num_samples": int(args.num_samples),
        "min_overlap": float("nan") if args.min_overlap is None else float(args.min_overlap),
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


# ---------------------------------------------------------------------------------------------- writing
def _import_h5py():
    try:
        import h5py
    except ImportError:
        raise CLIError(
            f'writing .h5 files needs h5py, which is not installed. Install it with: pip install "{H5_EXTRA}" '
            "(or pip install h5py), or write .npz instead (--out matches.npz).",
            EXIT_RUNTIME,
        ) from None
    return h5py


def pair_key(name_A: str, name_B: str) -> str:
    """HDF5 group of a pair: ``"<name A>/<name B>"`` with ``/`` inside each name replaced by ``-`` (as hloc)."""
    return f"{name_A.replace('/', '-')}/{name_B.replace('/', '-')}"


def write_npz(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    payload = dict(arrays)
    for k, v in meta.items():
        payload[k] = np.asarray(v)
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **payload)
    tmp.replace(path)


def _h5_root_diff(path: Path, meta: dict[str, Any]) -> list[str]:
    """Differences between the options recorded in an existing results file and ``meta``."""
    h5py = _import_h5py()
    keys = ("setting", "weights_sha256", "seed", "num_samples", "min_overlap")
    try:
        with h5py.File(path, "r") as f:
            if "setting" not in f.attrs:
                return []
            old = {k: f.attrs.get(k) for k in keys}
    except OSError as e:
        raise CLIError(
            f"{path} exists but is not a readable HDF5 file ({e}); remove it or choose another --out",
            EXIT_USAGE,
        ) from None
    old = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in old.items()}
    return [f"{k}: {old[k]} (file) vs {meta[k]} (now)" for k in keys if str(old[k]) != str(meta[k])]


def write_h5_pair(
    path: Path, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any], pair_meta: dict[str, Any]
) -> None:
    """Add (or replace) one pair group; the file is closed afterwards so it is complete on disk."""
    h5py = _import_h5py()
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "a") as f:
        for k, v in meta.items():
            f.attrs[k] = v
        if key in f:
            del f[key]
        g = f.create_group(key)
        for k, v in arrays.items():
            g.create_dataset(k, data=v)
        for k, v in pair_meta.items():
            g.attrs[k] = v
        g.attrs["complete"] = True  # set last: a group without it is redone on resume
        f.flush()


def finished_pairs(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    h5py = _import_h5py()
    done: set[str] = set()
    try:
        with h5py.File(path, "r") as f:

            def visit(name, obj):
                if isinstance(obj, h5py.Group) and obj.attrs.get("complete", False):
                    done.add(name)

            f.visititems(visit)
    except OSError as e:
        raise CLIError(
            f"{path} exists but is not a readable HDF5 file ({e}); remove it or choose another --out",
            EXIT_USAGE,
        ) from None
    return done


def write_pictures(
    res: PairResult, a: LoadedImage, b: LoadedImage, matches_png: Path, warp_png: Path, args
) -> None:
    from romav2_plugin.visualize import draw_matches, draw_warp

    p = res.preds
    draw_matches(
        a.image,
        b.image,
        res.arrays["keypoints_A"],
        res.arrays["keypoints_B"],
        res.confidence,
        max_draw=args.max_draw,
        seed=args.seed,
    ).save(matches_png)
    if p.get("warp_BA") is not None:
        w_BA, o_BA = p["warp_BA"][0], p["overlap_BA"][0]
    elif res.preds_BA is not None:
        w_BA, o_BA = res.preds_BA["warp_AB"][0], res.preds_BA["overlap_AB"][0]
    else:
        w_BA = o_BA = None
    draw_warp(a.image, b.image, p["warp_AB"][0], p["overlap_AB"][0], w_BA, o_BA).save(warp_png)


# ---------------------------------------------------------------------------------------------- summary
def reprojection_errors(H: np.ndarray, kpts_A: np.ndarray, kpts_B: np.ndarray) -> np.ndarray:
    """``|H(kpts_A) - kpts_B|`` in pixels of B (OpenCV convention)."""
    pa = (
        np.concatenate((kpts_A.astype(np.float64), np.ones((len(kpts_A), 1))), axis=1)
        @ np.asarray(H, dtype=np.float64).T
    )
    proj = pa[:, :2] / pa[:, 2:]
    return np.linalg.norm(proj - kpts_B.astype(np.float64), axis=1)


def _summary(
    args,
    model,
    info,
    a: LoadedImage,
    b: LoadedImage,
    res: PairResult,
    t_load: float,
    written: list[Path],
    gt_H: np.ndarray | None,
    device,
) -> str:
    conf = res.confidence
    n = len(conf)
    n_conf = int((conf > CONFIDENT).sum())
    hr = f" then {model.H_hr}x{model.W_hr}" if model.H_hr is not None else ""
    direction = "bidirectional" if model.bidirectional else "A->B only"
    times = ", ".join(f"{k} {v:.1f} s" for k, v in res.times.items())
    lines = [
        "RoMa v2 matches",
        f"  image A    {a.path}  ({a.image.width}x{a.image.height}{'' if a.exif_orientation == 1 else ', EXIF-rotated'})",
        f"  image B    {b.path}  ({b.image.width}x{b.image.height}{'' if b.exif_orientation == 1 else ', EXIF-rotated'})",
        f"  setting    {args.setting}: {model.H_lr}x{model.W_lr}{hr}, {direction}; device {device}",
        f"  weights    {info['weights']} (sha256 {info['weights_sha256']})",
        f"  time       load {t_load:.1f} s, {times}",
        f"  matches    {n} sampled (seed {args.seed}), {n_conf} confident (overlap > {CONFIDENT}); "
        f"{100 * res.coverage_A:.0f}% of A covisible",
    ]
    if gt_H is not None and n:
        e = reprojection_errors(gt_H, res.arrays["keypoints_A"], res.arrays["keypoints_B"])
        lines.append(
            f"  vs truth   reprojection error against the known homography: median {np.median(e):.2f} px, "
            f"{100 * np.mean(e < 1):.0f}% < 1 px, {100 * np.mean(e < 3):.0f}% < 3 px, {100 * np.mean(e < 10):.0f}% < 10 px"
        )
    lines.append("  wrote      " + "\n             ".join(str(p) for p in written))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ modes
def _out_paths(out: str | None) -> tuple[Path, Path, Path]:
    o = Path(out if out is not None else DEFAULT_OUT).expanduser()
    if o.suffix.lower() in (".npz", ".h5", ".hdf5"):
        return o, o.with_name(o.stem + "_matches.png"), o.with_name(o.stem + "_warp.png")
    if o.exists() and not o.is_dir():
        raise CLIError(
            f"--out {o} exists and is not a folder; give a folder or a .npz / .h5 file name", EXIT_USAGE
        )
    return o / "matches.npz", o / "matches.png", o / "warp.png"


def _cpu_note(setting: str, device) -> None:
    if device.type == "cpu" and setting not in ("turbo", "fast"):
        _err(
            f"note: running setting '{setting}' on the CPU takes one to a few minutes per pair; --setting turbo is much faster."
        )


def _run_single(args) -> int:
    gt_H = None
    with ExitStack() as stack:
        if args.demo:
            assets = resources.files("romav2_plugin.assets")
            path_A = stack.enter_context(resources.as_file(assets / "demo_A.jpg"))
            path_B = stack.enter_context(resources.as_file(assets / "demo_B.jpg"))
            gt_H = np.asarray(json.loads((assets / "demo_pair.json").read_text())["homography_A_to_B"])
        else:
            path_A, path_B = Path(args.images[0]), Path(args.images[1])
        matches_path, matches_png, warp_png = _out_paths(args.out)
        is_h5 = matches_path.suffix.lower() in (".h5", ".hdf5")
        if is_h5:
            _import_h5py()
        try:
            a, b = _load(path_A), _load(path_B)
        except (ValueError, FileNotFoundError) as e:
            raise CLIError(str(e), EXIT_USAGE) from None
        try:  # fail before the (slow) matching if the output cannot be written
            matches_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CLIError(
                f"cannot create the output folder {matches_path.parent}: {e}", EXIT_USAGE
            ) from None
        device = resolve_device(args.device)
        _cpu_note(args.setting, device)
        t0 = time.perf_counter()
        model, info = load_model(args.weights, args.setting, device, False if args.fp32 else None)
        t_load = time.perf_counter() - t0
        try:
            res = match_pair(model, a, b, args, warp_both=args.warp_both and not args.no_pictures)
        except ValueError as e:
            raise CLIError(str(e), EXIT_USAGE) from None
        except RuntimeError as e:  # e.g. out of device memory
            raise CLIError(f"matching failed: {e}", EXIT_RUNTIME) from None
        meta = _metadata(args, model, info)
        name_A = "demo_A.jpg" if args.demo else str(path_A)
        name_B = "demo_B.jpg" if args.demo else str(path_B)
        pmeta = _pair_metadata(a, b, name_A, name_B)
        written = [matches_path]
        try:
            if is_h5:
                write_h5_pair(matches_path, pair_key(name_A, name_B), res.arrays, meta, pmeta)
            else:
                write_npz(matches_path, res.arrays, {**meta, **pmeta})
            if not args.no_pictures:
                write_pictures(res, a, b, matches_png, warp_png, args)
                written += [matches_png, warp_png]
        except OSError as e:
            raise CLIError(f"cannot write the results: {e}", EXIT_RUNTIME) from None
        print(_summary(args, model, info, a, b, res, t_load, written, gt_H, device), flush=True)
    return EXIT_OK


def read_pairs(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise CLIError(f"pairs file not found: {path}", EXIT_USAGE)
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for i, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise CLIError(
                f"{path}:{i}: expected 'nameA nameB' (two names separated by white space), got {line!r}",
                EXIT_USAGE,
            )
        pair = (parts[0], parts[1])
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    if not pairs:
        raise CLIError(f"{path}: no pairs found", EXIT_USAGE)
    return pairs


def _run_pairs(args) -> int:
    from tqdm import tqdm

    pairs_path = Path(args.pairs).expanduser()
    pairs = read_pairs(pairs_path)
    image_dir = Path(args.image_dir).expanduser() if args.image_dir else pairs_path.parent
    if not image_dir.is_dir():
        raise CLIError(f"--image-dir {image_dir} is not a folder", EXIT_USAGE)
    out = Path(args.out if args.out is not None else DEFAULT_OUT).expanduser()
    if out.suffix.lower() == ".npz":
        raise CLIError(
            "--pairs writes HDF5: give --out RESULTS.h5 (or a folder for FOLDER/results.h5)", EXIT_USAGE
        )
    if out.suffix.lower() not in (".h5", ".hdf5"):
        out = out / "results.h5"
    _import_h5py()
    done = set() if args.overwrite else finished_pairs(out)
    todo = [(na, nb) for na, nb in pairs if pair_key(na, nb) not in done]
    skipped = len(pairs) - len(todo)
    if skipped:
        _err(f"{skipped} of {len(pairs)} pairs already in {out}: skipped (--overwrite redoes them)")
    if not todo:
        print(f"all {len(pairs)} pairs already in {out}; nothing to do")
        return EXIT_OK
    device = resolve_device(args.device)
    _cpu_note(args.setting, device)
    t0 = time.perf_counter()
    model, info = load_model(args.weights, args.setting, device, False if args.fp32 else None)
    meta = _metadata(args, model, info)
    diff = _h5_root_diff(out, meta) if out.is_file() else []
    if diff and not args.overwrite:
        raise CLIError(
            f"{out} holds results made with other options ({'; '.join(diff)}). "
            "Use the same options to resume, --overwrite to start the file afresh, or another --out.",
            EXIT_USAGE,
        )
    if diff:
        _err(f"--overwrite: {out} was made with other options ({'; '.join(diff)}); starting it afresh")
        out.unlink()
    _err(f"model loaded in {time.perf_counter() - t0:.1f} s ({args.setting}, {device}, {info['weights']})")
    failures: list[tuple[str, str, str]] = []
    n_done = 0
    total_matches = 0
    bar = tqdm(todo, desc="matching", unit="pair", file=sys.stderr, dynamic_ncols=True)
    try:
        for na, nb in bar:
            try:
                try:
                    a, b = _load(image_dir / na), _load(image_dir / nb)
                except (ValueError, FileNotFoundError) as e:
                    raise CLIError(str(e), EXIT_USAGE) from None
                res = match_pair(model, a, b, args)
                pmeta = _pair_metadata(a, b, na, nb)
                pmeta["time_match_s"] = res.times["match"]
                write_h5_pair(out, pair_key(na, nb), res.arrays, meta, pmeta)
                n_done += 1
                total_matches += len(res.confidence)
            except CLIError as e:
                failures.append((na, nb, str(e)))
                tqdm.write(f"romav2-match: pair {na} {nb} failed: {e}", file=sys.stderr)
            except Exception as e:  # a failing pair must not lose the others
                failures.append((na, nb, f"{type(e).__name__}: {e}"))
                tqdm.write(f"romav2-match: pair {na} {nb} failed: {type(e).__name__}: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        bar.close()
        _err(
            f"interrupted; {n_done} pairs finished in this run are saved in {out}. Rerun the same command to resume."
        )
        return EXIT_INTERRUPTED
    bar.close()
    elapsed = time.perf_counter() - t0
    lines = [
        "RoMa v2 pairs",
        f"  pairs      {len(pairs)} listed: {n_done} matched now, {skipped} already done, {len(failures)} failed",
        f"  setting    {args.setting}; device {device}; weights {info['weights']} (sha256 {info['weights_sha256']})",
        f"  time       {elapsed:.1f} s ({elapsed / max(n_done, 1):.1f} s per pair, model load included)",
        f"  matches    {total_matches} written ({args.num_samples} requested per pair)",
        f"  wrote      {out}",
    ]
    if failures:
        lines.append(
            "  failed     " + "\n             ".join(f"{na} {nb}: {msg}" for na, nb, msg in failures)
        )
        lines.append("             (fix them and rerun the same command: finished pairs are skipped)")
    print("\n".join(lines), flush=True)
    return EXIT_PAIRS_FAILED if failures else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see ``romav2-match --help``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        return _run_pairs(args) if args.pairs is not None else _run_single(args)
    except CLIError as e:
        _err(str(e))
        return e.code
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except MemoryError:
        _err("out of memory; try a smaller --setting (turbo, fast) or fewer --num-samples")
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
