"""The official checkpoint layout, and strict loading of a checkpoint file.

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
them; so do non-finite values and floating dtypes that cannot hold the released values
(:func:`check_values`). Files are read with ``torch.load(..., weights_only=True)``; nothing is ever
executed from a checkpoint and no code is downloaded (no ``torch.hub.load``). Finding and downloading the
file: :mod:`romav2_plugin.weights.download`. This module imports nothing from the model at import time.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from romav2_plugin.cache import cache_dir

__all__ = [
    "OFFICIAL_URL",
    "CheckpointDtypeWarning",
    "read_state_dict",
    "load_checkpoint",
    "official_layout",
    "check_layout",
    "check_values",
    "official_to_internal",
    "internal_to_official",
]

OFFICIAL_URL = "https://github.com/Parskatt/RoMaV2/releases/download/v2.0.1/romav2.0.1.pt"

_BLOCK_RE = re.compile(r"^f\.blocks\.(\d+)\.")
ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO2 = b"\x80\x02"  # torch's legacy (non-zip) format starts with a protocol-2 pickle


class CheckpointDtypeWarning(UserWarning):
    """A checkpoint holds tensors in another floating dtype than the official layout (accepted)."""


# --------------------------------------------------------------------------------------------------
# Reading a checkpoint
# --------------------------------------------------------------------------------------------------

# sentences of torch's messages that advise unsafe loading (weights_only=False, allow-listing globals)
_UNSAFE_ADVICE = re.compile(r"weights_only|safe_globals|trust|arbitrary code|file an issue", re.IGNORECASE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _describe_load_error(path: Path, err: BaseException) -> str:
    """Why ``torch.load`` failed, in one line, without torch's advice to load unsafely."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    if size == 0:
        return "the file is empty (0 bytes)"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return f"it is an HTML/XML page, not a checkpoint ({size} bytes, starting {head[:60]!r})"
    if head[:4] == ZIP_MAGIC and "central directory" in str(err):
        return f"the file is cut off or corrupted ({size} bytes; the zip archive has no end)"
    if head[:4] != ZIP_MAGIC and head[:2] != _PICKLE_PROTO2:
        return f"it is not a PyTorch checkpoint file ({size} bytes, starting {head[:16]!r})"
    msg = _ANSI.sub("", str(err))
    if "WeightsUnpickler error:" in msg:  # keep torch's reason, drop its advice
        reason = msg.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0].split(". Please")[0]
        reason = " ".join(reason.split())
        return (
            f"it holds Python objects other than tensors ({reason or 'unsupported pickle content'}); such files "
            "are refused because loading them could run code"
        )
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    first = ""
    if lines:
        sentences = re.split(r"(?<=\.)\s+", lines[0])
        first = " ".join(s for s in sentences if not _UNSAFE_ADVICE.search(s)).strip()
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _in_cache(path: Path) -> bool:
    try:
        p = path.resolve()
        roots = (cache_dir().resolve(), (Path(torch.hub.get_dir()) / "checkpoints").resolve())
    except OSError:
        return False
    return any(p.is_relative_to(r) for r in roots)


def read_state_dict(path: Path, *, mmap: bool | None = None) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` on the CPU; a flat dict of tensors or ``ValueError`` with the reason."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several types for corrupt / foreign files
        raise ValueError(_describe_load_error(path, e)) from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"it does not contain a flat state dict of tensors (got {type(sd).__name__})")
    if not sd:
        raise ValueError("it holds an empty state dict")
    return dict(sd)


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict with ``weights_only=True`` on the CPU.

    A file that is not a flat state dict of tensors raises ``ValueError`` naming the file and the reason;
    for a cached download it says to delete the file (the next run downloads it again).
    """
    path = Path(path)
    try:
        return read_state_dict(path)
    except ValueError as e:
        if _in_cache(path):
            fix = f"It is a cached download: delete {path} and run again to download it afresh."
        else:
            fix = f"Expected the official RoMa v2 weights (romav2.0.1.pt, {OFFICIAL_URL})."
        reason = str(e).rstrip(". ")
        end = "" if reason.endswith(("?", "!")) else "."
        raise ValueError(f"{path} is not a loadable PyTorch checkpoint: {reason}{end} {fix}") from None


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


def _stage_state(cfg) -> dict[str, torch.Tensor]:
    """State of the non-backbone stages of an architecture, built on the meta device (no model import)."""
    from romav2_plugin.nn.fine_features import FineFeatures
    from romav2_plugin.nn.matcher import Matcher
    from romav2_plugin.nn.refiner import build_refiners

    with torch.device("meta"):
        holder = torch.nn.Module()
        holder.matcher = Matcher(cfg.matcher)
        holder.refiners = build_refiners(cfg.refiners)
        holder.refiner_features = FineFeatures(cfg.fine_features)
    return holder.state_dict()


def official_layout(model=None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every key of the official checkpoint with its shape and dtype, derived from the code.

    ``model``: a :class:`~romav2_plugin.RoMaV2`, a :class:`~romav2_plugin.config.RoMaV2Config`, or ``None``
    (the official architecture). The backbone part comes from the full-depth timm DINOv3 ViT of the backbone
    config (24-block ViT-L for the official model) built on the meta device; the rest from the stages.
    """
    from romav2_plugin.config import RoMaV2Config
    from romav2_plugin.nn.backbone import _create_timm_vit

    cfg = model if isinstance(model, RoMaV2Config) else (model.cfg if model is not None else RoMaV2Config())
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    with torch.device("meta"):
        full = _create_timm_vit(cfg.backbone)
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
    stages = model.state_dict() if isinstance(model, torch.nn.Module) else _stage_state(cfg)
    for k, v in stages.items():
        if not k.startswith("f."):
            layout[k] = (tuple(v.shape), v.dtype)
    return layout


def check_layout(sd: Mapping[str, torch.Tensor], layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Raise ``ValueError`` listing missing, unexpected and mis-shaped keys (and integer/float mix-ups);
    then :func:`check_values` (non-finite weights, floating dtypes)."""
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
    check_values(sd, layout)


# every value of the key dtype is exactly representable in the value dtypes
_HOLDS: dict[torch.dtype, tuple[torch.dtype, ...]] = {
    torch.bfloat16: (torch.float32, torch.float64),
    torch.float16: (torch.float32, torch.float64),
    torch.float32: (torch.float64,),
}
_LIST_MAX = 8


def _few(items: list[str], n: int = _LIST_MAX) -> str:
    more = f", ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_values(sd: Mapping[str, torch.Tensor], layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Refuse non-finite weights and floating dtypes that cannot hold the official values.

    * A floating tensor with a NaN or an infinity raises ``ValueError`` naming the tensors (first few, with
      counts): such a model runs and silently returns no matches.
    * A floating tensor in another dtype than the layout's (the release: bf16 backbone, fp32 elsewhere) is
      accepted when its dtype holds every value of the layout's (fp32 or fp64 for bf16 keys, fp64 for fp32
      keys: e.g. an upcast copy of the release, or a fine-tuned backbone), with one
      :class:`CheckpointDtypeWarning` naming the keys; in a lower or incompatible precision (fp16 anywhere,
      bf16 outside the backbone, float8) it raises ``ValueError`` naming the keys and how to opt in.

    Keys not in ``layout`` are ignored (:func:`check_layout` reports them).
    """
    nonfinite: list[str] = []
    accepted: list[str] = []
    refused: list[str] = []
    for k, v in sd.items():
        if not v.is_floating_point():
            continue
        want = layout[k][1] if k in layout else None
        if want is not None and want.is_floating_point and v.dtype != want:
            item = f"{k} {str(v.dtype).removeprefix('torch.')} (expected {str(want).removeprefix('torch.')})"
            (accepted if v.dtype in _HOLDS.get(want, ()) else refused).append(item)
        # a finite sum proves every element finite (NaN and inf propagate) and is ~30x faster than isfinite
        # on bf16; an overflowing sum only sends the tensor to the exact count
        if v.numel() and not bool(torch.isfinite(v.sum())) and not bool(torch.isfinite(v).all()):
            n_nan = int(torch.isnan(v).sum())
            n_inf = int(torch.isinf(v).sum())
            nonfinite.append(f"{k} ({n_nan} NaN, {n_inf} inf of {v.numel()})")
    if nonfinite:
        raise ValueError(
            f"The checkpoint holds non-finite weights in {len(nonfinite)} tensor(s): {_few(nonfinite)}. The file "
            "is damaged or came from a diverged training run; use another copy of the weights."
        )
    if refused:
        raise ValueError(
            f"{len(refused)} checkpoint tensor(s) are stored in a lower or incompatible precision than the "
            "official layout (bf16 backbone, fp32 elsewhere), so they cannot hold the released values: "
            f"{_few(refused)}. To load such weights anyway, upcast them explicitly: "
            "sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}; "
            "RoMaV2.from_pretrained(sd, ...). (A file that this project's exporter stored in float16 on purpose "
            "records \"storage_dtype\": \"float16\" in the model card beside it and is upcast at load.)"
        )
    if accepted:
        warnings.warn(
            f"{len(accepted)} checkpoint tensor(s) are stored in another floating dtype than the official layout "
            f"and are loaded into the model's dtype: {_few(accepted)}.",
            CheckpointDtypeWarning,
            stacklevel=3,
        )


def official_to_internal(
    sd: Mapping[str, torch.Tensor], num_backbone_blocks: int, backbone_cfg=None
) -> dict[str, torch.Tensor]:
    """Map an official-layout state dict (already checked) to this package's module names.

    ``backbone_cfg``: the model's :class:`~romav2_plugin.config.BackboneConfig` (default: the official one).
    """
    from timm.models.eva import checkpoint_filter_fn

    from romav2_plugin.config import BackboneConfig
    from romav2_plugin.nn.backbone import _create_timm_vit

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
        target = _create_timm_vit(backbone_cfg or BackboneConfig(), num_backbone_blocks)
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
