"""Put a trained romav2-tiny into the package: fp16 weights + model card in romav2_plugin/assets/.

    python -m benchmarks.tiny.ship runs/romav2_tiny [--config benchmarks/tiny/romav2_tiny.toml]
        [--data .tiny-data] [--figures benchmarks/results/tiny_heldout.json]

Reads the run's checkpoint (EMA weights), writes ``romav2_tiny.pt`` (official key layout; bf16 backbone as
the layout has it, fp16 elsewhere, upcast at load) and ``romav2_tiny.json``: the config, the training data
and their licences (from the fetch manifest), steps, training time, machine, and the held-out figures; copies
the training log to ``benchmarks/results/tiny_training.csv`` with its curves ``tiny_training.png``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[2] / "romav2_plugin" / "assets"
NOTE = "demo model trained on synthetic data; not the paper's accuracy"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="the run's out_dir (holds checkpoint.pt and log.csv)")
    ap.add_argument("--config", default="benchmarks/tiny/romav2_tiny.toml")
    ap.add_argument("--data", default=".tiny-data", help="the folder made by benchmarks.tiny.fetch_images")
    ap.add_argument("--figures", default=None, help="JSON of held-out figures to record in the card")
    args = ap.parse_args(argv)

    from romav2_plugin.train.config import load_config
    from romav2_plugin.train.loop import Trainer, plot_curves

    cfg = load_config(args.config)
    if Path(cfg.out_dir).resolve() != Path(args.run).resolve():
        print(f"error: {args.config} trains into {cfg.out_dir}, not {args.run}", file=sys.stderr)
        return 2
    trainer = Trainer(cfg, progress=False)
    trainer.resume()
    rows = list(csv.DictReader((Path(args.run) / "log.csv").open(encoding="utf-8")))
    seconds = 0.0
    prev = {}
    for r in rows:  # each row averages the steps since the previous row of its stage
        n = int(r["step"]) - prev.get(r["stage"], 0)
        prev[r["stage"]] = int(r["step"])
        bs = next(s.batch_size for s in cfg.stages if s.name == r["stage"])
        seconds += n * bs / float(r["pairs_per_s"])
    manifest = json.loads((Path(args.data) / "manifest.json").read_text(encoding="utf-8"))
    train_files = [e for e in manifest["files"] if e["split"] == "train"]
    licences = sorted({(e["package"], e["licence"]) for e in manifest["files"]})
    card = {
        "name": "romav2-tiny",
        "note": NOTE,
        "steps": {s.name: min(s.steps, int(prev.get(s.name, 0))) for s in cfg.stages},
        "planned_steps": {s.name: s.steps for s in cfg.stages},
        "training_time_hours": round(seconds / 3600, 2),
        "machine": f"{_cpu()}, {os.cpu_count()} CPUs (shared with other work), torch {torch.__version__}",
        "date": dt.date.today().isoformat(),
        "recipe": "romav2-train benchmarks/tiny/romav2_tiny.toml; python -m benchmarks.tiny.ship " + args.run,
        "training_data": {
            "sources": ["synthetic homography pairs of photographs (strong photometric augmentation)",
                        "ray-cast 3D scenes (floor, walls, boxes) textured with crops of the same photographs"],
            "photographs": len(train_files),
            "held_out": manifest["rule"],
            "held_out_files": [e["file"] for e in manifest["files"] if e["split"] == "heldout"],
            "packages_and_licences": [{"package": p, "licence": lic} for p, lic in licences],
        },
        "held_out_figures": json.loads(Path(args.figures).read_text()) if args.figures else None,
    }
    path = trainer.export(ASSETS / "romav2_tiny.pt", card=card, dtype=torch.float16)
    results = Path(__file__).resolve().parents[1] / "results"
    shutil.copyfile(Path(args.run) / "log.csv", results / "tiny_training.csv")
    plot_curves(results / "tiny_training.csv", results / "tiny_training.png")
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB) and {path.with_suffix('.json')}")
    if size > 25:
        print("error: over the 25 MB budget of the wheel", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
