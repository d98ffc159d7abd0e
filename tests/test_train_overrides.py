"""``romav2-train CONFIG --set KEY=VALUE``: overrides of a training config, checked like the file's keys.

The fixtures are the former per-part files of the romav2-tiny recipe (parts 2, 10 and 12, comments dropped),
which ``benchmarks/tiny/romav2_tiny_continue.toml`` + ``--set`` replaces: both must parse to the same config.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from romav2_plugin.train.__main__ import build_parser, main
from romav2_plugin.train.config import apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[1]
CONTINUE = ROOT / "benchmarks" / "tiny" / "romav2_tiny_continue.toml"

_BODY = """
ema_decay = 0.99
log_every = 10
checkpoint_every = 25

[model]
architecture = "tiny"
weights = "{weights}"
train_backbone = true

[data]
size = [256, 256]
workers = 2

[[data.sources]]
kind = "homography"
path = "../../.tiny-data/train"
weight = 0.6
photometric_strength = 0.8
max_rotation_deg = 15.0
scale_range = [0.8, 1.25]
max_translation = 0.1
max_perspective = 0.1

[[data.sources]]
kind = "rendered"
path = "../../.tiny-data/train"
weight = 0.4
photometric_strength = 0.5

[[stages]]
name = "matcher"
steps = {matcher_steps}
batch_size = 4
lr = {matcher_lr}
warmup_steps = 50
bidirectional = false

[[stages]]
name = "refiners"
steps = {refiner_steps}
batch_size = 4
lr = 2e-4
warmup_steps = 25
bidirectional = false
"""


def _old_part(part: int, seed: int, weights: str, matcher_steps: int, matcher_lr: str, refiner_steps: int) -> str:
    head = f'out_dir = "../../runs/romav2_tiny_part{part}"\nseed = {seed}\n'
    return head + _BODY.format(weights=weights, matcher_steps=matcher_steps, matcher_lr=matcher_lr,
                               refiner_steps=refiner_steps)


#: part -> (the former romav2_tiny_partN.toml, its --set overrides of romav2_tiny_continue.toml)
PARTS = {
    2: (_old_part(2, 1, "../../runs/romav2_tiny/model.pt", 1800, "4e-4", 400),
        ["out_dir=runs/romav2_tiny_part2", "seed=1", "model.weights=runs/romav2_tiny/model.pt",
         "stages[0].steps=1800", "stages[0].lr=4e-4", "stages[1].steps=400"]),
    10: (_old_part(10, 9, "tiny", 2000, "3e-4", 300),
         ["out_dir=runs/romav2_tiny_part10", "seed=9"]),
    12: (_old_part(12, 11, "tiny", 1200, "3e-4", 700),
         ["out_dir=runs/romav2_tiny_part12", "seed=11", "stages[0].steps=1200", "stages[1].steps=700"]),
}


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A copy of the recipe's folder layout (benchmarks/tiny/) with the current directory at its root, so
    the file's relative paths and the command line's resolve to the same places."""
    tiny = tmp_path / "benchmarks" / "tiny"
    tiny.mkdir(parents=True)
    shutil.copy(CONTINUE, tiny / CONTINUE.name)
    monkeypatch.chdir(tmp_path)
    return tiny


@pytest.mark.parametrize("part", sorted(PARTS))
def test_continue_with_set_is_the_former_part_file(repo, part):
    old_text, overrides = PARTS[part]
    (repo / "old.toml").write_text(old_text)
    old = load_config(repo / "old.toml")
    new = load_config(repo / CONTINUE.name, build_parser().parse_args(
        ["x.toml", *[a for o in overrides for a in ("--set", o)]]).overrides)
    assert new == old
    assert Path(new.out_dir) == repo.parents[1] / "runs" / f"romav2_tiny_part{part}"


@pytest.mark.parametrize("part", sorted(PARTS))
def test_recipe_document_gives_the_tested_command(part):
    """docs/romav2_tiny_recipe.md lists, for each part, exactly the overrides tested above."""
    doc = (ROOT / "docs" / "romav2_tiny_recipe.md").read_text()
    sets = " ".join(f"--set '{o}'" if "[" in o else f"--set {o}" for o in PARTS[part][1])
    assert f"`romav2-train benchmarks/tiny/romav2_tiny_continue.toml {sets}`" in doc


@pytest.mark.parametrize("wrong", [["seed=12"], ["stages[1].steps=300"], ["stages[0].steps=700", "stages[1].steps=1200"],
                                   ["stages[0].lr=3e-5"]])
def test_a_wrong_override_gives_another_config(repo, wrong):
    old_text, overrides = PARTS[12]
    (repo / "old.toml").write_text(old_text)
    assert load_config(repo / CONTINUE.name, [*overrides, *wrong]) != load_config(repo / "old.toml")


def test_values_are_toml_else_strings(repo):
    cfg = load_config(repo / CONTINUE.name, ["data.size=[320, 320]", "amp=true", "threads=2", "ema_decay=0.5",
                                             "data.sources[1].weight=1", "device=cpu", "model.weights=tiny"])
    assert cfg.data.size == (320, 320) and cfg.amp is True and cfg.threads == 2 and cfg.ema_decay == 0.5
    assert cfg.data.sources[1].weight == 1 and cfg.device == "cpu" and cfg.model.weights == "tiny"
    cfg = load_config(repo / CONTINUE.name, ['device="cpu"', "data.size[1]=128"])
    assert cfg.device == "cpu" and cfg.data.size == (256, 128)


def test_later_override_wins_and_file_is_untouched(repo):
    raw = {"seed": 0, "stages": [{"name": "matcher", "steps": 5}]}
    out = apply_overrides(raw, ["seed=1", "seed=2", "stages[0].steps=7"])
    assert out["seed"] == 2 and out["stages"][0]["steps"] == 7
    assert raw == {"seed": 0, "stages": [{"name": "matcher", "steps": 5}]}


def test_paths_on_the_command_line_are_relative_to_the_current_directory(repo, tmp_path):
    cfg = load_config(repo / CONTINUE.name, ["out_dir=elsewhere/run", "model.weights=w/model.pt",
                                             "data.sources[0].path=photos"])
    assert Path(cfg.out_dir) == tmp_path / "elsewhere" / "run"
    assert Path(cfg.model.weights) == tmp_path / "w" / "model.pt"
    assert cfg.data.sources[0].path == (str(tmp_path / "photos"),)
    assert cfg.data.sources[1].path == (str(tmp_path / ".tiny-data" / "train"),)  # the file's own: from the file


@pytest.mark.parametrize("override, old, new", [
    ("sede=3", "out_dir =", "sede = 3\nout_dir ="),                                  # unknown top-level key
    ("seed=abc", "seed = 12 ", 'seed = "abc" '),                                       # wrong type
    ("seed=1.5", "seed = 12 ", "seed = 1.5 "),
    ("amp=1", "out_dir =", "amp = 1\nout_dir ="),
    ("stages[0].stepz=3", "steps = 2000", "steps = 2000\nstepz = 3"),                  # unknown key, list of tables
    ("stages[1].steps=many", "steps = 300", 'steps = "many"'),                         # wrong type, list of tables
    ("data.sources[0].kind=video", 'kind = "homography"', 'kind = "video"'),           # not one of the choices
    ("model.colour=red", 'architecture = "tiny"', 'architecture = "tiny"\ncolour = "red"'),  # unknown key in a table
])
def test_bad_override_gives_the_files_error(repo, override, old, new):
    """The override and the same key written in the file give the very same message, which names the key."""
    with pytest.raises(ValueError) as by_set:
        load_config(repo / CONTINUE.name, [override])
    text = CONTINUE.read_text()
    assert text.count(old) == 1
    (repo / "bad.toml").write_text(text.replace(old, new))
    with pytest.raises(ValueError) as by_file:
        load_config(repo / "bad.toml")
    assert str(by_set.value) == str(by_file.value)
    key = override.partition("=")[0]
    assert key.rsplit(".", 1)[-1].split("[")[0] in str(by_set.value)


@pytest.mark.parametrize("override, expected", [
    ("stages[2].steps=100", "index 2 is past the end of stages (2 entries: indices 0 to 1)"),
    ("data.sources[5].weight=1", "index 5 is past the end of data.sources (2 entries"),
    ("data.size[2]=64", "index 2 is past the end of data.size (2 entries"),
    ("seed[0]=1", "seed is not a list"),
    ("seed.value=1", "seed is a value, not a table"),
    ("stages[x].steps=1", "'stages[x]' is not a key"),
    ("stages[-1].steps=1", "'stages[-1]' is not a key"),
    ("seed", "expected KEY=VALUE"),
    ("=3", "expected KEY=VALUE"),
])
def test_malformed_override_or_bad_index_is_refused(repo, override, expected):
    with pytest.raises(ValueError) as e:
        load_config(repo / CONTINUE.name, [override])
    assert expected in str(e.value), str(e.value)


def test_command_line_exits_2_naming_the_key(repo, capsys):
    assert main([str(repo / CONTINUE.name), "--set", "stages[0].stepz=3", "--no-progress"]) == 2
    assert "stages[0].stepz" in capsys.readouterr().err
    assert main([str(repo / CONTINUE.name), "--set", "stages[9].steps=3", "--no-progress"]) == 2
    assert "index 9 is past the end of stages" in capsys.readouterr().err
