"""``romav2-train CONFIG.toml [--resume]``: train or fine-tune RoMa v2 (see :mod:`romav2_plugin.train.config`).

Exit codes: 0 done; 1 runtime failure; 2 bad config or input (unknown key, missing folder, unreadable
image, checkpoint of the wrong layout); 130 interrupted (the last checkpoint is kept: rerun with --resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="romav2-train",
        description="Train or fine-tune RoMa v2 with the paper's two-stage recipe (matcher, then refiners).",
        epilog="Writes OUT_DIR/checkpoint.pt (exact resume), log.csv, curves.png, and model.pt + model.json "
        "(EMA weights in the official layout: RoMaV2.from_pretrained('OUT_DIR/model.pt'), --weights OUT_DIR/model.pt).",
    )
    p.add_argument("config", help="TOML training config (keys: see romav2_plugin.train.config)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (checkpointed, no export)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--export", metavar="PATH", default=None,
                   help="do not train: write the EMA weights of OUT_DIR/checkpoint.pt to PATH (+ PATH.json) and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from romav2_plugin.train.config import load_config
        from romav2_plugin.train.loop import Trainer

        cfg = load_config(args.config)
        trainer = Trainer(cfg, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"romav2-train: error: {e}", file=sys.stderr)
        return 2
    if args.export:
        try:
            trainer.resume()
            path = trainer.export(Path(args.export))
        except (ValueError, FileNotFoundError) as e:
            print(f"romav2-train: error: {e}", file=sys.stderr)
            return 2
        print(f"romav2-train: exported {path} (EMA weights at step {trainer.global_step}) and {path.with_suffix('.json')}")
        return 0
    try:
        path = trainer.run(resume=args.resume, max_steps=args.max_steps)
    except KeyboardInterrupt:
        print(f"romav2-train: interrupted; resume with: romav2-train {args.config} --resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"romav2-train: error: {e}", file=sys.stderr)
        return 2
    if path is not None:
        print(f"romav2-train: exported {path} (EMA weights, official layout) and {path.with_suffix('.json')}")
    else:
        print(f"romav2-train: stopped after --max-steps; checkpoint {trainer.checkpoint_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
