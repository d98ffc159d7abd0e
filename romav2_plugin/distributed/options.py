"""``--engine`` and the Ray options, shared by ``romav2-match`` and ``python -m romav2_plugin.hloc``."""

from __future__ import annotations

__all__ = ["add_engine_arguments", "ray_only_options_given", "DEFAULT_BATCH_SIZE", "DEFAULT_CONNECT_TIMEOUT"]

DEFAULT_BATCH_SIZE = 4
#: Seconds to wait for ``--address HOST:PORT`` to accept a connection before giving up (exit 4).
DEFAULT_CONNECT_TIMEOUT = 30.0

#: Options that only mean something with ``--engine ray``: ``(flag, attribute, default)``.
_RAY_ONLY = (
    ("--address", "address", None),
    ("--connect-timeout", "connect_timeout", DEFAULT_CONNECT_TIMEOUT),
    ("--workers", "workers", None),
    ("--gpus-per-worker", "gpus_per_worker", None),
    ("--cpus-per-worker", "cpus_per_worker", None),
    ("--batch-size", "batch_size", DEFAULT_BATCH_SIZE),
)


def ray_only_options_given(args) -> list[str]:
    """The Ray-only options (``--address``, ``--workers``...) set to something other than their default while
    ``--engine`` is not ``ray``: the commands refuse them (exit 2) rather than ignore them silently."""
    if getattr(args, "engine", "local") == "ray":
        return []
    return [flag for flag, attr, default in _RAY_ONLY if getattr(args, attr, default) != default]


def _positive_seconds(text: str) -> float:
    import argparse
    import math

    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return v


def add_engine_arguments(p, *, what: str = "--pairs") -> None:
    """``--engine`` and the Ray options, shared by ``romav2-match`` and ``python -m romav2_plugin.hloc``."""
    g = p.add_argument_group(f'distributed ({what}; needs pip install "romav2-plugin[ray]")')
    g.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: one process (default); ray: Ray workers on this machine or a cluster",
    )
    g.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="Ray cluster: default: start one on this machine; 'auto': join the one 'ray start --head' "
        "started here; HOST:PORT or ray://HOST:10001: a remote one",
    )
    g.add_argument(
        "--connect-timeout", type=_positive_seconds, default=DEFAULT_CONNECT_TIMEOUT, metavar="S",
        help=f"with --address HOST:PORT: give up (exit 4) when nothing accepts a connection there within S "
        f"seconds (default {DEFAULT_CONNECT_TIMEOUT:g})",
    )  # fmt: skip
    g.add_argument(
        "--workers", type=int, default=None, metavar="N", help="workers (default: one per GPU, else per CPU)"
    )
    g.add_argument(
        "--gpus-per-worker", type=float, default=None, metavar="G",
        help="GPUs per worker (default 1 when the cluster has GPUs, else 0; 0.5 puts two workers on a GPU)",
    )  # fmt: skip
    g.add_argument(
        "--cpus-per-worker", type=float, default=None, metavar="C", help="CPUs per worker (default 1)"
    )
    g.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="B",
        help=f"pairs per request to a worker (default {DEFAULT_BATCH_SIZE})",
    )  # fmt: skip
