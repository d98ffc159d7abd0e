"""The one pairs job of ``romav2-match --pairs``: the same steps whichever executor matches the pairs.

:class:`PairsJob` validates the inputs (pairs file, image folder, output path, free space, the options of an
existing results file), opens, repairs or resumes the results file, probes every image's header, and then,
while an executor matches, writes each finished pair (flushed; the run stops cleanly on a full disk) and
reports the run (:class:`PairsRun`, the summary, the exit code). :func:`run_pairs` runs a job on an
executor; the two executors differ only in where the pairs are matched:

* :class:`LocalExecutor`: one model in this process (``--engine local``, the default);
* :class:`romav2_plugin.distributed.pairs.RayExecutor`: Ray workers on this machine or a cluster
  (``--engine ray``).

An executor has ``run(job)``: it loads its model(s), calls :meth:`PairsJob.begin` with the run metadata,
then hands each pair's outcome to :meth:`PairsJob.write` or :meth:`PairsJob.fail`, and stops when ``write``
returns ``False`` (the results file cannot take more); ``describe()`` names where it ran, for the summary.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from romav2_plugin.app import matching
from romav2_plugin.app.errors import (
    EXIT_OK,
    EXIT_PAIRS_FAILED,
    EXIT_RUNTIME,
    EXIT_USAGE,
    CommandError,
    check_output,
    human_bytes,
)
from romav2_plugin.app.matching import PROG, say
from romav2_plugin.app.results import (
    ResultsFile,
    Unreadable,
    WriteFailed,
    estimate_pair_bytes,
    import_h5py,
    one_writer,
)
from romav2_plugin.app.summary import CONFIDENT, pairs_summary
from romav2_plugin.app.weights_option import (
    WeightsChoice,
    cached_official_weights,
    choose_weights,
    sha256_prefix,
)
from romav2_plugin.keypoints import DEFAULT_CELL_SIZE, DEFAULT_MAX_ERROR
from romav2_plugin.verify import unreliable_reason

__all__ = [
    "DEFAULT_OUT",
    "read_pairs",
    "read_or_repair",
    "probe_images",
    "check_run_options",
    "prepare_results_file",
    "match_listed_pair",
    "PairsRun",
    "PairsJob",
    "Executor",
    "LocalExecutor",
    "run_pairs",
]

DEFAULT_OUT = "romav2-match-output"


# ----------------------------------------------------------------------------------------- the inputs
#: A comment: a ``#`` at the start of a line or after white space, to the end of the line; a ``#`` inside a
#: name (``hash#1.jpg``) is part of the name.
_COMMENT = re.compile(r"(?:^|(?<=\s))#.*")


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """Unique ``(name A, name B)`` pairs of a UTF-8 pairs file; problems name the line (and byte)."""
    if path.is_dir():
        raise CommandError(f"pairs file {path} is a folder", EXIT_USAGE)
    if not path.is_file():
        from romav2_plugin.io import special_file_kind

        kind = special_file_kind(path)
        if kind is not None:
            raise CommandError(
                f"pairs file {path} is {kind}, not a regular file: romav2-match reads the pairs from a file. "
                "Save them to a file first (e.g. ... > pairs.txt) and pass that.",
                EXIT_USAGE,
            )
        raise CommandError(f"pairs file not found: {path}", EXIT_USAGE)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CommandError(f"cannot read the pairs file {path} ({e.strerror or e})", EXIT_USAGE) from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    offset = 0
    for i, raw in enumerate(data.splitlines(keepends=True), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CommandError(
                f"{path}:{i}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}, byte offset "
                f"{offset + e.start} of the file). Save the pairs file as UTF-8 (e.g. iconv -f latin1 -t utf-8).",
                EXIT_USAGE,
            ) from None
        offset += len(raw)
        line = _COMMENT.sub("", line).strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise CommandError(
                f"{path}:{i}: expected 'nameA nameB' (two names separated by white space), got {line!r}",
                EXIT_USAGE,
            )
        pair = (parts[0], parts[1])
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    if not pairs:
        raise CommandError(f"{path}: no pairs found", EXIT_USAGE)
    return pairs


def probe_images(image_dir: Path, pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Header-only check of every image of ``pairs``: name -> problem."""
    from romav2_plugin.io import probe_image

    bad: dict[str, str] = {}
    for name in sorted({n for p in pairs for n in p}):
        try:
            probe_image(image_dir / name)
        except (ValueError, FileNotFoundError) as e:
            bad[name] = str(e)
    return bad


# ----------------------------------------------------------------------------------- the results file
def read_or_repair(results: ResultsFile) -> tuple[dict[str, Any], set[tuple[str, str]], int]:
    """Read an existing results file; one that an interrupted write damaged is repaired (what reads back is
    kept, the damaged file is kept as ``.damaged``). A locked file or one that is not HDF5 is refused."""
    try:
        return results.read()
    except Unreadable:
        if not results.looks_like_hdf5():
            raise
    check_output(results.path, results.path.stat().st_size + (1 << 20), what="repairing")
    kept, aside = results.repair()
    say(
        f"{results.path} was damaged (an interrupted or failed write); repaired: {kept} finished pair(s) kept, "
        f"the damaged file is kept as {aside}. Pairs that were lost are redone."
    )
    return results.read()


def check_run_options(results, out: Path, attrs: dict, options: dict, *, damaged: bool, overwrite: bool) -> list[str]:
    """The options in which ``out``'s earlier run differs from ``options`` (``[]`` for a new or damaged
    file); raises the usage error naming the fixes unless ``overwrite``."""
    diff = results.option_diff(attrs, options) if out.exists() and not damaged else []
    if diff and not overwrite:
        raise CommandError(
            f"{out} holds results made with other options ({'; '.join(diff)}). "
            "Use the same options to resume, --overwrite to start the file afresh, or another --out.",
            EXIT_USAGE,
        )
    return diff


def early_run_options(
    *, seed: int, num_samples: int, min_overlap: float, setting: str | None, choice: WeightsChoice, attrs: dict
) -> dict[str, Any]:
    """The run options that can be compared with a results file before the model loads: all but the
    weights' hash, which is added when it is cheap (shipped or local weights, the official file already
    cached) and the file records one; otherwise it is compared once the model is loaded."""
    early: dict[str, Any] = {"seed": int(seed), "num_samples": int(num_samples), "min_overlap": float(min_overlap)}
    if setting is not None:
        early["setting"] = setting
    if "weights_sha256" in attrs:
        try:
            if choice.named or choice.local_path() is not None:
                early["weights_sha256"] = choice.info()["weights_sha256"]
            elif choice.spec is None and (cached := cached_official_weights()) is not None:
                early["weights_sha256"] = sha256_prefix(cached)
        except (OSError, ValueError):
            pass  # compared after loading, where a problem with the weights is reported
    return early


def prepare_results_file(
    results, out: Path, attrs: dict, meta: dict, *, damaged: bool, fmt: int, overwrite: bool
) -> None:
    """Make ``out`` ready for a run with the run attributes ``meta`` (model loaded): refuse other options
    unless ``overwrite`` (then start afresh, a damaged file kept aside), migrate an earlier layout, create a
    new file, or record ``meta`` where the file lacks it; each step is said on stderr."""
    diff = check_run_options(results, out, attrs, meta, damaged=damaged, overwrite=overwrite)
    if damaged:
        aside = results.move_damaged_aside()
        say(f"--overwrite: {out} could not be read; kept as {aside}, starting a new file")
    elif diff:
        say(f"--overwrite: {out} was made with other options ({'; '.join(diff)}); starting it afresh")
        out.unlink()
    elif out.exists() and fmt < 2:
        moved = results.migrate()
        say(f"{out}: migrated from the earlier layout ({moved} group(s) renamed to injective pair keys)")
    if not out.exists():
        results.create(meta)
    elif damaged or diff or "setting" not in attrs:
        results.set_run_attrs(meta)


# ------------------------------------------------------------------------------------------ one pair
def match_listed_pair(
    model, image_dir: Path, name_A: str, name_B: str, *, num_samples: int, seed: int, min_overlap: float | None
) -> tuple[dict[str, np.ndarray] | None, dict[str, Any] | None, str | None]:
    """``(arrays, pair metadata, None)``, or ``(None, None, problem)`` for a pair that failed for its own
    reasons (unreadable image, ...): a failing pair must not lose the others."""
    try:
        a = matching.open_image(image_dir / name_A)
        b = matching.open_image(image_dir / name_B)
        res = matching.match_pair(model, a, b, num_samples=num_samples, seed=seed, min_overlap=min_overlap)
    except CommandError as e:
        return None, None, e.message
    except Exception as e:
        return None, None, f"{type(e).__name__}: {e}"
    pmeta = matching.pair_metadata(a, b, name_A, name_B)
    pmeta["time_match_s"] = res.times["match"]
    pmeta.update(res.check_metadata())  # the geometric check, per pair (read by PairsJob.write)
    return res.arrays, pmeta, None


# -------------------------------------------------------------------------------------------- the job
@dataclass
class PairsRun:
    """What a pairs job did; ``code`` is the exit code ``romav2-match`` returns for it."""

    out: Path
    n_listed: int
    n_done: int
    n_skipped: int
    failures: list[tuple[str, str, str]]
    code: int
    stopped: str | None = None
    workers: int = 0
    elapsed: float = 0.0  # seconds, model loads (and a cluster start) included
    match_seconds: float = 0.0  # seconds from the model(s) ready to the last pair written
    summary: str = ""


@dataclass
class PairsJob:
    """``romav2-match --pairs``: the inputs and options, and the bookkeeping of one run (see the module)."""

    pairs: str | os.PathLike | Iterable[tuple[str, str]]
    image_dir: Path
    out: Path
    weights: str | None = None
    setting: str | None = None
    seed: int = 0
    num_samples: int = 5000
    min_overlap: float = 0.5
    overwrite: bool = False
    device: str = "auto"
    fp32: bool = False
    progress: bool = True
    on_pair_written: Callable[[str, str], None] | None = None
    colmap_db: str | os.PathLike | None = None  # write a COLMAP database instead of the results file
    colmap_add: bool = False  # add to a database that holds other cameras/images
    cell_size: float = DEFAULT_CELL_SIZE  # --colmap-db keypoint grid, pixels (romav2_plugin.keypoints)
    max_error: float = DEFAULT_MAX_ERROR
    camera_mode: str = "auto"
    # the bookkeeping of the run (set by open() and while matching)
    pair_list: list[tuple[str, str]] = field(default_factory=list, init=False)
    todo: list[tuple[str, str]] = field(default_factory=list, init=False)
    choice: WeightsChoice | None = field(default=None, init=False)
    results: ResultsFile | None = field(default=None, init=False)
    run: PairsRun | None = field(default=None, init=False)
    started: bool = field(default=False, init=False)
    meta: dict[str, Any] = field(default_factory=dict, init=False)
    _attrs: dict[str, Any] = field(default_factory=dict, init=False)
    _fmt: int = field(default=2, init=False)
    _damaged: bool = field(default=False, init=False)
    _totals: dict[str, int] = field(default_factory=lambda: {"matches": 0, "meaningless": 0}, init=False)
    _unreliable: list[tuple[str, str, str]] = field(default_factory=list, init=False)
    _bar: Any = field(default=None, init=False)
    _t_ready: float = field(default=0.0, init=False)

    @property
    def amp(self) -> bool | None:
        return False if self.fp32 else None

    # ---------------------------------------------------------------- before any model is loaded
    def open(self) -> bool:
        """Check everything that needs no model and open (repair, resume) the results file; ``True`` when
        there are pairs to match. When there are none, the summary is printed and :attr:`run` is final."""
        if isinstance(self.pairs, str | os.PathLike):
            self.pair_list = read_pairs(Path(self.pairs).expanduser())
        else:
            self.pair_list = list(dict.fromkeys((str(a), str(b)) for a, b in self.pairs))
            if not self.pair_list:
                raise CommandError("no pairs given", EXIT_USAGE)
        if self.device != "auto":  # the string here (Ray workers may have devices this process lacks)
            from romav2_plugin.runtime import check_device

            try:
                check_device(self.device, here=False)
            except ValueError as e:
                raise CommandError(f"--device {self.device}: {e}", EXIT_USAGE) from None
        self.image_dir = Path(self.image_dir)
        if not self.image_dir.is_dir():
            raise CommandError(f"--image-dir {self.image_dir} is not a folder", EXIT_USAGE)
        out, done, per_pair = self._open_colmap() if self.colmap_db is not None else self._open_h5()
        if self.overwrite:
            done = set()
        todo = [p for p in self.pair_list if p not in done]
        skipped = len(self.pair_list) - len(todo)
        if skipped:
            redo = "" if self.colmap_db is not None else " (--overwrite redoes them)"
            say(f"{skipped} of {len(self.pair_list)} pairs already in {out}: skipped{redo}")
        self.run = PairsRun(out, len(self.pair_list), 0, skipped, [], EXIT_OK)
        if not todo:
            self.run.summary = f"all {len(self.pair_list)} pairs already in {out}; nothing to do"
            print(self.run.summary)
            return False
        try:
            free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
            if free < per_pair * len(todo):
                say(
                    f"note: {len(todo)} pairs need about {human_bytes(per_pair * len(todo))}, {human_bytes(free)} "
                    "are free: the run will stop cleanly when the disk is full (finished pairs are kept)."
                )
        except OSError:
            pass
        bad = probe_images(self.image_dir, todo)  # header-only, here: the image folder is shared
        if bad:
            runnable = []
            for na, nb in todo:
                problem = bad.get(na) or bad.get(nb)
                if problem:
                    self.run.failures.append((na, nb, problem))
                    say(f"pair {na} {nb} will be skipped: {problem}")
                else:
                    runnable.append((na, nb))
            todo = runnable
        self.todo = todo
        if not todo:
            self.run.code = EXIT_PAIRS_FAILED
            self.run.summary = pairs_summary(
                n_listed=len(self.pair_list), n_done=0, n_skipped=skipped, failures=self.run.failures,
                setting=self.setting or "-", device="-", weights=self.choice.label, weights_sha256="",
                elapsed=0.0, total_matches=0, num_samples=self.num_samples, n_meaningless=0, out=out,
                out_exists=out.exists(),
            )  # fmt: skip
            print(self.run.summary, flush=True)
            return False
        return True

    def _open_h5(self) -> tuple[Path, set[tuple[str, str]], int]:
        """The HDF5 results file: locked, read (repaired), its options compared; ``(path, done, bytes/pair)``."""
        out = Path(self.out).expanduser()
        if out.suffix.lower() == ".npz":
            raise CommandError(
                "--pairs writes HDF5: give --out RESULTS.h5 (or a folder for FOLDER/results.h5)", EXIT_USAGE
            )
        if out.suffix.lower() not in (".h5", ".hdf5"):
            out = out / "results.h5"
        self.out = out
        import_h5py()
        self.choice = choose_weights(self.weights)
        self.results = results = ResultsFile(out)
        per_pair = estimate_pair_bytes(matching.capped_num_samples(self.num_samples, self.setting))
        check_output(out, per_pair)
        results.hold_lock()  # one writer per results file, until this run ends; before the file is read
        done: set[tuple[str, str]] = set()
        if out.exists():
            try:
                self._attrs, done, self._fmt = read_or_repair(results)
            except Unreadable:
                if not self.overwrite:
                    raise
                self._damaged = True
        # the options that need no model are compared first, also when nothing is left to do (the weights'
        # hash where it is cheap, else once the model is loaded)
        early = early_run_options(
            seed=self.seed, num_samples=self.num_samples, min_overlap=self.min_overlap, setting=self.setting,
            choice=self.choice, attrs=self._attrs,
        )  # fmt: skip
        check_run_options(results, out, self._attrs, early, damaged=self._damaged, overwrite=self.overwrite)
        return out, done, per_pair

    def _open_colmap(self) -> tuple[Path, set[tuple[str, str]], int]:
        """``--colmap-db``: the database locked, refused when it is not ours (unless adding), its options
        compared; ``(path, done, bytes/pair)``."""
        from romav2_plugin.app.colmap_db import ColmapDatabase, import_pycolmap

        out = Path(self.colmap_db).expanduser()
        import_pycolmap()
        self.out = out
        self.choice = choose_weights(self.weights)
        try:
            store = ColmapDatabase(
                out, cell_size=self.cell_size, max_error=self.max_error, add=self.colmap_add,
                camera_mode=self.camera_mode,
            )  # fmt: skip
        except ValueError as e:
            raise CommandError(f"--cell-size / --max-error: {e}", EXIT_USAGE) from None
        self.results = store
        per_pair = estimate_pair_bytes(matching.capped_num_samples(self.num_samples, self.setting))
        check_output(out, per_pair, what="--colmap-db")
        store.hold_lock()
        attrs = store.inspect()
        early = early_run_options(
            seed=self.seed, num_samples=self.num_samples, min_overlap=self.min_overlap, setting=self.setting,
            choice=self.choice, attrs=attrs,
        )  # fmt: skip
        store.check_options({**early, "cell_size": self.cell_size, "max_error": self.max_error})
        return out, store.done_pairs(self.pair_list), per_pair

    # ---------------------------------------------------------------- while an executor matches
    def begin(self, meta: dict[str, Any]) -> None:
        """The model(s) are loaded, with the run attributes ``meta``: the results file is made ready (other
        options refused unless ``--overwrite``, an earlier layout migrated) and writing starts."""
        from tqdm import tqdm

        if self.colmap_db is not None:
            self.results.begin(meta)
        else:
            prepare_results_file(
                self.results, self.out, self._attrs, meta, damaged=self._damaged, fmt=self._fmt,
                overwrite=self.overwrite,
            )  # fmt: skip
        self.meta = meta
        self.started = True
        self._t_ready = time.perf_counter()
        self._bar = tqdm(
            total=len(self.todo), desc="matching", unit="pair", file=sys.stderr, dynamic_ncols=True,
            disable=not self.progress,
        )  # fmt: skip

    def write(self, name_A: str, name_B: str, arrays: dict[str, np.ndarray], pmeta: dict[str, Any]) -> bool:
        """Write (and flush) one finished pair; ``False`` when the file cannot take it (disk full, I/O
        error): the run stops there, every pair written before is kept."""
        run = self.run
        try:
            self.results.write_pair(
                name_A, name_B, arrays, self.meta, pmeta,
                saved_note=f"The {run.n_skipped + run.n_done} pairs finished before are kept.",
            )  # fmt: skip
        except WriteFailed as e:  # disk full / I/O error: stop writing to this file at once
            run.stopped, run.code = e.message, EXIT_RUNTIME
            return False
        run.n_done += 1
        self._totals["matches"] += len(arrays["confidence"])
        meaningless = int((arrays["confidence"] > CONFIDENT).sum()) == 0
        self._totals["meaningless"] += meaningless
        if not meaningless and "geometry_inlier_ratio" in pmeta:  # a pair with no confident match is counted above
            why = unreliable_reason(float(pmeta["geometry_inlier_ratio"]), float(pmeta.get("confident_share", "nan")))
            if why is not None:
                self._unreliable.append((name_A, name_B, why))
        self._bar.update(1)
        if self.on_pair_written is not None:
            self.on_pair_written(name_A, name_B)
        return True

    def fail(self, name_A: str, name_B: str, problem: str) -> None:
        """A pair that could not be matched: reported, the others go on."""
        self.run.failures.append((name_A, name_B, problem))
        self.warn(f"pair {name_A} {name_B} failed: {problem}")
        self._bar.update(1)

    def warn(self, msg: str) -> None:
        """A message while the progress bar runs."""
        from tqdm import tqdm

        tqdm.write(f"{PROG}: {msg}", file=sys.stderr)

    # ---------------------------------------------------------------- after
    def close(self) -> None:
        if self.colmap_db is not None and self.results is not None:
            self.results.close()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def finish(self, device: str, t0: float) -> PairsRun:
        """Print the summary (and why the run stopped early); :attr:`run` gets its final exit code."""
        run = self.run
        run.elapsed = time.perf_counter() - t0
        run.match_seconds = time.perf_counter() - self._t_ready
        run.summary = pairs_summary(
            n_listed=run.n_listed, n_done=run.n_done, n_skipped=run.n_skipped, failures=run.failures,
            setting=self.meta["setting"], device=device, weights=self.meta["weights"],
            weights_sha256=self.meta["weights_sha256"], elapsed=run.elapsed,
            total_matches=self._totals["matches"], num_samples=self.num_samples,
            n_meaningless=self._totals["meaningless"], out=self.out, out_exists=self.out.exists(),
            stopped=run.stopped, unreliable=self._unreliable,
        )  # fmt: skip
        print(run.summary, flush=True)
        if run.stopped:
            say(run.stopped)
        elif run.failures:
            run.code = EXIT_PAIRS_FAILED
        return run


class Executor(Protocol):
    def run(self, job: PairsJob) -> None: ...

    def describe(self) -> str: ...


class LocalExecutor:
    """One model in this process, the pairs one after the other."""

    def __init__(self) -> None:
        self.device: Any = "-"

    def run(self, job: PairsJob) -> None:
        t0 = time.perf_counter()
        model, self.device, meta = matching.load_matcher(
            job.choice, job.setting, job.device, job.amp, seed=job.seed, num_samples=job.num_samples,
            min_overlap=job.min_overlap,
        )  # fmt: skip
        matching.cpu_note(meta["setting"], self.device)
        job.begin(meta)
        say(f"model loaded in {time.perf_counter() - t0:.1f} s ({meta['setting']}, {self.device}, {meta['weights']})")
        for na, nb in job.todo:
            arrays, pmeta, problem = match_listed_pair(
                model, job.image_dir, na, nb, num_samples=job.num_samples, seed=job.seed,
                min_overlap=job.min_overlap,
            )  # fmt: skip
            if problem is not None:
                job.fail(na, nb, problem)
            elif not job.write(na, nb, arrays, pmeta):
                break

    def describe(self) -> str:
        return str(self.device)


@one_writer
def run_pairs(job: PairsJob, executor: Executor) -> PairsRun:
    """Open the job, let ``executor`` match its pairs, report. Ctrl-C / SIGTERM once writing has started
    says what is saved and propagates (``KeyboardInterrupt``); a rerun resumes."""
    if not job.open():
        return job.run
    t0 = time.perf_counter()
    try:
        executor.run(job)
    except KeyboardInterrupt:
        job.close()
        if job.started:
            say(
                f"interrupted; {job.run.n_done} pairs finished in this run are saved in {job.out}. "
                "Rerun the same command to resume."
            )
        raise
    finally:
        job.close()
    return job.finish(executor.describe(), t0)
