"""Matching one pair with a loaded model, as ``romav2-match`` does it in every mode and on every executor.

Loading (:func:`load_model`: weights problems become exit 4), reading an image the way the command reads
it (:func:`open_image`: EXIF orientation, refusals as exit 2), matching and sampling (:func:`match_pair`),
and the metadata written with each result (:func:`run_metadata`, :func:`pair_metadata`). Used by the single
pair mode, by the pairs job (:mod:`romav2_plugin.app.pairs`) and by the Ray workers
(:mod:`romav2_plugin.distributed.pairs`), so that every path writes the same arrays.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from romav2_plugin.app.errors import EXIT_USAGE, CommandError
from romav2_plugin.app.summary import CONFIDENT
from romav2_plugin.app.weights_option import WeightsChoice, choose_weights, is_weights_error, weights_error
from romav2_plugin.verify import (
    GeometryCheck,
    check_matches,
    confident_share,
    default_threshold_px,
    unreliable_reason,
)

__all__ = [
    "PROG",
    "PIXEL_CONVENTION",
    "say",
    "resolve_device",
    "load_model",
    "load_matcher",
    "LoadedImage",
    "open_image",
    "PairResult",
    "match_pair",
    "check_metadata",
    "run_metadata",
    "pair_metadata",
    "setting_of",
    "cpu_note",
]

PROG = "romav2-match"
PIXEL_CONVENTION = (
    "opencv: pixel coordinates of the original images, top-left pixel centre at (0, 0), x right, y down"
)


def say(msg: str) -> None:
    """A note or warning of ``romav2-match`` on stderr."""
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def package_version() -> str:
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
    if dev.type not in ("cuda", "mps"):  # meta, xpu, ...: checked here, before anything loads
        from romav2_plugin.runtime import check_device

        try:
            check_device(name)
        except ValueError as e:
            raise CommandError(f"--device {name}: {e}", EXIT_USAGE) from None
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

    Weights problems become :class:`CommandError` with exit code 4 (:func:`romav2_plugin.app.weights_option.weights_error`).
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


def exif_orientation(path: Path) -> int:
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


def open_image(path: Path) -> LoadedImage:
    from romav2_plugin.io import check_min_size, load_image

    try:
        img = load_image(path)
        check_min_size(img.width, img.height, str(path))
    except (ValueError, FileNotFoundError) as e:
        raise CommandError(str(e), EXIT_USAGE) from None
    return LoadedImage(path, img, exif_orientation(path))


# -------------------------------------------------------------------------------------------- matching
@dataclass
class PairResult:
    arrays: dict[str, np.ndarray]
    preds: dict[str, Any]
    preds_BA: dict[str, Any] | None = None
    times: dict[str, float] = field(default_factory=dict)
    coverage_A: float = float("nan")
    #: the geometric check of the drawn matches (:func:`romav2_plugin.verify.check_matches`)
    geometry: GeometryCheck | None = None
    #: the share of the grid (both directions when bidirectional) with overlap > CONFIDENT
    confident_share: float = float("nan")

    @property
    def confidence(self) -> np.ndarray:
        return self.arrays["confidence"]

    @property
    def n_confident(self) -> int:
        return int((self.confidence > CONFIDENT).sum())

    def check_metadata(self) -> dict[str, Any]:
        """The per-pair values of the geometric check, as written with each result."""
        return check_metadata(self.geometry, self.confident_share)

    @property
    def unreliable(self) -> str | None:
        """Why the pair looks unreliable (:func:`romav2_plugin.verify.unreliable_reason`), or ``None``."""
        m = self.check_metadata()
        return unreliable_reason(m["geometry_inlier_ratio"], m["confident_share"])


def check_metadata(geometry: GeometryCheck | None, share: float) -> dict[str, Any]:
    """``geometry_inlier_ratio`` (NaN when undefined), ``geometry_inliers``, ``geometry_model``,
    ``geometry_threshold_px`` and ``confident_share``: the attributes written per pair."""
    nan = float("nan")
    return {
        "geometry_inlier_ratio": nan if geometry is None else float(geometry.inlier_ratio),
        "geometry_inliers": 0 if geometry is None else int(geometry.inliers),
        "geometry_model": "none" if geometry is None else geometry.model,
        "geometry_threshold_px": nan if geometry is None else float(geometry.threshold_px),
        "confident_share": float(share),
    }


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
    t3 = time.perf_counter()
    # the geometric check of what was drawn (a fixed seed: the same check for the same matches)
    res.geometry = check_matches(
        arrays["keypoints_A"], arrays["keypoints_B"], threshold_px=default_threshold_px(a.hw, b.hw), seed=0
    )
    o_BA = preds.get("overlap_BA")
    res.confident_share = confident_share(
        preds["overlap_AB"][0], None if o_BA is None else o_BA[0], threshold=CONFIDENT
    )
    res.times["check"] = time.perf_counter() - t3
    if warp_both and preds.get("warp_BA") is None:
        t3 = time.perf_counter()
        res.preds_BA = model.match(b.image, a.image)
        res.times["match B->A"] = time.perf_counter() - t3
    return res


def run_metadata(
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
        "package_version": package_version(),
        "seed": int(seed),
        "num_samples": int(num_samples),
        "min_overlap": float("nan") if min_overlap is None else float(min_overlap),
    }


def pair_metadata(a: LoadedImage, b: LoadedImage, name_A: str, name_B: str) -> dict[str, Any]:
    return {
        "image_A": name_A,
        "image_B": name_B,
        "image_hw_A": np.array(a.hw, dtype=np.int64),
        "image_hw_B": np.array(b.hw, dtype=np.int64),
        "exif_orientation_A": a.exif_orientation,
        "exif_orientation_B": b.exif_orientation,
    }


def setting_of(model, requested: str | None) -> str:
    """The setting the model runs (its own default when none was requested)."""
    return str(getattr(model, "setting", None) or requested or "precise")


def cpu_note(setting: str, device) -> None:
    if device.type == "cpu" and setting not in ("turbo", "fast", "tiny"):
        say(
            f"note: running setting '{setting}' on the CPU takes one to a few minutes per pair; --setting turbo is much faster."
        )




def load_matcher(
    weights: WeightsChoice, setting: str | None, device: str, amp: bool | None, *, seed: int, num_samples: int,
    min_overlap: float | None,
) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, device, run metadata)`` for a run over many pairs (the pairs job, a Ray worker)."""
    dev = resolve_device(device)
    model, info = load_model(weights, setting, dev, amp)
    meta = run_metadata(
        setting=setting_of(model, setting), model=model, info=info, seed=seed, num_samples=num_samples,
        min_overlap=min_overlap,
    )  # fmt: skip
    return model, dev, meta


def grid_candidates(setting: str | None) -> int:
    """The most matches one pair can give with ``setting`` (``None``: the weights' own, so the largest of
    all settings): one candidate per pixel of the finest working grid, per direction."""
    from romav2_plugin.config import SETTINGS

    def n(st) -> int:
        h, w = (st.H_hr, st.W_hr) if st.H_hr is not None and st.W_hr is not None else (st.H_lr, st.W_lr)
        return h * w * (2 if st.bidirectional else 1)

    return n(SETTINGS[setting]) if setting in SETTINGS else max(n(st) for st in SETTINGS.values())


def capped_num_samples(num_samples: int, setting: str | None) -> int:
    """``num_samples``, or the grid's candidate count when it asks for more (what can ever be written), saying
    so on stderr; used for the space estimate (the sampler itself already stops at the candidates)."""
    cap = grid_candidates(setting)
    if num_samples <= cap:
        return num_samples
    say(
        f"--num-samples {num_samples} is more than the {cap} candidate matches of "
        f"{'setting ' + setting if setting else 'the largest setting'}: at most {cap} matches per pair are "
        "written (the disk-space estimate uses that)."
    )
    return cap
