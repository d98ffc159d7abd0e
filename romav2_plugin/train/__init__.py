"""Training and fine-tuning of RoMa v2 (the paper's decoupled two-stage recipe), CPU or GPU.

One module per concern: :mod:`~romav2_plugin.train.ground_truth` (warps and co-visibility from depth or a
homography), :mod:`~romav2_plugin.train.losses` (both stages' objectives), :mod:`~romav2_plugin.train.data`
(datasets; :mod:`~romav2_plugin.train.scenes` renders 3D scenes, :mod:`~romav2_plugin.train.augment`
augments), :mod:`~romav2_plugin.train.loop` (stages, EMA, logging), :mod:`~romav2_plugin.train.checkpoint`
(exact resume, exported weights), :mod:`~romav2_plugin.train.config` (TOML config) and the command
``romav2-train CONFIG.toml`` (:mod:`~romav2_plugin.train.__main__`).
"""

from __future__ import annotations

__all__ = ["Trainer", "TrainConfig", "load_config"]


def __getattr__(name: str):
    if name == "Trainer":
        from romav2_plugin.train.loop import Trainer

        return Trainer
    if name in ("TrainConfig", "load_config"):
        from romav2_plugin.train import config

        return getattr(config, name)
    raise AttributeError(name)
