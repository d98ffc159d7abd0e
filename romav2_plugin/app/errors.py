"""Conventions shared by the commands (``romav2-match``, ``python -m romav2_plugin.hloc``, ``romav2-export``,
``romav2-train``).

One table of exit codes, one way to report an error (one paragraph naming the problem and the fix, no
traceback) and one set of checks of an output path that run before the model loads. One meaning of
``--weights``: :mod:`romav2_plugin.app.weights_option`; stop signals: :mod:`romav2_plugin.signals`.

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
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

from romav2_plugin.signals import Terminated, sigterm_as_interrupt

__all__ = [
    "EXIT_OK",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "EXIT_PAIRS_FAILED",
    "EXIT_SETUP",
    "EXIT_INTERRUPTED",
    "EXIT_CODES_HELP",
    "CommandError",
    "missing_dependency",
    "check_output",
    "is_disk_full",
    "is_locked",
    "human_bytes",
    "interrupt_code",
    "report",
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

# Rough size of one sampled match in a results file: keypoints 2x2, confidence 1, precisions 2x4, normalized 4
# float32 values.
BYTES_PER_MATCH = 4 * (2 + 2 + 1 + 4 + 4 + 4)


class CommandError(Exception):
    """A message for the user (printed without a traceback) and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def interrupt_code(e: BaseException) -> int:
    return 128 + e.signum if isinstance(e, Terminated) else EXIT_INTERRUPTED


def missing_dependency(what: str, module: str, extra: str, alternative: str = "") -> CommandError:
    msg = f'{what} needs {module}, which is not installed. Install it with: pip install "romav2-plugin[{extra}]"'
    if alternative:
        msg += f", or {alternative}"
    return CommandError(msg + ".", EXIT_SETUP)


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
