"""Result files of ``romav2-match``: ``.npz`` (one pair) and HDF5 (one pair or many, resumable).

HDF5 layout (format 2): root attributes hold the options of the run (``setting``, ``weights``,
``weights_sha256``, ``seed``, ``num_samples``, ``min_overlap``, ``package_version``, ...) and
``romav2_results_format = 2``; one group per pair at ``pair_key(name_A, name_B)`` =
``"<quoted name A>/<quoted name B>"`` where quoting replaces ``%`` by ``%25`` and ``/`` by ``%2F`` (so two
different pairs never share a group); the exact names are in the group attributes ``image_A``, ``image_B``;
``complete = True`` is set last.

Writes cannot lose finished work: the file is created complete and empty (atomically) before the first
pair, each pair is written, flushed and the file closed before the next one, so a crash or a kill can only
lose the pair being written; free space is checked before each pair, and a full disk stops the run with a
message instead of writing into a file system with no room. Files of the earlier layout (format 1: ``/``
in a name replaced by ``-``, which let ``a/b.jpg`` and ``a-b.jpg`` collide) are migrated in place: each
finished group is moved to the key of the names stored in its attributes; resume reads those attributes.

Only files that carry our marks are read, migrated or written to (:meth:`ResultsFile.is_ours`): format 2 has
``romav2_results_format`` at the root; format 1 had no format attribute, but its writer stored all the run
options (``setting``, ``weights_sha256``, ``seed``, ``num_samples``, ``min_overlap``) as root attributes with
every pair. hloc's ``feats-*.h5`` / ``matches-*.h5`` (and other HDF5 files) carry no such root attributes:
any other HDF5 file is refused (exit 2, :class:`NotOurs`) and left byte-identical, ``--overwrite`` or not.

One writer per results file: a run holds an OS lock (``fcntl.flock``) on the sidecar ``<file>.lock`` (which
holds its pid) from before it reads the file until it ends (:meth:`ResultsFile.hold_lock`, inside a function
decorated with :func:`one_writer`); a second run is refused (exit 2) naming the first one's pid. The kernel
drops the lock when a process dies, so a killed run never blocks the next one.
"""

from __future__ import annotations

import contextvars
import errno
import functools
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from romav2_plugin.app.errors import (
    BYTES_PER_MATCH,
    EXIT_RUNTIME,
    EXIT_USAGE,
    CommandError,
    human_bytes,
    is_disk_full,
    is_locked,
    missing_dependency,
)

__all__ = [
    "FORMAT_ATTR",
    "FORMAT_VERSION",
    "pair_key",
    "import_h5py",
    "write_npz",
    "ResultsFile",
    "estimate_pair_bytes",
    "WriteFailed",
    "Unreadable",
    "NotOurs",
    "one_writer",
    "hold_writer_lock",
]

FORMAT_ATTR = "romav2_results_format"
FORMAT_VERSION = 2
#: Options that must agree between a results file and the run that resumes it.
RUN_KEYS = ("setting", "weights_sha256", "seed", "num_samples", "min_overlap")
_OVERHEAD = 64 * 1024
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # per pair: group, attributes, B-tree nodes (generous)


class WriteFailed(CommandError):
    """Writing results failed (disk full, I/O error); finished results are kept."""


class Unreadable(CommandError):
    """An existing results file cannot be read (damaged or not HDF5); not raised for a locked file."""


class NotOurs(CommandError):
    """An existing HDF5 file that ``romav2-match`` did not write (no mark of ours): never modified."""


_HELD: contextvars.ContextVar[ExitStack | None] = contextvars.ContextVar("romav2_results_locks", default=None)


def one_writer(fn):
    """Run ``fn`` holding the results-file locks it takes (:meth:`ResultsFile.hold_lock`) until it returns."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with ExitStack() as stack:
            token = _HELD.set(stack)
            try:
                return fn(*args, **kwargs)
            finally:
                _HELD.reset(token)

    return wrapper


class _RunLock:
    """An exclusive ``flock`` on ``<results>.lock`` (holding the owner's pid), removed when released."""

    def __init__(self, results: Path) -> None:
        self.results = results
        self.path = results.with_name(results.name + ".lock")
        self.fd: int | None = None

    def acquire(self) -> bool:
        import fcntl

        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise CommandError(
                    f"cannot create the lock file {self.path} for {self.results} ({e.strerror or e}). "
                    "Choose a writable --out.",
                    EXIT_USAGE,
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)  # e.g. ENOLCK: a file system without locks; go on unguarded, and say so
                    print(f"note: cannot lock {self.path} ({e.strerror or e}): make sure no other run writes "
                          f"{self.results} at the same time.", file=sys.stderr, flush=True)
                    return False
                try:
                    pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
                except OSError:
                    pid = ""
                os.close(fd)
                who = f"pid {pid}" if pid.isdigit() else "pid unknown"
                raise CommandError(
                    f"{self.results} is being written by another run (another romav2-match, {who}; lock "
                    f"{self.path}). One writer per results file: wait for it to finish, or choose another --out.",
                    EXIT_USAGE,
                ) from None
            try:  # a run that just ended may have removed the file we opened: lock the one at the path
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except OSError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            return True
        raise CommandError(f"cannot lock {self.path}: it keeps being replaced", EXIT_USAGE)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still held: the next run locks a fresh file
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def hold_writer_lock(path: Path) -> bool:
    """Take the writer lock of the output file ``path`` (``<path>.lock``) until the enclosing :func:`one_writer`
    function returns; a second run is refused (exit 2, naming the holder's pid). ``False`` where the file
    system has no locks (said on stderr)."""
    stack = _HELD.get()
    if stack is None:
        raise RuntimeError("hold_writer_lock() outside a function decorated with @one_writer")
    lock = _RunLock(Path(path))
    if not lock.acquire():
        return False
    stack.callback(lock.release)
    return True


def _quote(name: str) -> str:
    return name.replace("%", "%25").replace("/", "%2F")


def pair_key(name_A: str, name_B: str) -> str:
    """HDF5 group of a pair; injective: different pairs never share a group."""
    return f"{_quote(name_A)}/{_quote(name_B)}"


def import_h5py():
    try:
        import h5py
    except ImportError:
        raise missing_dependency(
            "writing .h5 files", "h5py", "h5", "write .npz instead (--out matches.npz; one pair only)"
        ) from None
    return h5py


def estimate_pair_bytes(num_samples: int) -> int:
    return int(num_samples) * BYTES_PER_MATCH + _OVERHEAD


def _write_failed(path: Path, e: BaseException, saved: str) -> WriteFailed:
    if is_disk_full(e):
        return WriteFailed(
            f"the disk is full: cannot write {path}. {saved} Free some space and rerun.", EXIT_RUNTIME
        )
    return WriteFailed(f"cannot write {path} ({e}). {saved}", EXIT_RUNTIME)


def write_npz(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write atomically (``<path>.part`` then rename); on any failure nothing is left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    payload = dict(arrays)
    for k, v in meta.items():
        payload[k] = np.asarray(v)
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **payload)
        tmp.replace(path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise _write_failed(path, e, "Nothing was written.") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(p: Path) -> None:
    try:
        p.unlink(missing_ok=True)
    except OSError:
        pass


def _attr(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


class ResultsFile:
    """An HDF5 results file of ``romav2-match`` (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # ---------------------------------------------------------------------------------------- opening
    def hold_lock(self) -> None:
        """Take this file's writer lock until the enclosing :func:`one_writer` function returns; a second
        run is refused (exit 2, naming the holder's pid). Call before reading the file."""
        if hold_writer_lock(self.path):
            self.remove_stale_temporaries()

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove ``FILE.new`` / ``FILE.repair`` that a killed run left (they are only written under the writer
        lock, which this run now holds, so no other run is writing them); says so on stderr. Returns them."""
        removed = []
        for suffix in (".new", ".repair"):
            tmp = self.path.with_name(self.path.name + suffix)
            if tmp.is_file() and not tmp.is_symlink():
                try:
                    tmp.unlink()
                except OSError:
                    continue
                removed.append(tmp)
                print(f"note: removed {tmp}, left by an interrupted run", file=sys.stderr, flush=True)
        return removed

    def _open(self, mode: str):
        h5py = import_h5py()
        try:
            return h5py.File(self.path, mode)
        except OSError as e:
            if is_locked(e):
                raise CommandError(
                    f"{self.path} is locked: another process (another romav2-match run?) has it open for "
                    "writing. Wait for it to finish, or choose another --out.",
                    EXIT_USAGE,
                ) from None
            raise Unreadable(
                f"{self.path} exists but cannot be read as an HDF5 results file ({e}). It may be damaged "
                "(e.g. a crash while it was written) or not ours. It was left untouched: move it away, or pass "
                f"--overwrite to keep it as {self.path.name}.damaged and start a new file.",
                EXIT_USAGE,
            ) from None

    def read(self) -> tuple[dict[str, Any], set[tuple[str, str]], int]:
        """``(run options, finished pairs by name, format)`` of an existing file; format 1 = earlier layout."""
        h5py = import_h5py()
        done: set[tuple[str, str]] = set()
        f = self._open("r")
        try:
            attrs = {k: _attr(f.attrs[k]) for k in f.attrs}
            if not self.is_ours(attrs):
                raise NotOurs(
                    f"{self.path} is an HDF5 file that romav2-match did not write (it is not a romav2-match "
                    f"results file: no '{FORMAT_ATTR}' nor the run options at its root; hloc's features or "
                    "matches file?). It was left untouched. Choose another --out (e.g. a new results.h5).",
                    EXIT_USAGE,
                )
            fmt = int(attrs.get(FORMAT_ATTR, 1))

            def visit(name, obj):
                if not isinstance(obj, h5py.Group) or not obj.attrs.get("complete", False):
                    return
                a, b = obj.attrs.get("image_A"), obj.attrs.get("image_B")
                if a is None or b is None:
                    return
                a, b = str(_attr(a)), str(_attr(b))
                # a group counts only where its names put it (format 1 files are migrated before writing)
                if fmt >= 2 and name != pair_key(a, b):
                    return
                done.add((a, b))

            f.visititems(visit)
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise Unreadable(
                f"{self.path} is damaged: part of it cannot be read ({e}).", EXIT_USAGE
            ) from None
        finally:
            _close_quietly(f)
        return attrs, done, fmt

    @staticmethod
    def is_ours(attrs: dict[str, Any]) -> bool:
        """Root attributes ``attrs`` carry our marks: format 2's format attribute, or format 1's run options."""
        return FORMAT_ATTR in attrs or all(k in attrs for k in RUN_KEYS)

    def option_diff(self, attrs: dict[str, Any], meta: dict[str, Any]) -> list[str]:
        if "setting" not in attrs:
            return []
        keys = [k for k in RUN_KEYS if k in meta]  # a subset before the model loads (no weights hash yet)
        return [
            f"{k}: {attrs.get(k)} (file) vs {meta[k]} (now)"
            for k in keys
            if str(attrs.get(k)) != str(meta[k])
        ]

    def move_damaged_aside(self) -> Path:
        dest = self.path.with_name(self.path.name + ".damaged")
        n = 1
        while dest.exists():
            dest = self.path.with_name(f"{self.path.name}.damaged.{n}")
            n += 1
        os.replace(self.path, dest)
        return dest

    def set_run_attrs(self, meta: dict[str, Any]) -> None:
        """Record the run's options (once, when the file has none: created by a repair)."""
        with self._open("a") as f:
            for k, v in meta.items():
                f.attrs[k] = v
            f.attrs[FORMAT_ATTR] = FORMAT_VERSION

    def _reserve(self, nbytes: int, saved_note: str) -> None:
        """Allocate ``nbytes`` of disk beyond the end of the file before HDF5 writes there.

        HDF5 (2.0, h5py 3.16) cannot recover from ENOSPC in the middle of a write: the next flush crashes the
        process (segfault) and the file is left damaged. With the blocks reserved, a full disk is found here,
        before the file is touched; HDF5 writes into the reserved blocks and trims the file to its real end
        when it closes it.
        """
        try:
            size = self.path.stat().st_size
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, size, nbytes)
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            if is_disk_full(e):
                raise WriteFailed(
                    f"the disk is full: no room for the next pair in {self.path} (about {human_bytes(nbytes)} "
                    f"reserved before writing). {saved_note} Free some space and rerun the same command to resume.",
                    EXIT_RUNTIME,
                ) from None
            # EOPNOTSUPP / EINVAL: no reservation on this file system; the free-space check stands
        finally:
            os.close(fd)

    def looks_like_hdf5(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                return f.read(8) == HDF5_SIGNATURE
        except OSError:
            return False

    def repair(self) -> tuple[int, Path]:
        """Rebuild a damaged results file from what can still be read (each finished pair whose data reads
        back), in format 2. The damaged file is kept next to it (``.damaged``). Returns ``(pairs kept, where the
        damaged file went)``."""
        h5py = import_h5py()
        tmp = self.path.with_name(self.path.name + ".repair")
        kept = 0
        try:
            with h5py.File(tmp, "w") as dst:
                try:
                    src = h5py.File(self.path, "r")
                except OSError:
                    src = None
                if src is not None:
                    with src:
                        kept = _salvage(h5py, src, dst)
                dst.attrs[FORMAT_ATTR] = FORMAT_VERSION
        except OSError as e:
            _unlink_quietly(tmp)
            raise _write_failed(tmp, e, f"{self.path} was left as it was.") from None
        aside = self.move_damaged_aside()
        os.replace(tmp, self.path)
        return kept, aside

    def create(self, meta: dict[str, Any]) -> None:
        """A new, complete, empty results file (atomically: a crash leaves either nothing or this file)."""
        h5py = import_h5py()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".new")
        try:
            with h5py.File(tmp, "w") as f:
                for k, v in meta.items():
                    f.attrs[k] = v
                f.attrs[FORMAT_ATTR] = FORMAT_VERSION
            os.replace(tmp, self.path)
        except OSError as e:
            _unlink_quietly(tmp)
            raise _write_failed(self.path, e, "Nothing was written.") from None

    def migrate(self) -> int:
        """Bring a format-1 file to format 2 in place; returns the number of groups moved."""
        moved = 0
        with self._open("a") as f:
            import h5py

            pairs = []
            for k1 in list(f):
                g1 = f[k1]
                if not isinstance(g1, h5py.Group):
                    continue
                for k2 in list(g1):
                    pairs.append(f"{k1}/{k2}")
            for old in pairs:
                g = f[old]
                a, b = g.attrs.get("image_A"), g.attrs.get("image_B")
                if not g.attrs.get("complete", False) or a is None or b is None:
                    del f[old]  # unfinished: redone
                    continue
                new = pair_key(str(_attr(a)), str(_attr(b)))
                if new != old:
                    if new in f:
                        del f[new]
                    f.move(old, new)
                    moved += 1
            for k1 in list(f):
                if isinstance(f[k1], h5py.Group) and len(f[k1]) == 0:
                    del f[k1]
            f.attrs[FORMAT_ATTR] = FORMAT_VERSION
            f.flush()
        return moved

    # ---------------------------------------------------------------------------------------- writing
    def write_pair(
        self,
        name_A: str,
        name_B: str,
        arrays: dict[str, np.ndarray],
        meta: dict[str, Any],
        pair_meta: dict[str, Any],
        *,
        saved_note: str = "",
    ) -> None:
        """Add (or replace) one pair; the file is flushed and closed afterwards.

        Raises :class:`WriteFailed` (disk full: checked before writing, so the file is not touched; or an I/O
        error). The caller must then stop writing to this file.
        """
        import shutil

        need = sum(int(v.nbytes) for v in arrays.values()) + _OVERHEAD
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            free = None
        if free is not None and free < need:
            raise WriteFailed(
                f"the disk is full: {human_bytes(free)} free where {self.path} is, about {human_bytes(need)} needed "
                f"for the next pair. {saved_note} Free some space and rerun the same command to resume.",
                EXIT_RUNTIME,
            )
        if not self.path.exists():
            self.create(meta)
        self._reserve(need + _OVERHEAD, saved_note)
        key = pair_key(name_A, name_B)
        f = self._open("a")
        try:
            if key in f:
                del f[key]
            g = f.create_group(key)
            for k, v in arrays.items():
                g.create_dataset(k, data=v)
            for k, v in pair_meta.items():
                g.attrs[k] = v
            g.attrs["image_A"] = name_A
            g.attrs["image_B"] = name_B
            g.attrs["complete"] = True  # set last: a group without it is redone on resume
            f.flush()
        except (OSError, RuntimeError) as e:
            _close_quietly(f)
            raise _write_failed(self.path, e, saved_note) from None
        except BaseException:
            _close_quietly(f)
            raise
        try:
            f.close()
        except (OSError, RuntimeError) as e:
            raise _write_failed(self.path, e, saved_note) from None


def _salvage(h5py, src, dst) -> int:
    kept = 0
    try:
        for k, v in src.attrs.items():
            if k != FORMAT_ATTR:
                dst.attrs[k] = v
    except Exception:
        pass
    try:
        top = list(src)
    except Exception:
        return 0
    for k1 in top:
        try:
            subs = list(src[k1])
        except Exception:
            continue
        for k2 in subs:
            try:
                g = src[f"{k1}/{k2}"]
                if not isinstance(g, h5py.Group) or not g.attrs.get("complete", False):
                    continue
                attrs = dict(g.attrs)
                data = {n: g[n][()] for n in g}
                a, b = str(_attr(attrs["image_A"])), str(_attr(attrs["image_B"]))
            except Exception:  # unreadable: that pair is redone
                continue
            key = pair_key(a, b)
            if key in dst:
                del dst[key]
            ng = dst.create_group(key)
            for n, v in data.items():
                ng.create_dataset(n, data=v)
            for n, v in attrs.items():
                ng.attrs[n] = v
            kept += 1
    return kept


def _close_quietly(f) -> None:
    try:
        f.close()
    except Exception:
        pass
