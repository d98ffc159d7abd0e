"""What ``weights=X`` means: named weights shipped inside the package, model cards beside weight files.

:func:`load_weights` is the one answer, used by ``RoMaV2.from_pretrained`` and ``romav2-train``:

* ``None``: ``$ROMAV2_WEIGHTS`` if set (a path or URL), else the official release (downloaded once and
  cached: :mod:`romav2_plugin.weights.download`);
* a name of :data:`NAMED_WEIGHTS` (``"tiny"``): a model shipped inside the package, with its card;
* a local path or a URL: that checkpoint, with the model card beside it if there is one;
* a mapping: an official-layout state dict, used as is.

``RoMaV2.from_pretrained("tiny")`` loads **romav2-tiny**: a small model of the same architecture
(:func:`romav2_plugin.config.tiny_config`) trained by this project on synthetic data
(``romav2_plugin/assets/romav2_tiny.pt``, fp16, upcast at load; its card ``romav2_tiny.json`` records the
config, data, licences, steps, machine and held-out figures). It is a demo model: not the paper's accuracy.

A *model card* is a JSON file next to a weight file with the same stem (``model.pt`` -> ``model.json``)
holding at least ``{"config": {...}}`` (a :class:`~romav2_plugin.config.RoMaV2Config` as a dict);
``romav2-train`` writes one for every exported model, so a fine-tuned small model loads with
``from_pretrained(path)`` alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from romav2_plugin.config import RoMaV2Config, check_card_ranges, config_from_dict
from romav2_plugin.weights.download import resolve_weights
from romav2_plugin.weights.layout import load_checkpoint

__all__ = [
    "NAMED_WEIGHTS",
    "is_named",
    "named_path",
    "load_named",
    "load_weights",
    "read_card",
    "config_from_card",
    "upcast_stored",
]

#: name -> file in ``romav2_plugin/assets`` (the card has the same stem, ``.json``)
NAMED_WEIGHTS = {"tiny": "romav2_tiny.pt"}


def is_named(weights: object) -> bool:
    """Whether ``weights`` names a shipped model (``"tiny"``) rather than a path or URL."""
    return isinstance(weights, str) and weights in NAMED_WEIGHTS


def named_path(name: str) -> Path:
    """Path of a shipped weight file; ``FileNotFoundError`` if this installation lacks it."""
    if not is_named(name):
        raise ValueError(f"Unknown named weights {name!r}. Valid names: {', '.join(NAMED_WEIGHTS)}.")
    path = Path(str(resources.files("romav2_plugin") / "assets" / NAMED_WEIGHTS[name]))
    if not path.is_file():
        raise FileNotFoundError(
            f"The shipped weights {name!r} are missing from this installation ({path}). Reinstall the package "
            "(pip install --force-reinstall romav2-plugin, or pip install . from a clone)."
        )
    return path


def read_card(path: str | os.PathLike) -> dict[str, Any] | None:
    """The model card beside a weight file (same stem, ``.json``), or ``None`` if there is none."""
    card = Path(path).with_suffix(".json")
    if not card.is_file():
        return None
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"Model card {card} is not readable JSON ({e}). Fix or remove it.") from None
    if not isinstance(data, dict):
        raise ValueError(f"Model card {card} must hold a JSON object.")
    return data


def config_from_card(path: str | os.PathLike) -> RoMaV2Config | None:
    """The architecture recorded in the card beside ``path`` (``None``: no card or no ``config``)."""
    card = read_card(path)
    if card is None or "config" not in card:
        return None
    try:
        config = config_from_dict(RoMaV2Config, card["config"])
        check_card_ranges(config)
        return config
    except ValueError as e:
        raise ValueError(f"Model card {Path(path).with_suffix('.json')}: {e}") from None


def upcast_stored(sd: dict[str, torch.Tensor], card: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """Float16 tensors back to float32 (the official layout's dtype) when the card beside their file records
    ``"storage_dtype": "float16"``: a file this project's exporter stored in half precision on purpose
    (``romav2-train``/``Trainer.export(dtype=torch.float16)``). Without that record nothing changes, and the
    layout check still refuses float16 tensors in place of float32 ones (they cannot hold released values)."""
    if not card or card.get("storage_dtype") != "float16":
        return sd
    return _float16_to_float32(sd)


def _float16_to_float32(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.float() if v.dtype == torch.float16 else v) for k, v in sd.items()}


def load_named(name: str) -> tuple[dict[str, torch.Tensor], RoMaV2Config]:
    """State dict (fp16-stored tensors upcast to fp32, the official layout's dtype) and config of a shipped model."""
    path = named_path(name)
    config = config_from_card(path)
    if config is None:
        raise ValueError(f"The shipped weights {name!r} have no model card with a config ({path.with_suffix('.json')}).")
    sd = load_checkpoint(path)
    return _float16_to_float32(sd), config  # unconditionally: cards shipped before storage_dtype lack it


def load_weights(
    weights: str | os.PathLike | Mapping[str, torch.Tensor] | None,
) -> tuple[dict[str, torch.Tensor], RoMaV2Config | None]:
    """The official-layout state dict that ``weights`` names, and the architecture recorded with it (the
    config of a named model or of the card beside the file; ``None`` when nothing records one). See the
    module docstring for what each kind of ``weights`` means."""
    if isinstance(weights, Mapping):
        return dict(weights), None
    if is_named(weights):
        return load_named(str(weights))
    path = resolve_weights(weights)
    return upcast_stored(load_checkpoint(path), read_card(path)), config_from_card(path)
