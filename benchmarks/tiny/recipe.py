"""romav2-tiny's recipe as command lines: part 1 is ``romav2_tiny.toml``, every later part is
``romav2_tiny_continue.toml`` with ``--set`` overrides. docs/romav2_tiny_recipe.md is this module's table.

    python -m benchmarks.tiny.recipe                 # print the table (markdown)
    python -m benchmarks.tiny.recipe --check         # exit 1 unless every part's command gives its recorded config

``--check`` compares each part's parsed config with the one the shipped model card records for it
(``romav2_plugin/assets/romav2_tiny.json``, ``parts[i].train_config``), from the repository root.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRATCH = "benchmarks/tiny/romav2_tiny.toml"
CONTINUE = "benchmarks/tiny/romav2_tiny_continue.toml"

#: part -> the ``--set`` overrides of romav2_tiny_continue.toml that reproduce it (part 1: romav2_tiny.toml as is).
#: Derived by diffing the parsed configs of the former per-part files (romav2_tiny_part2.toml ... _part12.toml).
PARTS: dict[int, list[str]] = {
    1: [],
    2: ["out_dir=runs/romav2_tiny_part2", "seed=1", "model.weights=runs/romav2_tiny/model.pt",
        "stages[0].steps=1800", "stages[0].lr=4e-4", "stages[1].steps=400"],
    3: ["out_dir=runs/romav2_tiny_part3", "seed=2", "model.weights=runs/romav2_tiny_part2/model.pt",
        "stages[0].steps=1800", "stages[1].steps=120"],
    4: ["out_dir=runs/romav2_tiny_part4", "seed=3", "model.weights=runs/romav2_tiny_part3/model.pt",
        "stages[0].steps=3600", "stages[1].steps=150"],
    5: ["out_dir=runs/romav2_tiny_part5", "seed=4", "model.weights=runs/romav2_tiny_part4/model.pt",
        "stages[0].steps=4800", "stages[1].steps=150"],
    6: ["out_dir=runs/romav2_tiny_part6", "seed=5", "model.weights=runs/romav2_tiny_part5/model.pt",
        "stages[0].steps=4800", "stages[1].steps=150"],
    7: ["out_dir=runs/romav2_tiny_part7", "seed=6", "model.weights=runs/romav2_tiny_part6/model.pt",
        "stages[0].steps=4800", "stages[1].steps=150"],
    8: ["out_dir=runs/romav2_tiny_part8", "seed=7"],
    9: ["out_dir=runs/romav2_tiny_part9", "seed=8"],
    10: ["out_dir=runs/romav2_tiny_part10", "seed=9"],
    11: ["out_dir=runs/romav2_tiny_part11", "seed=10"],
    12: ["out_dir=runs/romav2_tiny_part12", "seed=11", "stages[0].steps=1200", "stages[1].steps=700"],
}

#: The GPU variant (``python -m benchmarks.gpu_suite``'s training step; not a part of the shipped chain). The
#: suite replaces both stages' steps with what its time budget allows.
GPU: list[str] = ["out_dir=runs/romav2_tiny_gpu", "seed=100", "ema_decay=0.995", "checkpoint_every=100",
                  "device=cuda", "data.workers=14", "data.sources[0].path=.gpu-data/train",
                  "data.sources[1].path=.gpu-data/train", "stages[0].batch_size=32", "stages[1].batch_size=32"]


def config_file(part: int) -> str:
    return SCRATCH if part == 1 else CONTINUE


def command(part: int) -> str:
    """The ``romav2-train`` command line of a part, run from the repository root."""
    return " ".join(["romav2-train", config_file(part), *(f"--set {shlex.quote(o)}" for o in PARTS[part])])


def load(part: int):
    """The parsed config of a part (paths resolved from the repository root)."""
    import os

    from romav2_plugin.train.config import load_config

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return load_config(ROOT / config_file(part), PARTS[part])
    finally:
        os.chdir(cwd)


def table() -> str:
    rows = ["| part | command (from the repository root) |", "|---|---|"]
    rows += [f"| {p} | `{command(p)}` |" for p in PARTS]
    return "\n".join(rows)


def check(card_path: Path = ROOT / "romav2_plugin" / "assets" / "romav2_tiny.json") -> list[str]:
    """Differences between each part's command and the config the model card records for that part."""
    from romav2_plugin.config import config_from_dict, config_to_dict
    from romav2_plugin.train.config import TrainConfig

    card = json.loads(card_path.read_text())
    problems = []
    for entry in card["parts"]:
        part = entry["part"]
        # read through today's config classes: keys added since (at their defaults) appear on both sides
        recorded = config_to_dict(config_from_dict(TrainConfig, entry["train_config"]))
        ours = config_to_dict(load(part))
        for d in (recorded, ours):  # the card records paths relative to the repository root
            d["out_dir"] = _rel(d["out_dir"])
            if d["model"].get("weights"):
                d["model"]["weights"] = _rel(d["model"]["weights"])
            for s in d["data"]["sources"]:
                s["path"] = [_rel(p) for p in s["path"]]
        if json.loads(json.dumps(recorded)) != json.loads(json.dumps(ours)):
            problems.append(f"part {part}: {command(part)} gives {ours}, the card records {recorded}")
    return problems


def _rel(p: str) -> str:
    try:
        return str(Path(p).relative_to(ROOT))
    except ValueError:
        return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare each part's config with the model card's record")
    args = ap.parse_args(argv)
    if args.check:
        problems = check()
        print("\n".join(problems) or f"all {len(PARTS)} parts match the model card")
        return 1 if problems else 0
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
