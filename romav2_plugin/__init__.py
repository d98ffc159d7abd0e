"""RoMa v2 dense feature matching: the official model, reimplemented and weight-compatible."""

from __future__ import annotations

from romav2_plugin._layout import extend_path as _extend_path

__path__ = _extend_path(list(__path__))  # noqa: F821 - source checkout: kernels/, adapters/ at top level

__version__ = "0.1.0"

from romav2_plugin.config import SETTINGS, RoMaV2Config, get_setting  # noqa: E402
from romav2_plugin.model import RoMaV2  # noqa: E402

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
