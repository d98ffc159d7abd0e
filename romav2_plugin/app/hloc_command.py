"""``python -m romav2_plugin.hloc``: hloc's tools with the RoMa v2 matchers registered (:func:`main`).

``python -m hloc.match_dense`` takes its ``--conf`` choices from a dict built when hloc runs it as
``__main__``, so no plugin can extend it. This command takes the same arguments (all of hloc's confs plus
ours) and runs :func:`romav2_plugin.app.hloc.run_match_dense` (hloc's own ``hloc.match_dense.main`` with
input checks and all-or-nothing writes), in this process or, with ``--engine ray``, with the dense stage on
Ray workers (:mod:`romav2_plugin.distributed.hloc`). Exit codes: :mod:`romav2_plugin.app.errors`.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

from romav2_plugin.app.hloc import InputError, run_match_dense

__all__ = ["main"]

PROG = "python -m romav2_plugin.hloc"


def _parser(
    conf_names: list[str] | None, default_conf: str, hloc_missing: str | None = None
) -> argparse.ArgumentParser:
    from romav2_plugin.app.errors import EXIT_CODES_HELP
    from romav2_plugin.app.weights_option import WEIGHTS_HELP
    from romav2_plugin.config import SETTINGS

    note = f"\n\nhloc is not installed here: {hloc_missing}" if hloc_missing else ""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="hloc tools with the RoMa v2 matchers registered." + note,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "match_dense",
        help="hloc.match_dense.main with all of hloc's confs plus RoMa v2's",
        description="Dense matching with hloc.match_dense.main (hloc's arguments, plus --weights, --setting, "
        "--overwrite). Pairs already in the matches file are skipped; an interrupted run leaves the "
        "outputs as they were." + note,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pairs", type=Path, required=True, help="pairs file: one 'name0 name1' per line")
    p.add_argument("--image_dir", type=Path, required=True)
    p.add_argument("--export_dir", type=Path, required=True)
    p.add_argument(
        "--matches",
        type=Path,
        default=None,
        help="matches file (default: EXPORT_DIR/<output>_<pairs stem>.h5)",
    )
    p.add_argument(
        "--features",
        type=str,
        default=None,
        help="features file (*.h5, needs --matches) or name prefix (default 'feats_': EXPORT_DIR/feats_<output>.h5)",
    )
    conf_help = "hloc conf (default: romav2)" + ("" if conf_names else "; the list needs hloc installed")
    p.add_argument("--conf", type=str, default=default_conf, choices=conf_names, help=conf_help)
    p.add_argument("--weights", default=None, metavar="PATH|URL|tiny", help="RoMa v2 " + WEIGHTS_HELP)
    p.add_argument(
        "--setting", default=None, choices=list(SETTINGS), help="RoMa v2 setting (overrides the conf)"
    )
    p.add_argument("--overwrite", action="store_true", help="recompute pairs already in the matches file")
    from romav2_plugin.distributed.options import add_engine_arguments

    add_engine_arguments(p, what="dense matching")  # --engine ray, ... (romav2_plugin.distributed)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (the codes of :mod:`romav2_plugin.app.errors`)."""
    from romav2_plugin.app.errors import (
        EXIT_RUNTIME,
        EXIT_SETUP,
        EXIT_USAGE,
        CommandError,
        interrupt_code,
        is_disk_full,
        run_command,
    )
    from romav2_plugin.app.weights_option import choose_weights, is_weights_error, weights_error

    hloc_missing = None
    confs: dict[str, Any] | None = None
    try:
        from romav2_plugin.adapters.hloc import ensure_registered

        confs = ensure_registered().confs
    except ImportError as e:
        hloc_missing = str(e)
    parser = _parser(list(confs) if confs else None, "romav2", hloc_missing)
    args = parser.parse_args(argv)

    def body() -> int:
        if confs is None:
            raise CommandError(str(hloc_missing), EXIT_SETUP)
        if args.conf not in confs:
            parser.error(f"unknown --conf {args.conf!r}")
        from romav2_plugin.distributed.options import ray_only_options_given

        ray_only = ray_only_options_given(args)
        if ray_only:
            parser.error(f"{', '.join(ray_only)} only apply with --engine ray (add --engine ray, or leave them out)")
        conf = copy.deepcopy(confs[args.conf])
        choice = None
        if conf["model"].get("name") == "romav2":
            choice = choose_weights(
                args.weights if args.weights is not None else conf["model"].get("weights")
            )
        if args.weights is not None or args.setting is not None:
            if choice is None:
                parser.error(f"--weights/--setting apply to RoMa v2 confs only, not {args.conf!r}")
            if args.weights is not None:
                conf["model"]["weights"] = args.weights
            if args.setting is not None:
                conf["model"]["setting"] = args.setting
        try:
            run = run_match_dense
            if getattr(args, "engine", "local") == "ray":  # the same files; the dense stage on Ray workers
                from romav2_plugin.distributed.hloc import hloc_runner

                run = hloc_runner(args)
            features, matches = run(
                conf,
                args.pairs,
                args.image_dir,
                args.export_dir,
                args.matches,
                args.features,
                overwrite=args.overwrite,
            )
        except InputError as e:
            raise CommandError(str(e), EXIT_USAGE) from None
        except KeyboardInterrupt as e:
            raise CommandError(
                "interrupted: the output files were left as they were; run the same command again to resume.",
                interrupt_code(e),
            ) from None
        except ImportError as e:
            raise CommandError(f"{e} ({_hint_extra()})", EXIT_SETUP) from None
        except (OSError, ValueError, RuntimeError, IndexError, KeyError) as e:
            if is_weights_error(e) or (
                choice is not None and isinstance(e, ValueError) and "checkpoint" in str(e)
            ):
                raise weights_error(e, choice) from None
            what = "the disk is full" if is_disk_full(e) else str(e)
            raise CommandError(f"{what}\nThe output files were left as they were.", EXIT_RUNTIME) from None
        print(f"features: {features}\nmatches: {matches}")
        return 0

    return run_command(PROG, body)


def _hint_extra() -> str:
    return 'pip install "romav2-plugin[hloc]" and hloc itself'


if __name__ == "__main__":
    sys.exit(main())
