"""Finding and downloading a checkpoint file: what ``weights=None``, a path or a URL points to.

:func:`resolve_weights` turns ``None`` (``$ROMAV2_WEIGHTS``, else the official release), a local path or a URL
into a local file. Downloads have a connect and a read timeout (:data:`CONNECT_TIMEOUT`,
:data:`READ_TIMEOUT`, or ``$ROMAV2_DOWNLOAD_TIMEOUT``), are retried and resumed with HTTP ``Range`` requests
(:data:`DOWNLOAD_ATTEMPTS`), show a progress bar on a terminal for large files, and are written to a
temporary file that gets its final name in the cache only after its size matched the announced
``Content-Length`` and it loaded as a flat state dict of tensors. A failed download leaves nothing behind.
Named weights shipped with the package (``"tiny"``) are :mod:`romav2_plugin.weights.named`'s business; the
checkpoint layout and strict loading are :mod:`romav2_plugin.weights.layout`'s. This module imports nothing
from the model.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch

from romav2_plugin.cache import CACHE_ENV, cache_dir
from romav2_plugin.weights.layout import OFFICIAL_URL, ZIP_MAGIC, read_state_dict

__all__ = [
    "OFFICIAL_URL",
    "WEIGHTS_ENV",
    "TIMEOUT_ENV",
    "DownloadError",
    "cache_dir",
    "resolve_weights",
]

WEIGHTS_ENV = "ROMAV2_WEIGHTS"
#: ``SECONDS`` (both) or ``CONNECT,READ`` seconds, overriding :data:`CONNECT_TIMEOUT` / :data:`READ_TIMEOUT`
TIMEOUT_ENV = "ROMAV2_DOWNLOAD_TIMEOUT"

#: seconds allowed to open the connection (TCP, TLS, proxy tunnel)
CONNECT_TIMEOUT: float = 30.0
#: seconds without any byte from the server (response headers or body) before the attempt is abandoned
READ_TIMEOUT: float = 60.0
#: attempts per download; after a timeout or a cut connection the next one resumes (HTTP ``Range``)
DOWNLOAD_ATTEMPTS: int = 4
#: seconds before the first retry, doubled for each further one
RETRY_BACKOFF: float = 2.0
#: files at least this large get a progress bar (on a terminal: ``tqdm``'s default)
PROGRESS_MIN_BYTES: int = 16 * 2**20

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A weights download failed; nothing was stored in the cache. The message says what to do."""



# --------------------------------------------------------------------------------------------------
# Finding and downloading the file
# --------------------------------------------------------------------------------------------------


def _manual_steps(target: Path) -> str:
    return (
        f"Download the file on a machine with internet access ({OFFICIAL_URL}) and then do one of:\n"
        "  * pass its path: RoMaV2.from_pretrained(weights='/path/to/romav2.0.1.pt') or --weights PATH;\n"
        f"  * set the environment variable {WEIGHTS_ENV}=/path/to/romav2.0.1.pt;\n"
        f"  * copy it to {target} (the download cache)."
    )


def _offline_message(url: str, target: Path, err: BaseException) -> str:
    return (
        f"Could not download the RoMa v2 weights from {url} ({type(err).__name__}: {err}).\n"
        "This machine appears to be offline or cannot reach that address. " + _manual_steps(target)
    )


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://", "file://"))


def _timeouts() -> tuple[float, float]:
    """``(connect, read)`` seconds: ``$ROMAV2_DOWNLOAD_TIMEOUT`` (``SECONDS`` or ``CONNECT,READ``) or the
    module constants."""
    env = os.environ.get(TIMEOUT_ENV, "").strip()
    if not env:
        return float(CONNECT_TIMEOUT), float(READ_TIMEOUT)
    try:
        parts = [float(p) for p in env.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or not all(0 < p < float("inf") for p in parts):
        raise ValueError(
            f"{TIMEOUT_ENV}={env!r} is not a timeout: give SECONDS (both) or CONNECT,READ seconds (e.g. 60 or 10,60), "
            "or unset it."
        )
    return parts[0], parts[-1]


class _ReadTimeout:
    """Mixin: after the connection is open (under the connect timeout), every read waits at most the read
    timeout."""

    read_timeout: float | None = None

    def connect(self):  # noqa: D102
        super().connect()  # type: ignore[misc]
        if self.read_timeout is not None:
            self.sock.settimeout(self.read_timeout)  # type: ignore[attr-defined]


def _opener(read_timeout: float) -> urllib.request.OpenerDirector:
    class Conn(_ReadTimeout, http.client.HTTPConnection):
        pass

    class SConn(_ReadTimeout, http.client.HTTPSConnection):
        pass

    Conn.read_timeout = SConn.read_timeout = read_timeout

    class Handler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(Conn, req)

    class SHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            kw = {"context": self._context}
            if hasattr(self, "_check_hostname"):  # Python < 3.12
                kw["check_hostname"] = self._check_hostname
            return self.do_open(SConn, req, **kw)

    return urllib.request.build_opener(Handler, SHandler)


def _is_timeout(err: BaseException) -> bool:
    return isinstance(err, (TimeoutError, socket.timeout)) or (
        isinstance(err, urllib.error.URLError) and isinstance(err.reason, (TimeoutError, socket.timeout))
    )


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "an unknown number of"
    return f"{n} bytes ({n / 2**20:.1f} MiB)" if n >= 2**20 else f"{n} bytes"


def _content_range(resp) -> tuple[int, int | None] | None:
    """``(first byte, total or None)`` of a 206 answer."""
    m = re.match(r"bytes\s+(\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
    if not m:
        return None
    return int(m.group(1)), (None if m.group(2) == "*" else int(m.group(2)))


def _fetch(url: str, part: Path, target: Path) -> int | None:
    """Download ``url`` into ``part`` with retries and resume; returns the announced size (or ``None``).

    Raises :class:`DownloadError` with what happened and what to do.
    """
    try:
        connect_t, read_t = _timeouts()
    except ValueError as e:  # callers (CLI, hloc) report download problems as RuntimeError
        raise DownloadError(str(e)) from None
    opener = _opener(read_t)
    attempts = max(1, int(DOWNLOAD_ATTEMPTS))
    have = 0
    total: int | None = None
    bar = None
    failures: list[str] = []
    try:
        with open(part, "wb") as fh:
            for attempt in range(attempts):
                if attempt:
                    time.sleep(RETRY_BACKOFF * 2 ** (attempt - 1))
                headers = {"User-Agent": "romav2-plugin", "Accept-Encoding": "identity"}
                if have:
                    headers["Range"] = f"bytes={have}-"
                try:
                    resp = opener.open(urllib.request.Request(url, headers=headers), timeout=connect_t)
                except urllib.error.HTTPError as e:
                    e.close()
                    if e.code in (408, 425, 429, 500, 502, 503, 504):
                        failures.append(f"HTTP {e.code} {e.reason}")
                        continue
                    raise DownloadError(
                        f"Could not download the RoMa v2 weights from {url}: the server answered HTTP {e.code} "
                        f"{e.reason}. Check the URL. Nothing was stored in the cache.\n" + _manual_steps(target)
                    ) from None
                except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                    if _is_timeout(e):
                        failures.append(f"no connection or no answer within {connect_t:g} s / {read_t:g} s")
                        continue
                    raise DownloadError(_offline_message(url, target, e)) from None
                with resp:
                    if resp.status == 206 and have:
                        cr = _content_range(resp)
                        if cr is None or cr[0] != have:  # not the part we asked for: start again
                            fh.seek(0)
                            fh.truncate()
                            have = 0
                            failures.append("the server resumed at the wrong offset")
                            continue
                        total = cr[1] if cr[1] is not None else total
                    else:
                        if have:  # the server ignored the Range request: start again from byte 0
                            fh.seek(0)
                            fh.truncate()
                            have = 0
                        length = resp.headers.get("Content-Length")
                        total = int(length) if length and length.isdigit() else None
                    if bar is None and total is not None and total >= PROGRESS_MIN_BYTES:
                        from tqdm.auto import tqdm

                        bar = tqdm(
                            total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=None,
                            desc=f"downloading {target.name}",
                        )
                    if bar is not None:
                        bar.n = have
                        bar.refresh()
                    try:
                        while True:
                            chunk = resp.read1(_CHUNK)  # what has arrived: kept even if the next read stalls
                            if not chunk:
                                break
                            fh.write(chunk)
                            have += len(chunk)
                            if bar is not None:
                                bar.update(len(chunk))
                    except (OSError, http.client.HTTPException) as e:
                        what = f"no data for {read_t:g} s" if _is_timeout(e) else f"{type(e).__name__}: {e}"
                        failures.append(f"cut off after {_fmt_bytes(have)} ({what})")
                        fh.flush()
                        continue
                if total is not None and have < total:
                    failures.append(f"cut off after {_fmt_bytes(have)} of {_fmt_bytes(total)}")
                    continue
                if total is not None and have > total:
                    raise DownloadError(
                        f"The download of {url} is larger ({_fmt_bytes(have)}) than the server announced "
                        f"({_fmt_bytes(total)}). Nothing was stored in the cache; try again later.\n"
                        + _manual_steps(target)
                    )
                return total
    finally:
        if bar is not None:
            bar.close()
    raise DownloadError(
        f"Could not download the RoMa v2 weights from {url}: {attempts} attempt(s) failed "
        f"({'; '.join(failures)}). The server stalls or the connection is unreliable; nothing was stored in "
        f"the cache. Try again later, raise the timeouts ({TIMEOUT_ENV}=CONNECT,READ seconds), or:\n"
        + _manual_steps(target)
    )


def _verify_download(part: Path, url: str, target: Path) -> None:
    """The downloaded bytes must load as a flat state dict of tensors (``weights_only``)."""
    with open(part, "rb") as fh:
        is_zip = fh.read(4) == ZIP_MAGIC
    try:
        read_state_dict(part, mmap=is_zip)  # mmap: no second copy of a 1 GB file in memory
    except ValueError as e:
        raise DownloadError(
            f"The file downloaded from {url} is not a RoMa v2 checkpoint: {e}. Nothing was stored in the cache. "
            "Check the URL (a login or error page instead of the file?).\n" + _manual_steps(target)
        ) from None


def _download(url: str) -> Path:
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or "romav2.pt"
    target = cache_dir() / "weights" / name
    if target.is_file():
        return target
    # Reuse a file the official package (torch.hub) has already downloaded.
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / name
    if hub_file.is_file():
        return hub_file
    created = [p for p in (target.parent.parent, target.parent) if not p.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(
            f"Cannot create the download cache {target.parent} ({e.strerror or e}). Set {CACHE_ENV} to a "
            "writable folder. " + _manual_steps(target)
        ) from None
    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        _fetch(url, part, target)
        _verify_download(part, url, target)
        os.replace(part, target)
    except BaseException:  # also KeyboardInterrupt: never leave a partial file behind
        part.unlink(missing_ok=True)
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                pass
        raise
    return target


def resolve_weights(weights: str | os.PathLike | None) -> Path:
    """Find the checkpoint file.

    ``None``: ``$ROMAV2_WEIGHTS`` if set (a path or URL), else the official release URL. URLs are
    downloaded once into :func:`cache_dir` (``weights/<file name>``); a copy in torch.hub's cache is reused.
    A failed download raises :class:`DownloadError` (a ``RuntimeError``) saying what to do.
    """
    from_env = weights is None and bool(os.environ.get(WEIGHTS_ENV))
    if weights is None:
        weights = os.environ.get(WEIGHTS_ENV) or OFFICIAL_URL
    weights = str(weights)
    if _is_url(weights):
        if weights.startswith("file://"):
            weights = urllib.parse.unquote(weights[len("file://") :])
        else:
            return _download(weights)
    path = Path(weights).expanduser()
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "not found"
        if from_env:
            raise FileNotFoundError(
                f"RoMa v2 weights {what}: {WEIGHTS_ENV}={weights} ({path}). Point {WEIGHTS_ENV} at romav2.0.1.pt, "
                f"or unset it to download the official release ({OFFICIAL_URL}) into the cache."
            )
        raise FileNotFoundError(
            f"RoMa v2 weights {what} at {path}. Pass the path of romav2.0.1.pt (download: {OFFICIAL_URL}), or "
            "pass no weights to download the official release into the cache."
        )
    return path

