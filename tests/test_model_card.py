"""Model cards: every numeric value of a card's ``config`` is range-checked when the card
is read (one table, :data:`romav2_plugin.config.CARD_RANGES`); a bad one is refused with exit 4 naming the
key, before anything is matched (``"anchor_width": 0`` was a ZeroDivisionError "bug" in the middle of a match)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from romav2_plugin import config
from romav2_plugin.app import cli
from romav2_plugin.testing import make_micro_weights
from romav2_plugin.weights import named as pretrained

ASSETS = Path(__file__).resolve().parents[1] / "romav2_plugin" / "assets"


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return make_micro_weights(tmp_path_factory.mktemp("w") / "micro.pt")


def _with_card_value(micro, tmp_path, keys, value):
    w = tmp_path / "m.pt"
    w.write_bytes(micro.read_bytes())
    card = json.loads(micro.with_suffix(".json").read_text())
    node = card["config"]
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    w.with_suffix(".json").write_text(json.dumps(card))
    return w


@pytest.mark.parametrize(
    "keys, value, named",
    [
        (["anchor_width"], 0, "anchor_width"),
        (["anchor_height"], -512, "anchor_height"),
        (["refiners", 1, "refine_init"], 0.0, "refiners[1].refine_init"),
        (["refiners", 0, "kernel_size"], 0, "refiners[0].kernel_size"),
        (["matcher", "temperature"], 0.0, "matcher.temperature"),
        (["refiners", 2, "bn_momentum"], 2.0, "refiners[2].bn_momentum"),
    ],
)
def test_bad_card_value_exits_4_naming_the_key(micro, tmp_path, capsys, keys, value, named):
    w = _with_card_value(micro, tmp_path, keys, value)
    out = tmp_path / "o.h5"
    code = cli.main([str(ASSETS / "demo_A.jpg"), str(ASSETS / "demo_B.jpg"), "--weights", str(w), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 4, err
    assert f"{named}: must be" in err and "m.json" in err and "bug" not in err, err
    assert not out.exists()


def test_nan_in_a_card_is_refused(micro, tmp_path):
    w = _with_card_value(micro, tmp_path, ["matcher", "rope_base"], float("nan"))
    with pytest.raises(ValueError, match=r"matcher\.rope_base: must be > 0"):
        pretrained.config_from_card(w)


def test_shipped_and_official_configs_are_in_range(micro):
    config.check_card_ranges(config.RoMaV2Config())
    config.check_card_ranges(config.tiny_config())
    assert pretrained.config_from_card(micro) is not None
    assert pretrained.config_from_card(pretrained.named_path("tiny")) == config.tiny_config()


def _numeric_keys(cls):
    import typing

    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        args = typing.get_args(tp)
        inner = args[0] if args else tp
        if dataclasses.is_dataclass(inner):
            yield from _numeric_keys(inner)
        elif tp in (int, float) or set(args) & {int, float}:
            yield f"{cls.__name__}.{f.name}"


def test_every_numeric_card_key_has_a_range():
    missing = [k for k in _numeric_keys(config.RoMaV2Config) if k not in config.CARD_RANGES]
    assert not missing, f"add these keys to CARD_RANGES: {missing}"
    assert len(list(_numeric_keys(config.RoMaV2Config))) > 30


def test_tiny_card_table_of_photographs_and_licence_page_agree():
    """The shipped table of romav2-tiny's photographs (one row each: author(s), SPDX licence, where stated),
    the card's training_data and assets/LICENSES.md describe the same pictures and the same licence counts.
    (benchmarks/tests/test_tiny_training_images.py checks the table against the installed packages.)"""
    import csv
    from collections import Counter

    from packaging.licenses import canonicalize_license_expression

    card = json.loads((ASSETS / "romav2_tiny.json").read_text(encoding="utf-8"))["training_data"]
    with (ASSETS / card["images_table"]).open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == card["photographs"] == 61
    assert [r["file"] for r in rows if r["split"] == "heldout"] == card["held_out_files"]
    assert len({r["file"] for r in rows}) == len(rows)
    counts = Counter(r["licence"] for r in train)
    assert dict(counts) == card["licence_counts"]
    assert sum(v for k, v in counts.items() if k.startswith("CC-BY-SA")) == card["cc_by_sa_photographs"] == 21
    for r in rows:
        assert r["authors"] and r["statement_source"] and r["licence_as_stated"], r
        assert canonicalize_license_expression(r["licence"]) == r["licence"], r
    page = (ASSETS / "LICENSES.md").read_text(encoding="utf-8")
    for licence, n in counts.items():
        assert re.search(rf"{re.escape(licence)}\W[^|\n]*\| {n} \|", page), (licence, n)
    assert "romav2_tiny.pt" in page and card["images_table"] in page
