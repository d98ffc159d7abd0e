"""Checkpoint layout, strict loading and cached downloads of the official RoMa v2 weights.

The official checkpoint (``romav2.0.1.pt``) is a flat state dict with four groups of keys:

============================  ===============================================================
official key                  here
============================  ===============================================================
``f.*`` (DINOv3 ViT-L, bf16)  ``f.vit.*`` (timm ``vit_large_patch16_dinov3_qkvb``), converted by
                              ``timm.models.eva.checkpoint_filter_fn``:
                              ``storage_tokens -> reg_token``, ``ls{1,2}.gamma -> gamma_{1,2}``,
                              ``attn.qkv.bias -> attn.q_bias + attn.v_bias`` (the k third must be
                              masked out by ``attn.qkv.bias_mask``, which is checked, then dropped);
                              ``mask_token`` (pre-training only) and ``rope_embed.periods``
                              (recomputed by timm) are checked for shape and dropped;
                              ``blocks.18`` - ``blocks.23`` are validated and dropped (their outputs
                              are never used)
``matcher.*``                 same names
``refiners.{4,2,1}.*``        same names
``refiner_features.layers.*`` same names
============================  ===============================================================

Loading is strict: any missing, unexpected or mis-shaped key raises a :class:`ValueError` that lists
them. Files are read with ``torch.load(..., weights_only=True)``; nothing is ever executed from a
checkpoint and no code is downloaded (no ``torch.hub.load``).
"""

from __future__ import annotations

import os
import re
import urllib.error
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = [
    "OFFICIAL_URL",
    "WEIGHTS_ENV",
    "cache_dir",
    "resolve_weights",
    "load_checkpoint",
    "official_layout",
    "check_layout",
    "official_to_internal",
    "internal_to_official",
]

OFFICIAL_URL = "https://github.com/Parskatt/RoMaV2/releases/download/v2.0.1/romav2.0.1.pt"
WEIGHTS_ENV = "ROMAV2_WEIGHTS"
CACHE_ENV = "ROMAV2_PLUGIN_CACHE"

_BLOCK_RE = re.compile(r"^f\.blocks\.(\d+)\.")


def cache_dir() -> Path:
    """``$ROMAV2_PLUGIN_CACHE`` or ``~/.cache/romav2_plugin``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "romav2_plugin"))


def _offline_message(url: str, target: Path, err: BaseException) -> str:
    return (
        f"Could not download the RoMa v2 weights from {url} ({type(err).__name__}: {err}).\n"
        "This machine appears to be offline or cannot reach that address. Download the file on a machine "
        f"with internet access ({OFFICIAL_URL}) and then do one of:\n"
        "  * pass its path: RoMaV2.from_pretrained(weights='/path/to/romav2.0.1.pt') or --weights PATH;\n"
        f"  * set the environment variable {WEIGHTS_ENV}=/path/to/romav2.0.1.pt;\n"
        f"  * copy it to {target} (the download cache)."
    )


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://", "file://"))


def _download(url: str) -> Path:
    name = Path(url.split("?")[0]).name or "romav2.pt"
    target = cache_dir() / "weights" / name
    if target.is_file():
        return target
    # Reuse a file the official package (torch.hub) has already downloaded.
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / name
    if hub_file.is_file():
        return hub_file
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=True)
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(_offline_message(url, target, e)) from None
    tmp.replace(target)
    return target


def resolve_weights(weights: str | os.PathLike | None) -> Path:
    """Find the checkpoint file.

    ``None``: ``$ROMAV2_WEIGHTS`` if set (a path or URL), else the official release URL. URLs are
    downloaded once into :func:`cache_dir` (``weights/<file name>``); a copy in torch.hub's cache is reused.
    """
    if weights is None:
        weights = os.environ.get(WEIGHTS_ENV) or OFFICIAL_URL
    weights = str(weights)
    if _is_url(weights):
        if weights.startswith("file://"):
            weights = weights[len("file://") :]
        else:
            return _download(weights)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"RoMa v2 weights not found at {path}. Pass the path of romav2.0.1.pt (download: {OFFICIAL_URL}), "
            f"or unset {WEIGHTS_ENV} to use the cached download."
        )
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict with ``weights_only=True`` on the CPU."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt / foreign files
        raise ValueError(
            f"{path} is not a loadable PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"Expected the official RoMa v2 weights (romav2.0.1.pt, {OFFICIAL_URL})."
        ) from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not contain a flat state dict of tensors (got {type(sd).__name__}).")
    return dict(sd)


# --------------------------------------------------------------------------------------------------
# Layout mapping
# --------------------------------------------------------------------------------------------------


def _timm_to_official_backbone_key(k: str) -> list[str]:
    k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
    if k.endswith("attn.q_bias"):
        base = k[: -len("q_bias")]
        return [base + "qkv.bias", base + "qkv.bias_mask"]
    if k.endswith("attn.v_bias"):
        return []
    return [k]


def official_layout(model: torch.nn.Module | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every key of the official checkpoint with its shape and dtype, derived from the code.

    The backbone part comes from a full (24-block) timm DINOv3 ViT-L built on the meta device; the rest
    from ``model`` (a :class:`~romav2_plugin.RoMaV2`) or a meta-device instance of it.
    """
    from romav2_plugin.backbone import _create_timm_vit
    from romav2_plugin.config import BackboneConfig

    layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    with torch.device("meta"):
        full = _create_timm_vit(BackboneConfig())
        if model is None:
            from romav2_plugin.model import RoMaV2

            model = RoMaV2()
    bf16 = torch.bfloat16
    for k, v in full.state_dict().items():
        if k.endswith("k_bias") or "rope" in k:
            continue
        for ok in _timm_to_official_backbone_key(k):
            shape = tuple(v.shape) if not ok.endswith("qkv.bias_mask") and not ok.endswith("qkv.bias") else (3 * v.shape[0],)
            layout["f." + ok] = (shape, bf16)
    layout["f.mask_token"] = ((1, full.embed_dim), bf16)
    head_dim = full.embed_dim // full.blocks[0].attn.num_heads
    layout["f.rope_embed.periods"] = ((head_dim // 4,), bf16)
    for k, v in model.state_dict().items():
        if not k.startswith("f."):
            layout[k] = (tuple(v.shape), v.dtype)
    return layout


def check_layout(sd: Mapping[str, torch.Tensor], layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Raise ``ValueError`` listing missing, unexpected and mis-shaped keys (and integer/float mix-ups)."""
    missing = sorted(set(layout) - set(sd))
    unexpected = sorted(set(sd) - set(layout))
    wrong = []
    for k in sorted(set(sd) & set(layout)):
        shape, dtype = layout[k]
        v = sd[k]
        if tuple(v.shape) != shape:
            wrong.append(f"{k}: checkpoint {tuple(v.shape)}, expected {shape}")
        elif v.is_floating_point() != dtype.is_floating_point:
            wrong.append(f"{k}: checkpoint dtype {v.dtype}, expected {dtype}")
    if missing or unexpected or wrong:

        def fmt(title: str, items: list[str]) -> str:
            if not items:
                return ""
            more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:20]) + more

        raise ValueError(
            "The checkpoint does not have the official RoMa v2 layout (romav2.0.1.pt):"
            + fmt("missing keys", missing)
            + fmt("unexpected keys", unexpected)
            + fmt("mis-shaped keys", wrong)
            + "\nIs this the right file? Official weights: " + OFFICIAL_URL
        )


def official_to_internal(sd: Mapping[str, torch.Tensor], num_backbone_blocks: int) -> dict[str, torch.Tensor]:
    """Map an official-layout state dict (already checked) to this package's module names."""
    from timm.models.eva import checkpoint_filter_fn

    from romav2_plugin.backbone import _create_timm_vit
    from romav2_plugin.config import BackboneConfig

    backbone: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not k.startswith("f."):
            out[k] = v
            continue
        m = _BLOCK_RE.match(k)
        if m and int(m.group(1)) >= num_backbone_blocks:
            continue  # blocks after the last used layer: validated by check_layout, not needed
        if k.endswith("attn.qkv.bias_mask"):
            dim = v.shape[0] // 3
            expected = torch.ones_like(v, dtype=torch.float32)
            expected[dim : 2 * dim] = 0
            if not torch.equal(v.float(), expected):
                raise ValueError(
                    f"{k}: expected the DINOv3 k-bias mask (ones for q and v, zeros for k); this checkpoint "
                    "uses an unmasked key bias, which the timm DINOv3 backbone cannot represent."
                )
        backbone[k[2:]] = v
    with torch.device("meta"):
        target = _create_timm_vit(BackboneConfig(), num_backbone_blocks)
    for k, v in checkpoint_filter_fn(backbone, target).items():
        out["f.vit." + k] = v
    return out


def internal_to_official(
    sd: Mapping[str, torch.Tensor], *, extra_backbone: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_internal` for the keys this package holds.

    ``extra_backbone`` supplies the official-only backbone entries (``f.mask_token``,
    ``f.rope_embed.periods`` and the unused blocks), e.g. to write a complete official-layout file.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not k.startswith("f.vit."):
            out[k] = v
            continue
        tk = k[len("f.vit.") :]
        if tk.endswith("k_bias") or "rope" in tk:
            continue
        if tk.endswith("attn.q_bias"):
            base = tk[: -len("q_bias")]
            vb = sd["f.vit." + base + "v_bias"]
            kb = sd.get("f.vit." + base + "k_bias", torch.zeros_like(v))
            out["f." + base + "qkv.bias"] = torch.cat((v, kb.to(v.dtype), vb))
            mask = torch.ones(3 * v.shape[0], dtype=v.dtype)
            mask[v.shape[0] : 2 * v.shape[0]] = 0
            out["f." + base + "qkv.bias_mask"] = mask
            continue
        if tk.endswith("attn.v_bias"):
            continue
        (ok,) = _timm_to_official_backbone_key(tk)
        out["f." + ok] = v
    if extra_backbone:
        out.update(extra_backbone)
    return out
