"""Frozen configuration dataclasses and the named match settings.

Every stage has its own frozen dataclass; :class:`RoMaV2Config` bundles them. Settings (``turbo``,
``fast``, ``base``, ``precise``, ``mega1500``, ...) are the official presets of RoMa v2 2.0.1: they choose
the working resolutions, whether both directions are matched and the overlap threshold. Unknown keys
and unknown setting names raise a :class:`ValueError` that lists the valid choices.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

__all__ = [
    "BackboneConfig",
    "MatcherConfig",
    "RefinerConfig",
    "FineFeaturesConfig",
    "MatchSetting",
    "ARCHITECTURES",
    "get_architecture",
    "tiny_config",
    "config_to_dict",
    "RoMaV2Config",
    "SETTINGS",
    "get_setting",
    "config_from_dict",
    "CARD_RANGES",
    "check_card_ranges",
]


@dataclass(frozen=True)
class BackboneConfig:
    """DINOv3 ViT/16 coarse descriptor (timm ``vit_large_patch16_dinov3_qkvb`` with these dimensions).

    ``depth`` is the number of blocks of the checkpoint; only blocks up to ``max(layers)`` are built,
    their outputs are normed and returned as ``(B, H/16, W/16, embed_dim)`` maps. The official model
    is ViT-L (1024 wide, 24 blocks, 16 heads) and frozen; smaller widths/depths (``romav2-tiny``) use
    the same timm architecture and are trained.
    """

    timm_name: str = "vit_large_patch16_dinov3_qkvb"
    layers: tuple[int, ...] = (11, 17)
    patch_size: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16

    def __post_init__(self) -> None:
        if not self.layers or max(self.layers) >= self.depth or min(self.layers) < 0:
            raise ValueError(f"BackboneConfig.layers {self.layers} must index blocks 0..{self.depth - 1}")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(
                f"BackboneConfig: embed_dim {self.embed_dim} must split into {self.num_heads} heads of a "
                "size divisible by 4 (RoPE)"
            )


@dataclass(frozen=True)
class MatcherConfig:
    """Multi-view ViT-B matcher, attention matching and DPT head."""

    feat_dim: int = 1024
    num_feature_layers: int = 2
    vit_dim: int = 768
    vit_depth: int = 12
    vit_heads: int = 12
    vit_mlp_ratio: float = 4.0
    rope_base: float = 100.0
    out_dim: int = 1024  # == pos_emb_dim
    temperature: float = 0.1
    scale: int = 1
    dpt_features: int = 256
    dpt_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    dpt_down_ratio: int = 4
    warp_dim: int = 2
    confidence_dim: int = 1


@dataclass(frozen=True)
class RefinerConfig:
    """One ConvRefiner (official ``roma-4-pow2`` layout)."""

    stride: int
    feat_dim: int
    proj_dim: int
    displacement_emb_dim: int
    local_corr_radius: int | None
    kernel_size: int = 5
    hidden_blocks: int = 8
    warp_dim: int = 2
    confidence_dim: int = 4
    refine_init: float = 4.0
    bn_momentum: float = 0.01

    @property
    def hidden_dim(self) -> int:
        corr = 0 if self.local_corr_radius is None else (2 * self.local_corr_radius + 1) ** 2
        return 2 * self.proj_dim + self.displacement_emb_dim + corr


def _default_refiners() -> tuple[RefinerConfig, ...]:
    return (
        RefinerConfig(stride=4, feat_dim=256, proj_dim=192, displacement_emb_dim=79, local_corr_radius=3),
        RefinerConfig(stride=2, feat_dim=128, proj_dim=48, displacement_emb_dim=23, local_corr_radius=1),
        RefinerConfig(stride=1, feat_dim=64, proj_dim=12, displacement_emb_dim=8, local_corr_radius=None),
    )


@dataclass(frozen=True)
class FineFeaturesConfig:
    """VGG19-BN trunk up to stride 4: ``channels`` at strides 1, 2 and 4 (official: 64, 128, 256)."""

    channels: tuple[int, int, int] = (64, 128, 256)

    def __post_init__(self) -> None:
        if len(self.channels) != 3 or min(self.channels) < 1:
            raise ValueError(f"FineFeaturesConfig.channels must be 3 positive widths, got {self.channels}")

    def channels_at(self, stride: int) -> int:
        return dict(zip((1, 2, 4), self.channels))[stride]


@dataclass(frozen=True)
class MatchSetting:
    """Inference resolution and sampling options of one named setting.

    Attributes:
        H_lr, W_lr: resolution of the coarse (backbone + matcher + first refinement) pass.
        H_hr, W_hr: resolution of the optional second refinement pass (``None``: no second pass).
        bidirectional: also predict the B->A warp.
        threshold: overlaps above it are set to 1 (``None``: keep the sigmoid).
        balanced_sampling: KDE-balanced sampling in :meth:`RoMaV2.sample`.
        half_precision_kde: compute that KDE in half precision, as the official code does (its exact random
            draws); ``False``: in float32, more accurate and several times faster on a CPU
            (:mod:`romav2_plugin.sampling`).
        precise_fraction: :meth:`RoMaV2.sample` draws only from this fraction of the grid's candidate
            matches, those with the smallest predicted uncertainty (standard deviation along the least
            certain direction of their predicted precision, :func:`~romav2_plugin.geometry.largest_sigma`);
            ``1.0`` (the official sampler): from all of them.
        grid_kde: approximate the sampling density of the ``4 * num`` candidates on a grid (float32,
            :func:`~romav2_plugin.sampling.kde_density_grid`): ``O(num)`` instead of ``(4 * num)^2`` kernel
            values, within a few percent of the float32 KDE, other random draws than the official sampler;
            ``False`` (every official setting): the full KDE chosen by ``half_precision_kde``.
    """

    H_lr: int
    W_lr: int
    H_hr: int | None = None
    W_hr: int | None = None
    bidirectional: bool = False
    threshold: float | None = None
    balanced_sampling: bool = True
    half_precision_kde: bool = True
    precise_fraction: float = 1.0
    grid_kde: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.precise_fraction <= 1.0:
            raise ValueError(f"MatchSetting.precise_fraction must be in (0, 1], got {self.precise_fraction}")


_BENCH = MatchSetting(800, 800, 1024, 1024, bidirectional=True, threshold=0.05)

#: The official presets of RoMa v2 2.0.1 (read-only), and ``tiny``: romav2-tiny's own (trained at 256x256; a
#: second refinement pass at 384x384 raised precision@3px on validation pairs from the training photographs,
#: benchmarks/results/tiny_settings_study*.md). It has no official draws to reproduce, so its sampling KDE
#: runs in float32 (benchmarks/results/sampling_speed_cpu.md), and it draws only from the 30% of candidates with
#: the smallest predicted uncertainty, which raised precision@3px on those validation pairs without lowering
#: the RANSAC figures (benchmarks/results/tiny_sampling_study*.md); its sampling density is approximated on a
#: grid (``grid_kde``), which keeps sampling a small part of matching (benchmarks/results/sampling_speed_cpu.md);
#: the synthetic held-out figures did not change with it (docs/romav2_tiny.md).
SETTINGS: Mapping[str, MatchSetting] = MappingProxyType(
    {
        "tiny": MatchSetting(256, 256, 384, 384, half_precision_kde=False, precise_fraction=0.3, grid_kde=True),
        "turbo": MatchSetting(320, 320),
        "fast": MatchSetting(512, 512),
        "base": MatchSetting(640, 640),
        "precise": MatchSetting(800, 800, 1280, 1280, bidirectional=True),
        "mega1500": _BENCH,
        "scannet1500": _BENCH,
        "wxbs": _BENCH,
        "satast": _BENCH,
    }
)


def get_setting(name: str) -> MatchSetting:
    """Return the preset called ``name``; raise ``ValueError`` naming the valid ones otherwise."""
    if not isinstance(name, str) or name not in SETTINGS:
        raise ValueError(f"Unknown setting {name!r}. Valid settings: {', '.join(SETTINGS)}.")
    return SETTINGS[name]


@dataclass(frozen=True)
class RoMaV2Config:
    """Whole-model configuration.

    ``anchor_width``/``anchor_height`` scale the refiners' displacement embedding (``W / 512``).
    ``compile`` (default ``False``): ``torch.compile`` the fixed-shape parts of the network (backbone blocks,
    multi-view ViT, DPT head, fine-feature CNN, refiners) when the model is built; compile time on the first
    call per shape. Close to eager, not bit-close: up to 2.7e-3 (normalized) in the warp on the CPU in fp32
    (tests/test_model_compile.py) (:meth:`romav2_plugin.RoMaV2._compile_fixed_shape_parts`).
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    refiners: tuple[RefinerConfig, ...] = field(default_factory=_default_refiners)
    fine_features: FineFeaturesConfig = field(default_factory=FineFeaturesConfig)
    anchor_width: int = 512
    anchor_height: int = 512
    setting: str = "precise"
    compile: bool = False

    def __post_init__(self) -> None:
        get_setting(self.setting)
        if not isinstance(self.compile, bool):
            raise ValueError(f"RoMaV2Config.compile must be True or False, got {self.compile!r}")
        strides = [r.stride for r in self.refiners]
        if strides != sorted(strides, reverse=True):
            raise ValueError(f"Refiners must be ordered coarse to fine, got strides {strides}.")
        if self.matcher.feat_dim != self.backbone.embed_dim:
            raise ValueError(
                f"matcher.feat_dim ({self.matcher.feat_dim}) must equal backbone.embed_dim ({self.backbone.embed_dim})"
            )
        if self.matcher.num_feature_layers != len(self.backbone.layers):
            raise ValueError(
                f"matcher.num_feature_layers ({self.matcher.num_feature_layers}) must equal the number of "
                f"backbone layers ({len(self.backbone.layers)})"
            )
        for r in self.refiners:
            if r.stride not in (1, 2, 4):
                raise ValueError(f"Refiner strides must be 1, 2 or 4 (the fine-feature strides), got {r.stride}")
            want = self.fine_features.channels_at(r.stride)
            if r.feat_dim != want:
                raise ValueError(
                    f"Refiner at stride {r.stride}: feat_dim {r.feat_dim} must equal the fine-feature width "
                    f"there ({want}, fine_features.channels)"
                )


def tiny_config(setting: str = "tiny") -> RoMaV2Config:
    """``romav2-tiny``: the same stages, narrower and shallower (6.4 M parameters).

    Backbone: a 6-block, 192-wide DINOv3-style ViT/16 (trained, not frozen), layers 3 and 5; matcher:
    a 4-block 192-wide multi-view ViT and a 64-feature DPT head; fine features 16/32/64 channels;
    refiners at strides 4/2/1 with local-correlation radii 3 and 1 and 4 hidden blocks each.
    """
    return RoMaV2Config(
        backbone=BackboneConfig(layers=(3, 5), embed_dim=192, depth=6, num_heads=3),
        matcher=MatcherConfig(
            feat_dim=192,
            vit_dim=192,
            vit_depth=4,
            vit_heads=3,
            out_dim=192,
            dpt_features=64,
            dpt_out_channels=(48, 96, 192, 192),
        ),
        refiners=(
            RefinerConfig(stride=4, feat_dim=64, proj_dim=32, displacement_emb_dim=15, local_corr_radius=3,
                          hidden_blocks=4),
            RefinerConfig(stride=2, feat_dim=32, proj_dim=16, displacement_emb_dim=23, local_corr_radius=1,
                          hidden_blocks=4),
            RefinerConfig(stride=1, feat_dim=16, proj_dim=8, displacement_emb_dim=8, local_corr_radius=None,
                          hidden_blocks=4),
        ),
        fine_features=FineFeaturesConfig(channels=(16, 32, 64)),
        setting=setting,
    )


#: Named architectures: ``official`` (RoMa v2 as released) and ``tiny`` (:func:`tiny_config`).
ARCHITECTURES: Mapping[str, Any] = MappingProxyType({"official": RoMaV2Config, "tiny": tiny_config})


def get_architecture(name: str) -> RoMaV2Config:
    """The :class:`RoMaV2Config` of a named architecture (``official`` or ``tiny``)."""
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {name!r}. Valid architectures: {', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[name]()


def config_to_dict(cfg: Any) -> Any:
    """A JSON-able dict of a config dataclass (tuples as lists); inverse of :func:`config_from_dict`."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    return cfg


T = TypeVar("T")


def config_from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "") -> T:
    """Build a frozen config dataclass from a mapping (e.g. parsed TOML/JSON), rejecting unknown keys.

    Nested dataclass fields accept mappings, tuple fields accept lists, and scalar fields are type-checked;
    every error names the offending key (``where`` prefixes it, e.g. ``"train.optim."``). Example::

        config_from_dict(RoMaV2Config, {"setting": "base", "matcher": {"temperature": 0.1}})
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a config dataclass")
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or cls.__name__}: expected a table of keys, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"Unknown {cls.__name__} key(s): {', '.join(where + u for u in unknown)}. "
            f"Valid keys: {', '.join(fields)}."
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, where + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        raise ValueError(f"{where or cls.__name__}: {e}") from None


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else config_from_dict(tp, value, where=key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ValueError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key}: unexpected value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    return value


_INF = math.inf
#: The range of every numeric key of a model card's ``config`` (one table): ``"Class.field": (low, high,
#: low included, high included, why)``; a tuple-valued key applies it to each element; ``None`` where the key
#: is optional means "not set". Values must also be finite. Checked by :func:`check_card_ranges` when a card is
#: read (``--weights FILE`` with ``FILE.json`` beside it, the shipped cards), so that a card with
#: ``"anchor_width": 0`` is refused naming the key instead of dividing by zero in the middle of a match.
CARD_RANGES: dict[str, tuple[float, float, bool, bool, str]] = {
    "BackboneConfig.layers": (0, 1023, True, True, "block indices"),
    "BackboneConfig.patch_size": (16, 16, True, True, "the ViT/16 patch size"),
    "BackboneConfig.embed_dim": (1, 65536, True, True, "channels"),
    "BackboneConfig.depth": (1, 1024, True, True, "blocks"),
    "BackboneConfig.num_heads": (1, 1024, True, True, "attention heads"),
    "MatcherConfig.feat_dim": (1, 65536, True, True, "channels"),
    "MatcherConfig.num_feature_layers": (1, 1024, True, True, "backbone layers fed to the matcher"),
    "MatcherConfig.vit_dim": (1, 65536, True, True, "channels"),
    "MatcherConfig.vit_depth": (1, 1024, True, True, "blocks"),
    "MatcherConfig.vit_heads": (1, 1024, True, True, "attention heads"),
    "MatcherConfig.vit_mlp_ratio": (0, 64, False, True, "the MLP width / vit_dim"),
    "MatcherConfig.rope_base": (0, _INF, False, False, "the RoPE frequency base"),
    "MatcherConfig.out_dim": (1, 65536, True, True, "channels"),
    "MatcherConfig.temperature": (0, _INF, False, False, "the softmax temperature of attention matching"),
    "MatcherConfig.scale": (1, 1024, True, True, "the positional-embedding scale"),
    "MatcherConfig.dpt_features": (1, 65536, True, True, "channels"),
    "MatcherConfig.dpt_out_channels": (1, 65536, True, True, "channels"),
    "MatcherConfig.dpt_down_ratio": (1, 16, True, True, "the DPT head's output stride"),
    "MatcherConfig.warp_dim": (2, 2, True, True, "a 2-D warp"),
    "MatcherConfig.confidence_dim": (1, 1, True, True, "the overlap logit"),
    "RefinerConfig.stride": (1, 4, True, True, "the fine-feature stride: 1, 2 or 4"),
    "RefinerConfig.feat_dim": (1, 65536, True, True, "channels"),
    "RefinerConfig.proj_dim": (1, 65536, True, True, "channels"),
    "RefinerConfig.displacement_emb_dim": (1, 65536, True, True, "channels"),
    "RefinerConfig.local_corr_radius": (0, 64, True, True, "pixels"),
    "RefinerConfig.kernel_size": (1, 63, True, True, "the depthwise convolution's kernel width"),
    "RefinerConfig.hidden_blocks": (0, 1024, True, True, "convolution blocks"),
    "RefinerConfig.warp_dim": (2, 2, True, True, "a 2-D warp"),
    "RefinerConfig.confidence_dim": (4, 4, True, True, "the overlap logit and 3 precision-matrix entries"),
    "RefinerConfig.refine_init": (0, _INF, False, False, "the displacement's divisor"),
    "RefinerConfig.bn_momentum": (0, 1, True, True, "a batch-norm momentum"),
    "FineFeaturesConfig.channels": (1, 65536, True, True, "channels"),
    "RoMaV2Config.anchor_width": (1, 65536, True, True, "pixels: the refiners' displacement scale is W / anchor_width"),
    "RoMaV2Config.anchor_height": (1, 65536, True, True, "pixels: the refiners' displacement scale is H / anchor_height"),
}


def _range_text(lo: float, hi: float, lo_in: bool, hi_in: bool) -> str:
    if lo == hi:
        return f"{lo:g}"
    if hi == _INF:
        return f"{'>=' if lo_in else '>'} {lo:g}"
    return f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def check_ranges(obj: Any, table: dict[str, tuple[float, float, bool, bool, str]], where: str = "") -> None:
    """Raise ``ValueError`` naming the key's path (``refiners[1].kernel_size: must be ...``) for the first
    numeric value of ``obj`` (a config dataclass, walked recursively) outside its entry in ``table``
    (``"Class.field": (low, high, low included, high included, why)``; a tuple value: each element)."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), where + f.name
        items = value if isinstance(value, tuple) else (value,)
        if items and all(dataclasses.is_dataclass(v) for v in items):
            for i, v in enumerate(items):
                check_ranges(v, table, f"{key}[{i}]." if isinstance(value, tuple) else key + ".")
            continue
        spec = table.get(f"{type(obj).__name__}.{f.name}")
        if spec is None or value is None:
            continue
        lo, hi, lo_in, hi_in, why = spec
        for v in items:
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (lo <= v if lo_in else lo < v) and (v <= hi if hi_in else v < hi)
            if not ok:
                raise ValueError(f"{key}: must be {_range_text(lo, hi, lo_in, hi_in)} ({why}), got {value!r}")


def check_card_ranges(cfg: Any) -> None:
    """:func:`check_ranges` of a model config against :data:`CARD_RANGES`."""
    check_ranges(cfg, CARD_RANGES)
