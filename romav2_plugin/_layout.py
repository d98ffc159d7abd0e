"""Where the ``kernels`` and ``adapters`` sub-packages live.

In the wheel, ``romav2_plugin.kernels`` (CUDA sources + NVRTC runtime) and ``romav2_plugin.adapters``
(kornia / hloc glue) are installed inside this package. In a source checkout they stay at the repository
top level (``kernels/``, ``adapters/``), so the package's ``__path__`` is extended to the checkout root
for exactly those two names. Nothing else is touched.
"""

from __future__ import annotations

from pathlib import Path

_SUBPACKAGES = ("kernels", "adapters")


def extend_path(pkg_path: list[str]) -> list[str]:
    here = Path(pkg_path[0])
    root = here.parent
    if any((here / name).is_dir() for name in _SUBPACKAGES):
        return pkg_path  # installed layout
    if any((root / name / "__init__.py").is_file() for name in _SUBPACKAGES):
        return [*pkg_path, str(root)]
    return pkg_path
