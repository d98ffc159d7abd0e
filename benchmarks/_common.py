"""Shared helpers of the benchmark scripts: provenance (machine, versions, command, date), the test pair,
and process memory probes.

Nothing here imports a matcher; the scripts import the matchers they are asked to run.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import importlib.metadata as _md
import os
import platform
import shlex
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SHARED_PAIR = (REPO.parent / "shared" / "data" / "toronto_A.jpg", REPO.parent / "shared" / "data" / "toronto_B.jpg")

#: Images shipped inside scikit-image (``skimage.data``), all public domain or CC0 (see their docstrings).
SKIMAGE_IMAGES = {
    "astronaut": "NASA, public domain",
    "coffee": "Rachel Michetti, CC0",
    "chelsea": "Stefan van der Walt, CC0",
    "rocket": "SpaceX, public domain",
    "hubble_deep_field": "NASA, public domain",
}

_PACKAGES = ("torch", "timm", "kornia", "numpy", "romav2", "romatch", "opencv-python-headless", "scikit-image", "pycolmap")


# ---------------------------------------------------------------- provenance
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: CPU features that decide which kernels torch uses on CPU (listed with the model when present)
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in _CPU_FLAGS if f in have]
    except OSError:
        pass
    return []


def git_commit() -> str | None:
    """The checkout's commit (short hash, ``-dirty`` with uncommitted changes), or None outside a git checkout."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_label(device: str = "cpu") -> str:
    """The device part of a results file name: ``cpu``, or the GPU model (``NVIDIA H200`` -> ``h200``,
    ``NVIDIA H100 80GB HBM3`` -> ``h100``, ``NVIDIA GeForce RTX 4090`` -> ``rtx4090``)."""
    if not device.startswith("cuda"):
        return device.split(":")[0]
    import torch

    if not torch.cuda.is_available():
        return "cuda"
    return gpu_label(torch.cuda.get_device_name(torch.device(device)))


def gpu_label(name: str) -> str:
    import re

    words = [w for w in re.split(r"[\s_-]+", name) if w and w.lower() not in ("nvidia", "geforce", "tesla", "quadro")]
    out = []
    for w in words:
        out.append(re.sub(r"[^a-z0-9]", "", w.lower()))
        if any(c.isdigit() for c in w):
            break
    return "".join(out) or "cuda"


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _version(pkg: str) -> str | None:
    try:
        return _md.version(pkg)
    except _md.PackageNotFoundError:
        return None


def machine_info(device: str = "cpu") -> dict:
    """CPU model, cores, RAM, GPU (when ``device`` is CUDA), Python and package versions."""
    info: dict = {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "ram_gb": _ram_gb(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(torch.device(device))
            info["gpu"] = f"{p.name} ({p.total_memory / 1024**3:.0f} GiB)"
            info["cuda"] = torch.version.cuda
    info["versions"] = {p: v for p in _PACKAGES if (v := _version(p)) is not None}
    info["romav2_plugin"] = _version("romav2-plugin") or "source checkout"
    info["commit"] = git_commit()
    return info


def command_line() -> str:
    """The command as typed: ``python -m benchmarks.<name> ...`` when run as a module, else the script."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        name = spec.name.removesuffix(".__main__")
        return "python -m " + " ".join(shlex.quote(a) for a in [name, *sys.argv[1:]])
    return "python " + " ".join(shlex.quote(a) for a in [_rel(sys.argv[0]), *sys.argv[1:]])


def _rel(p: str) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return p


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def provenance_markdown(info: dict, command: str, date: str) -> str:
    v = ", ".join(f"{k} {x}" for k, x in info["versions"].items())
    lines = [
        f"- Machine: {info['cpu']}"
        + (f" ({', '.join(info['cpu_flags'])})" if info.get("cpu_flags") else "")
        + f", {info['cores']} cores, {info['ram_gb']} GB RAM"
        + (f"; GPU {info['gpu']}, CUDA {info.get('cuda')}" if "gpu" in info else ""),
        f"- Python {info['python']} on {info['platform']}",
        f"- Versions: {v}; romav2_plugin {info['romav2_plugin']}",
        f"- Command: `{command}`",
        f"- Date: {date}",
        f"- Commit: {info.get('commit') or 'unknown (not a git checkout)'}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- images
def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """``(H, W, 3)`` uint8, EXIF orientation applied."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB")).copy()


def skimage_image(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def tiny_on_demo_pair():
    """romav2-tiny (the shipped weights, CPU) and the demo pair as PIL images: ``(model, A, B)``."""
    from PIL import Image

    from romav2_plugin import RoMaV2

    assets = REPO / "romav2_plugin" / "assets"
    A, B = Image.open(assets / "demo_A.jpg").convert("RGB"), Image.open(assets / "demo_B.jpg").convert("RGB")
    return RoMaV2.from_pretrained("tiny", device="cpu"), A, B


def benchmark_pair(pair: tuple[str, str] | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """The image pair of the speed benchmark: given paths, else the shared toronto pair, else two
    scikit-image photos (different sizes, like a real pair). Returns ``(img_A, img_B, description)``."""
    if pair is not None:
        a, b = pair
        return load_rgb(a), load_rgb(b), f"{a}, {b}"
    if all(p.is_file() for p in SHARED_PAIR):
        A, B = (load_rgb(p) for p in SHARED_PAIR)
        return A, B, f"toronto pair ({A.shape[1]}x{A.shape[0]}, {B.shape[1]}x{B.shape[0]})"
    A, B = skimage_image("astronaut"), skimage_image("coffee")
    return A, B, f"scikit-image astronaut ({A.shape[1]}x{A.shape[0]}) and coffee ({B.shape[1]}x{B.shape[0]})"


# ---------------------------------------------------------------- process memory
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """Current resident set size (``VmRSS``) in MiB, ``None`` where /proc is unavailable."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def hwm_mb() -> float:
    """Peak resident set size in MiB: ``VmHWM`` (resettable), else ``ru_maxrss``."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / (1024 if sys.platform == "darwin" else 1)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so that RSS measures live data."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5). Returns whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
