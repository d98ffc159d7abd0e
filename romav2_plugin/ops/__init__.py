"""Custom ops of the plugin (``torch.library`` namespace ``romav2_plugin``).

* :func:`local_corr` -- refiner local correlation, ``(B, C, H, W) x (B, C, H, W) x (B, H, W, 2) -> (B, K, H, W)``
"""

from __future__ import annotations

from romav2_plugin.ops.local_corr import DEFAULT_CHUNK_BYTES, local_corr, local_corr_backward

__all__ = ["DEFAULT_CHUNK_BYTES", "local_corr", "local_corr_backward"]
