"""``--weights``, as the commands read it: one meaning for ``romav2-match``, the hloc command and
``romav2-export``.

:func:`choose_weights` resolves the option (or ``$ROMAV2_WEIGHTS``, or the official release) without loading
or downloading anything and refuses a missing or empty local file at once (exit 4); :class:`WeightsChoice`
says what was chosen and, for result metadata, the file name and sha256 prefix; :func:`weights_error` turns
an exception raised while loading weights into the commands' one-paragraph error (exit 4). What each form
of ``weights`` means is :mod:`romav2_plugin.weights.named`'s business.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from romav2_plugin.app.errors import EXIT_SETUP, CommandError
from romav2_plugin.weights.download import WEIGHTS_ENV
from romav2_plugin.weights.layout import OFFICIAL_URL
from romav2_plugin.weights.named import is_named, named_path

__all__ = [
    "WEIGHTS_HELP",
    "is_named_weights",
    "sha256_prefix",
    "WeightsChoice",
    "choose_weights",
    "cached_official_weights",
    "is_weights_error",
    "weights_error",
]

WEIGHTS_HELP = (
    "checkpoint: a local PATH, a URL, or 'tiny' (a small model shipped with the package). "
    "Default: $ROMAV2_WEIGHTS if set, else the official release (downloaded once, cached)"
)



def is_named_weights(spec: object) -> bool:
    """Whether ``spec`` names weights shipped with the package (``"tiny"``), not a path or URL."""
    return is_named(spec)


def _named_sha256(name: str) -> str:
    """sha256 prefix of a shipped weights file (its entry of the named-weights table); ``""`` if this
    installation lacks the file."""
    try:
        path = named_path(name)
    except (ValueError, FileNotFoundError):
        return ""
    return sha256_prefix(path)


def sha256_prefix(path: Path, n: int = 16) -> str:
    """First ``n`` hex digits of the file's sha256, cached by (path, size, mtime) in the weights cache."""
    import hashlib
    import json

    from romav2_plugin.cache import cache_dir

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
            from romav2_plugin.weights.download import resolve_weights

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
    from romav2_plugin.cache import cache_dir

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


_WEIGHTS_MODULES = ("romav2_plugin.weights.download", "romav2_plugin.weights.layout", "romav2_plugin.weights.named")


def is_weights_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from finding, downloading, reading or checking a checkpoint."""
    return _raised_in(exc, _WEIGHTS_MODULES)


def weights_error(exc: BaseException, choice: WeightsChoice | None = None) -> CommandError:
    """A :class:`CommandError` (exit 4) from an exception raised while loading weights, with the message
    brought in line with this command's options."""
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


