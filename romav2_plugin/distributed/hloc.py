"""``python -m romav2_plugin.hloc match_dense ... --engine ray``: a drop-in for ``hloc.match_dense.main``
with hloc's dense stage on Ray workers.

Only hloc's dense stage (``hloc.match_dense.match_dense``: read, preprocess, match, rescale) runs on the
workers; the driver writes each pair's dense predictions exactly as hloc does and then runs hloc's own
keypoint aggregation and assignment, so the features/matches files are hloc's. The run goes through
:func:`romav2_plugin.app.hloc.run_match_dense` (input checks, outputs replaced only when the run completes);
a cache of dense predictions next to the matches file (removed when the run completes) lets an interrupted
run resume without recomputing them.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from romav2_plugin.app.errors import EXIT_RUNTIME, EXIT_SETUP, EXIT_USAGE, CommandError
from romav2_plugin.app.results import pair_key
from romav2_plugin.app.weights_option import is_weights_error
from romav2_plugin.distributed.cluster import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_IN_FLIGHT,
    Pool,
    connect,
    drive,
    import_ray,
    maybe_die,
    plan_workers,
    set_threads,
    start_actors,
)
from romav2_plugin.distributed.options import DEFAULT_BATCH_SIZE, DEFAULT_CONNECT_TIMEOUT

__all__ = ["hloc_runner", "hloc_match_dense"]

_HLOC_CACHE_SUFFIX = ".ray-dense.h5"


def hloc_runner(args) -> Callable[..., tuple[Path, Path]]:
    """``python -m romav2_plugin.hloc match_dense ... --engine ray``: :func:`hloc_match_dense` with the command
    line's Ray options, called like :func:`romav2_plugin.app.hloc.run_match_dense`."""
    import functools

    import_ray()  # at once: before hloc or the model is loaded
    return functools.partial(
        hloc_match_dense,
        address=args.address,
        connect_timeout=getattr(args, "connect_timeout", DEFAULT_CONNECT_TIMEOUT),
        num_workers=args.workers,
        num_gpus_per_worker=args.gpus_per_worker,
        num_cpus_per_worker=args.cpus_per_worker,
        batch_size=args.batch_size,
    )


class _HlocWorker:
    """hloc's dense stage for one pair at a time: ``ImagePairDataset`` preprocessing, the matcher of
    ``conf["model"]``, the optional flip and the rescaling to original pixels, as in
    ``hloc.match_dense.match_dense``; the driver writes the result."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.count = 0
        self.error: tuple[str, int] | None = None
        try:
            import torch

            set_threads(spec["cpus"])
            from romav2_plugin.adapters.hloc import ensure_registered

            md = ensure_registered()
            from hloc import matchers
            from hloc.utils.base_model import dynamic_load

            self.md = md
            self.device = "cuda" if torch.cuda.is_available() else "cpu"  # hloc's choice
            Model = dynamic_load(matchers, spec["conf"]["model"]["name"])
            self.model = Model(spec["conf"]["model"]).eval().to(self.device)
            self.dataset = md.ImagePairDataset(Path(spec["image_dir"]), spec["conf"]["preprocessing"], [])
        except ImportError as e:
            self.error = (
                f"{e} (on node {socket.gethostname()}: hloc must be installed on every node)",
                EXIT_SETUP,
            )
        except Exception as e:
            code = EXIT_SETUP if is_weights_error(e) else EXIT_RUNTIME
            self.error = (f"loading the hloc matcher failed: {type(e).__name__}: {e}", code)

    def hello(self) -> dict[str, Any]:
        return {"error": self.error, "device": getattr(self, "device", "?"), "node": socket.gethostname()}

    def match(self, batch: Sequence[tuple[str, str, bool]]) -> list[tuple]:
        import numpy as np
        import torch
        from hloc.extract_features import read_image

        md, ds = self.md, self.dataset
        out = []
        with torch.no_grad():
            for name0, name1, flip in batch:
                self.count += 1
                maybe_die(self.spec.get("fault"), self.count)
                image0, scale0 = ds.preprocess(read_image(ds.image_dir / name0, ds.conf.grayscale))
                image1, scale1 = ds.preprocess(read_image(ds.image_dir / name1, ds.conf.grayscale))
                # the DataLoader's collation: a batch dimension; scales round-trip through float64 tensors
                image0, image1 = image0[None].to(self.device), image1[None].to(self.device)
                scale0 = torch.as_tensor(np.asarray(scale0)).numpy()
                scale1 = torch.as_tensor(np.asarray(scale1)).numpy()
                if flip:
                    pred = self.model({"image0": image1, "image1": image0})
                    pred = {**pred, "keypoints0": pred["keypoints1"], "keypoints1": pred["keypoints0"]}
                else:
                    pred = self.model({"image0": image0, "image1": image1})
                kpts0, kpts1 = pred["keypoints0"], pred["keypoints1"]
                kpts0 = md.scale_keypoints(kpts0 + 0.5, scale0) - 0.5
                kpts1 = md.scale_keypoints(kpts1 + 0.5, scale1) - 0.5
                out.append(
                    (
                        name0,
                        name1,
                        flip,
                        kpts0.cpu().numpy(),
                        kpts1.cpu().numpy(),
                        pred["scores"].cpu().numpy(),
                    )
                )
        return out


def _hloc_cache_path(match_path: Path) -> Path:
    p = Path(match_path)
    # romav2_plugin.hloc's staging copy: the cache sits next to the final file
    if p.name.endswith(".partial"):
        p = p.with_name(p.name[: -len(".partial")])
    return p.with_name(p.name + _HLOC_CACHE_SUFFIX)


def _fingerprint(conf: dict[str, Any], image_dir: Path) -> str:
    return json.dumps(
        {"model": conf["model"], "preprocessing": conf["preprocessing"], "image_dir": str(image_dir)},
        sort_keys=True,
        default=str,
    )


def _ray_dense_stage(engine: dict[str, Any]):
    """A replacement for ``hloc.match_dense.match_dense`` (same signature, same file contents) that runs the
    pairs on Ray workers; predictions are also kept in a cache next to the matches file, so that an
    interrupted run resumes without recomputing them."""

    def match_dense(conf, pairs, image_dir, match_path, existing_refs=[]):  # noqa: B006 (hloc's signature)
        import h5py
        from hloc import logger
        from hloc.utils.parsers import names_to_pair

        ray = engine["ray"]
        image_dir = Path(image_dir).resolve()
        cache = _hloc_cache_path(Path(match_path))
        fp = _fingerprint(conf, image_dir)
        if cache.exists():
            try:
                with h5py.File(cache, "r") as c:
                    stale = c.attrs.get("fingerprint") != fp
            except OSError:
                stale = True
            if stale:
                cache.unlink()
        if not cache.exists():
            with h5py.File(cache, "w") as c:
                c.attrs["fingerprint"] = fp
        todo = [(n0, n1, n0 in existing_refs) for n0, n1 in pairs]

        def ckey(n0: str, n1: str, flip: bool) -> str:
            return pair_key(n0, n1) + ("%flip" if flip else "")

        with h5py.File(cache, "r") as c:
            cached = [t for t in todo if ckey(*t) in c and c[ckey(*t)].attrs.get("complete", False)]
        cached_set = set(cached)
        run_list = [t for t in todo if t not in cached_set]

        def write(fd, name0, name1, kpts0, kpts1, scores) -> None:  # hloc's writing code
            pair = names_to_pair(name0, name1)
            if pair in fd:
                del fd[pair]
            grp = fd.create_group(pair)
            grp.create_dataset("keypoints0", data=kpts0)
            grp.create_dataset("keypoints1", data=kpts1)
            grp.create_dataset("scores", data=scores)

        logger.info(
            f"Performing dense matching on Ray ({len(run_list)} pairs; {len(cached)} from the cache of an "
            "interrupted run)..."
        )
        with h5py.File(str(match_path), "a") as fd:
            with h5py.File(cache, "r") as c:
                for t in cached:
                    g = c[ckey(*t)]
                    write(fd, t[0], t[1], g["keypoints0"][()], g["keypoints1"][()], g["scores"][()])
            if not run_list:
                return
            spec = {
                "conf": conf,
                "image_dir": str(image_dir),
                "cpus": engine["cpus"],
                "fault": engine.get("fault"),
            }
            actors, _ = start_actors(
                ray,
                _HlocWorker,
                spec,
                engine["workers"],
                engine["gpus"],
                engine["cpus"],
                engine["max_restarts"],
            )
            pool = Pool(ray, actors, engine["max_in_flight"], engine["max_attempts"], engine["max_restarts"])
            from tqdm import tqdm

            bar = tqdm(total=len(run_list), smoothing=0.1, file=sys.stderr, disable=not engine["progress"])
            failed: list[tuple[str, str, str]] = []

            def on_results(res: list[tuple]) -> None:
                with h5py.File(cache, "a") as c:  # the cache first: a crash after this loses nothing
                    for name0, name1, flip, k0, k1, s in res:
                        k = ckey(name0, name1, flip)
                        if k in c:
                            del c[k]
                        g = c.create_group(k)
                        g.create_dataset("keypoints0", data=k0)
                        g.create_dataset("keypoints1", data=k1)
                        g.create_dataset("scores", data=s)
                        g.attrs["complete"] = True
                for name0, name1, _flip, k0, k1, s in res:
                    write(fd, name0, name1, k0, k1, s)
                    bar.update(1)
                    if engine.get("on_pair_written") is not None:
                        engine["on_pair_written"](name0, name1)

            try:
                drive(
                    pool, run_list, engine["batch_size"], lambda a, b: a.match.remote(b), on_results,
                    lambda t, why: failed.append((t[0], t[1], why)),
                    lambda m: tqdm.write(f"romav2_plugin.hloc: {m}", file=sys.stderr),
                )  # fmt: skip
            finally:
                bar.close()
                pool.kill()
            if failed:  # hloc's aggregation needs every pair: stop, keeping the cache for the rerun
                shown = "; ".join(f"{a} {b}: {why}" for a, b, why in failed[:5])
                raise CommandError(
                    f"{len(failed)} pair(s) could not be matched ({shown}). The other pairs are kept in {cache}; "
                    "fix the cause and rerun the same command to resume.",
                    EXIT_RUNTIME,
                )

    return match_dense


@contextmanager
def _patched_dense_stage(match_dense_module, replacement):
    original = match_dense_module.match_dense
    match_dense_module.match_dense = replacement
    try:
        yield
    finally:
        match_dense_module.match_dense = original


def hloc_match_dense(
    conf: dict[str, Any],
    pairs: str | os.PathLike,
    image_dir: str | os.PathLike,
    export_dir: str | os.PathLike | None = None,
    matches: str | os.PathLike | None = None,
    features: str | os.PathLike | None = None,
    features_ref: Path | list[Path] | None = None,
    max_kps: int | None = 8192,
    overwrite: bool = False,
    *,
    address: str | None = None,
    num_workers: int | None = None,
    num_gpus_per_worker: float | None = None,
    num_cpus_per_worker: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    max_restarts: int = 3,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    progress: bool = True,
    on_pair_written: Callable[[str, str], None] | None = None,
    _fault: dict[str, Any] | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> tuple[Path, Path]:
    """``hloc.match_dense.main`` with the dense matching on Ray workers: the same features and matches files.

    The arguments before ``*`` are ``main``'s (plus ``overwrite``); the others as in :func:`match_pairs`.
    Runs :func:`romav2_plugin.app.hloc.run_match_dense` (input checks; the outputs replaced only when the run
    completes) with hloc's dense stage swapped for the Ray one; hloc's keypoint aggregation and assignment
    run on the driver, unchanged. Works with every dense matcher of hloc, not only RoMa v2's.

    Returns ``(features, matches)``. An interrupted run leaves the outputs as they were and keeps the dense
    predictions made so far in ``<matches>.ray-dense.h5``; rerunning reuses them.
    """
    ray = import_ray()
    from romav2_plugin.adapters.hloc import ensure_registered
    from romav2_plugin.app.hloc import resolve_outputs, run_match_dense

    md = ensure_registered()
    if batch_size <= 0 or max_in_flight <= 0:
        raise CommandError(f"--batch-size ({batch_size}) must be positive", EXIT_USAGE)
    cluster = connect(ray, address, connect_timeout=connect_timeout)
    try:
        n, gpus, cpus = plan_workers(ray, num_workers, num_gpus_per_worker, num_cpus_per_worker)
        engine = {
            "ray": ray, "workers": n, "gpus": gpus, "cpus": cpus, "batch_size": batch_size,
            "max_in_flight": max_in_flight, "max_restarts": max_restarts, "max_attempts": max_attempts,
            "progress": progress, "on_pair_written": on_pair_written, "fault": _fault,
        }  # fmt: skip
        with _patched_dense_stage(md, _ray_dense_stage(engine)):
            result = run_match_dense(
                conf,
                Path(pairs),
                Path(image_dir),
                None if export_dir is None else Path(export_dir),
                None if matches is None else Path(matches),
                features if features is None or isinstance(features, Path) else str(features),
                features_ref=features_ref,
                max_kps=max_kps,
                overwrite=overwrite,
            )
        _, final_matches = resolve_outputs(
            conf, Path(pairs), None if export_dir is None else Path(export_dir),
            None if matches is None else Path(matches),
            features if features is None or isinstance(features, Path) else str(features),
        )  # fmt: skip
        _hloc_cache_path(final_matches).unlink(missing_ok=True)  # the run completed: the cache is spent
        return result
    finally:
        cluster.close()
