"""``romav2-train CONFIG.toml [--set KEY=VALUE ...] [--resume]``: train or fine-tune RoMa v2 (see :mod:`romav2_plugin.train.config`).

Exit codes are those of every command of the package (:mod:`romav2_plugin.app.errors`): 0 done; 1 runtime
failure; 2 bad config or input (unknown key, missing folder, unreadable image, a run that exists or differs);
4 weights to start from missing or of the wrong layout; 130 / 143 interrupted (the last checkpoint is kept:
rerun with ``--resume``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from romav2_plugin.app.errors import EXIT_OK, EXIT_RUNTIME, EXIT_SETUP, EXIT_USAGE, CommandError, run_command
from romav2_plugin.app.weights_option import is_weights_error, weights_error

PROG = "romav2-train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train or fine-tune RoMa v2 with the paper's two-stage recipe (matcher, then refiners).",
        epilog="Writes OUT_DIR/checkpoint.pt (exact resume), log.csv, curves.png, and model.pt + model.json "
        "(EMA weights in the official layout: RoMaV2.from_pretrained('OUT_DIR/model.pt'), --weights OUT_DIR/model.pt). "
        "Exit codes: 0 done, 1 runtime failure, 2 bad config or input, 4 weights missing or invalid, 130/143 interrupted.",
    )
    p.add_argument("config", help="TOML training config (keys: see romav2_plugin.train.config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a key of CONFIG, checked like the file's keys (repeatable): --set seed=11 "
                   "--set 'stages[0].steps=1200' --set model.weights=runs/a/model.pt (paths given here are "
                   "relative to the current directory)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (checkpointed, no export)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--export", metavar="PATH", default=None,
                   help="do not train: write the EMA weights of OUT_DIR/checkpoint.pt to PATH (+ PATH.json) and exit")
    return p


def _input_error(e: Exception) -> CommandError:
    from romav2_plugin.train.checkpoint import UnsafeCheckpoint

    if isinstance(e, UnsafeCheckpoint):  # a checkpoint with code: a set-up problem, as unsafe weights are
        return CommandError(str(e), EXIT_SETUP)
    if is_weights_error(e):
        return weights_error(e)
    return CommandError(str(e), EXIT_USAGE)


def _body(args: argparse.Namespace) -> int:
    from romav2_plugin.train.checkpoint import DiskFull
    from romav2_plugin.train.config import load_config
    from romav2_plugin.train.loop import Trainer

    try:
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg, progress=not args.no_progress)
        if args.export:
            trainer.resume()
            path = trainer.export(Path(args.export))
            print(f"{PROG}: exported {path} (EMA weights at step {trainer.global_step}) and {path.with_suffix('.json')}")
            return EXIT_OK
        path = trainer.run(resume=args.resume, max_steps=args.max_steps)
    except DiskFull as e:  # the last checkpoint is kept: the run resumes from it
        hint = f" and resume with: {PROG} {args.config} --resume" if not args.export else " and rerun"
        raise CommandError(f"{e.strerror}{hint}.", EXIT_RUNTIME) from None
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not is_weights_error(e):
            raise
        raise _input_error(e) from None
    except KeyboardInterrupt:
        print(f"{PROG}: the last checkpoint is kept; resume with: {PROG} {_config_args(args)} --resume", file=sys.stderr)
        raise
    if path is not None:
        print(f"{PROG}: exported {path} (EMA weights, official layout) and {path.with_suffix('.json')}")
    else:
        print(f"{PROG}: stopped after --max-steps; checkpoint {trainer.checkpoint_path}")
    return EXIT_OK


def _config_args(args: argparse.Namespace) -> str:
    import shlex

    return " ".join([shlex.quote(args.config), *(f"--set {shlex.quote(o)}" for o in args.overrides)])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: _body(args))


if __name__ == "__main__":
    sys.exit(main())
