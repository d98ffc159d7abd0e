"""romav2_plugin.distributed.cluster.connect: the local cluster that ``--engine ray`` starts without
``--address`` listens on loopback only.

Ray's GCS server, raylet, workers and agents used to listen on every interface (``::``, ``0.0.0.0``, the
node's IP), so anyone who could reach the machine could submit code to the cluster while a run lasted. The
slow test starts the cluster through ``connect(ray, None)``, runs a task and an actor on it (so a worker's
server is up too), and lists the listening TCP sockets of every process in this process's tree
(``/proc/net/tcp{,6}`` and ``/proc/PID/fd``): there must be some (Ray's GCS server and raylet at least) and
every one must be on 127.0.0.0/8 or ::1 (an IPv4-mapped ``::ffff:127.x`` counts). It also checks that
``connect`` leaves this process's environment and Ray's constants as it found them.

The fast tests check with a recording stand-in for ``ray`` that the loopback setting applies only to a local
start: a Ray already initialised is reused untouched, and ``--address`` is passed on as before.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import types

import pytest

from romav2_plugin.distributed import cluster as distributed

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _listening_inodes() -> dict[str, tuple[str, int]]:
    """``{socket inode: (ip, port)}`` of the listening TCP sockets in this network namespace."""
    found = {}
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"/proc/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            col = row.split()
            if col[3] != "0A":  # TCP_LISTEN
                continue
            hex_ip, hex_port = col[1].split(":")
            raw = bytes.fromhex(hex_ip)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found[col[9]] = (socket.inet_ntop(family, raw), int(hex_port, 16))
    return found


def _listening_sockets(pids) -> list[tuple[str, int, str, int]]:
    """``(process name, pid, ip, port)`` of every listening TCP socket that one of ``pids`` holds open."""
    inodes = _listening_inodes()
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # the process has ended
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                out.add((name, pid, *inodes[target[8:-1]]))
    return sorted(out)


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def test_is_loopback_reads_the_forms_proc_shows():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("::ffff:127.0.0.1")
    assert not any(_is_loopback(ip) for ip in ("0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2"))


@linux_only
def test_listening_sockets_finds_a_socket_of_this_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert (os.getpid(), "127.0.0.1", port) in {row[1:] for row in _listening_sockets([os.getpid()])}


@linux_only
@pytest.mark.slow  # a local Ray cluster
def test_local_cluster_listens_on_loopback_only():
    import ray  # the [dev] extra has it: without ray this test fails, it does not skip

    if ray.is_initialized():  # a cluster another test left running would be reused, not started
        ray.shutdown()
    env = dict(os.environ)
    enable_cluster = ray._private.ray_constants.ENABLE_RAY_CLUSTER
    before = distributed._children()
    cluster = distributed.connect(ray, None, num_cpus=1)
    try:
        assert cluster.started
        assert ray._private.ray_constants.ENABLE_RAY_CLUSTER == enable_cluster

        @ray.remote
        def pid() -> int:
            return os.getpid()

        @ray.remote
        class Echo:
            def echo(self, x):
                return x

        worker = ray.get(pid.remote())
        assert ray.get(Echo.remote().echo.remote(7)) == 7  # the cluster works on loopback
        tree = distributed._children() - before
        assert worker in tree
        rows = _listening_sockets(tree | {os.getpid()})
        listing = "\n".join(f"  {name} (pid {p}) {ip} port {port}" for name, p, ip, port in rows)
        print(f"listening sockets of the local Ray cluster:\n{listing}")
        names = {name for name, *_ in rows}
        assert {"gcs_server", "raylet"} <= names, listing
        exposed = [row for row in rows if not _is_loopback(row[2])]
        assert not exposed, f"listening beyond loopback:\n{listing}"
    finally:
        cluster.close()
    assert not ray.is_initialized()
    assert dict(os.environ) == env  # no variable left set, changed or removed in this process
    assert ray._private.ray_constants.ENABLE_RAY_CLUSTER == enable_cluster


# ----------------------------------------------------------------------- which starts get loopback
class _RecordingRay(types.SimpleNamespace):
    """Stands in for ``ray``: records each ``init`` call with the node address Ray would pick then (the
    real one takes loopback while ``ray_constants.ENABLE_RAY_CLUSTER`` is false, the outward IP otherwise);
    ``constants=False`` is a Ray without that constant."""

    def __init__(self, initialized: bool = False, constants: bool = True):
        consts = types.SimpleNamespace(**({"ENABLE_RAY_CLUSTER": True} if constants else {}))
        super().__init__(
            _private=types.SimpleNamespace(ray_constants=consts), calls=[], up=initialized, node=None,
            util=types.SimpleNamespace(get_node_ip_address=lambda: self.node), __version__="0.test",
        )  # fmt: skip

    def is_initialized(self) -> bool:
        return self.up

    def init(self, **kwargs) -> None:
        self.node = (
            "192.0.2.2" if getattr(self._private.ray_constants, "ENABLE_RAY_CLUSTER", True) else "127.0.0.1"
        )
        self.calls.append((kwargs, self.node))
        self.up = True

    def shutdown(self) -> None:
        self.up = False


def test_local_start_picks_loopback_and_restores_ray_constants(capsys):
    fake = _RecordingRay()
    env = dict(os.environ)
    cluster = distributed.connect(fake, None, num_cpus=2)
    assert cluster.started and len(fake.calls) == 1
    kwargs, node = fake.calls[0]
    assert node == "127.0.0.1" and kwargs["address"] == "local" and kwargs["num_cpus"] == 2
    assert fake._private.ray_constants.ENABLE_RAY_CLUSTER is True
    assert dict(os.environ) == env and "warning" not in capsys.readouterr().err


def test_ray_without_the_means_starts_with_a_warning_naming_the_fix(capsys):
    fake = _RecordingRay(constants=False)
    cluster = distributed.connect(fake, None)
    assert cluster.started and fake.calls[0][1] == "192.0.2.2"
    err = capsys.readouterr().err
    assert "not on loopback" in err and "192.0.2.2" in err and "RAY_AUTH_MODE=token" in err


def test_close_puts_back_what_ray_init_set_in_the_environment(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    fake = _RecordingRay()
    init = fake.init

    def init_setting_auth(**kwargs):  # what Ray 2.60's ray.init does when it starts a local cluster
        os.environ["RAY_AUTH_MODE"] = "token"
        init(**kwargs)

    fake.init = init_setting_auth
    cluster = distributed.connect(fake, None)
    assert os.environ.get("RAY_AUTH_MODE") == "token"  # the cluster's setting while it runs
    cluster.close()
    assert not fake.up and "RAY_AUTH_MODE" not in os.environ


@pytest.mark.parametrize("address", ["auto", "ray://head.example:10001"])
def test_address_is_the_users_choice_unchanged(address, monkeypatch):
    monkeypatch.setattr(distributed, "_wait_reachable", lambda *a: None)
    fake = _RecordingRay()
    cluster = distributed.connect(fake, address)
    assert cluster.started and fake.calls == [
        ({"include_dashboard": False, "log_to_driver": True, "address": address}, "192.0.2.2")
    ]


def test_initialised_ray_is_reused_untouched():
    fake = _RecordingRay(initialized=True)
    cluster = distributed.connect(fake, None)
    assert not cluster.started and fake.calls == []
    cluster.close()
    assert fake.up  # not ours to shut down
