"""Weights downloads against a loopback HTTP server that misbehaves on purpose.

Every case is bounded in time (timeouts of a fraction of a second, no back-off) and must leave the cache
exactly as it was: nothing under the final name, no partial file, no empty folders.
"""

from __future__ import annotations

import http.server
import io
import socket
import threading
import time

import pytest
import torch

import romav2_plugin.weights.download as download
import romav2_plugin.weights.layout as layout
from romav2_plugin.weights.download import DownloadError, resolve_weights

READ_T = 0.4  # seconds: the stall cases must fail fast


def _checkpoint_bytes(n: int = 3000) -> bytes:
    buf = io.BytesIO()
    g = torch.Generator().manual_seed(0)
    torch.save({"a": torch.randn(n, generator=g), "b": torch.arange(7)}, buf)
    return buf.getvalue()


GOOD = _checkpoint_bytes()
HTML = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Please log in</body></html>"


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 whose behaviour is chosen by the request path."""

    def __init__(self):
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.release = threading.Event()
        self.counts: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the test output clean
                pass

            def _send(self, status, body, ctype="application/octet-stream", length=None, extra=()):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                for k, v in extra:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def do_GET(self):  # noqa: N802 - http.server API
                path = self.path.split("/")[1]
                rng = self.headers.get("Range")
                server.requests.append((path, rng))
                n = server.counts[path] = server.counts.get(path, 0) + 1
                half = len(GOOD) // 2
                if path == "stall":  # accepts, reads the request, never answers
                    server.release.wait(30)
                elif path == "drip":  # headers, part of the body, then silence
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(GOOD)))
                    self.end_headers()
                    self.wfile.write(GOOD[:half])
                    self.wfile.flush()
                    server.release.wait(30)
                elif path == "cut":  # always cut off mid-body (the connection is closed)
                    self._send(200, GOOD[:half], length=len(GOOD))
                    self.close_connection = True
                elif path in ("resume", "norange"):  # cut once, then complete
                    if n == 1:
                        self._send(200, GOOD[:half], length=len(GOOD), extra=[("Accept-Ranges", "bytes")])
                        self.close_connection = True
                    elif rng and path == "resume":
                        start = int(rng.split("=")[1].rstrip("-"))
                        body = GOOD[start:]
                        cr = f"bytes {start}-{len(GOOD) - 1}/{len(GOOD)}"
                        self._send(206, body, extra=[("Content-Range", cr)])
                    else:  # "norange": ignores Range and sends the whole file again
                        self._send(200, GOOD)
                elif path == "html":
                    self._send(200, HTML, ctype="text/html")
                elif path == "busy":  # 503 once, then the file
                    if n == 1:
                        self._send(503, b"busy", ctype="text/plain")
                    else:
                        self._send(200, GOOD)
                elif path == "good":
                    self._send(200, GOOD)
                else:
                    self._send(404, b"not found", ctype="text/plain")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.block_on_close = False
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, name: str = "romav2.0.1.pt") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}/{name}"

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("ROMAV2_PLUGIN_CACHE", str(root))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no reuse of a real torch.hub copy
    monkeypatch.delenv("ROMAV2_DOWNLOAD_TIMEOUT", raising=False)
    monkeypatch.setattr(download, "CONNECT_TIMEOUT", READ_T)
    monkeypatch.setattr(download, "READ_TIMEOUT", READ_T)
    monkeypatch.setattr(download, "DOWNLOAD_ATTEMPTS", 2)
    monkeypatch.setattr(download, "RETRY_BACKOFF", 0.0)
    return root


def _left_in(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _fails(url, cache, match):
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match=match) as e:
        resolve_weights(url)
    dt = time.monotonic() - t0
    assert _left_in(cache) == [], "a failed download left files in the cache"
    msg = str(e.value)
    assert "Nothing was stored in the cache" in msg or "nothing was stored in the cache" in msg, msg
    assert "--weights PATH" in msg and "ROMAV2_WEIGHTS" in msg, msg
    return dt, msg


def test_server_that_never_answers_fails_in_bounded_time(server, cache):
    dt, msg = _fails(server.url("stall"), cache, "2 attempt")
    assert dt < 2 * READ_T + 2.0, dt
    assert "no answer within" in msg and "ROMAV2_DOWNLOAD_TIMEOUT" in msg
    assert len(server.requests) == 2  # retried once


def test_server_that_stops_mid_body_fails_in_bounded_time(server, cache):
    dt, msg = _fails(server.url("drip"), cache, "cut off after")
    assert dt < 2 * READ_T + 2.0, dt
    assert f"no data for {READ_T:g} s" in msg
    # the retry asked for the rest only
    assert server.requests[1] == ("drip", f"bytes={len(GOOD) // 2}-")


def test_connection_that_cannot_be_opened_fails_in_bounded_time(cache):
    # a listening socket whose backlog is full: the TCP handshake never completes
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=1)
    try:
        dt, msg = _fails(f"http://127.0.0.1:{port}/x/romav2.0.1.pt", cache, "no connection or no answer")
    finally:
        filler.close()
        srv.close()
    assert dt < 2 * READ_T + 2.0, dt


def test_cut_off_download_never_reaches_the_cache(server, cache):
    _, msg = _fails(server.url("cut"), cache, "cut off after")
    assert f"of {len(GOOD)} bytes" in msg


def test_html_page_with_status_200_never_reaches_the_cache(server, cache):
    _, msg = _fails(server.url("html"), cache, "not a RoMa v2 checkpoint")
    assert "HTML" in msg


def test_http_error_is_reported_without_retrying(server, cache):
    _fails(server.url("missing"), cache, "HTTP 404")
    assert len(server.requests) == 1


def test_good_download_is_verified_cached_and_reused(server, cache):
    p = resolve_weights(server.url("good"))
    assert p == cache / "weights" / "romav2.0.1.pt" and p.read_bytes() == GOOD
    assert _left_in(cache) == ["weights", "weights/romav2.0.1.pt"]
    server.close()
    assert resolve_weights(server.url("good")) == p  # the server is gone: served from the cache
    assert set(layout.load_checkpoint(p)) == {"a", "b"}


def test_cut_connection_is_resumed_with_a_range_request(server, cache):
    p = resolve_weights(server.url("resume"))
    assert p.read_bytes() == GOOD
    assert [r for _, r in server.requests] == [None, f"bytes={len(GOOD) // 2}-"]


def test_server_ignoring_range_restarts_from_zero(server, cache):
    p = resolve_weights(server.url("norange"))
    assert p.read_bytes() == GOOD and len(server.requests) == 2


def test_transient_503_is_retried(server, cache):
    assert resolve_weights(server.url("busy")).read_bytes() == GOOD


def test_progress_bar_for_big_files(server, cache, monkeypatch):
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, total, **kw):
            self.total, self.n, self.kw = total, 0, kw
            bars.append(self)

        def update(self, k):
            self.n += k

        def refresh(self):
            pass

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setattr(download, "PROGRESS_MIN_BYTES", len(GOOD))
    resolve_weights(server.url("good"))
    assert len(bars) == 1 and bars[0].total == bars[0].n == len(GOOD) and bars[0].closed
    assert "romav2.0.1.pt" in bars[0].kw["desc"]
    monkeypatch.setattr(download, "PROGRESS_MIN_BYTES", len(GOOD) + 1)
    resolve_weights(server.url("good", name="other.pt"))
    assert len(bars) == 1  # small files: no bar


def test_interrupt_leaves_nothing_behind(server, cache, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "_verify_download", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve_weights(server.url("good"))
    assert _left_in(cache) == []


def test_timeout_env_var(monkeypatch):
    monkeypatch.setenv("ROMAV2_DOWNLOAD_TIMEOUT", "5")
    assert download._timeouts() == (5.0, 5.0)
    monkeypatch.setenv("ROMAV2_DOWNLOAD_TIMEOUT", " 3,90 ")
    assert download._timeouts() == (3.0, 90.0)
    monkeypatch.setenv("ROMAV2_DOWNLOAD_TIMEOUT", "")
    assert download._timeouts() == (download.CONNECT_TIMEOUT, download.READ_TIMEOUT)
    for bad in ("soon", "0", "1,2,3", "-4"):
        monkeypatch.setenv("ROMAV2_DOWNLOAD_TIMEOUT", bad)
        with pytest.raises(ValueError, match="ROMAV2_DOWNLOAD_TIMEOUT"):
            download._timeouts()


def test_cache_dir_rules_are_shared_with_the_kernel_cache(tmp_path, monkeypatch):
    from romav2_plugin import kernels
    from romav2_plugin.cache import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    default = tmp_path / "home" / ".cache" / "romav2_plugin"
    for value, expect in [
        ("~/c", tmp_path / "home" / "c"),
        ("", default),
        ("   ", default),
        (str(tmp_path / "x"), tmp_path / "x"),
    ]:
        monkeypatch.setenv("ROMAV2_PLUGIN_CACHE", value)
        assert cache_dir() == download.cache_dir() == kernels.cache_dir() == expect, value
    monkeypatch.delenv("ROMAV2_PLUGIN_CACHE")
    assert download.cache_dir() == kernels.cache_dir() == default


def test_weights_module_is_a_leaf():
    """weights/download.py and weights/layout.py import only the standard library, torch, romav2_plugin.cache
    (and download the layout) at module level, and the model nowhere (the layout is derived from the stages'
    modules, not from romav2_plugin.model)."""
    import ast
    import inspect

    for module, own in ((download, {"romav2_plugin.weights.layout"}), (layout, set())):
        tree = ast.parse(inspect.getsource(module))
        top = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                top |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                top.add(node.module if node.module.startswith("romav2_plugin") else node.module.split(".")[0])
        assert top <= {"__future__", "http", "os", "re", "socket", "time", "urllib", "warnings", "collections",
                       "pathlib", "torch", "romav2_plugin.cache"} | own, (module.__name__, top)
        users = set()
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.module == "romav2_plugin.model":
                    users.add(fn.name)
        assert not users, (module.__name__, users)


def test_bad_timeout_env_var_is_a_download_error(server, cache, monkeypatch):
    monkeypatch.setenv("ROMAV2_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(DownloadError, match="ROMAV2_DOWNLOAD_TIMEOUT='soon' is not a timeout"):
        resolve_weights(server.url("good"))
    assert server.requests == [] and _left_in(cache) == []
