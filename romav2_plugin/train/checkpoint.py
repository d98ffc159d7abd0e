"""Training checkpoints (exact resume) and exported inference weights (official layout + model card).

A training checkpoint holds everything a resumed run needs to continue bit for bit: model, EMA, optimizer
and scheduler states, the stage and step (the data order is a function of the step, see
:mod:`romav2_plugin.train.data`), and the RNG states. It is written atomically: to a temporary file in the
same folder, flushed and fsync'ed, then renamed over the previous one, so a crash mid-write never loses
the last good checkpoint.

Exported weights are a flat state dict in the official RoMa v2 key layout (the same file format as
``romav2.0.1.pt``, loadable by ``RoMaV2.from_pretrained(path)``, the kornia and hloc adapters and the
CLIs), plus a model card ``<stem>.json`` with the architecture (so non-official sizes load by path).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import socket
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from romav2_plugin.config import config_to_dict

__all__ = ["atomic_save", "remove_stale_temporaries", "save_training_state", "load_training_state", "rng_state", "set_rng_state",
           "official_weights", "export_weights", "UnsafeCheckpoint", "DiskFull"]


class DiskFull(OSError):
    """The disk filled up while a file was written; the previous file is kept and no temporary file is left."""


def _is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC/EDQUOT anywhere in ``e``'s chain (torch.save reports a failed write as a RuntimeError whose
    context is the OSError)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


class UnsafeCheckpoint(ValueError):
    """A training checkpoint holding Python objects beyond training state (loading it could run code)."""


def _numpy_globals() -> list:
    """What numpy's RNG state (a uint32 array in a tuple) needs beyond torch's safe types."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _tmp_prefix(path: Path) -> str:
    """``NAME.HOST-PID.``: whose temporary file it is, so that a later run can tell a dead writer's from a
    live one's (:func:`remove_stale_temporaries`)."""
    return f"{path.name}.{socket.gethostname()}-{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists (another user's)
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the ``NAME.HOST-PID.XXXX.tmp`` files in ``folder`` that :func:`atomic_save` of a process of this
    machine left when it was killed (SIGKILL, power loss): those whose process is gone. Files of other
    machines (a shared folder) and of live processes are left alone. Says so on stderr; returns them."""
    pattern = re.compile(rf"\.{re.escape(socket.gethostname())}-(\d+)\.[^.]+\.tmp$")
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.search(p.name)
        if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        if p.is_file() and not p.is_symlink():
            try:
                p.unlink()
            except OSError:
                continue
            removed.append(p)
            print(f"note: removed {p}, left by an interrupted save (process {m.group(1)})", file=sys.stderr, flush=True)
    return removed


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` through a temporary file + fsync + rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; weights are shared files
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError | RuntimeError) and _is_disk_full(e):
            kept = f"the previous {path.name} is kept unchanged" if path.exists() else "nothing was written"
            raise DiskFull(errno.ENOSPC, f"the disk is full: cannot write {path} ({kept}, no temporary file "
                           "left). Free some space") from None
        raise
    return path


def _atomic_write_text(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write a training checkpoint (a dict of state dicts, counters and RNG states) atomically."""
    return atomic_save({"format": "romav2_plugin.train/1", **state, "rng": rng_state()}, path)


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_training_state` (restores nothing by itself)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No training checkpoint at {path} (nothing to resume; run without --resume)")
    try:
        # weights_only: tensors, containers, numbers; plus numpy's RNG state. Nothing else is unpickled, so a
        # file holding a pickled callable is refused before anything in it runs.
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).split("WeightsUnpickler error:", 1)[-1].strip().split("\n")[0].split(". Please")[0]
        raise UnsafeCheckpoint(
            f"{path} holds Python objects that are not training state ({reason.strip() or 'unsupported content'}); "
            "it is refused because loading it could run code. Use a checkpoint written by romav2-train, or "
            "start afresh without --resume (another out_dir)."
        ) from None
    except Exception as e:
        raise ValueError(f"{path} is not a readable training checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != "romav2_plugin.train/1":
        raise ValueError(f"{path} is not a romav2_plugin training checkpoint (format marker missing)")
    return state


def official_weights(model, source: Mapping[str, torch.Tensor] | None = None,
                     state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``model``'s weights (or ``state_dict``, e.g. the EMA's) as a complete official-layout state dict.

    Entries the model does not hold (the official checkpoint's unused backbone blocks, ``mask_token``,
    ``rope_embed.periods``) are taken from ``source`` (the checkpoint training started from) or, when
    there is none, filled with neutral values of the right shape (they are never used for inference).
    Dtypes follow the official layout (bf16 backbone).
    """
    from romav2_plugin.weights.layout import check_layout, internal_to_official, official_layout

    layout = official_layout(model)
    sd = internal_to_official(state_dict if state_dict is not None else model.state_dict())
    for k, (shape, _) in layout.items():
        if k in sd:
            continue
        if source is not None and k in source:
            sd[k] = source[k]
        elif k.endswith("rope_embed.periods"):
            n = shape[0]
            sd[k] = 100.0 ** (2 * torch.arange(n, dtype=torch.float32) / (2 * n))
        else:
            sd[k] = torch.zeros(shape)
    out = {k: sd[k].detach().to("cpu", layout[k][1]).clone() for k in layout}
    if source is not None:
        # the key third of each qkv bias is masked out (bias_mask) and not held by the model: keep the
        # source's values, so an untouched backbone is written back bit for bit
        for k in out:
            if k.endswith("attn.qkv.bias") and k in source and source[k].shape == out[k].shape:
                d = out[k].shape[0] // 3
                out[k][d : 2 * d] = source[k][d : 2 * d].to(out[k].dtype)
    check_layout(out, layout)
    return out


def export_weights(path: str | os.PathLike, model, *, state_dict=None, source=None,
                   card: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write official-layout weights (see :func:`official_weights`) and the model card ``<stem>.json``.

    ``dtype``: store the layout's float32 tensors in this dtype (``torch.float16`` halves a shipped file; the
    bf16 backbone stays bf16); the card then records it as ``storage_dtype`` and ``from_pretrained`` upcasts
    them back (:func:`romav2_plugin.weights.named.upcast_stored`); default: the layout's.
    """
    path = Path(path)
    sd = official_weights(model, source=source, state_dict=state_dict)
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.dtype == torch.float32 else v) for k, v in sd.items()}
    atomic_save(sd, path)
    info = {"config": config_to_dict(model.cfg), **(dict(card) if card else {})}
    if dtype is not None and dtype != torch.float32:
        info["storage_dtype"] = str(dtype).removeprefix("torch.")
    _atomic_write_text(json.dumps(info, indent=2, sort_keys=False) + "\n", path.with_suffix(".json"))
    return path
