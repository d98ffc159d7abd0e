"""Stop signals, as the commands and training handle them: neutral ground for :mod:`romav2_plugin.app` and
:mod:`romav2_plugin.train`.

* :class:`Terminated`: SIGTERM delivered as an interruption (a ``KeyboardInterrupt``), so that files are
  closed by the normal unwinding; :func:`sigterm_as_interrupt` installs it for a block.
* :func:`deferred_interrupts`: hold stop signals back while a file (a checkpoint) is being written.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Terminated", "sigterm_as_interrupt", "deferred_interrupts"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered as an interruption (files are closed by the normal unwinding)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum



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
