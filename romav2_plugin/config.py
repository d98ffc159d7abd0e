"""Frozen configuration dataclasses and the named match settings.

Every stage has its own frozen dataclass; :class:`RoMaV2Config` bundles them. Settings (``turbo``,
``fast``, ``base``, ``precise``, ``mega1500``, ...) are the official presets of RoMa v2 2.0.1: they choose
the working resolutions, whether both directions are matched and the overlap threshold. Unknown keys
and unknown setting names raise a :class:`ValueError` that lists the valid choices.
"""

from __future__ import annotations

import dataclasses
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
    "RoMaV2Config",
    "SETTINGS",
    "get_setting",
    "config_from_dict",
]


@dataclass(frozen=True)
class BackboneConfig:
    """Frozen DINOv3 ViT-L/16 (timm ``vit_large_patch16_dinov3_qkvb``) used as coarse descriptor.

    Only blocks up to ``max(layers)`` are built; their outputs are normed and returned as
    ``(B, H/16, W/16, 1024)`` maps.
    """

    timm_name: str = "vit_large_patch16_dinov3_qkvb"
    layers: tuple[int, ...] = (11, 17)
    patch_size: int = 16
    embed_dim: int = 1024
    num_blocks_in_checkpoint: int = 24


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
    """VGG19-BN trunk up to stride 4 (channels 64, 128, 256 at strides 1, 2, 4)."""

    strides: tuple[int, ...] = (1, 2, 4)


@dataclass(frozen=True)
class MatchSetting:
    """Inference resolution and sampling options of one named setting.

    Attributes:
        H_lr, W_lr: resolution of the coarse (backbone + matcher + first refinement) pass.
        H_hr, W_hr: resolution of the optional second refinement pass (``None``: no second pass).
        bidirectional: also predict the B->A warp.
        threshold: overlaps above it are set to 1 (``None``: keep the sigmoid).
        balanced_sampling: KDE-balanced sampling in :meth:`RoMaV2.sample`.
    """

    H_lr: int
    W_lr: int
    H_hr: int | None = None
    W_hr: int | None = None
    bidirectional: bool = False
    threshold: float | None = None
    balanced_sampling: bool = True


_BENCH = MatchSetting(800, 800, 1024, 1024, bidirectional=True, threshold=0.05)

#: The official presets of RoMa v2 2.0.1 (read-only).
SETTINGS: Mapping[str, MatchSetting] = MappingProxyType(
    {
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
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    refiners: tuple[RefinerConfig, ...] = field(default_factory=_default_refiners)
    fine_features: FineFeaturesConfig = field(default_factory=FineFeaturesConfig)
    anchor_width: int = 512
    anchor_height: int = 512
    setting: str = "precise"

    def __post_init__(self) -> None:
        get_setting(self.setting)
        strides = [r.stride for r in self.refiners]
        if strides != sorted(strides, reverse=True):
            raise ValueError(f"Refiners must be ordered coarse to fine, got strides {strides}.")


T = TypeVar("T")


def config_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build a frozen config dataclass from a mapping, rejecting unknown keys.

    Nested dataclass fields accept mappings too. Example::

        config_from_dict(RoMaV2Config, {"setting": "base", "matcher": {"temperature": 0.1}})
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a config dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"Unknown {cls.__name__} key(s): {', '.join(unknown)}. Valid keys: {', '.join(fields)}."
        )
    kwargs: dict[str, Any] = {}
    defaults = cls()  # type: ignore[call-arg]
    for name, value in data.items():
        current = getattr(defaults, name)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            value = config_from_dict(type(current), value)
        elif name == "refiners" and isinstance(value, (list, tuple)):
            value = tuple(v if isinstance(v, RefinerConfig) else config_from_dict_refiner(v) for v in value)
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict_refiner(data: Mapping[str, Any]) -> RefinerConfig:
    fields = {f.name for f in dataclasses.fields(RefinerConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"Unknown RefinerConfig key(s): {', '.join(unknown)}. Valid keys: {', '.join(fields)}.")
    return RefinerConfig(**data)
