"""ONNX export of the RoMa v2 network, checked in ONNX Runtime (other ONNX consumers untried).

The exported graph is the network of :meth:`romav2_plugin.RoMaV2.match` after resizing, at the fixed working
resolution and batch size of one setting, in float32:

* inputs ``image_A``, ``image_B``: ``(B, 3, H_lr, W_lr)`` float32 in ``[0, 1]``, the images resized to the
  setting's low resolution (bicubic, antialiased, as :meth:`~romav2_plugin.RoMaV2.match` does:
  :func:`prepare_inputs` does it); plus ``image_A_hr``, ``image_B_hr`` ``(B, 3, H_hr, W_hr)`` for settings
  with a high-resolution pass (``precise``, ``mega1500``, ...).
* outputs, as in :meth:`~romav2_plugin.RoMaV2.match`: ``warp_AB (B, H, W, 2)`` normalized ``[-1, 1]``
  (A's pixel-centre grid -> B), ``overlap_AB (B, H, W, 1)`` in ``[0, 1]``, ``precision_AB (B, H, W, 2, 2)``,
  and the ``_BA`` ones for bidirectional settings. ``H, W`` is the finest working resolution.

:func:`preds_from_outputs` turns a runtime's outputs back into the dict that
:meth:`~romav2_plugin.RoMaV2.sample`, :meth:`~romav2_plugin.RoMaV2.to_pixel_coordinates` and
:meth:`~romav2_plugin.RoMaV2.match_keypoints` take, so sampling stays in the core.

How: ``torch.onnx.export(dynamo=True)``. Two parts of the eager model are written differently while
exporting, with the same numbers: the refiners' local correlation (a custom op eagerly) uses standard
operators (:func:`romav2_plugin.ops.local_corr.local_corr_reference`), and the matcher's bf16 RoPE is
emulated in float32 with a rounding after every operation (ONNX runtimes have no bf16 ``Sin``).

Needs the ``export`` extra (``pip install "romav2-plugin[export]"``: onnx, onnxscript; onnxruntime to run).
Command line: ``python -m romav2_plugin.export --setting turbo --out romav2_turbo.onnx [--weights PATH]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "EXPORT_HINT",
    "input_names",
    "output_names",
    "prepare_inputs",
    "export_onnx",
    "supported_opsets",
    "check_graph",
    "preds_from_outputs",
    "main",
]

EXPORT_HINT = 'ONNX export needs onnx and onnxscript: pip install "romav2-plugin[export]"'
_DIRECTIONAL = ("warp", "overlap", "precision")


def _require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{EXPORT_HINT} (missing: {', '.join(missing)})")


def _has_hr(model) -> bool:
    return model.H_hr is not None and model.W_hr is not None


def input_names(model) -> list[str]:
    """Graph input names for ``model``'s current setting."""
    return ["image_A", "image_B"] + (["image_A_hr", "image_B_hr"] if _has_hr(model) else [])


def output_names(model) -> list[str]:
    """Graph output names for ``model``'s current setting."""
    dirs = ("AB", "BA") if model.bidirectional else ("AB",)
    return [f"{k}_{d}" for d in dirs for k in _DIRECTIONAL]


def prepare_inputs(model, img_A: Any, img_B: Any) -> dict[str, torch.Tensor]:
    """The exported graph's inputs for two images (or equal batches), resized as :meth:`match` does.

    Args:
        model: the :class:`~romav2_plugin.RoMaV2` (its setting gives the resolutions).
        img_A, img_B: anything :meth:`~romav2_plugin.RoMaV2.match` takes.

    Returns:
        ``{name: (B, 3, h, w) float32 tensor}`` (call ``.numpy()`` for ONNX Runtime).
    """
    from romav2_plugin.io import to_tensor_image

    x_A = to_tensor_image(img_A, name="image A", device="cpu")
    x_B = to_tensor_image(img_B, name="image B", device="cpu")
    if x_A.shape[0] != x_B.shape[0]:
        raise ValueError(f"Batch sizes differ: {x_A.shape[0]} (A) vs {x_B.shape[0]} (B)")
    from romav2_plugin.postprocess import resize_image

    out = {"image_A": resize_image(x_A, model.H_lr, model.W_lr), "image_B": resize_image(x_B, model.H_lr, model.W_lr)}
    if _has_hr(model):
        out["image_A_hr"] = resize_image(x_A, model.H_hr, model.W_hr)
        out["image_B_hr"] = resize_image(x_B, model.H_hr, model.W_hr)
    return out


def preds_from_outputs(model, outputs: Sequence[Any] | Mapping[str, Any]) -> dict[str, torch.Tensor | None]:
    """A runtime's outputs (in :func:`output_names` order, or by name) as a :meth:`match`-style dict."""
    names = output_names(model)
    if not isinstance(outputs, Mapping):
        if len(outputs) != len(names):
            raise ValueError(f"expected {len(names)} outputs {names}, got {len(outputs)}")
        outputs = dict(zip(names, outputs))
    missing = [n for n in names if n not in outputs]
    if missing:
        raise ValueError(f"outputs lack {missing} (the graph was exported for another setting?)")
    preds: dict[str, torch.Tensor | None] = {f"{k}_{d}": None for d in ("AB", "BA") for k in _DIRECTIONAL}
    preds.update({n: torch.as_tensor(outputs[n]) for n in names})
    return preds


class _Graph(nn.Module):
    """``forward(*inputs) -> outputs`` in the order of :func:`input_names` / :func:`output_names`."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from romav2_plugin.postprocess import map_confidence

        m = self.model
        preds = m(*images)
        outs = []
        for d in ("AB", "BA") if m.bidirectional else ("AB",):
            overlap, precision = map_confidence(preds[f"confidence_{d}"], m.threshold)
            outs += [preds[f"warp_{d}"], overlap, precision]
        return tuple(outs)


def supported_opsets() -> tuple[int, int]:
    """``(lowest, highest)`` ONNX opset :func:`export_onnx` accepts: 18 (GridSample and Resize as used here) up
    to the newest that both the installed ``torch.onnx`` exporter and ``onnx`` package know."""
    hi = 23
    try:
        from torch.onnx import _constants

        hi = int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):  # a torch without the table: keep the last known value
        pass
    try:
        import onnx

        hi = min(hi, int(onnx.defs.onnx_opset_version()))
    except ImportError:
        pass
    return 18, hi


def check_graph(path: str | os.PathLike) -> None:
    """Raise ``RuntimeError`` unless the ONNX file at ``path`` (its ``.data`` beside it) passes
    ``onnx.checker`` and loads in an ONNX Runtime ``InferenceSession`` (CPU; skipped, with the other check
    kept, when onnxruntime is not installed). :func:`export_onnx` runs it on the staged file before moving it
    into place, so a graph the runtime refuses is never reported as written."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # onnx raises several types (ValidationError, InferenceError, ...)
        raise RuntimeError(f"the exported graph fails onnx.checker: {str(e).strip().splitlines()[0]}") from None
    try:
        import onnxruntime as ort
    except ImportError:
        return
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only load and resolve
    try:
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"ONNX Runtime cannot load the exported graph: {msg}") from None


def _check_request(path: str | os.PathLike, batch_size: int, opset: int, overwrite: bool) -> tuple[Path, Path]:
    """Validate an export request before any work; returns ``(path, its .data file)``."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    if path.suffix != ".onnx":
        raise ValueError(f"{path}: the output file name must end in .onnx")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    lo, hi = supported_opsets()
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        raise ValueError(
            f"opset must be in [{lo}, {hi}] ({lo}: GridSample and Resize as used here; {hi}: the newest that the "
            f"installed torch.onnx exporter and onnx package write), got {opset!r}"
        )
    existing = [str(p) for p in (path, data) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass overwrite=True (--overwrite) to replace")
    return path, data


def export_onnx(
    model,
    path: str | os.PathLike,
    *,
    batch_size: int = 1,
    opset: int = 18,
    overwrite: bool = False,
) -> Path:
    """Export ``model`` (its current setting, float32) to ``path``, weights in ``path`` + ``.data``.

    Args:
        model: a :class:`~romav2_plugin.RoMaV2` (e.g. ``RoMaV2.from_pretrained(setting="turbo")``). It is put
            in eval mode; ``amp`` is ignored (the graph is float32) and restored afterwards.
        path: output ``.onnx`` file. Both files are written to a temporary folder beside it and moved into
            place at the end, so an interrupted export leaves nothing half written.
        batch_size: the graph's fixed batch size.
        opset: ONNX opset, in :func:`supported_opsets` (18 to the newest the installed exporter writes).
        overwrite: replace existing files; otherwise an existing ``path`` (or its ``.data``) is an error.

    Returns:
        ``path``, once the written graph passed :func:`check_graph` (otherwise ``RuntimeError`` and no file).
    """
    _require_onnx()
    path, data = _check_request(path, batch_size, opset, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)

    device = model.device
    args = tuple(
        torch.rand(batch_size, 3, h, w, device=device)
        for h, w in [(model.H_lr, model.W_lr)] * 2 + ([(model.H_hr, model.W_hr)] * 2 if _has_hr(model) else [])
    )
    was_training, amp = model.training, model.amp
    model.eval()
    model.set_amp(False)  # fp32 graph; a frozen backbone held in bf16 goes back to fp32 until the end
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".romav2-export-") as tmp:
            staged = Path(tmp) / path.name
            with torch.no_grad():
                torch.onnx.export(
                    _Graph(model).eval(),
                    args,
                    str(staged),
                    dynamo=True,
                    opset_version=opset,
                    input_names=input_names(model),
                    output_names=output_names(model),
                    external_data=True,
                    verbose=False,
                )
            staged_data = staged.with_name(staged.name + ".data")
            if not staged_data.exists():
                raise RuntimeError(f"torch.onnx.export wrote no {staged_data.name}")
            check_graph(staged)  # before anything is moved into place: a refused graph leaves no file
            os.replace(staged_data, data)  # the .onnx names its data file by base name: same folder, same name
            os.replace(staged, path)
    finally:
        model.set_amp(amp)
        model.train(was_training)
    return path


def _describe(path: Path) -> str:
    size = sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.exists())
    return f"{path} (+ {path.name}.data), {size / 2**20:.0f} MiB"


def _cli_parser() -> argparse.ArgumentParser:
    from romav2_plugin.app.errors import EXIT_CODES_HELP
    from romav2_plugin.app.weights_option import WEIGHTS_HELP
    from romav2_plugin.config import SETTINGS

    p = argparse.ArgumentParser(
        prog="romav2-export",
        description=(
            "Export the RoMa v2 network of one setting to ONNX: float32, fixed working resolution and batch\n"
            "size. The graph is tested against the eager model in ONNX Runtime; other runtimes have not been\n"
            "tried. Sampling stays in Python: romav2_plugin.export.preds_from_outputs turns the runtime's\n"
            'outputs into what RoMaV2.sample takes. Needs: pip install "romav2-plugin[export]".'
        ),
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="output .onnx file (the weights go to OUT.data next to it)")
    p.add_argument("--setting", default="turbo", choices=sorted(SETTINGS), help="preset (default: turbo)")
    p.add_argument("--weights", default=None, metavar="PATH|URL|tiny", help=WEIGHTS_HELP)
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        metavar="N",
        help="image pairs per run; fixed in the graph (default 1)",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=18,
        metavar="V",
        help=(
            "ONNX opset version, from 18 (GridSample and Resize as used here) to the newest the installed "
            "torch.onnx exporter and onnx package write (23 with torch 2.14); default 18. The written graph is "
            "checked (onnx.checker, an ONNX Runtime session) before it is reported"
        ),
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT and OUT.data if they exist (default: refuse)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``romav2-export`` / ``python -m romav2_plugin.export``; returns the exit code (see ``--help``)."""
    from romav2_plugin.app.errors import (
        EXIT_RUNTIME,
        EXIT_SETUP,
        EXIT_USAGE,
        CommandError,
        check_output,
        is_disk_full,
        run_command,
    )
    from romav2_plugin.app.weights_option import choose_weights, weights_error

    args = _cli_parser().parse_args(argv)

    def body() -> int:
        try:
            _require_onnx()
        except ImportError as e:
            raise CommandError(str(e), EXIT_SETUP) from None
        try:  # before loading the weights
            _check_request(args.out, args.batch_size, args.opset, args.overwrite)
        except (ValueError, FileExistsError) as e:
            raise CommandError(str(e), EXIT_USAGE) from None
        check_output(args.out, 0)
        choice = choose_weights(args.weights)
        from romav2_plugin.model import RoMaV2

        try:
            model = RoMaV2.from_pretrained(choice.spec, setting=args.setting, amp=False)
        except (OSError, ValueError, RuntimeError, IndexError, KeyError, TypeError) as e:
            raise weights_error(e, choice) from None
        try:
            out = export_onnx(model, args.out, batch_size=args.batch_size, opset=args.opset, overwrite=args.overwrite)
        except FileExistsError as e:
            raise CommandError(str(e), EXIT_USAGE) from None
        except (OSError, RuntimeError, ValueError) as e:
            what = f"the disk is full ({e})" if is_disk_full(e) else f"export failed: {e}"
            raise CommandError(what, EXIT_RUNTIME) from None
        print(f"wrote {_describe(out)}")
        print(f"inputs: {', '.join(input_names(model))}; outputs: {', '.join(output_names(model))}")
        return 0

    return run_command("romav2-export", body)


if __name__ == "__main__":
    sys.exit(main())
