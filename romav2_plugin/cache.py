"""The plugin's on-disk cache directory (downloaded weights, compiled CUDA kernels).

One rule for every user of the cache: ``$ROMAV2_PLUGIN_CACHE`` if it is set to a non-blank value (``~`` is
expanded), else ``~/.cache/romav2_plugin``. An empty or blank value counts as unset. No third-party import.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_dir"]

#: environment variable overriding the cache directory
CACHE_ENV = "ROMAV2_PLUGIN_CACHE"


def cache_dir() -> Path:
    """``$ROMAV2_PLUGIN_CACHE`` (``~`` expanded; empty = unset) or ``~/.cache/romav2_plugin``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "romav2_plugin"
