"""Data of the accuracy benchmarks: the synthetic homography pairs and the rendered 3D pairs (both made here,
exact ground truth), and the loaders of the standard protocols (MegaDepth-1500, ScanNet-1500, HPatches).

Held-out images: romav2-tiny is trained on ``.tiny-data/train`` (``python -m benchmarks.tiny.fetch_images``);
``.tiny-data/heldout`` holds pictures training never reads. The synthetic benchmark draws its pairs from that
folder when it is present (else from scikit-image's bundled photos, as before), and the rendered benchmark
textures its scenes with held-out pictures only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks._common import REPO, SKIMAGE_IMAGES, skimage_image
from benchmarks.accuracy.metrics import corners, dlt_homography

__all__ = [
    "HELDOUT", "RENDERED_SEED", "MEGADEPTH_SCENES", "HPATCHES_IGNORE", "DATA_HELP", "DataMissingError",
    "WeightsMissingError", "SyntheticPair", "RenderedPair", "PosePair", "synthetic_images", "synthetic_pairs",
    "rendered_pairs", "random_homography", "warp_image", "photometric", "megadepth1500_pairs",
    "scannet1500_pairs", "hpatches_pairs", "missing_data",
]

#: The held-out pictures of romav2-tiny (made by ``python -m benchmarks.tiny.fetch_images --out .tiny-data``).
HELDOUT = REPO / ".tiny-data" / "heldout"
#: Seed base of the rendered benchmark's scenes: training draws scene ``i`` from seed ``0 * 1_000_003 + i``
#: (its ``seed`` is 0, indices below 2**31); ours start at ``RENDERED_SEED * 1_000_003``, far from those.
RENDERED_SEED = 1_511_706
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

MEGADEPTH_SCENES = ("0015_0.1_0.3.npz", "0015_0.3_0.5.npz", "0022_0.1_0.3.npz", "0022_0.3_0.5.npz", "0022_0.5_0.7.npz")
HPATCHES_IGNORE = frozenset({"i_contruction", "i_crownnight", "i_dc", "i_pencils", "i_whitebuilding",
                             "v_artisans", "v_astronautis", "v_talent"})

DATA_HELP = {
    "megadepth1500": (
        "MegaDepth-1500 expects, under --data-root:\n"
        "  {scenes}  (LoFTR's megadepth_test_1500_scene_info npz files)\n"
        "  and the images they reference (paths relative to --data-root, e.g. Undistorted_SfM/0015/images/*.jpg).\n"
        "Get them from the test-data section of https://github.com/zju3dv/LoFTR (README, 'megadepth_test_1500'\n"
        "and 'megadepth_test_1500_scene_info'), or follow the RoMa / RoMa v2 READMEs (data/megadepth layout)."
    ),
    "scannet1500": (
        "ScanNet-1500 expects, under --data-root:\n"
        "  test.npz  (LoFTR's scannet_test_1500 pair list: 'name' = (scene, sub-scene, stem A, stem B), 'rel_pose')\n"
        "  scans_test/scene0XXX_00/color/<stem>.jpg and scans_test/scene0XXX_00/intrinsic/intrinsic_color.txt\n"
        "Get them from the test-data section of https://github.com/zju3dv/LoFTR ('scannet_test_1500'); ScanNet's\n"
        "terms of use apply (http://www.scan-net.org/)."
    ),
    "hpatches": (
        "HPatches expects --data-root/hpatches-sequences-release/<sequence>/{1..6}.ppm and H_1_<k>.\n"
        "Download https://huggingface.co/datasets/vbalnt/hpatches/resolve/main/hpatches-sequences-release.zip\n"
        "(or the original link in https://github.com/hpatches/hpatches-dataset) and unzip it into --data-root."
    ),
    "wxbs": (
        "WxBS needs the wxbs-benchmark package (pip install wxbs-benchmark) and its dataset under --data-root\n"
        "(the package downloads it with download=True when the machine is online)."
    ),
}


class DataMissingError(FileNotFoundError):
    """Benchmark data is not where it should be; the message says what to download and where to put it."""


class WeightsMissingError(FileNotFoundError):
    """A standard protocol was asked for with random weights."""


def missing_data(bench: str, root: Path, what: list[str]) -> DataMissingError:
    shown = "\n  ".join(what[:5]) + (f"\n  ... and {len(what) - 5} more" if len(what) > 5 else "")
    msg = DATA_HELP[bench].replace("{scenes}", ", ".join(MEGADEPTH_SCENES))
    return DataMissingError(f"{bench}: data not found under --data-root {root}. Missing:\n  {shown}\n\n{msg}")


# ====================================================================== synthetic homography pairs
@dataclass
class SyntheticPair:
    name: str
    img_A: np.ndarray
    img_B: np.ndarray
    H: np.ndarray  # A pixels -> B pixels, OpenCV convention


def random_homography(rng: np.random.Generator, w: int, h: int, *, max_rot_deg: float = 20.0,
                      scale_range=(0.8, 1.2), max_corner_shift: float = 0.1) -> np.ndarray:
    """A random homography mapping a ``w`` x ``h`` image into a same-sized one: rotation about the centre,
    scale, and an independent shift of each corner by up to ``max_corner_shift`` of the image size."""
    src = corners(w, h)
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    a = np.radians(rng.uniform(-max_rot_deg, max_rot_deg))
    s = rng.uniform(*scale_range)
    R = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    dst = (src - c) @ R.T + c + rng.uniform(-max_corner_shift, max_corner_shift, size=(4, 2)) * [w, h]
    return dlt_homography(src, dst)


def warp_image(img: np.ndarray, H: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """``B(p) = A(H^-1 p)``, bilinear, zero outside; float in [0, 1]."""
    from skimage.transform import ProjectiveTransform, warp

    inv = ProjectiveTransform(matrix=np.linalg.inv(H))
    return warp(img.astype(np.float64) / 255.0, inv, output_shape=out_hw, order=1, mode="constant", cval=0.0)


def photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma, contrast, brightness, per-channel gain and Gaussian noise; float [0, 1] -> uint8."""
    x = img ** rng.uniform(0.7, 1.4)
    x = x * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)
    x = x * rng.uniform(0.9, 1.1, size=3) + rng.normal(0, 3 / 255, size=x.shape)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def _resize_long(img: np.ndarray, long_side: int) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    s = long_side / max(h, w)
    if s >= 1:
        return img
    return np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s)), Image.BICUBIC))

def _folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _load_long(path: Path, long_side: int) -> np.ndarray:
    """A photo at most ``long_side`` px on its long side (JPEGs decoded at a reduced scale when possible)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.draft("RGB", (long_side, long_side))  # JPEG: decode at >= the wanted size (no-op for PNG)
        img = np.asarray(ImageOps.exif_transpose(im).convert("RGB")).copy()
    return _resize_long(img, long_side)


def synthetic_images(folder: str | Path | None = None) -> tuple[list[tuple[str, Callable[[int], np.ndarray]]], str]:
    """The source photos of the synthetic pairs as ``[(name, load(long_side) -> uint8 (H, W, 3))]`` and a
    description for the report.

    ``folder``: that folder's photos (sorted by name); ``None``: the held-out folder :data:`HELDOUT` when it
    exists and holds photos, else scikit-image's bundled photos (the benchmark's images before romav2-tiny).
    """
    if folder is not None:
        folder = Path(folder)
        files = _folder_images(folder) if folder.is_dir() else []
        if not files:
            raise DataMissingError(f"synthetic: no {'/'.join(IMAGE_SUFFIXES)} images in --images {folder}")
        return [(p.stem, lambda s, p=p: _load_long(p, s)) for p in files], f"{len(files)} photos from {folder}"
    if HELDOUT.is_dir() and _folder_images(HELDOUT):
        files = _folder_images(HELDOUT)
        return ([(p.stem, lambda s, p=p: _load_long(p, s)) for p in files],
                f"the {len(files)} held-out photos of romav2-tiny ({_rel(HELDOUT)}; training never reads them)")
    srcs = ", ".join(f"{k}: {v}" for k, v in SKIMAGE_IMAGES.items())
    return ([(k, lambda s, k=k: _resize_long(skimage_image(k), s)) for k in SKIMAGE_IMAGES],
            f"scikit-image's bundled photos ({srcs}); no held-out folder at {_rel(HELDOUT)}")


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def synthetic_pairs(n: int = 10, seed: int = 0, long_side: int = 512,
                    images: str | Path | Sequence[str] | None = None) -> list[SyntheticPair]:
    """``n`` pairs cycling over the source photos: A is the photo at ``long_side`` px (never upscaled), B its
    warp by a random homography plus a photometric change. Deterministic for a given seed.

    ``images``: a folder, a sequence of scikit-image photo names, or ``None`` (see :func:`synthetic_images`).
    """
    if images is not None and not isinstance(images, (str, Path)):
        source = [(k, lambda s, k=k: _resize_long(skimage_image(k), s)) for k in images]
    else:
        source, _ = synthetic_images(images)
    rng = np.random.default_rng(seed)
    pairs, cache = [], {}
    for i in range(n):
        name, load = source[i % len(source)]
        if name not in cache:
            cache[name] = load(long_side)
        A = cache[name]
        h, w = A.shape[:2]
        H = random_homography(rng, w, h)
        B = photometric(warp_image(A, H, (h, w)), rng)
        pairs.append(SyntheticPair(f"{name}-{i}", A, B, H))
    return pairs


# ====================================================================== rendered 3D pairs
@dataclass
class RenderedPair:
    """Two renders of one textured 3D scene. Intrinsics in pixels with COLMAP's convention (top-left pixel
    centre at ``(0.5, 0.5)``); ``R``, ``t`` map A's camera frame to B's; depths are z-depths (0: no surface)."""

    name: str
    img_A: np.ndarray
    img_B: np.ndarray
    K_A: np.ndarray
    K_B: np.ndarray
    R: np.ndarray
    t: np.ndarray
    depth_A: np.ndarray
    depth_B: np.ndarray
    covisible: float  # fraction of A's pixels seen in B


def rendered_pairs(n: int = 50, *, folder: str | Path | None = None, size: tuple[int, int] = (384, 512),
                   seed: int = 0, max_angle_deg: float = 35.0, photometric_strength: float = 0.5,
                   min_covisible: float = 0.2) -> list[RenderedPair]:
    """``n`` rendered pairs (``size`` = (height, width)) of random scenes of ``romav2_plugin.train.scenes``
    textured with crops of the photos in ``folder`` (default: the held-out folder :data:`HELDOUT`; nothing
    else), drawn as training's ``RenderedPairs`` draws them (same camera ranges, texture crops, redraw
    below ``min_covisible``, photometric change) but with the seeds ``RENDERED_SEED + seed``.

    Textures are resampled to ``192 * max(size) / 256`` px, so that they carry as much detail per image pixel
    as training's 192 px textures at 256 px. Deterministic for given arguments.
    """
    import torch

    from romav2_plugin.train.augment import photometric as photometric_t
    from romav2_plugin.train.data import ImageFolder, RenderedPairs, sample_generator
    from romav2_plugin.train.ground_truth import warp_from_depth
    from romav2_plugin.train.scenes import relative_pose

    folder = HELDOUT if folder is None else Path(folder)
    if not (folder.is_dir() and _folder_images(folder)):
        raise DataMissingError(
            f"rendered3d: no held-out photos in {folder}. Make them with\n"
            "  python -m benchmarks.tiny.fetch_images --out .tiny-data --install\n"
            "or pass --images FOLDER (photos the evaluated models were not trained on)."
        )
    texture_size = round(192 * max(size) / 256)
    ds = RenderedPairs(ImageFolder(folder), tuple(size), max_angle_deg=max_angle_deg,
                       photometric_strength=photometric_strength, texture_size=texture_size)

    def u8(img: torch.Tensor) -> np.ndarray:
        return (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)

    pairs = []
    for i in range(n):
        g = sample_generator(RENDERED_SEED + seed, i)
        for _ in range(8):
            _, cam_A, cam_B, image_A, depth_A, image_B, depth_B = ds.render_pair(g)
            T = relative_pose(cam_A, cam_B)
            _, covis = warp_from_depth(depth_A[None], depth_B[None], cam_A.K[None], cam_B.K[None], T[None])
            if covis.float().mean() >= min_covisible:
                break
        k = photometric_strength
        if k > 0:
            image_A, image_B = photometric_t(image_A, g, k), photometric_t(image_B, g, k)
        pairs.append(RenderedPair(
            f"scene{i}", u8(image_A), u8(image_B), cam_A.K.numpy().copy(), cam_B.K.numpy().copy(),
            T[:3, :3].numpy().copy(), T[:3, 3].numpy().copy(), depth_A.numpy(), depth_B.numpy(),
            float(covis.float().mean()),
        ))
    return pairs


# ====================================================================== standard protocols
@dataclass
class PosePair:
    path_A: Path
    path_B: Path
    K_A: np.ndarray
    K_B: np.ndarray
    R: np.ndarray  # A -> B
    t: np.ndarray


def megadepth1500_pairs(root: str | Path) -> list[PosePair]:
    root = Path(root)
    missing = [str(root / s) for s in MEGADEPTH_SCENES if not (root / s).is_file()]
    if missing:
        raise missing_data("megadepth1500", root, missing)
    pairs = []
    for s in MEGADEPTH_SCENES:
        d = np.load(root / s, allow_pickle=True)
        for info in d["pair_infos"]:
            i, j = info[0]
            T_A, T_B = d["poses"][i], d["poses"][j]
            R = T_B[:3, :3] @ T_A[:3, :3].T
            t = -R @ T_A[:3, 3] + T_B[:3, 3]
            pairs.append(PosePair(root / str(d["image_paths"][i]), root / str(d["image_paths"][j]),
                                  d["intrinsics"][i].astype(np.float64), d["intrinsics"][j].astype(np.float64), R, t))
    absent = [str(p) for pp in pairs for p in (pp.path_A, pp.path_B) if not p.is_file()]
    if absent:
        raise missing_data("megadepth1500", root, sorted(set(absent)))
    return pairs


def scannet1500_pairs(root: str | Path) -> list[PosePair]:
    root = Path(root)
    if not (root / "test.npz").is_file():
        raise missing_data("scannet1500", root, [str(root / "test.npz")])
    d = np.load(root / "test.npz")
    pairs, absent = [], []
    for name, rel in zip(d["name"], d["rel_pose"]):
        scene = root / "scans_test" / f"scene{int(name[0]):04d}_{int(name[1]):02d}"
        kfile = scene / "intrinsic" / "intrinsic_color.txt"
        pa, pb = scene / "color" / f"{int(name[2])}.jpg", scene / "color" / f"{int(name[3])}.jpg"
        absent += [str(p) for p in (kfile, pa, pb) if not p.is_file()]
        if absent:
            continue
        K = np.loadtxt(kfile)[:3, :3]
        T = np.asarray(rel, dtype=np.float64).reshape(-1, 4)
        pairs.append(PosePair(pa, pb, K.copy(), K.copy(), T[:3, :3], T[:3, 3]))
    if absent:
        raise missing_data("scannet1500", root, sorted(set(absent)))
    return pairs


def hpatches_pairs(root: str | Path) -> Iterator[tuple[str, Path, Path, np.ndarray]]:
    seqs = Path(root) / "hpatches-sequences-release"
    if not seqs.is_dir():
        raise missing_data("hpatches", Path(root), [str(seqs)])
    for seq in sorted(p for p in seqs.iterdir() if p.is_dir() and p.name not in HPATCHES_IGNORE):
        for k in range(2, 7):
            yield seq.name, seq / "1.ppm", seq / f"{k}.ppm", np.loadtxt(seq / f"H_1_{k}")


