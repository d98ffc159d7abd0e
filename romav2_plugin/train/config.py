"""Training configuration: frozen dataclasses read from TOML, unknown keys rejected (each error names the key).

Example (``romav2-train finetune.toml``)::

    out_dir = "runs/finetune"
    seed = 0

    [model]
    architecture = "official"          # or "tiny"
    weights = "romav2.0.1.pt"          # start from these (official layout); omit to start from scratch
    train_backbone = false             # the official DINOv3 backbone stays frozen

    [data]
    size = [448, 448]
    [[data.sources]]
    kind = "megadepth"                 # "homography", "rendered" or "megadepth"
    path = "my_scene/"
    weight = 1.0

    [[stages]]
    name = "refiners"                  # "matcher" (stage 1) or "refiners" (stage 2)
    steps = 2000
    lr = 1e-4
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from romav2_plugin.config import config_from_dict
from romav2_plugin.train.losses import LossConfig

__all__ = ["ModelSection", "DataSource", "DataSection", "StageConfig", "TrainConfig", "load_config"]


@dataclass(frozen=True)
class ModelSection:
    """``architecture``: ``official`` or ``tiny``; ``weights``: an official-layout file (or ``tiny``) to
    start from; ``train_backbone``: also train the backbone in the matcher stage (default: only for a
    model started from scratch)."""

    architecture: str = "official"
    weights: str | None = None
    train_backbone: bool | None = None

    def __post_init__(self) -> None:
        from romav2_plugin.config import ARCHITECTURES

        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"model.architecture: {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}")


@dataclass(frozen=True)
class DataSource:
    """One data set: ``kind`` ``homography`` (``path``: a folder of photos), ``rendered`` (``path``: photos
    used as textures) or ``megadepth`` (``path``: a scene folder); ``weight``: its share of the samples;
    ``exclude``: image file names to leave out (the held-out set). Homography views: rotation up to
    ``max_rotation_deg``, scale in ``scale_range``, translation and corner perturbation up to
    ``max_translation`` / ``max_perspective`` of the size, each view independently. Rendered pairs: cameras
    up to ``max_angle_deg`` apart around the scene."""

    kind: Literal["homography", "rendered", "megadepth"]
    path: tuple[str, ...]
    weight: float = 1.0
    exclude: tuple[str, ...] = ()
    photometric_strength: float = 1.0
    max_rotation_deg: float = 25.0
    scale_range: tuple[float, float] = (0.7, 1.4)
    max_translation: float = 0.15
    max_perspective: float = 0.15
    max_angle_deg: float = 35.0


@dataclass(frozen=True)
class DataSection:
    size: tuple[int, int] = (256, 256)
    sources: tuple[DataSource, ...] = ()
    workers: int = 1

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("data.sources: give at least one [[data.sources]] table")
        if any(s % 16 for s in self.size):
            raise ValueError(f"data.size: {self.size} must be multiples of 16 (the patch size)")


@dataclass(frozen=True)
class StageConfig:
    """One stage: ``matcher`` (the matcher, and the backbone if trained; refiners not run) or ``refiners``
    (fine features + refiners, the matcher frozen and its warp detached). AdamW with linear warm-up then
    cosine decay to ``min_lr_ratio * lr``; gradients clipped to ``grad_clip`` (global norm)."""

    name: Literal["matcher", "refiners"]
    steps: int
    lr: float = 2e-4
    batch_size: int = 8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    bidirectional: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"stages: {self.name}: steps and batch_size must be positive")


@dataclass(frozen=True)
class TrainConfig:
    """``ema_decay``: decay of the exponential moving average of the weights that is exported (the paper's
    remedy for the refiners' sub-pixel bias); ``device``: ``auto`` (CUDA if available), ``cpu``, ``cuda``...
    ``amp``: bf16 autocast, default on CUDA only."""

    out_dir: str
    stages: tuple[StageConfig, ...]
    data: DataSection
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossConfig = field(default_factory=LossConfig)
    seed: int = 0
    ema_decay: float = 0.999
    device: str = "auto"
    amp: bool | None = None
    log_every: int = 10
    checkpoint_every: int = 200
    threads: int | None = None

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages: give at least one [[stages]] table")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a TOML training config; relative paths (data, ``out_dir``, a ``model.weights``
    file) are relative to the file."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        try:
            import tomli as tomllib
        except ImportError:
            raise ImportError("Reading TOML on Python 3.10 needs tomli: pip install tomli") from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Training config {path} not found")
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    for src in raw.get("data", {}).get("sources", []) or []:
        if isinstance(src, dict) and isinstance(src.get("path"), str):
            src["path"] = [src["path"]]
        if isinstance(src, dict) and isinstance(src.get("path"), list):
            src["path"] = [str((path.parent / p).resolve()) if not Path(p).is_absolute() else p for p in src["path"]]
    if isinstance(raw.get("out_dir"), str) and not Path(raw["out_dir"]).is_absolute():
        raw["out_dir"] = str((path.parent / raw["out_dir"]).resolve())
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("weights"), str):
        from romav2_plugin.weights.named import is_named

        w = model["weights"]
        if not is_named(w) and not Path(w).expanduser().is_absolute():
            model["weights"] = str((path.parent / w).resolve())
    return config_from_dict(TrainConfig, raw)
