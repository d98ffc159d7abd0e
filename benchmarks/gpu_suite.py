"""Every GPU benchmark of the project in one command, within a time budget.

    python -m benchmarks.gpu_suite --budget-s 600                 # all steps, results into benchmarks/results/
    python -m benchmarks.gpu_suite --budget-s 300 --only kernels,throughput
    python -m benchmarks.gpu_suite --dry-run --out /tmp/gpu-dry   # no GPU needed: token sizes on the CPU

It needs a CUDA GPU (without one it exits 2, saying so; ``--dry-run`` checks the plumbing on the CPU). Each
step runs in its own process with its own time limit; a failed or timed-out step is recorded and the next one
runs. ``<gpu>`` below is the GPU model, e.g. ``h200`` (:func:`benchmarks._common.gpu_label`):

1. ``kernels``: ``python -m benchmarks.gpu_kernels`` (NVRTC build + self-check, parity in fp32/bf16/fp16, time
   and peak memory against the official native path and, with ``fused-local-corr`` installed, the official
   fused kernel) -> ``gpu_kernels_<gpu>.md/.json``;
2. ``throughput``: ``python -m benchmarks.speed``, ours against the official code (``pip install --no-deps
   romav2==2.0.1 einops``), ``base`` setting, 640x640, batch 8, bf16 -> ``speed_<gpu>.md/.csv/.json/.png``;
3. ``train``: romav2-tiny from the shipped weights (``benchmarks/tiny/romav2_tiny_continue.toml`` with the
   GPU overrides of :data:`benchmarks.tiny.recipe.GPU`, pictures from ``--pictures``, by default the
   ``.tiny-data/train`` of ``python -m benchmarks.tiny.fetch_images``): a probe of a few matcher and refiner
   steps (past the data loader's prefetch buffer) measures the sustained seconds per step, then one run whose
   step counts fill the time left (80% matcher, 20% refiners) -> ``tiny_training_<gpu>.csv`` (its log) and
   ``tiny_training_<gpu>.json`` (the exported model's card; the fp16 weights stay in ``--work``);
4. a summary: ``gpu_suite_<gpu>.json`` and ``.md`` (per step: command, limit, exit code, seconds), with the
   machine, commit and date.

Step logs and training runs go to ``--work`` (default ``runs/gpu_suite``), not into the results.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "benchmarks" / "tiny" / "romav2_tiny_continue.toml"
PICTURES = ROOT / ".tiny-data" / "train"
RESULTS = ROOT / "benchmarks" / "results"
GRACE_S = 30  # after SIGTERM, before SIGKILL
PLAN_SHARE = 0.85  # of the time left that the training run is planned to fill (the pace of data workers varies)


# ------------------------------------------------------------------------------------------------ train
def _train_config(template: Path, *, out_dir: Path, matcher_steps: int, refiner_steps: int,
                  dry_run: bool, pictures: Path | None = None):
    """The template with the step counts replaced (warm-ups shortened to at most a tenth of a stage) and,
    with ``pictures``, every source reading that folder instead."""
    from benchmarks.tiny.recipe import GPU
    from romav2_plugin.train.config import load_config

    cfg = load_config(template, [o for o in GPU if not o.startswith("data.sources")])
    stages = []
    for st in cfg.stages:
        steps = matcher_steps if st.name == "matcher" else refiner_steps
        kw = {"steps": steps, "warmup_steps": min(st.warmup_steps, max(1, steps // 10))}
        if dry_run:
            kw["batch_size"] = 2
        stages.append(dataclasses.replace(st, **kw))
    over: dict = {"stages": tuple(stages), "out_dir": str(out_dir)}
    data = cfg.data
    if pictures is not None:
        data = dataclasses.replace(
            data, sources=tuple(dataclasses.replace(src, path=(str(pictures),)) for src in data.sources)
        )
    if dry_run:
        data = dataclasses.replace(data, size=(128, 128), workers=0)
        over.update(device="cpu", log_every=1, checkpoint_every=1000)
    over["data"] = data
    return dataclasses.replace(cfg, **over)


def train_main(argv: list[str]) -> int:
    """``python -m benchmarks.gpu_suite train-once``: one training run of the template (own process)."""
    import torch

    from romav2_plugin.signals import sigterm_as_interrupt
    from romav2_plugin.train.loop import Trainer

    ap = argparse.ArgumentParser(prog="gpu_suite train-once")
    ap.add_argument("--template", type=Path, default=TEMPLATE)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--matcher-steps", type=int, required=True)
    ap.add_argument("--refiner-steps", type=int, required=True)
    ap.add_argument("--export", type=Path, default=None, help="fp16 export of the EMA weights")
    ap.add_argument("--pictures", type=Path, default=PICTURES, help="training pictures")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    cfg = _train_config(a.template, out_dir=a.out_dir, matcher_steps=a.matcher_steps,
                        refiner_steps=a.refiner_steps, dry_run=a.dry_run, pictures=a.pictures)
    if a.out_dir.exists():
        shutil.rmtree(a.out_dir)
    trainer = Trainer(cfg, progress=False)
    stopped = None
    with sigterm_as_interrupt():
        try:
            trainer.run()
        except KeyboardInterrupt as e:  # the step's time limit: keep what was trained
            stopped = f"{e or 'interrupted'} at global step {trainer.global_step}"
            print(f"train-once: {stopped}; exporting the EMA weights as they are", flush=True)
    if a.export is not None:
        card = {"trained_by": "python -m benchmarks.gpu_suite", "template": TEMPLATE.name,
                "matcher_steps": a.matcher_steps, "refiner_steps": a.refiner_steps, "stopped_early": stopped,
                "machine": _machine(), "note": "demo model trained on synthetic data; not the paper's accuracy"}
        trainer.export(a.export, card=card, dtype=torch.float16)
    return 0 if stopped is None else 143


def pairs_per_second(log_csv: Path, skip_steps: int = 0) -> dict[str, float]:
    """Sustained pairs per second of each stage of a training ``log.csv``: all pairs over all seconds of the
    logging windows that end after ``skip_steps`` (the loader's prefetch buffer, filled while the model is
    built, serves the first steps of a stage far faster than its workers can keep up with: a median over
    short windows planned 2.5x too many steps on the H200 on 2026-11-30). A stage with no window past
    ``skip_steps`` uses all its windows."""
    rows: dict[str, list[tuple[int, float]]] = {}
    with open(log_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("pairs_per_s"):
                rows.setdefault(row["stage"], []).append((int(row["step"]), float(row["pairs_per_s"])))
    out = {}
    for stage, rs in rows.items():
        windows, prev = [], 0
        for step, rate in rs:
            windows.append((step, step - prev, rate))  # (end step, steps in the window, its pairs/s)
            prev = step
        late = [w for w in windows if w[0] > skip_steps] or windows
        # pairs / seconds; the batch size cancels: a window of n steps took n * batch / rate seconds
        out[stage] = sum(n for _, n, _ in late) / sum(n / r for _, n, r in late if r > 0)
    return out


def plan_steps(seconds: float, s_matcher: float, s_refiner: float, *, matcher_share: float = 0.8,
               cap: int = 50_000) -> tuple[int, int]:
    """Matcher and refiner step counts that fill ``seconds`` (``matcher_share`` of it for the matcher)."""
    if seconds <= 0 or s_matcher <= 0 or s_refiner <= 0:
        return 0, 0
    m = int(matcher_share * seconds / s_matcher + 1e-9)  # (the epsilon: 0.2 * 100 / 1 is 19.999...)
    r = int((1 - matcher_share) * seconds / s_refiner + 1e-9)
    return max(0, min(cap, m)), max(0, min(cap, r))


# ------------------------------------------------------------------------------------------------ run
def _machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    from benchmarks._common import _cpu_model

    return {"host": platform.node(), "cpu": _cpu_model(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": gpu, "cpus": os.cpu_count()}


class _Suite:
    def __init__(self, out: Path, work: Path, budget_s: float, dry_run: bool) -> None:
        self.out, self.dry_run = out, dry_run
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.steps: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def step(self, name: str, cmd: list[str], limit_s: float) -> dict:
        """Run ``cmd`` in its own process group; past the limit its leader gets SIGTERM (the training step then
        exports what it has), and the whole group SIGKILL :data:`GRACE_S` seconds later, workers included."""
        limit = max(1.0, min(limit_s, self.left()))
        rec = {"step": name, "command": " ".join(cmd), "limit_s": round(limit, 1)}
        log = self.logs / f"{name}.log"
        t = time.monotonic()
        print(f"== {name} (limit {limit:.0f} s): {rec['command']}", flush=True)
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                # the leader alone: its data workers stay up while it exports (SIGTERM to the whole group
                # killed them under the loader, which raised in the middle of the export on 2026-11-30)
                proc.terminate()
                try:
                    proc.wait(timeout=GRACE_S)
                except subprocess.TimeoutExpired:
                    pass
                rc = "timeout"
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group (data workers)
                except ProcessLookupError:
                    pass
                proc.wait()
        rec.update(rc=rc, seconds=round(time.monotonic() - t, 1), log=log.name)
        print(f"   {name}: rc {rc} in {rec['seconds']} s; tail of {log.name}:", flush=True)
        print("   " + "\n   ".join(log.read_text(errors="replace").splitlines()[-6:]), flush=True)
        self.steps.append(rec)
        return rec


#: in order of value: a budget cut loses the last ones; each writes its results file when it finishes
STEPS = ("kernels", "profile", "throughput", "parity", "compare", "latency", "levers", "train")


def run(out: Path, budget_s: float, dry_run: bool, pictures: Path = PICTURES, only: tuple[str, ...] = STEPS,
        work: Path = ROOT / "runs" / "gpu_suite") -> int:
    from benchmarks._common import command_line, gpu_label, now_utc

    py = sys.executable
    s = _Suite(out, work, budget_s, dry_run)
    machine = _machine()
    label = "dry" if dry_run else gpu_label(machine["gpu"] or "")
    summary: dict = {"date": now_utc(), "command": command_line(), "machine": machine, "budget_s": budget_s,
                     "dry_run": dry_run, "steps": s.steps}
    if "kernels" in only:
        _kernels(s, py, label, dry_run)
    if "profile" in only:
        _model_step(s, py, "profile", label, dry_run, 300 if dry_run else 90)
    if "throughput" in only:
        _throughput(s, py, label, dry_run)
    if "parity" in only:
        _model_step(s, py, "parity", label, dry_run, 400 if dry_run else 120)
    if "compare" in only:
        _compare(s, py, label, dry_run)
    if "latency" in only:
        _latency(s, py, label, dry_run)
    if "levers" in only:
        _model_step(s, py, "levers", label, dry_run, 200 if dry_run else 150)
    if "train" in only and not pictures.is_dir():  # (a GPU run without --dry-run refuses this in main)
        s.steps.append({"step": "train", "command": f"skipped: no training pictures in {pictures}", "limit_s": 0,
                        "rc": "skipped", "seconds": 0.0, "log": None})
    elif "train" in only:
        _train(s, py, work, label, dry_run, pictures, summary)
    return _summary(s, label, summary)


def _kernels(s: _Suite, py: str, label: str, dry_run: bool) -> None:
    s.step("kernels", [py, "-m", "benchmarks.gpu_kernels", "--out", str(s.out), "--name", f"gpu_kernels_{label}",
                       *(["--dry-run"] if dry_run else [])], 240 if dry_run else 120)  # dry: NVRTC, cold cache


def _throughput(s: _Suite, py: str, label: str, dry_run: bool) -> None:
    speed = [py, "-m", "benchmarks.speed", "--out", str(s.out), "--tag", label]
    if dry_run:
        speed += ["--dry-run"]
    else:
        speed += ["--device", "cuda", "--batch", "8", "--dtype", "bf16", "--settings", "base",
                  "--input-size", "640", "--matchers", "ours,official", "--repeats", "5", "--warmup", "2"]
    s.step("throughput", speed, 120 if dry_run else 150)


def _model_step(s: _Suite, py: str, step: str, label: str, dry_run: bool, limit: float) -> None:
    """``benchmarks/gpu_model.py``: ``profile`` -> gpu_profile_<gpu>, ``parity`` -> gpu_parity_<gpu>,
    ``levers`` -> gpu_levers_<gpu> (each .md/.json)."""
    s.step(step, [py, "-m", "benchmarks.gpu_model", step, "--out", str(s.out), "--name", f"gpu_{step}_{label}",
                  *(["--dry-run"] if dry_run else [])], limit)


def _compare(s: _Suite, py: str, label: str, dry_run: bool) -> None:
    """The mission's comparison, one run on one card: ours and official at turbo/base/precise, RoMa (romatch,
    644x644 coarse, no upsampled pass) and LoFTR (kornia, random weights: speed and memory only), 640x640
    input, batch 8, bf16 -> speed_<gpu>_compare.md/.csv/.json/.png."""
    cmd = [py, "-m", "benchmarks.speed", "--out", str(s.out), "--tag", f"{label}_compare"]
    if dry_run:  # CPU, token sizes: LoFTR's real plumbing (ours runs in the profile, parity and levers steps;
        # RoMa only where romatch is installed: carried to the GPU as a wheel)
        cmd += ["--device", "cpu", "--batch", "1", "--dtype", "fp32", "--settings", "turbo", "--input-size", "64",
                "--matchers", "loftr", "--loftr-res", "64", "--repeats", "1", "--warmup", "0"]
    else:
        cmd += ["--device", "cuda", "--batch", "8", "--dtype", "bf16", "--settings", "turbo,base,precise",
                "--input-size", "640", "--matchers", "ours,official,roma,loftr", "--roma-coarse", "644",
                "--roma-upsample", "0", "--loftr-res", "640", "--repeats", "5", "--warmup", "2"]
    s.step("compare", cmd, 300 if dry_run else 240)


def _latency(s: _Suite, py: str, label: str, dry_run: bool) -> None:
    """Batch-1 latency of the same four at ``base`` / 640x640 (RoMa 644) -> speed_<gpu>_b1.md/...."""
    cmd = [py, "-m", "benchmarks.speed", "--out", str(s.out), "--tag", f"{label}_b1"]
    if dry_run:
        cmd += ["--dry-run"]
    else:
        cmd += ["--device", "cuda", "--batch", "1", "--dtype", "bf16", "--settings", "base", "--input-size", "640",
                "--matchers", "ours,official,roma,loftr", "--roma-coarse", "644", "--roma-upsample", "0",
                "--repeats", "10", "--warmup", "3"]
    s.step("latency", cmd, 120 if dry_run else 100)


def _train(s: _Suite, py: str, work: Path, label: str, dry_run: bool, pictures: Path, summary: dict) -> None:
    """A probe measures seconds per step of each stage; the final run's steps fill the time left."""
    runs = work / "train_runs"
    once = [py, "-m", "benchmarks.gpu_suite", "train-once", "--pictures", str(pictures),
            *(["--dry-run"] if dry_run else [])]
    # the probe runs past each stage's prefetch buffer (workers x PREFETCH_FACTOR batches) and measures after it
    from romav2_plugin.train.loop import PREFETCH_FACTOR

    cfg = _train_config(TEMPLATE, out_dir=runs / "probe", matcher_steps=1, refiner_steps=1, dry_run=dry_run)
    buffer = cfg.data.workers * PREFETCH_FACTOR
    probe_m, probe_r = (2, 1) if dry_run else (buffer + 40, buffer + 20)
    t = time.monotonic()
    rec = s.step("train_probe", [*once, "--out-dir", str(runs / "probe"), "--matcher-steps", str(probe_m),
                                 "--refiner-steps", str(probe_r)], 600 if dry_run else 150)
    probe_s = time.monotonic() - t
    if rec["rc"] == 0:
        pps = pairs_per_second(runs / "probe" / "log.csv", skip_steps=buffer)
        batch = {st.name: st.batch_size for st in cfg.stages}
        sps = {k: batch[k] / v for k, v in pps.items() if v > 0}
        overhead = max(0.0, probe_s - sum(sps.get(k, 0) * n for k, n in (("matcher", probe_m), ("refiners", probe_r))))
        spare = 5 if dry_run else 30  # export, summary
        m, r = plan_steps(PLAN_SHARE * (s.left() - overhead - spare), sps.get("matcher", 0),
                          sps.get("refiners", 0))
        if dry_run:
            m, r = max(1, min(m, 2)), max(1, min(r, 1))
        summary["train_plan"] = {"probe_steps": {"matcher": probe_m, "refiners": probe_r}, "skipped_steps": buffer,
                                 "pairs_per_s": pps, "seconds_per_step": sps, "overhead_s": round(overhead, 1),
                                 "plan_share": PLAN_SHARE, "matcher_steps": m, "refiner_steps": r, "batch": batch}
        if m >= 1 and r >= 1:
            final = runs / "final"
            weights = work / f"romav2_tiny_{label}.pt"
            s.step("train", [*once, "--out-dir", str(final), "--matcher-steps", str(m),
                             "--refiner-steps", str(r), "--export", str(weights)], s.left() - spare / 2)
            if (final / "log.csv").is_file():
                shutil.copy(final / "log.csv", s.out / f"tiny_training_{label}.csv")
            if weights.with_suffix(".json").is_file():
                shutil.copy(weights.with_suffix(".json"), s.out / f"tiny_training_{label}.json")
    shutil.rmtree(runs, ignore_errors=True)


def _summary(s: _Suite, label: str, summary: dict) -> int:
    from benchmarks._common import git_commit

    summary["commit"] = git_commit()
    summary["total_s"] = round(time.monotonic() - s.t0, 1)
    name = f"gpu_suite_{label}"
    (s.out / f"{name}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    m = summary["machine"]
    lines = [f"# GPU benchmark suite ({m['gpu'] or 'no GPU: dry run'})", "",
             f"- Machine: GPU {m['gpu']}; host {m['cpu']}, {m['cpus']} CPUs; Python {m['python']}, torch {m['torch']}",
             f"- Command: `{summary['command']}`", f"- Date: {summary['date']}",
             f"- Commit: {summary['commit'] or 'unknown (not a git checkout)'}",
             f"- Budget: {summary['budget_s']:g} s; took {summary['total_s']} s", "",
             "| step | exit code | seconds | limit s | command |", "|---|---|---|---|---|"]
    lines += [f"| {st['step']} | {st['rc']} | {st['seconds']} | {st['limit_s']} | `{st['command']}` |"
              for st in s.steps]
    if "train_plan" in summary:
        lines += ["", f"Training plan: {json.dumps(summary['train_plan'], default=str)}"]
    (s.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    ok = all(st["rc"] in (0, "skipped") for st in s.steps)
    print(f"gpu_suite: {'all steps ok' if ok else 'some steps failed'} in {summary['total_s']} s; "
          f"wrote {s.out / (name + '.md')} and .json; step logs in {s.logs}", flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-once"]:
        return train_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=600.0, help="wall-clock budget of all steps (default 600)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results; with --dry-run: runs/gpu_suite/dry)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "gpu_suite",
                    help="step logs, training runs and the trained weights (default runs/gpu_suite)")
    ap.add_argument("--only", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)} (default: all)")
    ap.add_argument("--pictures", type=Path, default=PICTURES,
                    help="training pictures (default .tiny-data/train: python -m benchmarks.tiny.fetch_images)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, token sizes: checks the plumbing, no GPU needed")
    a = ap.parse_args(argv)
    only = tuple(x.strip() for x in a.only.split(",") if x.strip())
    bad = sorted(set(only) - set(STEPS))
    if bad or not only:
        ap.error(f"--only: unknown step(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(STEPS)}")
    if a.budget_s <= 0:
        ap.error(f"--budget-s: must be positive, got {a.budget_s:g}")
    if not a.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_suite: no CUDA GPU here (torch.cuda.is_available() is False; torch "
                  f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}). The suite measures GPU kernels, "
                  "throughput and training: run it on a machine with an NVIDIA GPU and a CUDA build of torch, "
                  "or add --dry-run to check the plumbing on this CPU.", file=sys.stderr)
            return 2
        if "train" in only and not a.pictures.is_dir():
            print(f"gpu_suite: no training pictures in {a.pictures}: run `python -m benchmarks.tiny.fetch_images "
                  "--out .tiny-data --install` first, pass --pictures DIR, or leave the step out with "
                  "--only kernels,throughput.", file=sys.stderr)
            return 2
    out = a.out or (ROOT / "runs" / "gpu_suite" / "dry" if a.dry_run else RESULTS)
    return run(out, a.budget_s, a.dry_run, a.pictures, only, a.work)


if __name__ == "__main__":
    sys.exit(main())
