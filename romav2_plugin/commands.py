"""Conventions shared by the three commands (``romav2-match``, ``python -m romav2_plugin.hloc``, ``romav2-export``).

One table of exit codes, one way to report an error (one paragraph naming the problem and the fix, no
traceback), one meaning of ``--weights`` and one set of checks of an output path that run before the model
loads.

Exit codes (the same in all three commands):

====  =====================================================================================================
0     success
1     runtime failure: matching/export failed, out of memory, disk full or I/O error while writing
2     bad arguments or unusable input/output, found before the model loads (missing/unreadable image,
      bad pairs file, output not writable, not enough free space, results file locked or damaged, ...)
3     ``romav2-match --pairs``: finished, but some pairs failed (listed; every other pair is saved)
4     set-up problem: weights missing/unreachable/invalid, or a missing optional dependency (the message
      names the pip extra)
130   interrupted (Ctrl-C); 143 terminated (SIGTERM). What was finished is saved; rerun to resume.
====  =====================================================================================================
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_OK",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "EXIT_PAIRS_FAILED",
    "EXIT_SETUP",
    "EXIT_INTERRUPTED",
    "EXIT_CODES_HELP",
    "WEIGHTS_HELP",
    "CommandError",
    "Terminated",
    "missing_dependency",
    "is_named_weights",
    "WeightsChoice",
    "choose_weights",
    "cached_official_weights",
    "weights_error",
    "check_output",
    "is_disk_full",
    "is_locked",
    "interrupt_code",
    "run_command",
]

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_PAIRS_FAILED = 3
EXIT_SETUP = 4
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "exit codes (the same for romav2-match, romav2-export and python -m romav2_plugin.hloc):\n"
    "  0 success; 1 runtime failure (matching/export failed, out of memory, disk full while writing);\n"
    "  2 bad arguments or unusable input/output, found before the model loads; 3 romav2-match --pairs\n"
    "  finished but some pairs failed; 4 set-up problem: weights missing/unreachable/invalid or an optional\n"
    "  dependency missing; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM)."
)

WEIGHTS_HELP = (
    "checkpoint: a local PATH, a URL, or 'tiny' (a small model shipped with the package). "
    "Default: $ROMAV2_WEIGHTS if set, else the official release (downloaded once, cached)"
)

# Named weights known before romav2_plugin.pretrained exists (the lead adds it).
_FALLBACK_NAMED = ("tiny",)
# Rough size of one sampled match in a results file: keypoints 2x2, confidence 1, precisions 2x4, normalized 4
# float32 values.
BYTES_PER_MATCH = 4 * (2 + 2 + 1 + 4 + 4 + 4)


class CommandError(Exception):
    """A message for the user (printed without a traceback) and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered as an interruption (files are closed by the normal unwinding)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def interrupt_code(e: BaseException) -> int:
    return 128 + e.signum if isinstance(e, Terminated) else EXIT_INTERRUPTED


def missing_dependency(what: str, module: str, extra: str, alternative: str = "") -> CommandError:
    msg = f'{what} needs {module}, which is not installed. Install it with: pip install "romav2-plugin[{extra}]"'
    if alternative:
        msg += f", or {alternative}"
    return CommandError(msg + ".", EXIT_SETUP)


# ----------------------------------------------------------------------------------------------- weights
def is_named_weights(spec: object) -> bool:
    """Whether ``spec`` names weights shipped with the package (``"tiny"``), not a path or URL."""
    if not isinstance(spec, str):
        return False
    try:
        from romav2_plugin.pretrained import is_named  # type: ignore[import-not-found]
    except ImportError:
        return spec in _FALLBACK_NAMED
    return bool(is_named(spec))


def _named_sha256(name: str) -> str:
    """sha256 prefix of a shipped weights file, if :mod:`romav2_plugin.pretrained` can say; else ``""``."""
    try:
        from romav2_plugin import pretrained  # type: ignore[attr-defined]
    except ImportError:
        return ""
    for attr in ("sha256", "named_sha256"):
        fn = getattr(pretrained, attr, None)
        if callable(fn):
            try:
                return str(fn(name) or "")[:16]
            except Exception:
                return ""
    for attr in ("path", "named_path", "resolve"):
        fn = getattr(pretrained, attr, None)
        if callable(fn):
            try:
                p = Path(fn(name))
                return sha256_prefix(p) if p.is_file() else ""
            except Exception:
                return ""
    return ""


def sha256_prefix(path: Path, n: int = 16) -> str:
    """First ``n`` hex digits of the file's sha256, cached by (path, size, mtime) in the weights cache."""
    import hashlib
    import json

    from romav2_plugin.weights import cache_dir

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache = cache_dir() / "sha256.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key][:n]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    try:
        known = known if isinstance(known, dict) else {}
        known[key] = digest
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known))
    except OSError:
        pass
    return digest[:n]


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


@dataclass
class WeightsChoice:
    """What ``--weights`` (or its default) resolved to, before anything is loaded.

    ``spec`` is what to pass to ``RoMaV2.from_pretrained``; ``source`` says where it came from
    (``"--weights"``, ``"ROMAV2_WEIGHTS"``, ``"default"``); ``named`` for shipped weights (``"tiny"``).
    """

    spec: str | None
    source: str
    named: bool = False

    @property
    def label(self) -> str:
        if self.spec is None:
            return "official release"
        return self.spec if self.named or _is_url(self.spec) else Path(self.spec).name

    def info(self) -> dict[str, str]:
        """``{"weights": ..., "weights_sha256": ...}`` for result metadata (no download, no hashing of URLs)."""
        if self.named:
            return {"weights": str(self.spec), "weights_sha256": _named_sha256(str(self.spec))}
        path = self.local_path()
        if path is None:
            from romav2_plugin.weights import resolve_weights

            path = resolve_weights(self.spec)  # the download happens here (once, cached)
        return {"weights": path.name, "weights_sha256": sha256_prefix(path)}

    def local_path(self) -> Path | None:
        if self.spec is None or self.named or _is_url(self.spec):
            return None
        s = self.spec[len("file://") :] if self.spec.startswith("file://") else self.spec
        return Path(s).expanduser()


def choose_weights(arg: str | None) -> WeightsChoice:
    """Resolve ``--weights`` without loading or downloading anything; a local file that is missing, a folder
    or empty is refused here (exit 4) with a message naming where the name came from."""
    from romav2_plugin.weights import OFFICIAL_URL, WEIGHTS_ENV

    if arg is not None and arg != "":
        choice = WeightsChoice(arg, "--weights")
    elif os.environ.get(WEIGHTS_ENV):
        choice = WeightsChoice(os.environ[WEIGHTS_ENV], WEIGHTS_ENV)
    else:
        return WeightsChoice(None, "default")
    if is_named_weights(choice.spec):
        choice.named = True
        return choice
    path = choice.local_path()
    if path is None:
        return choice
    where = f"--weights {choice.spec}" if choice.source == "--weights" else f"{WEIGHTS_ENV}={choice.spec}"
    fix = (
        f"Pass the path of romav2.0.1.pt (download: {OFFICIAL_URL}), or --weights tiny for the small model "
        "shipped with the package"
    )
    if choice.source == WEIGHTS_ENV:
        fix += f", or unset {WEIGHTS_ENV} to use the official release (downloaded once, cached)"
    if path.is_dir():
        raise CommandError(f"{where}: {path} is a folder, not a checkpoint file. {fix}.", EXIT_SETUP)
    if not path.is_file():
        raise CommandError(f"{where}: RoMa v2 weights not found at {path}. {fix}.", EXIT_SETUP)
    if path.stat().st_size == 0:
        raise CommandError(
            f"{where}: {path} is empty (0 bytes; an interrupted copy or download?). Delete it and get the file "
            f"again ({OFFICIAL_URL}), or use --weights tiny.",
            EXIT_SETUP,
        )
    return choice


def cached_official_weights() -> Path | None:
    """The official checkpoint if it is already on this machine (our cache or torch.hub's), without downloading."""
    from romav2_plugin.weights import OFFICIAL_URL, cache_dir

    name = Path(OFFICIAL_URL).name
    candidates = [cache_dir() / "weights" / name]
    try:
        import torch

        candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / name)
    except Exception:
        pass
    for p in candidates:
        try:
            if p.is_file() and p.stat().st_size > 0:
                return p
        except OSError:
            continue
    return None


def _raised_in(exc: BaseException, modules: tuple[str, ...]) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__", "") in modules:
            return True
        tb = tb.tb_next
    return False


_WEIGHTS_MODULES = ("romav2_plugin.weights", "romav2_plugin.pretrained")


def is_weights_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from finding, downloading, reading or checking a checkpoint."""
    weights_error_cls = getattr(sys.modules.get("romav2_plugin.weights"), "WeightsError", None)
    if isinstance(weights_error_cls, type) and isinstance(exc, weights_error_cls):
        return True
    return _raised_in(exc, _WEIGHTS_MODULES)


def weights_error(exc: BaseException, choice: WeightsChoice | None = None) -> CommandError:
    """A :class:`CommandError` (exit 4) from an exception raised while loading weights, with the message
    brought in line with this command's options."""
    from romav2_plugin.weights import WEIGHTS_ENV

    msg = str(exc) or type(exc).__name__
    if isinstance(exc, IndexError | KeyError | TypeError | AttributeError):  # a bug while reading the file
        where = f" ({choice.spec})" if choice is not None and choice.spec else ""
        msg = f"the weights file{where} could not be read ({type(exc).__name__}: {exc}); is it a RoMa v2 checkpoint?"
    if not os.environ.get(WEIGHTS_ENV):
        # the environment variable is mentioned only when it is set (and thus part of the problem)
        msg = msg.replace(f", or unset {WEIGHTS_ENV} to use the cached download", "")
        msg = msg.replace(f" or unset {WEIGHTS_ENV} to use the cached download", "")
    download_failed = type(exc).__name__ == "DownloadError" or "Could not download" in msg
    if download_failed and "--weights tiny" not in msg:
        msg += (
            "\n  * or try the tool without the official weights: --weights tiny (a small model shipped with "
            "the package; lower quality)."
        )
    return CommandError(msg, EXIT_SETUP)


# ------------------------------------------------------------------------------------------------ output
def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    s = str(e)
    return "errno = 28" in s or "No space left on device" in s or "Disk quota exceeded" in s


def is_locked(e: BaseException) -> bool:
    s = str(e).lower()
    return "unable to lock file" in s or "lock" in s and ("errno = 11" in s or "temporarily unavailable" in s)


def _nearest_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def check_output(path: Path, need_bytes: int, *, what: str = "--out", create_parent: bool = True) -> None:
    """Refuse (exit 2) an output file whose folder cannot be created or written, an existing file that
    cannot be written, or a disk with less than ``need_bytes`` free: before any model is loaded."""
    folder = path.parent
    anchor = _nearest_existing(folder)
    if anchor.exists() and not anchor.is_dir():
        raise CommandError(f"{what} {path}: {anchor} exists and is not a folder.", EXIT_USAGE)
    if create_parent:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CommandError(
                f"{what} {path}: cannot create the folder {folder} ({e.strerror or e}). Choose a writable place.",
                EXIT_USAGE,
            ) from None
        anchor = folder
    if path.is_dir():
        raise CommandError(f"{what} {path} is a folder; give a file name.", EXIT_USAGE)
    try:  # os.access is not reliable (root, read-only mounts): try it
        fd, tmp = tempfile.mkstemp(prefix=".romav2-write-test-", dir=anchor)
        os.close(fd)
        os.unlink(tmp)
        if path.exists():
            with open(path, "ab"):
                pass
    except OSError as e:
        raise CommandError(
            f"{what} {path}: cannot write there ({e.strerror or e}; read-only folder or file system?). "
            "Choose a writable place or fix the permissions.",
            EXIT_USAGE,
        ) from None
    try:
        free = shutil.disk_usage(anchor).free
    except OSError:
        return
    if free < need_bytes:
        raise CommandError(
            f"{what} {path}: only {_human(free)} free on that file system, about {_human(need_bytes)} needed. "
            "Free some space or choose another place.",
            EXIT_USAGE,
        )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


human_bytes = _human


# ----------------------------------------------------------------------------------------------- running
def _on_sigterm(signum, frame):
    raise Terminated(signum)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C (files closed, staging removed); the previous handler is restored."""
    try:
        old = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold stop signals (SIGINT, SIGTERM) and child-exit notices (SIGCHLD) back while the block runs.

    For a checkpoint being written: a stop signal, or a dead data worker reported by torch's SIGCHLD handler,
    inside ``torch.save`` surfaces as a C++ error about a torn file instead of what it is. Inside this block
    the signals are only recorded; on leaving it the previous handlers are restored and each recorded signal
    is raised again, so it acts exactly as it would have (an exception, or the default action). Outside the
    main thread (where handlers cannot be set) the block runs unchanged.
    """
    caught: list[int] = []
    names = ("SIGINT", "SIGTERM", "SIGCHLD")  # SIGCHLD: POSIX only
    held = [s for s in (getattr(signal, n, None) for n in names) if s is not None and signal.getsignal(s) is not None]
    old: dict[int, Any] = {}
    try:
        for s in held:
            old[s] = signal.signal(s, lambda signum, frame: caught.append(signum))
    except ValueError:  # not the main thread (nothing was changed: the first call refuses)
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


def report(prog: str, message: str) -> None:
    print(
        f"{prog}: error: {message}" if not message.startswith("interrupted") else f"{prog}: {message}",
        file=sys.stderr,
        flush=True,
    )


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run ``body`` and turn every failure into one paragraph on stderr and an exit code."""
    with sigterm_as_interrupt():
        try:
            return body()
        except CommandError as e:
            report(prog, e.message)
            return e.code
        except KeyboardInterrupt as e:
            report(prog, "interrupted")
            return interrupt_code(e)
        except MemoryError:
            report(prog, "out of memory; try a smaller --setting (turbo, fast) or fewer matches")
            return EXIT_RUNTIME
        except Exception as e:  # a bug: one paragraph, traceback on request
            if os.environ.get("ROMAV2_TRACEBACK"):
                traceback.print_exc()
            report(
                prog,
                f"unexpected {type(e).__name__}: {e}. This is probably a bug in romav2-plugin; please report it "
                "with the command line (set ROMAV2_TRACEBACK=1 to print the traceback).",
            )
            return EXIT_RUNTIME
