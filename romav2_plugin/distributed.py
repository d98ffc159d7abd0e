"""Scale-out on Ray: many pairs over every GPU (or CPU) of a host or a cluster, into the same files.

Two entry points, both resumable and writing exactly what the single-process paths write:

* :func:`match_pairs`: ``romav2-match --pairs ... --engine ray``: the same HDF5 results file
  (:class:`romav2_plugin.results.ResultsFile`, one group per pair, keyed by name: the file does not depend
  on the order in which pairs finish);
* :func:`hloc_match_dense`: ``python -m romav2_plugin.hloc match_dense ... --engine ray``, a drop-in for
  ``hloc.match_dense.main``: only hloc's dense stage (``hloc.match_dense.match_dense``: read, preprocess,
  match, rescale) runs on the workers; the driver writes each pair's dense predictions exactly as hloc does
  and then runs hloc's own keypoint aggregation and assignment, so the features/matches files are hloc's.

How it runs. Ray actors (one per worker, ``num_gpus_per_worker`` GPUs and ``num_cpus_per_worker`` CPUs each)
load the model once. The driver hands out batches of ``batch_size`` pairs, at most ``max_in_flight``
batches per actor (backpressure: the driver never holds more than ``workers * max_in_flight`` batches of
results), and is the single writer: each pair is written and flushed as soon as its batch comes back.
Pairs of a batch are matched one after the other with the single-process code, so the output is identical
bit for bit, given the same torch thread count: a CPU worker runs ``num_cpus_per_worker`` threads, and torch's
CPU kernels round differently with other thread counts (float32 rounding, about 1e-7 relative, in the same
matches); a batch is the unit of scheduling (pairs are not stacked into one GPU batch, which would change
the rounding too).

Faults. A worker that dies (killed, out of memory, node lost: ``RayActorError``, ``WorkerCrashedError``,
...) is restarted by Ray (``max_restarts``) and the pairs of its unfinished batches go back to the queue,
one pair per batch, for whichever worker is free; a pair during which workers died ``max_attempts`` times
is reported as failed (a poison pair must not stop the run). A pair that fails for its own reasons
(unreadable image, ...) is reported and skipped as in the single-process path. The driver writes each
finished pair before asking for more, so a driver crash loses only the pairs in flight; rerunning the same
command skips the finished pairs (the bookkeeping of :mod:`romav2_plugin.results`; for hloc, a cache of
dense predictions next to the matches file, removed when the run completes).

Where the workers run. ``address=None`` starts a local Ray cluster on this machine (all of its GPUs, or
its CPUs); ``address="auto"`` joins the cluster started with ``ray start --head`` on this machine;
``"HOST:PORT"`` or ``"ray://HOST:10001"`` joins a remote one; when nothing accepts a connection there within
``--connect-timeout`` seconds (default 30; Ray itself would retry for minutes) the run stops with exit 4
naming the address. Every node needs romav2-plugin (and hloc for
:func:`hloc_match_dense`) installed, the images under the same path, and the weights file under the same
path (the default official weights are downloaded once per node into its cache; ``tiny`` ships with the
package).

Ray is optional: ``pip install "romav2-plugin[ray]"``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from romav2_plugin.commands import (
    EXIT_OK,
    EXIT_PAIRS_FAILED,
    EXIT_RUNTIME,
    EXIT_SETUP,
    EXIT_USAGE,
    CommandError,
    interrupt_code,
    missing_dependency,
)
from romav2_plugin.results import one_writer

__all__ = [
    "import_ray",
    "match_pairs",
    "hloc_match_dense",
    "PairsRun",
    "add_engine_arguments",
    "run_pairs_command",
    "hloc_runner",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_IN_FLIGHT",
]

DEFAULT_BATCH_SIZE = 4
DEFAULT_MAX_IN_FLIGHT = 2
DEFAULT_MAX_ATTEMPTS = 3
#: Seconds to wait for ``--address HOST:PORT`` to accept a connection before giving up (exit 4).
DEFAULT_CONNECT_TIMEOUT = 30.0
_LOCAL_OBJECT_STORE = 512 << 20  # results are small (about 0.4 MB per pair); keep the local cluster lean
_HLOC_CACHE_SUFFIX = ".ray-dense.h5"


# ------------------------------------------------------------------------------------------- Ray itself
def import_ray():
    """``import ray``, or a :class:`CommandError` (exit 4) naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise missing_dependency(
            "--engine ray", "Ray", "ray", "run in one process with --engine local (the default)"
        ) from None
    return ray


def _death_errors(ray) -> tuple[type[BaseException], ...]:
    """Ray's exceptions for 'the worker (or its node) went away': the work is retried elsewhere."""
    ex = ray.exceptions
    names = (
        "RayActorError",  # ActorDiedError is a subclass
        "ActorUnavailableError",
        "WorkerCrashedError",
        "NodeDiedError",
        "ObjectLostError",  # OwnerDiedError, ObjectReconstructionFailedError... are subclasses
        "OutOfMemoryError",
        "LocalRayletDiedError",
    )
    return tuple(getattr(ex, n) for n in names if isinstance(getattr(ex, n, None), type))


@dataclass
class _Cluster:
    ray: Any
    started: bool  # we called ray.init (and shut it down at the end)

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


def _children() -> set[int]:
    """Process ids of this process's descendants (Linux /proc; elsewhere none)."""
    parent: dict[int, int] = {}
    try:
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    pass
    except OSError:
        return set()
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, pp in parent.items() if pp in frontier and pid not in found}
        found |= frontier
    return found


def _shutdown_failed_start(ray, before: set[int]) -> None:
    """After a failed ``ray.init``: shut down, and end the processes that start left behind (by their id)."""
    import signal

    try:
        ray.shutdown()
    except Exception:
        pass
    for pid in _children() - before:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``HOST:PORT``, ``[IPv6]:PORT`` or ``ray://HOST:PORT``; ``None`` for anything else
    (``auto``, no port): Ray resolves those itself."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _wait_reachable(address: str, timeout: float) -> None:
    """Raise a :class:`CommandError` (exit 4) naming ``address`` unless a TCP connection to it opens within
    ``timeout`` seconds (retried every half second: a head node may still be starting). Ray's own
    ``ray.init`` retries for minutes when nothing listens; this bounds it (``--connect-timeout``)."""
    import socket
    import time

    hp = _host_port(address)
    if hp is None:
        return
    deadline, last = time.monotonic() + timeout, None
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection(hp, timeout=max(0.1, min(left, 5.0))):
                return
        except OSError as e:
            last = e
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(0.5, left))
    raise CommandError(
        f"cannot reach the Ray cluster at --address {address}: nothing accepted a connection within "
        f"{timeout:g} s ({last}). Start it first (ray start --head on the head node), check the address and "
        "that no firewall blocks it, give it longer (--connect-timeout S), or leave --address out to start a "
        "local cluster on this machine.",
        EXIT_SETUP,
    )


def _connect(ray, address: str | None, num_cpus: int | None = None, connect_timeout: float = 30.0) -> _Cluster:
    """Join ``address`` (``auto``, ``HOST:PORT``, ``ray://...``), or start a local cluster (``None``).

    Reuses an already initialised Ray (a notebook or a test that called ``ray.init`` itself). A ``HOST:PORT``
    that accepts no TCP connection within ``connect_timeout`` seconds is refused (exit 4) before ``ray.init``.
    """
    if ray.is_initialized():
        return _Cluster(ray, False)
    if address is not None and address not in ("local", "auto"):
        _wait_reachable(address, connect_timeout)
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address is None or address == "local":
        # "local": always a new cluster (a bare ray.init() would join one that 'ray start' left running)
        kwargs.update(address="local", num_cpus=num_cpus, object_store_memory=_LOCAL_OBJECT_STORE)
    else:
        kwargs["address"] = address
    local = kwargs["address"] == "local"
    for attempt in range(3 if local else 1):
        before = _children()
        try:
            ray.init(**kwargs)
            break
        except ConnectionError as e:
            raise CommandError(
                f"cannot reach the Ray cluster at --address {address} ({e}). Start it first (ray start --head on "
                "the head node, ray start --address=HEAD:6379 on the others), check the address, or leave "
                "--address out to start a local cluster on this machine.",
                EXIT_SETUP,
            ) from None
        except Exception as e:  # a local start can time out on a busy machine: clean up, try again
            _shutdown_failed_start(ray, before)
            if not local or attempt == 2:
                raise CommandError(
                    f"cannot start Ray ({type(e).__name__}: {e}). On a busy machine, start the cluster yourself "
                    "(ray start --head) and pass --address auto, or give Ray more time: "
                    "RAY_gcs_server_request_timeout_seconds=300.",
                    EXIT_SETUP,
                ) from None
    return _Cluster(ray, True)


def _plan_workers(
    ray, num_workers: int | None, gpus: float | None, cpus: float | None
) -> tuple[int, float, float]:
    """``(workers, GPUs per worker, CPUs per worker)``: defaults fill the cluster (one worker per GPU, else
    one per CPU); a request the cluster cannot hold is refused with what it has."""
    res = ray.cluster_resources()
    n_gpu, n_cpu = float(res.get("GPU", 0)), float(res.get("CPU", 0))
    if gpus is None:
        gpus = 1.0 if n_gpu >= 1 else 0.0
    if cpus is None:
        cpus = 1.0
    if gpus < 0 or cpus < 0 or (gpus == 0 and cpus == 0):
        raise CommandError(
            f"--gpus-per-worker {gpus:g} / --cpus-per-worker {cpus:g}: each worker needs some GPU or CPU",
            EXIT_USAGE,
        )
    if gpus > 0 and n_gpu == 0:
        raise CommandError(
            f"--gpus-per-worker {gpus:g}, but the Ray cluster has no GPU. Use --gpus-per-worker 0 (CPU workers) "
            "or join a cluster with GPUs (--address).",
            EXIT_USAGE,
        )
    fit = min(
        int(n_gpu / gpus + 1e-9) if gpus > 0 else 1 << 30,
        int(n_cpu / cpus + 1e-9) if cpus > 0 else 1 << 30,
    )
    if num_workers is None:
        num_workers = max(1, fit)
    if num_workers <= 0:
        raise CommandError(f"--workers must be positive, got {num_workers}", EXIT_USAGE)
    if num_workers > fit:
        raise CommandError(
            f"{num_workers} workers with {gpus:g} GPU(s) and {cpus:g} CPU(s) each do not fit into the Ray "
            f"cluster ({n_gpu:g} GPUs, {n_cpu:g} CPUs): at most {fit}. Use fewer --workers or smaller "
            "--gpus-per-worker / --cpus-per-worker.",
            EXIT_USAGE,
        )
    return num_workers, float(gpus), float(cpus)


def _actor_options(gpus: float, cpus: float, max_restarts: int) -> dict[str, Any]:
    # task retries are the driver's business (it knows which pairs are finished): max_task_retries=0
    return {"num_gpus": gpus, "num_cpus": cpus, "max_restarts": max_restarts, "max_task_retries": 0}


def _set_threads(cpus: float) -> None:
    import torch

    n = max(1, int(cpus))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _maybe_die(fault: dict[str, Any] | None, count: int) -> None:
    """Test hook: the worker process exits on its ``die_after``-th pair, once (a marker file says it did)."""
    if not fault or count != int(fault["die_after"]):
        return
    marker = Path(fault["marker"])
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


# ------------------------------------------------------------------------------ romav2-match workers
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
            from romav2_plugin import cli
            from romav2_plugin.commands import WeightsChoice

            _set_threads(spec["cpus"])
            choice = WeightsChoice(**spec["weights"])
            path = choice.local_path()
            if path is not None and not path.is_file():
                raise CommandError(
                    f"the weights file {path} is not readable on node {socket.gethostname()}: every Ray worker "
                    "loads it from the same path. Put it on a file system every node mounts, or copy it to that "
                    "path on each node.",
                    EXIT_SETUP,
                )
            device = cli.resolve_device(spec["device"])
            self.model, info = cli.load_model(choice, spec["setting"], device, spec["amp"])
            self.device = str(device)
            self.meta = cli._run_metadata(
                setting=cli._setting_of(self.model, spec["setting"]),
                model=self.model,
                info=info,
                seed=spec["seed"],
                num_samples=spec["num_samples"],
                min_overlap=spec["min_overlap"],
            )
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
        from romav2_plugin import cli

        spec = self.spec
        image_dir = Path(spec["image_dir"])
        out = []
        for na, nb in batch:
            self.count += 1
            _maybe_die(spec.get("fault"), self.count)
            try:  # the same code and the same failures as romav2-match --pairs in one process
                a, b = cli._load(image_dir / na), cli._load(image_dir / nb)
                res = cli.match_pair(
                    self.model,
                    a,
                    b,
                    num_samples=spec["num_samples"],
                    seed=spec["seed"],
                    min_overlap=spec["min_overlap"],
                )
            except CommandError as e:
                out.append((na, nb, None, None, e.message))
                continue
            except Exception as e:
                out.append((na, nb, None, None, f"{type(e).__name__}: {e}"))
                continue
            pmeta = cli._pair_metadata(a, b, na, nb)
            pmeta["time_match_s"] = res.times["match"]
            out.append((na, nb, res.arrays, pmeta, None))
        return out


# ------------------------------------------------------------------------------------------ scheduling
@dataclass
class _Pool:
    """Actors with their in-flight batches; the driver side of backpressure and retries."""

    ray: Any
    actors: list[Any]
    max_in_flight: int
    max_attempts: int
    max_restarts: int
    load: list[int] = field(default_factory=list)
    deaths: list[int] = field(default_factory=list)
    alive: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.actors)
        self.load, self.deaths, self.alive = [0] * n, [0] * n, [True] * n

    def kill(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:
                pass


def _batches(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _drive(
    pool: _Pool,
    todo: Sequence[Any],
    batch_size: int,
    call: Callable[[Any, list[Any]], Any],
    on_results: Callable[[list[tuple]], None],
    on_gave_up: Callable[[Any, str], None],
    warn: Callable[[str], None],
    restart_timeout_s: float = 900.0,
) -> None:
    """Run every item of ``todo`` on the pool: ``call(actor, batch)`` returns an ObjectRef of a list of
    per-item results, handed to ``on_results`` as each batch comes back (the driver writes them there).

    A batch whose worker died goes back to the front of the queue one item per batch; the worker gets no
    work until it answers again (Ray restarts it, ``max_restarts`` times; then it is dropped). An item during
    which workers died ``max_attempts`` times goes to ``on_gave_up``. Raises :class:`CommandError` when no
    worker is left.
    """
    ray = pool.ray
    deaths = _death_errors(ray)
    died_for_good = getattr(ray.exceptions, "ActorDiedError", ())
    queue: deque[list[Any]] = deque(_batches(list(todo), batch_size))
    inflight: dict[Any, tuple[int, list[Any]]] = {}
    probes: dict[Any, tuple[int, float]] = {}  # hello() of a worker that died: (worker, since)
    ready = [True] * len(pool.actors)
    attempts: Counter = Counter()

    def probe(i: int, since: float) -> None:
        probes[pool.actors[i].hello.remote()] = (i, since)

    def drop(i: int, why: str) -> None:
        pool.alive[i] = False
        warn(f"worker {i} is gone for good ({why}); the other workers go on")

    try:
        while queue or inflight:
            for i, actor in enumerate(pool.actors):  # fill each live actor up to max_in_flight batches
                while pool.alive[i] and ready[i] and pool.load[i] < pool.max_in_flight and queue:
                    batch = queue.popleft()
                    inflight[call(actor, batch)] = (i, batch)
                    pool.load[i] += 1
            if not inflight and not probes:
                raise CommandError(
                    f"every Ray worker died too often (more than {pool.max_restarts} restarts each); "
                    f"{sum(len(b) for b in queue)} pair(s) were not run. Check the workers' logs (ray logs; "
                    "out of memory? a node lost?), then rerun the same command: finished pairs are kept.",
                    EXIT_RUNTIME,
                )
            done, _ = ray.wait([*inflight, *probes], num_returns=1)
            ref = done[0]
            if ref in probes:  # a restarted worker answering (or not yet)
                i, since = probes.pop(ref)
                try:
                    h = ray.get(ref)
                except died_for_good as e:
                    drop(i, type(e).__name__)
                    continue
                except deaths:
                    if time.monotonic() - since > restart_timeout_s:
                        drop(i, f"not back after {restart_timeout_s:.0f} s")
                    else:
                        time.sleep(0.5)
                        probe(i, since)
                    continue
                if h["error"] is not None:
                    drop(i, h["error"][0])
                else:
                    ready[i] = True
                continue
            i, batch = inflight.pop(ref)
            pool.load[i] -= 1
            try:
                results = ray.get(ref)
            except deaths as e:
                if ready[i]:  # the first failure of this death: count it, wait for the restart
                    ready[i] = False
                    pool.deaths[i] += 1
                    if pool.deaths[i] > pool.max_restarts:
                        drop(i, f"died {pool.deaths[i]} time(s)")
                    else:
                        probe(i, time.monotonic())
                    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    warn(
                        f"worker {i} died ({type(e).__name__}: {why[:160]}); its unfinished pairs are retried"
                    )
                retry = []
                for item in batch:
                    attempts[_key(item)] += 1
                    if attempts[_key(item)] >= pool.max_attempts:
                        on_gave_up(
                            item,
                            f"a Ray worker died {attempts[_key(item)]} times while matching this pair "
                            "(out of memory? a bad image?); skipped",
                        )
                    else:
                        retry.append([item])
                queue.extendleft(reversed(retry))
                continue
            del ref
            on_results(results)
    finally:
        for ref in inflight:
            try:
                ray.cancel(ref)
            except Exception:
                pass


def _key(item: Any) -> Any:
    return item if isinstance(item, tuple) else tuple(item)[:2]


def _start_actors(
    ray, cls, spec: dict[str, Any], n: int, gpus: float, cpus: float, max_restarts: int
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Start ``n`` actors and wait until each has loaded the model; a set-up error of any of them stops the
    run with that worker's message (the same as the single-process one, plus the node's name)."""
    Actor = ray.remote(cls).options(**_actor_options(gpus, cpus, max_restarts))
    actors = [Actor.remote(spec) for _ in range(n)]
    deaths = _death_errors(ray)
    hellos: list[dict[str, Any]] = []
    for i, a in enumerate(actors):
        for attempt in range(max(1, max_restarts) + 1):
            try:
                h = ray.get(a.hello.remote())
                break
            except deaths as e:
                if attempt >= max_restarts:
                    for b in actors:
                        ray.kill(b, no_restart=True)
                    raise CommandError(
                        f"Ray worker {i} died while loading the model ({type(e).__name__}). Out of memory? "
                        "Use fewer --workers per node or more --cpus-per-worker / --gpus-per-worker.",
                        EXIT_RUNTIME,
                    ) from None
        if h["error"] is not None:
            for b in actors:
                ray.kill(b, no_restart=True)
            msg, code = h["error"]
            raise CommandError(f"{msg} (Ray worker {i} on {h['node']})", code)
        hellos.append(h)
    return actors, hellos


# ------------------------------------------------------------------------------------ romav2-match API
@dataclass
class PairsRun:
    """What :func:`match_pairs` did; ``code`` is the exit code ``romav2-match`` returns for it."""

    out: Path
    n_listed: int
    n_done: int
    n_skipped: int
    failures: list[tuple[str, str, str]]
    code: int
    stopped: str | None = None
    workers: int = 0
    elapsed: float = 0.0  # seconds, cluster start and model loads included
    match_seconds: float = 0.0  # seconds from every worker ready to the last pair written
    summary: str = ""


def _err(msg: str) -> None:
    print(f"romav2-match: {msg}", file=sys.stderr, flush=True)


@one_writer
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
        :class:`PairsRun` (exit code 0, or 3 when some pairs failed; they are in ``failures``).

    Raises:
        CommandError: the problem and the fix (``.code`` is the exit code): Ray missing (4), bad input (2),
        weights (4), no worker left (1). KeyboardInterrupt propagates after the workers are stopped; the pairs
        written so far are kept and a rerun resumes.
    """
    ray = import_ray()  # at once: before anything is read or loaded
    from romav2_plugin import cli
    from romav2_plugin.commands import check_output, choose_weights, human_bytes
    from romav2_plugin.results import ResultsFile, Unreadable, WriteFailed, estimate_pair_bytes, import_h5py
    from romav2_plugin.summary import pairs_summary

    if device != "auto":  # the string here (workers may have devices the driver lacks); availability on them
        from romav2_plugin.runtime import check_device

        try:
            check_device(device, here=False)
        except ValueError as e:
            raise CommandError(f"--device {device}: {e}", EXIT_USAGE) from None
    if batch_size <= 0 or max_in_flight <= 0:
        raise CommandError(
            f"--batch-size ({batch_size}) and max_in_flight ({max_in_flight}) must be positive", EXIT_USAGE
        )
    if isinstance(pairs, str | os.PathLike):
        pair_list = cli.read_pairs(Path(pairs).expanduser())
    else:
        pair_list = list(dict.fromkeys((str(a), str(b)) for a, b in pairs))
        if not pair_list:
            raise CommandError("no pairs given", EXIT_USAGE)
    image_dir = Path(image_dir).expanduser().resolve()
    if not image_dir.is_dir():
        raise CommandError(f"--image-dir {image_dir} is not a folder", EXIT_USAGE)
    out = Path(out).expanduser()
    if out.suffix.lower() == ".npz":
        raise CommandError(
            "--pairs writes HDF5: give --out RESULTS.h5 (or a folder for FOLDER/results.h5)", EXIT_USAGE
        )
    if out.suffix.lower() not in (".h5", ".hdf5"):
        out = out / "results.h5"
    import_h5py()
    choice = choose_weights(weights)
    results = ResultsFile(out)
    per_pair = estimate_pair_bytes(cli.capped_num_samples(num_samples, setting))
    check_output(out, per_pair)
    results.hold_lock()  # one writer per results file (the driver writes it), until this run ends
    attrs: dict[str, Any] = {}
    done: set[tuple[str, str]] = set()
    fmt, damaged = 2, False
    if out.exists():
        try:
            attrs, done, fmt = cli._read_or_repair(results)
        except Unreadable:
            if not overwrite:
                raise
            damaged = True
    early = cli.early_run_options(
        seed=seed, num_samples=num_samples, min_overlap=min_overlap, setting=setting, choice=choice, attrs=attrs
    )  # checked first, also when nothing is left to do
    cli.check_run_options(results, out, attrs, early, damaged=damaged, overwrite=overwrite)
    if overwrite:
        done = set()
    todo = [p for p in pair_list if p not in done]
    skipped = len(pair_list) - len(todo)
    if skipped:
        _err(f"{skipped} of {len(pair_list)} pairs already in {out}: skipped (--overwrite redoes them)")
    run = PairsRun(out, len(pair_list), 0, skipped, [], EXIT_OK)
    if not todo:
        run.summary = f"all {len(pair_list)} pairs already in {out}; nothing to do"
        print(run.summary)
        return run
    try:
        import shutil

        free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
        if free < per_pair * len(todo):
            _err(
                f"note: {len(todo)} pairs need about {human_bytes(per_pair * len(todo))}, {human_bytes(free)} "
                "are free: the run will stop cleanly when the disk is full (finished pairs are kept)."
            )
    except OSError:
        pass
    bad = cli._probe_images(image_dir, todo)  # header-only, on the driver: the image path is shared
    if bad:
        runnable = []
        for na, nb in todo:
            problem = bad.get(na) or bad.get(nb)
            if problem:
                run.failures.append((na, nb, problem))
                _err(f"pair {na} {nb} will be skipped: {problem}")
            else:
                runnable.append((na, nb))
        todo = runnable
    if not todo:
        run.code = EXIT_PAIRS_FAILED
        run.summary = pairs_summary(
            n_listed=len(pair_list), n_done=0, n_skipped=skipped, failures=run.failures, setting=setting or "-",
            device="-", weights=choice.label, weights_sha256="", elapsed=0.0, total_matches=0,
            num_samples=num_samples, n_meaningless=0, out=out, out_exists=out.exists(),
        )  # fmt: skip
        print(run.summary, flush=True)
        return run

    t0 = time.perf_counter()
    cluster = _connect(ray, address, connect_timeout=connect_timeout)
    pool: _Pool | None = None
    try:
        n, gpus, cpus = _plan_workers(ray, num_workers, num_gpus_per_worker, num_cpus_per_worker)
        dev = device
        if dev == "auto":
            dev = "cuda" if gpus > 0 else "cpu"
        spec = {
            "weights": {"spec": choice.spec, "source": choice.source, "named": choice.named},
            "setting": setting,
            "device": dev,
            "amp": False if fp32 else None,
            "seed": int(seed),
            "num_samples": int(num_samples),
            "min_overlap": float(min_overlap),
            "image_dir": str(image_dir),
            "cpus": cpus,
            "fault": _fault,
        }
        actors, hellos = _start_actors(ray, _PairWorker, spec, n, gpus, cpus, max_restarts)
        pool = _Pool(ray, actors, max_in_flight, max_attempts, max_restarts)
        meta = hellos[0]["meta"]
        setting = meta["setting"]
        if dev == "cpu" and setting not in ("turbo", "fast", "tiny"):
            _err(f"note: setting '{setting}' on CPU workers takes one to a few minutes per pair.")
        other = {h["meta"]["weights_sha256"] for h in hellos}
        if len(other) > 1:
            raise CommandError(
                f"the Ray workers loaded different weights (sha256 {', '.join(sorted(other))}): the same "
                f"--weights path holds different files on different nodes. Make it the same file everywhere.",
                EXIT_SETUP,
            )
        cli.prepare_results_file(results, out, attrs, meta, damaged=damaged, fmt=fmt, overwrite=overwrite)
        devices = Counter(f"{h['device']}@{h['node']}" for h in hellos)
        where = ", ".join(f"{k} x{v}" for k, v in sorted(devices.items()))
        _err(
            f"{n} Ray worker(s) ready in {time.perf_counter() - t0:.1f} s ({setting}, {meta['weights']}; {where}); "
            f"batches of {batch_size}, at most {max_in_flight} per worker in flight"
        )
        run.workers = n
        t_ready = time.perf_counter()
        totals = {"matches": 0, "meaningless": 0}
        from tqdm import tqdm

        bar = tqdm(
            total=len(todo), desc="matching", unit="pair", file=sys.stderr, dynamic_ncols=True,
            disable=not progress,
        )  # fmt: skip

        class _Stop(Exception):
            pass

        def on_results(batch_results: list[tuple]) -> None:
            from romav2_plugin.summary import CONFIDENT

            for na, nb, arrays, pmeta, problem in batch_results:
                if problem is not None:
                    run.failures.append((na, nb, problem))
                    tqdm.write(f"romav2-match: pair {na} {nb} failed: {problem}", file=sys.stderr)
                    bar.update(1)
                    continue
                try:
                    results.write_pair(
                        na, nb, arrays, meta, pmeta,
                        saved_note=f"The {skipped + run.n_done} pairs finished before are kept.",
                    )  # fmt: skip
                except WriteFailed as e:  # disk full / I/O error: stop writing to this file at once
                    run.stopped, run.code = e.message, EXIT_RUNTIME
                    raise _Stop from None
                run.n_done += 1
                totals["matches"] += len(arrays["confidence"])
                totals["meaningless"] += int((arrays["confidence"] > CONFIDENT).sum()) == 0
                bar.update(1)
                if on_pair_written is not None:
                    on_pair_written(na, nb)

        def on_gave_up(pair: tuple[str, str], why: str) -> None:
            run.failures.append((pair[0], pair[1], why))
            tqdm.write(f"romav2-match: pair {pair[0]} {pair[1]} failed: {why}", file=sys.stderr)
            bar.update(1)

        try:
            _drive(
                pool, todo, batch_size, lambda actor, batch: actor.match.remote(batch), on_results, on_gave_up,
                lambda m: tqdm.write(f"romav2-match: {m}", file=sys.stderr),
            )  # fmt: skip
        except _Stop:
            pass
        except KeyboardInterrupt:
            bar.close()
            _err(
                f"interrupted; {run.n_done} pairs finished in this run are saved in {out}. "
                "Rerun the same command to resume."
            )
            raise
        bar.close()
        run.elapsed = time.perf_counter() - t0
        run.match_seconds = time.perf_counter() - t_ready
        run.summary = pairs_summary(
            n_listed=len(pair_list), n_done=run.n_done, n_skipped=skipped, failures=run.failures,
            setting=setting, device=f"Ray, {n} worker(s): {where}", weights=meta["weights"],
            weights_sha256=meta["weights_sha256"], elapsed=run.elapsed, total_matches=totals["matches"],
            num_samples=num_samples, n_meaningless=totals["meaningless"], out=out, out_exists=out.exists(),
            stopped=run.stopped,
        )  # fmt: skip
        print(run.summary, flush=True)
        if run.stopped:
            _err(run.stopped)
        elif run.failures:
            run.code = EXIT_PAIRS_FAILED
        return run
    finally:
        if pool is not None:
            pool.kill()
        cluster.close()


def run_pairs_command(args) -> int:
    """``romav2-match --pairs ... --engine ray`` (called by :mod:`romav2_plugin.cli`); returns the exit code."""
    try:
        run = match_pairs(
            args.pairs,
            args.image_dir if args.image_dir else Path(args.pairs).expanduser().parent,
            args.out if args.out is not None else "romav2-match-output",
            weights=args.weights,
            setting=args.setting,
            seed=args.seed,
            num_samples=args.num_samples,
            min_overlap=args.min_overlap,
            overwrite=args.overwrite,
            device=args.device,
            fp32=args.fp32,
            address=args.address,
            connect_timeout=getattr(args, "connect_timeout", DEFAULT_CONNECT_TIMEOUT),
            num_workers=args.workers,
            num_gpus_per_worker=args.gpus_per_worker,
            num_cpus_per_worker=args.cpus_per_worker,
            batch_size=args.batch_size,
        )
    except KeyboardInterrupt as e:
        return interrupt_code(e)
    return run.code


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


# ----------------------------------------------------------------------------------------------- hloc
def hloc_runner(args) -> Callable[..., tuple[Path, Path]]:
    """``python -m romav2_plugin.hloc match_dense ... --engine ray``: :func:`hloc_match_dense` with the command
    line's Ray options, called like :func:`romav2_plugin.hloc.run_match_dense`."""
    import functools

    import_ray()  # at once: before hloc or the model is loaded
    return functools.partial(
        hloc_match_dense,
        address=args.address,
        connect_timeout=getattr(args, "connect_timeout", DEFAULT_CONNECT_TIMEOUT),
        num_workers=args.workers,
        num_gpus_per_worker=args.gpus_per_worker,
        num_cpus_per_worker=args.cpus_per_worker,
        batch_size=args.batch_size,
    )


class _HlocWorker:
    """hloc's dense stage for one pair at a time: ``ImagePairDataset`` preprocessing, the matcher of
    ``conf["model"]``, the optional flip and the rescaling to original pixels, as in
    ``hloc.match_dense.match_dense``; the driver writes the result."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.count = 0
        self.error: tuple[str, int] | None = None
        try:
            import torch

            _set_threads(spec["cpus"])
            from romav2_plugin.adapters.hloc import ensure_registered

            md = ensure_registered()
            from hloc import matchers
            from hloc.utils.base_model import dynamic_load

            self.md = md
            self.device = "cuda" if torch.cuda.is_available() else "cpu"  # hloc's choice
            Model = dynamic_load(matchers, spec["conf"]["model"]["name"])
            self.model = Model(spec["conf"]["model"]).eval().to(self.device)
            self.dataset = md.ImagePairDataset(Path(spec["image_dir"]), spec["conf"]["preprocessing"], [])
        except ImportError as e:
            self.error = (
                f"{e} (on node {socket.gethostname()}: hloc must be installed on every node)",
                EXIT_SETUP,
            )
        except Exception as e:
            from romav2_plugin.commands import is_weights_error

            code = EXIT_SETUP if is_weights_error(e) else EXIT_RUNTIME
            self.error = (f"loading the hloc matcher failed: {type(e).__name__}: {e}", code)

    def hello(self) -> dict[str, Any]:
        return {"error": self.error, "device": getattr(self, "device", "?"), "node": socket.gethostname()}

    def match(self, batch: Sequence[tuple[str, str, bool]]) -> list[tuple]:
        import numpy as np
        import torch
        from hloc.extract_features import read_image

        md, ds = self.md, self.dataset
        out = []
        with torch.no_grad():
            for name0, name1, flip in batch:
                self.count += 1
                _maybe_die(self.spec.get("fault"), self.count)
                image0, scale0 = ds.preprocess(read_image(ds.image_dir / name0, ds.conf.grayscale))
                image1, scale1 = ds.preprocess(read_image(ds.image_dir / name1, ds.conf.grayscale))
                # the DataLoader's collation: a batch dimension; scales round-trip through float64 tensors
                image0, image1 = image0[None].to(self.device), image1[None].to(self.device)
                scale0 = torch.as_tensor(np.asarray(scale0)).numpy()
                scale1 = torch.as_tensor(np.asarray(scale1)).numpy()
                if flip:
                    pred = self.model({"image0": image1, "image1": image0})
                    pred = {**pred, "keypoints0": pred["keypoints1"], "keypoints1": pred["keypoints0"]}
                else:
                    pred = self.model({"image0": image0, "image1": image1})
                kpts0, kpts1 = pred["keypoints0"], pred["keypoints1"]
                kpts0 = md.scale_keypoints(kpts0 + 0.5, scale0) - 0.5
                kpts1 = md.scale_keypoints(kpts1 + 0.5, scale1) - 0.5
                out.append(
                    (
                        name0,
                        name1,
                        flip,
                        kpts0.cpu().numpy(),
                        kpts1.cpu().numpy(),
                        pred["scores"].cpu().numpy(),
                    )
                )
        return out


def _hloc_cache_path(match_path: Path) -> Path:
    p = Path(match_path)
    # romav2_plugin.hloc's staging copy: the cache sits next to the final file
    if p.name.endswith(".partial"):
        p = p.with_name(p.name[: -len(".partial")])
    return p.with_name(p.name + _HLOC_CACHE_SUFFIX)


def _fingerprint(conf: dict[str, Any], image_dir: Path) -> str:
    return json.dumps(
        {"model": conf["model"], "preprocessing": conf["preprocessing"], "image_dir": str(image_dir)},
        sort_keys=True,
        default=str,
    )


def _ray_dense_stage(engine: dict[str, Any]):
    """A replacement for ``hloc.match_dense.match_dense`` (same signature, same file contents) that runs the
    pairs on Ray workers; predictions are also kept in a cache next to the matches file, so that an
    interrupted run resumes without recomputing them."""

    def match_dense(conf, pairs, image_dir, match_path, existing_refs=[]):  # noqa: B006 (hloc's signature)
        import h5py
        from hloc import logger
        from hloc.utils.parsers import names_to_pair

        from romav2_plugin.results import pair_key

        ray = engine["ray"]
        image_dir = Path(image_dir).resolve()
        cache = _hloc_cache_path(Path(match_path))
        fp = _fingerprint(conf, image_dir)
        if cache.exists():
            try:
                with h5py.File(cache, "r") as c:
                    stale = c.attrs.get("fingerprint") != fp
            except OSError:
                stale = True
            if stale:
                cache.unlink()
        if not cache.exists():
            with h5py.File(cache, "w") as c:
                c.attrs["fingerprint"] = fp
        todo = [(n0, n1, n0 in existing_refs) for n0, n1 in pairs]

        def ckey(n0: str, n1: str, flip: bool) -> str:
            return pair_key(n0, n1) + ("%flip" if flip else "")

        with h5py.File(cache, "r") as c:
            cached = [t for t in todo if ckey(*t) in c and c[ckey(*t)].attrs.get("complete", False)]
        cached_set = set(cached)
        run_list = [t for t in todo if t not in cached_set]

        def write(fd, name0, name1, kpts0, kpts1, scores) -> None:  # hloc's writing code
            pair = names_to_pair(name0, name1)
            if pair in fd:
                del fd[pair]
            grp = fd.create_group(pair)
            grp.create_dataset("keypoints0", data=kpts0)
            grp.create_dataset("keypoints1", data=kpts1)
            grp.create_dataset("scores", data=scores)

        logger.info(
            f"Performing dense matching on Ray ({len(run_list)} pairs; {len(cached)} from the cache of an "
            "interrupted run)..."
        )
        with h5py.File(str(match_path), "a") as fd:
            with h5py.File(cache, "r") as c:
                for t in cached:
                    g = c[ckey(*t)]
                    write(fd, t[0], t[1], g["keypoints0"][()], g["keypoints1"][()], g["scores"][()])
            if not run_list:
                return
            spec = {
                "conf": conf,
                "image_dir": str(image_dir),
                "cpus": engine["cpus"],
                "fault": engine.get("fault"),
            }
            actors, _ = _start_actors(
                ray,
                _HlocWorker,
                spec,
                engine["workers"],
                engine["gpus"],
                engine["cpus"],
                engine["max_restarts"],
            )
            pool = _Pool(ray, actors, engine["max_in_flight"], engine["max_attempts"], engine["max_restarts"])
            from tqdm import tqdm

            bar = tqdm(total=len(run_list), smoothing=0.1, file=sys.stderr, disable=not engine["progress"])
            failed: list[tuple[str, str, str]] = []

            def on_results(res: list[tuple]) -> None:
                with h5py.File(cache, "a") as c:  # the cache first: a crash after this loses nothing
                    for name0, name1, flip, k0, k1, s in res:
                        k = ckey(name0, name1, flip)
                        if k in c:
                            del c[k]
                        g = c.create_group(k)
                        g.create_dataset("keypoints0", data=k0)
                        g.create_dataset("keypoints1", data=k1)
                        g.create_dataset("scores", data=s)
                        g.attrs["complete"] = True
                for name0, name1, _flip, k0, k1, s in res:
                    write(fd, name0, name1, k0, k1, s)
                    bar.update(1)
                    if engine.get("on_pair_written") is not None:
                        engine["on_pair_written"](name0, name1)

            try:
                _drive(
                    pool, run_list, engine["batch_size"], lambda a, b: a.match.remote(b), on_results,
                    lambda t, why: failed.append((t[0], t[1], why)),
                    lambda m: tqdm.write(f"romav2_plugin.hloc: {m}", file=sys.stderr),
                )  # fmt: skip
            finally:
                bar.close()
                pool.kill()
            if failed:  # hloc's aggregation needs every pair: stop, keeping the cache for the rerun
                shown = "; ".join(f"{a} {b}: {why}" for a, b, why in failed[:5])
                raise CommandError(
                    f"{len(failed)} pair(s) could not be matched ({shown}). The other pairs are kept in {cache}; "
                    "fix the cause and rerun the same command to resume.",
                    EXIT_RUNTIME,
                )

    return match_dense


@contextmanager
def _patched_dense_stage(match_dense_module, replacement):
    original = match_dense_module.match_dense
    match_dense_module.match_dense = replacement
    try:
        yield
    finally:
        match_dense_module.match_dense = original


def hloc_match_dense(
    conf: dict[str, Any],
    pairs: str | os.PathLike,
    image_dir: str | os.PathLike,
    export_dir: str | os.PathLike | None = None,
    matches: str | os.PathLike | None = None,
    features: str | os.PathLike | None = None,
    features_ref: Path | list[Path] | None = None,
    max_kps: int | None = 8192,
    overwrite: bool = False,
    *,
    address: str | None = None,
    num_workers: int | None = None,
    num_gpus_per_worker: float | None = None,
    num_cpus_per_worker: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    max_restarts: int = 3,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    progress: bool = True,
    on_pair_written: Callable[[str, str], None] | None = None,
    _fault: dict[str, Any] | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> tuple[Path, Path]:
    """``hloc.match_dense.main`` with the dense matching on Ray workers: the same features and matches files.

    The arguments before ``*`` are ``main``'s (plus ``overwrite``); the others as in :func:`match_pairs`.
    Runs :func:`romav2_plugin.hloc.run_match_dense` (input checks; the outputs replaced only when the run
    completes) with hloc's dense stage swapped for the Ray one; hloc's keypoint aggregation and assignment
    run on the driver, unchanged. Works with every dense matcher of hloc, not only RoMa v2's.

    Returns ``(features, matches)``. An interrupted run leaves the outputs as they were and keeps the dense
    predictions made so far in ``<matches>.ray-dense.h5``; rerunning reuses them.
    """
    ray = import_ray()
    from romav2_plugin.adapters.hloc import ensure_registered
    from romav2_plugin.hloc import resolve_outputs, run_match_dense

    md = ensure_registered()
    if batch_size <= 0 or max_in_flight <= 0:
        raise CommandError(f"--batch-size ({batch_size}) must be positive", EXIT_USAGE)
    cluster = _connect(ray, address, connect_timeout=connect_timeout)
    try:
        n, gpus, cpus = _plan_workers(ray, num_workers, num_gpus_per_worker, num_cpus_per_worker)
        engine = {
            "ray": ray, "workers": n, "gpus": gpus, "cpus": cpus, "batch_size": batch_size,
            "max_in_flight": max_in_flight, "max_restarts": max_restarts, "max_attempts": max_attempts,
            "progress": progress, "on_pair_written": on_pair_written, "fault": _fault,
        }  # fmt: skip
        with _patched_dense_stage(md, _ray_dense_stage(engine)):
            result = run_match_dense(
                conf,
                Path(pairs),
                Path(image_dir),
                None if export_dir is None else Path(export_dir),
                None if matches is None else Path(matches),
                features if features is None or isinstance(features, Path) else str(features),
                features_ref=features_ref,
                max_kps=max_kps,
                overwrite=overwrite,
            )
        _, final_matches = resolve_outputs(
            conf, Path(pairs), None if export_dir is None else Path(export_dir),
            None if matches is None else Path(matches),
            features if features is None or isinstance(features, Path) else str(features),
        )  # fmt: skip
        _hloc_cache_path(final_matches).unlink(missing_ok=True)  # the run completed: the cache is spent
        return result
    finally:
        cluster.close()
