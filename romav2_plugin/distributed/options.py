"""``--engine`` and the Ray options, shared by ``romav2-match`` and ``python -m romav2_plugin.hloc``."""

from __future__ import annotations

__all__ = ["add_engine_arguments", "DEFAULT_BATCH_SIZE"]

DEFAULT_BATCH_SIZE = 4


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
