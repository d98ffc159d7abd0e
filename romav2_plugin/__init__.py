"""RoMa v2 dense feature matching: the official model, reimplemented and weight-compatible."""

from __future__ import annotations

# romav2_plugin.kernels and romav2_plugin.adapters live in the repository's top-level kernels/ and adapters/;
# pyproject.toml maps them into this package ([tool.setuptools.package-dir]), for wheels and editable installs.
from romav2_plugin.config import SETTINGS, RoMaV2Config, get_setting
from romav2_plugin.model import RoMaV2

__version__ = "0.1.0"

__all__ = ["RoMaV2", "RoMaV2Config", "SETTINGS", "get_setting"]


def _register_integrations() -> None:
    """Registration points of optional integrations (only when the library is installed)."""
    from importlib.util import find_spec

    if find_spec("kornia") is not None:
        from romav2_plugin.adapters.kornia import register as _register_kornia

        _register_kornia()
    from romav2_plugin.adapters.hloc import register as _register_hloc

    _register_hloc()  # lazy import hook: hloc.matchers.romav2 + match_dense.confs["romav2*"], only with hloc


_register_integrations()
