"""Put a trained romav2-tiny into the package: fp16 weights + model card in romav2_plugin/assets/.

    python -m benchmarks.tiny.ship runs/romav2_tiny_part12 [--config benchmarks/tiny/romav2_tiny_continue.toml]
        [--set KEY=VALUE ...] [--data .tiny-data] [--figures benchmarks/results/tiny_heldout_cpu.json]

``--config`` and ``--set``: the run's training config, exactly as given to ``romav2-train`` (the recipe's
command lines: docs/romav2_tiny_recipe.md, ``python -m benchmarks.tiny.recipe``).

Reads the run's checkpoint (EMA weights), writes ``romav2_tiny.pt`` (official key layout; bf16 backbone as
the layout has it, fp16 elsewhere, upcast at load) and ``romav2_tiny.json``: the config, the training data
and their licences (benchmarks/tiny/training_images.py, read from the installed packages; it rewrites
romav2_tiny_training_images.csv too), steps, training time, machine, and the held-out figures; copies
the training log to ``benchmarks/results/tiny_training_cpu.csv`` with its curves ``tiny_training_cpu.png``.

A run that started from an earlier run's exported weights (``model.weights = ".../<run>/model.pt"``) is
shipped with that history: the card lists every part (config, steps, hours) and the training time is their
sum; the log joins the parts, each stage's steps counted on from the previous part's (column ``part``).
A run that started from the shipped model (``model.weights = "tiny"``) continues the shipped card's history
instead: its parts and their log rows (``benchmarks/results/tiny_training_cpu.csv``) come first, so a part can be
trained on any machine without the earlier runs' folders. Shipping such a run again (e.g. with ``--figures``)
drops its own earlier entry from that history first.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[2] / "romav2_plugin" / "assets"
TRAINING_LOG = "tiny_training_cpu.csv"
RESULTS = Path(__file__).resolve().parents[1] / "results"
NOTE = "demo model trained on synthetic data; not the paper's accuracy"


PAUSE_FACTOR = 5.0  # a log row this many times slower than its stage's median spans a pause, not training


def _seconds_and_steps(rows: list[dict[str, str]], cfg) -> tuple[float, dict[str, int], int]:
    """Training seconds (from the logged throughput), the steps done per stage, and how many rows were paused.

    Each row averages the steps since the previous row of its stage, so its seconds are ``steps * batch /
    pairs_per_s``. A row over ``PAUSE_FACTOR`` times slower than its stage's median throughput in this run spans
    a pause (the process stopped, e.g. with SIGSTOP while a CI check had the machine) and is counted at that
    median instead, so the card's hours are training time, not wall time.
    """
    medians = {name: statistics.median(float(r["pairs_per_s"]) for r in rows if r["stage"] == name)
               for name in {r["stage"] for r in rows}}
    seconds, prev, paused = 0.0, {}, 0
    for r in rows:
        n = int(r["step"]) - prev.get(r["stage"], 0)
        prev[r["stage"]] = int(r["step"])
        bs = next(s.batch_size for s in cfg.stages if s.name == r["stage"])
        rate = float(r["pairs_per_s"])
        if rate * PAUSE_FACTOR < medians[r["stage"]]:
            rate, paused = medians[r["stage"]], paused + 1
        seconds += n * bs / rate
    return seconds, {s.name: min(s.steps, int(prev.get(s.name, 0))) for s in cfg.stages}, paused


def _parts(cfg) -> list[tuple[Path, object]]:
    """The runs this one continues, oldest first, then this one: ``[(run_dir, config), ...]``."""
    from romav2_plugin.train.config import TrainConfig, config_from_dict

    parts = [(Path(cfg.out_dir), cfg)]
    while parts[0][1].model.weights and Path(parts[0][1].model.weights).name == "model.pt":
        run = Path(parts[0][1].model.weights).parent
        card = run / "model.json"
        if not (run / "log.csv").is_file() or not card.is_file():
            break
        parts.insert(0, (run, config_from_dict(TrainConfig, json.loads(card.read_text())["train_config"])))
    return parts


def _shipped_history(run_name: str) -> tuple[list[dict], list[dict[str, str]]]:
    """The shipped model's parts (card) and their log rows (results CSV), without any part named ``run_name``.

    For a run that started from ``weights = "tiny"``: the history it continues. A part of that name (this run,
    shipped before) and every later one are dropped, so shipping twice does not count a part twice.
    """
    parts = json.loads((ASSETS / "romav2_tiny.json").read_text(encoding="utf-8"))["parts"]
    keep = next((i for i, p in enumerate(parts) if p["run"] == run_name), len(parts))
    parts = parts[:keep]
    rows = [r for r in csv.DictReader((RESULTS / TRAINING_LOG).open(encoding="utf-8"))
            if int(r["part"]) <= keep]
    if {int(r["part"]) for r in rows} != set(range(1, keep + 1)):
        raise SystemExit(f"error: {RESULTS / TRAINING_LOG} does not hold the log of the shipped card's "
                         f"{keep} part(s); restore it from git (git checkout -- benchmarks/results)")
    return parts, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="the run's out_dir (holds checkpoint.pt and log.csv)")
    ap.add_argument("--config", default="benchmarks/tiny/romav2_tiny_continue.toml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="the run's romav2-train --set overrides (repeatable)")
    ap.add_argument("--data", default=".tiny-data", help="the folder made by benchmarks.tiny.fetch_images")
    ap.add_argument("--figures", default=None, help="JSON of held-out figures to record in the card")
    args = ap.parse_args(argv)

    from benchmarks._common import machine_info
    from romav2_plugin.config import config_to_dict
    from romav2_plugin.train.config import load_config
    from romav2_plugin.train.loop import Trainer, plot_curves

    cfg = load_config(args.config, args.overrides)
    if Path(cfg.out_dir).resolve() != Path(args.run).resolve():
        print(f"error: {args.config} trains into {cfg.out_dir}, not {args.run}", file=sys.stderr)
        return 2
    trainer = Trainer(cfg, progress=False)
    trainer.resume()
    parts = _parts(cfg)
    rows: list[dict[str, str]] = []
    seconds, history, offset, paused = 0.0, [], {}, 0
    if parts[0][1].model.weights == "tiny":  # continues the shipped model: its history comes first
        history, rows = _shipped_history(Path(cfg.out_dir).name)
        for p in history:
            seconds += p["training_time_hours"] * 3600
            paused += p["paused_log_rows"]
            for name, n in p["steps"].items():
                offset[name] = offset.get(name, 0) + n
    for i, (run, part_cfg) in enumerate(parts, len(history) + 1):
        part_rows = list(csv.DictReader((run / "log.csv").open(encoding="utf-8")))
        sec, steps, n_paused = _seconds_and_steps(part_rows, part_cfg)
        seconds += sec
        paused += n_paused
        history.append({"part": i, "run": run.name, "steps": steps, "training_time_hours": round(sec / 3600, 2),
                        "paused_log_rows": n_paused, "train_config": config_to_dict(part_cfg)})
        last_global = int(rows[-1]["global_step"]) if rows else 0
        for r in part_rows:
            rows.append({"part": str(i), **r, "global_step": str(int(r["global_step"]) + last_global),
                         "step": str(int(r["step"]) + offset.get(r["stage"], 0))})
        for name, n in steps.items():
            offset[name] = offset.get(name, 0) + n
    manifest = json.loads((Path(args.data) / "manifest.json").read_text(encoding="utf-8"))
    train_files = [e for e in manifest["files"] if e["split"] == "train"]
    from benchmarks.tiny.fetch_images import pictures
    from benchmarks.tiny.training_images import TABLE, card_training_data, describe, to_csv

    images = describe(pictures())  # the licence table, from the installed packages (as fetch_images links them)
    if [r["file"] for r in images] != [e["file"] for e in manifest["files"]]:
        print(f"error: the installed packages do not give the pictures of {args.data}/manifest.json; run "
              f"python -m benchmarks.tiny.fetch_images --out {args.data} --install (root)", file=sys.stderr)
        return 1
    TABLE.write_text(to_csv(images), encoding="utf-8")
    card = {
        "name": "romav2-tiny",
        "note": NOTE,
        "steps": offset,
        "parts": history,
        "training_time_hours": round(seconds / 3600, 2),
        "training_time_rule": (f"sum over the training log's rows of steps x batch / logged pairs per second; the "
                               f"{paused} row(s) over {PAUSE_FACTOR:g}x slower than their stage's median spanned a "
                               "pause of the process and are counted at that median"),
        "machine": f"{machine_info()['cpu']}, {os.cpu_count()} CPUs (shared with other work), torch {torch.__version__}",
        "date": dt.date.today().isoformat(),
        "recipe": "; ".join(_recipe(args, len(history))),
        "training_data": {
            "sources": ["synthetic homography pairs of photographs (strong photometric augmentation)",
                        "ray-cast 3D scenes (floor, walls, boxes) textured with crops of the same photographs"],
            "photographs": len(train_files),
            "held_out": manifest["rule"],
            "held_out_files": [e["file"] for e in manifest["files"] if e["split"] == "heldout"],
            **card_training_data(images),
        },
        "held_out_figures": json.loads(Path(args.figures).read_text()) if args.figures else None,
    }
    card["train_config"] = config_to_dict(cfg)  # as the trainer records it, but with the paths below made relative
    path = trainer.export(ASSETS / "romav2_tiny.pt", card=_relative(card), dtype=torch.float16)
    with (RESULTS / TRAINING_LOG).open("w", newline="", encoding="utf-8") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    plot_curves(RESULTS / TRAINING_LOG, (RESULTS / TRAINING_LOG).with_suffix(".png"))
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB) and {path.with_suffix('.json')}")
    if size > 25:
        print("error: over the 25 MB budget of the wheel", file=sys.stderr)
        return 1
    return 0


def _relative(obj):
    """``obj`` with every string naming a path inside this repository made relative to it."""
    root = str(ASSETS.parents[1]) + os.sep
    if isinstance(obj, dict):
        return {k: _relative(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative(v) for v in obj]
    return obj[len(root):] if isinstance(obj, str) and obj.startswith(root) else obj


def _recipe(args: argparse.Namespace, n_parts: int) -> list[str]:
    """The recipe's commands, oldest first: the earlier parts' (benchmarks.tiny.recipe), this run's, the ship."""
    from benchmarks.tiny.recipe import PARTS, command

    sets = [f"--set {shlex.quote(o)}" for o in args.overrides]
    this = " ".join(["romav2-train", args.config, *sets])
    earlier = [command(i) for i in range(1, n_parts) if i in PARTS]
    ship = " ".join(["python -m benchmarks.tiny.ship", args.run, "--config", args.config, *sets])
    return [*earlier, this, ship]


if __name__ == "__main__":
    sys.exit(main())
