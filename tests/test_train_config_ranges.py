"""Training config numbers: every numeric key has a documented range
(``romav2_plugin.train.config.RANGES``), checked when the config is read, the error naming the key's path."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from romav2_plugin.train import config as tc
from romav2_plugin.train.losses import LossConfig

GOOD = """out_dir = "run"
{top}
[data]
size = {size}
{data}
[[data.sources]]
kind = "homography"
path = "."
{source}
[[stages]]
name = "matcher"
steps = 2
{stage}
[loss]
{loss}
"""


def _write(tmp_path, *, top="", size="[64, 64]", data="", source="", stage="", loss=""):
    p = tmp_path / "c.toml"
    p.write_text(GOOD.format(top=top, size=size, data=data, source=source, stage=stage, loss=loss))
    return p


BAD = [
    (dict(size="[0, 0]"), "data.size"),
    (dict(size="[16, 100000]"), "data.size"),
    (dict(top="checkpoint_every = 0"), "checkpoint_every"),
    (dict(top="log_every = -1"), "log_every"),
    (dict(top="seed = -1"), "seed"),
    (dict(top="seed = 100000000000000000000"), "seed"),
    (dict(top="ema_decay = 1.0"), "ema_decay"),
    (dict(top="threads = 0"), "threads"),
    (dict(data="workers = -1"), "data.workers"),
    (dict(stage="grad_clip = -1.0"), "stages[0].grad_clip"),
    (dict(stage="warmup_steps = -5"), "stages[0].warmup_steps"),
    (dict(stage="lr = 0.0"), "stages[0].lr"),
    (dict(stage="lr = nan"), "stages[0].lr"),
    (dict(stage="lr = inf"), "stages[0].lr"),
    (dict(stage="min_lr_ratio = 1.5"), "stages[0].min_lr_ratio"),
    (dict(stage="weight_decay = -0.1"), "stages[0].weight_decay"),
    (dict(source="weight = -1.0"), "data.sources[0].weight"),
    (dict(source="weight = 0.0"), "data.sources[0].weight"),
    (dict(source="max_translation = -0.1"), "data.sources[0].max_translation"),
    (dict(source="scale_range = [2.0, 1.0]"), "data.sources[0].scale_range"),
    (dict(source="scale_range = [0.0, 1.0]"), "data.sources[0].scale_range"),
    (dict(source="max_rotation_deg = 400.0"), "data.sources[0].max_rotation_deg"),
    (dict(source="photometric_strength = -1.0"), "data.sources[0].photometric_strength"),
    (dict(loss="charbonnier_c = -1.0"), "loss.charbonnier_c"),
    (dict(loss="nll_weight = -1.0"), "loss.nll_weight"),
    (dict(loss="cutoff_px = 0.0"), "loss.cutoff_px"),
]


@pytest.mark.parametrize("kw, key", BAD, ids=[f"{k}:{next(iter(v.values()))}" for v, k in BAD])
def test_out_of_range_numbers_are_refused_naming_the_key(tmp_path, kw, key):
    with pytest.raises(ValueError) as e:
        tc.load_config(_write(tmp_path, **kw))
    msg = str(e.value)
    assert msg.startswith(key + ":") or f" {key}:" in msg, msg
    assert "must" in msg


@pytest.mark.parametrize("kw, key", [BAD[0], BAD[2], BAD[9], BAD[10], BAD[16]], ids=lambda x: str(x))
def test_the_command_exits_2_before_training(tmp_path, capsys, kw, key):
    from romav2_plugin.train.__main__ import main

    assert main([str(_write(tmp_path, **kw)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert key in err and "probably a bug" not in err
    assert not (tmp_path / "run").exists()


def test_defaults_and_edges_inside_the_ranges_are_accepted(tmp_path):
    cfg = tc.load_config(_write(tmp_path, top="checkpoint_every = 1\nseed = 9223372036854775807",
                                stage="warmup_steps = 0\ngrad_clip = 0.5\nmin_lr_ratio = 0.0",
                                source="weight = 0.25\nmax_translation = 0.0", data="workers = 0"))
    assert cfg.stages[0].warmup_steps == 0 and cfg.data.sources[0].weight == 0.25


def _numeric_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        inner = args[0]
        if dataclasses.is_dataclass(inner):
            yield from _numeric_fields(inner, f"{inner.__name__}.")
        elif typing.get_origin(inner) is tuple:
            sub = typing.get_args(inner)[0]
            if dataclasses.is_dataclass(sub):
                yield from _numeric_fields(sub, f"{sub.__name__}.")
            elif sub in (int, float):
                yield f"{cls.__name__}.{f.name}"
        elif inner in (int, float):
            yield f"{cls.__name__}.{f.name}"


def test_every_numeric_key_has_a_range():
    keys = set(_numeric_fields(tc.TrainConfig)) | set(_numeric_fields(LossConfig))
    assert keys, "no numeric keys found"
    missing = sorted(keys - set(tc.RANGES))
    assert not missing, f"numeric keys without a range in train/config.py RANGES: {missing}"
