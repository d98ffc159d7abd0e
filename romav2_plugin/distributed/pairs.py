"""``romav2-match --pairs ... --engine ray``: the pairs job (:mod:`romav2_plugin.app.pairs`) with its pairs
matched by Ray workers; the driver writes the same HDF5 results file as the single-process path.

The job is the same (validation, results file, resume, writing, summary); only the executor differs:
:class:`RayExecutor` starts one model per worker and hands out batches of pairs (:func:`~.cluster.drive`).
Pairs of a batch are matched one after the other with the single-process code
(:func:`romav2_plugin.app.pairs.match_listed_pair`), so the output is identical bit for bit, given the same
torch thread count: a CPU worker runs ``num_cpus_per_worker`` threads, and torch's CPU kernels round
differently with other thread counts (float32 rounding, about 1e-7 relative, in the same matches); a batch is
the unit of scheduling (pairs are not stacked into one GPU batch, which would change the rounding too).
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from romav2_plugin.app import matching
from romav2_plugin.app.errors import EXIT_RUNTIME, EXIT_SETUP, EXIT_USAGE, CommandError
from romav2_plugin.app.matching import say
from romav2_plugin.app.pairs import PairsJob, PairsRun, match_listed_pair, run_pairs
from romav2_plugin.app.weights_option import WeightsChoice
from romav2_plugin.distributed.cluster import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_IN_FLIGHT,
    Pool,
    connect,
    drive,
    import_ray,
    maybe_die,
    plan_workers,
    set_threads,
    start_actors,
)
from romav2_plugin.distributed.options import DEFAULT_BATCH_SIZE, DEFAULT_CONNECT_TIMEOUT

__all__ = ["RayExecutor", "match_pairs"]


class _PairWorker:
    """One model, many pairs (wrapped by ``ray.remote`` at run time). Never raises from ``__init__``: a set-up
    problem (weights missing on this node, ...) is returned by :meth:`hello` as ``(message, exit code)``."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.count = 0
        self.error: tuple[str, int] | None = None
        self.meta: dict[str, Any] | None = None
        self.device = "?"
        try:
            set_threads(spec["cpus"])
            choice = WeightsChoice(**spec["weights"])
            path = choice.local_path()
            if path is not None and not path.is_file():
                raise CommandError(
                    f"the weights file {path} is not readable on node {socket.gethostname()}: every Ray worker "
                    "loads it from the same path. Put it on a file system every node mounts, or copy it to that "
                    "path on each node.",
                    EXIT_SETUP,
                )
            self.model, device, self.meta = matching.load_matcher(
                choice, spec["setting"], spec["device"], spec["amp"], seed=spec["seed"],
                num_samples=spec["num_samples"], min_overlap=spec["min_overlap"],
            )  # fmt: skip
            self.device = str(device)
        except CommandError as e:
            self.error = (e.message, e.code)
        except Exception as e:  # reported by the driver, with the node's name
            self.error = (f"{type(e).__name__}: {e}", EXIT_RUNTIME)

    def hello(self) -> dict[str, Any]:
        return {
            "error": self.error,
            "meta": self.meta,
            "device": self.device,
            "node": socket.gethostname(),
            "pid": os.getpid(),
        }

    def match(self, batch: Sequence[tuple[str, str]]) -> list[tuple]:
        """``(name A, name B, arrays, pair metadata, None)`` per pair, or ``(A, B, None, None, problem)``."""
        spec = self.spec
        image_dir = Path(spec["image_dir"])
        out = []
        for na, nb in batch:
            self.count += 1
            maybe_die(spec.get("fault"), self.count)
            # the same code and the same failures as romav2-match --pairs in one process
            arrays, pmeta, problem = match_listed_pair(
                self.model, image_dir, na, nb, num_samples=spec["num_samples"], seed=spec["seed"],
                min_overlap=spec["min_overlap"],
            )  # fmt: skip
            out.append((na, nb, arrays, pmeta, problem))
        return out


class _Stop(Exception):
    pass


class RayExecutor:
    """The pairs of a :class:`~romav2_plugin.app.pairs.PairsJob` on Ray workers (see :func:`match_pairs` for
    the options). Importing Ray happens at construction: a missing Ray is refused before anything is read."""

    def __init__(
        self,
        *,
        address: str | None = None,
        num_workers: int | None = None,
        num_gpus_per_worker: float | None = None,
        num_cpus_per_worker: float | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_restarts: int = 3,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        fault: dict[str, Any] | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.ray = import_ray()
        if batch_size <= 0 or max_in_flight <= 0:
            raise CommandError(
                f"--batch-size ({batch_size}) and max_in_flight ({max_in_flight}) must be positive", EXIT_USAGE
            )
        self.address = address
        self.connect_timeout = connect_timeout
        self.num_workers = num_workers
        self.gpus, self.cpus = num_gpus_per_worker, num_cpus_per_worker
        self.batch_size, self.max_in_flight = batch_size, max_in_flight
        self.max_restarts, self.max_attempts = max_restarts, max_attempts
        self.fault = fault
        self.where = "-"
        self.n = 0

    @classmethod
    def from_args(cls, args) -> RayExecutor:
        """The executor of ``romav2-match``'s Ray options (``--address``, ``--workers``, ...)."""
        return cls(
            address=args.address, num_workers=args.workers, num_gpus_per_worker=args.gpus_per_worker,
            num_cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size,
            connect_timeout=getattr(args, "connect_timeout", DEFAULT_CONNECT_TIMEOUT),
        )  # fmt: skip

    def describe(self) -> str:
        return f"Ray, {self.n} worker(s): {self.where}"

    def run(self, job: PairsJob) -> None:
        ray = self.ray
        t0 = time.perf_counter()
        cluster = connect(ray, self.address, connect_timeout=self.connect_timeout)
        pool: Pool | None = None
        try:
            n, gpus, cpus = plan_workers(ray, self.num_workers, self.gpus, self.cpus)
            dev = job.device
            if dev == "auto":
                dev = "cuda" if gpus > 0 else "cpu"
            choice = job.choice
            spec = {
                "weights": {"spec": choice.spec, "source": choice.source, "named": choice.named},
                "setting": job.setting,
                "device": dev,
                "amp": job.amp,
                "seed": int(job.seed),
                "num_samples": int(job.num_samples),
                "min_overlap": float(job.min_overlap),
                "image_dir": str(job.image_dir),
                "cpus": cpus,
                "fault": self.fault,
            }
            actors, hellos = start_actors(ray, _PairWorker, spec, n, gpus, cpus, self.max_restarts)
            pool = Pool(ray, actors, self.max_in_flight, self.max_attempts, self.max_restarts)
            meta = hellos[0]["meta"]
            setting = meta["setting"]
            if dev == "cpu" and setting not in ("turbo", "fast", "tiny"):
                say(f"note: setting '{setting}' on CPU workers takes one to a few minutes per pair.")
            other = {h["meta"]["weights_sha256"] for h in hellos}
            if len(other) > 1:
                raise CommandError(
                    f"the Ray workers loaded different weights (sha256 {', '.join(sorted(other))}): the same "
                    f"--weights path holds different files on different nodes. Make it the same file everywhere.",
                    EXIT_SETUP,
                )
            job.begin(meta)
            devices = Counter(f"{h['device']}@{h['node']}" for h in hellos)
            self.where = ", ".join(f"{k} x{v}" for k, v in sorted(devices.items()))
            self.n = job.run.workers = n
            say(
                f"{n} Ray worker(s) ready in {time.perf_counter() - t0:.1f} s ({setting}, {meta['weights']}; {self.where}); "
                f"batches of {self.batch_size}, at most {self.max_in_flight} per worker in flight"
            )

            def on_results(batch_results: list[tuple]) -> None:
                for na, nb, arrays, pmeta, problem in batch_results:
                    if problem is not None:
                        job.fail(na, nb, problem)
                    elif not job.write(na, nb, arrays, pmeta):
                        raise _Stop

            try:
                drive(
                    pool, job.todo, self.batch_size, lambda actor, batch: actor.match.remote(batch), on_results,
                    lambda pair, why: job.fail(pair[0], pair[1], why), job.warn,
                )  # fmt: skip
            except _Stop:
                pass
        finally:
            if pool is not None:
                pool.kill()
            cluster.close()


def match_pairs(
    pairs: str | os.PathLike | Iterable[tuple[str, str]],
    image_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    weights: str | None = None,
    setting: str | None = None,
    seed: int = 0,
    num_samples: int = 5000,
    min_overlap: float = 0.5,
    overwrite: bool = False,
    device: str = "auto",
    fp32: bool = False,
    address: str | None = None,
    num_workers: int | None = None,
    num_gpus_per_worker: float | None = None,
    num_cpus_per_worker: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    max_restarts: int = 3,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    on_pair_written: Callable[[str, str], None] | None = None,
    progress: bool = True,
    _fault: dict[str, Any] | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> PairsRun:
    """``romav2-match --pairs PAIRS --image-dir IMAGE_DIR --out OUT`` on a Ray cluster: the same results file.

    Args:
        pairs: a pairs file (one ``nameA nameB`` per line) or ``(name A, name B)`` tuples.
        image_dir: folder the names are relative to; every node must see it under this path.
        out: the ``.h5`` results file (a folder: ``FOLDER/results.h5``). Finished pairs in it are skipped
            (``overwrite=True`` redoes them); its options must match (``setting``, ``seed``, ...).
        weights, setting, seed, num_samples, min_overlap, device, fp32: as ``romav2-match``'s options.
        address: ``None`` starts a local cluster; ``"auto"`` joins the one of ``ray start`` on this machine;
            ``"HOST:PORT"`` / ``"ray://HOST:10001"`` a remote one. An already initialised Ray is used as is.
        connect_timeout: seconds ``HOST:PORT`` has to accept a connection before the run gives up (exit 4).
        num_workers: actors (default: as many as the cluster holds: one per GPU, else one per CPU).
        num_gpus_per_worker: default 1 when the cluster has GPUs, else 0 (fractions share a GPU).
        num_cpus_per_worker: default 1 (also the worker's torch threads).
        batch_size: pairs per request to a worker; max_in_flight: requests per worker at once.
        max_restarts: restarts of a worker that died; max_attempts: worker deaths a pair may cause before it
            is reported as failed.
        on_pair_written: called with ``(name A, name B)`` after each pair is written (flushed).

    Returns:
        :class:`~romav2_plugin.app.pairs.PairsRun` (exit code 0, or 3 when some pairs failed; they are in
        ``failures``).

    Raises:
        CommandError: the problem and the fix (``.code`` is the exit code): Ray missing (4), bad input (2),
        weights (4), no worker left (1). KeyboardInterrupt propagates after the workers are stopped; the pairs
        written so far are kept and a rerun resumes.
    """
    executor = RayExecutor(
        address=address, num_workers=num_workers, num_gpus_per_worker=num_gpus_per_worker,
        num_cpus_per_worker=num_cpus_per_worker, batch_size=batch_size, max_in_flight=max_in_flight,
        max_restarts=max_restarts, max_attempts=max_attempts, fault=_fault, connect_timeout=connect_timeout,
    )  # fmt: skip  # at once: Ray missing is refused before anything is read or loaded
    job = PairsJob(
        pairs, Path(image_dir).expanduser().resolve(), Path(out), weights=weights, setting=setting, seed=seed,
        num_samples=num_samples, min_overlap=min_overlap, overwrite=overwrite, device=device, fp32=fp32,
        progress=progress, on_pair_written=on_pair_written,
    )  # fmt: skip
    return run_pairs(job, executor)
