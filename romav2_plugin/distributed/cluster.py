"""The Ray machinery shared by the executors: joining or starting a cluster, sizing the workers, and the
driver's scheduling with backpressure and retries (:func:`drive`).

Ray actors (one per worker, ``num_gpus_per_worker`` GPUs and ``num_cpus_per_worker`` CPUs each) load the
model once (:func:`start_actors`). The driver hands out batches of ``batch_size`` items, at most
``max_in_flight`` batches per actor (backpressure: the driver never holds more than
``workers * max_in_flight`` batches of results), and is the single writer. A worker that dies (killed, out
of memory, node lost: ``RayActorError``, ``WorkerCrashedError``, ...) is restarted by Ray (``max_restarts``)
and the items of its unfinished batches go back to the queue, one per batch, for whichever worker is free;
an item during which workers died ``max_attempts`` times is given up (a poison pair must not stop the run).
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from romav2_plugin.app.errors import EXIT_RUNTIME, EXIT_SETUP, EXIT_USAGE, CommandError, missing_dependency
from romav2_plugin.distributed.options import DEFAULT_CONNECT_TIMEOUT

__all__ = [
    "import_ray",
    "Cluster",
    "connect",
    "plan_workers",
    "set_threads",
    "maybe_die",
    "Pool",
    "drive",
    "start_actors",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_ATTEMPTS",
]

DEFAULT_MAX_IN_FLIGHT = 2
DEFAULT_MAX_ATTEMPTS = 3
_LOCAL_OBJECT_STORE = 512 << 20  # results are small (about 0.4 MB per pair); keep the local cluster lean


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
class Cluster:
    ray: Any
    started: bool  # we called ray.init (and shut it down at the end)
    # environment variables our ray.init set in this process ({name: value before, None: was unset}); put
    # back after the shutdown (Ray 2.60 sets RAY_AUTH_MODE=token here when it starts a local cluster)
    env_before: dict[str, str | None] = field(default_factory=dict)

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        if self.started and not self.ray.is_initialized():
            _restore_env(self.env_before)
            self.env_before = {}


def _env_changes(before: dict[str, str], after: dict[str, str]) -> dict[str, str | None]:
    """``{name: value in before (None: absent)}`` of the variables that differ between two environments."""
    return {k: before.get(k) for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def _restore_env(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextmanager
def _loopback_node(ray) -> Iterator[bool]:
    """While a new local cluster starts: make Ray pick the loopback address as the node's address, so that
    everything it starts listens on loopback only; yields whether this Ray offers the means.

    Ray (checked in 2.60: ``ray/_private/services.py`` ``get_node_ip_address``, which ``Node`` calls when
    ``ray.init`` starts a cluster) takes 127.0.0.1 (``get_localhost_ip``) as the node address when
    ``ray_constants.ENABLE_RAY_CLUSTER`` is false (the default on macOS/Windows, read from
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when ray is imported), and the node's outward IP otherwise. Given a
    loopback node address, the GCS server, raylet, core workers, dashboard agent, runtime-env agent and the
    metrics exporters all bind to loopback instead of every interface. ``ray.init(_node_ip_address=
    "127.0.0.1")`` does not do it: ``resolve_ip_for_localhost`` turns it back into the outward IP. The
    constant is this process's only (the processes Ray starts get the address on their command lines) and is
    set back as soon as ``ray.init`` returns. Nothing goes into the environment: the processes Ray starts
    bind to loopback without ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` (seen in 2.60).
    """
    consts = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if not isinstance(getattr(consts, "ENABLE_RAY_CLUSTER", None), bool):
        yield False
        return
    saved = consts.ENABLE_RAY_CLUSTER
    consts.ENABLE_RAY_CLUSTER = False
    try:
        yield True
    finally:
        consts.ENABLE_RAY_CLUSTER = saved


def _start_on_loopback(ray, kwargs: dict[str, Any]) -> None:
    """``ray.init(**kwargs)`` of a new local cluster on loopback only (:func:`_loopback_node`); a warning on
    stderr where this Ray offers no way to do so."""
    with _loopback_node(ray):
        ray.init(**kwargs)
    node = _node_address(ray)  # what Ray's services bind to: loopback, or every interface
    if node is None or not _is_loopback(node):
        print(
            f"warning: this Ray ({getattr(ray, '__version__', '?')}) started the local cluster on node address "
            f"{node or '(unknown)'}, not on loopback: its services can be reached from the network while the run "
            "lasts. Run it on a machine no untrusted host can reach, or turn on Ray's token authentication "
            "(RAY_AUTH_MODE=token, Ray 2.52 or newer).",
            file=sys.stderr,
            flush=True,
        )


def _node_address(ray) -> str | None:
    try:
        return str(ray.util.get_node_ip_address())
    except Exception:
        return None


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


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


def connect(
    ray, address: str | None, num_cpus: int | None = None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> Cluster:
    """Join ``address`` (``auto``, ``HOST:PORT``, ``ray://...``), or start a local cluster (``None``).

    Reuses an already initialised Ray (a notebook or a test that called ``ray.init`` itself). A ``HOST:PORT``
    that accepts no TCP connection within ``connect_timeout`` seconds is refused (exit 4) before ``ray.init``.
    A local cluster listens on loopback only (:func:`_loopback_node`): Ray has no authentication unless
    ``RAY_AUTH_MODE=token`` is on, so a cluster other hosts can reach runs their code. Environment variables
    that ``ray.init`` sets in this process are put back by :meth:`Cluster.close`.
    """
    if ray.is_initialized():
        return Cluster(ray, False)
    if address is not None and address not in ("local", "auto"):
        _wait_reachable(address, connect_timeout)
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address is None or address == "local":
        # "local": always a new cluster (a bare ray.init() would join one that 'ray start' left running)
        kwargs.update(address="local", num_cpus=num_cpus, object_store_memory=_LOCAL_OBJECT_STORE)
    else:
        kwargs["address"] = address
    local = kwargs["address"] == "local"
    env = dict(os.environ)
    try:
        for attempt in range(3 if local else 1):
            before = _children()
            try:
                if local:
                    _start_on_loopback(ray, kwargs)
                else:
                    ray.init(**kwargs)
                break
            except ConnectionError as e:
                raise CommandError(
                    f"cannot reach the Ray cluster at --address {address} ({e}). Start it first (ray start --head "
                    "on the head node, ray start --address=HEAD:6379 on the others), check the address, or leave "
                    "--address out to start a local cluster on this machine.",
                    EXIT_SETUP,
                ) from None
            except Exception as e:  # a local start can time out on a busy machine: clean up, try again
                _shutdown_failed_start(ray, before)
                if not local or attempt == 2:
                    raise CommandError(
                        f"cannot start Ray ({type(e).__name__}: {e}). On a busy machine, start the cluster "
                        "yourself (ray start --head) and pass --address auto, or give Ray more time: "
                        "RAY_gcs_server_request_timeout_seconds=300.",
                        EXIT_SETUP,
                    ) from None
    except BaseException:
        _restore_env(_env_changes(env, dict(os.environ)))
        raise
    return Cluster(ray, True, _env_changes(env, dict(os.environ)))


def plan_workers(
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


def set_threads(cpus: float) -> None:
    import torch

    n = max(1, int(cpus))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def maybe_die(fault: dict[str, Any] | None, count: int) -> None:
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


# ------------------------------------------------------------------------------------------ scheduling
@dataclass
class Pool:
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


def drive(
    pool: Pool,
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


def start_actors(
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
