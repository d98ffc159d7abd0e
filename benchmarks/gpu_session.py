"""One prepared GPU lease: every GPU-side check of the project in one run, inside a fixed time budget.

    # here (the CPU machine), before the lease: the wheels the GPU image lacks + the training pictures
    python -m benchmarks.gpu_session prepare        # writes .whl/ and .gpu-data/ (both git-ignored)
    # the device tool's `run`, carry [".whl", ".gpu-data"], timeout_s 600:
    bash benchmarks/gpu_session.sh                  # installs, then: python -m benchmarks.gpu_session run --out $OUT
    # the same steps on CPU with token sizes (what the tests run):
    python -m benchmarks.gpu_session run --dry-run --out /tmp/gpu-dry

Steps of ``run``, each in its own process with its own time limit (a failed or timed-out step is recorded
and the next one runs):

1. ``kernels``: ``benchmarks/gpu_kernels.py`` (NVRTC build + self-check, parity in fp32/bf16/fp16, time and
   peak memory against the official native path and, with the carried ``fused-local-corr`` wheel, the
   official fused kernel);
2. ``throughput``: ``benchmarks/speed.py``, ours against the official code (``romav2==2.0.1``, carried),
   ``base`` setting, 640x640, batch 8, bf16;
3. ``train``: romav2-tiny from the shipped weights (``benchmarks/tiny/romav2_tiny_gpu.toml``): a probe of a
   few matcher and refiner steps (past the data loader's prefetch buffer) measures the sustained seconds
   per step, then one run whose step counts fill the time
   left (80% matcher, 20% refiners), exported in fp16 to ``OUT/romav2_tiny_gpu.pt`` (+ ``.json``) with its
   ``log.csv``;
4. pack: the text results into ``OUT/gpu_session.tar.gz`` (the device returns at most 8 files) and a summary
   ``OUT/gpu_session.json`` (per step: command, exit code, seconds, what it wrote).

Unpack here with ``tar xzf gpu_session.tar.gz -C benchmarks/results``.
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
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "benchmarks" / "tiny" / "romav2_tiny_gpu.toml"
WHEELS = {"romav2": "2.0.1", "fused-local-corr": "0.3.211"}  # the GPU image has torch 2.11, timm, einops, rich
GPU_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
GRACE_S = 30  # after SIGTERM, before SIGKILL
PLAN_SHARE = 0.85  # of the time left that the training run is planned to fill (the pace of data workers varies)
PICTURE_SIDE = 640  # ImageFolder shrinks to max(640, 2 * crop) on load anyway: nothing is lost at 256 px crops


# ------------------------------------------------------------------------------------------------ prepare
def prepare(src: Path, dst: Path, wheels: Path, *, download: bool = True) -> dict:
    """Copy the training pictures (``src``: the fetched ``.tiny-data/train``, links resolved) into ``dst``,
    shrunk to :data:`PICTURE_SIDE` px on the long side, and download :data:`WHEELS` for the GPU's Python into
    ``wheels``. The held-out folder is never read."""
    from PIL import Image

    if src.name != "train" or not src.is_dir():
        raise SystemExit(
            f"gpu_session prepare: {src} is not a fetched training folder; run "
            "`python -m benchmarks.tiny.fetch_images --out .tiny-data --install` first"
        )
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for p in sorted(src.iterdir()):
        if p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        with Image.open(p) as im:
            im = im.convert("RGB")
            im.thumbnail((PICTURE_SIDE, PICTURE_SIDE), Image.Resampling.LANCZOS)
            im.save(dst / (p.stem + ".jpg"), quality=95)
        n += 1
    out = {"pictures": n, "pictures_MiB": sum(f.stat().st_size for f in dst.iterdir()) / 2**20}
    if download:
        wheels.mkdir(parents=True, exist_ok=True)
        plat = [a for p in PLATFORMS for a in ("--platform", p)]
        for name, version in WHEELS.items():
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                 "--python-version", GPU_PYTHON, "--implementation", "cp", *plat, "-d", str(wheels),
                 f"{name}=={version}"],
                check=True,
            )
        out["wheels"] = sorted(f.name for f in wheels.glob("*.whl"))
        out["wheels_MiB"] = sum(f.stat().st_size for f in wheels.glob("*.whl")) / 2**20
    return out


# ------------------------------------------------------------------------------------------------ train
def _train_config(template: Path, *, out_dir: Path, matcher_steps: int, refiner_steps: int,
                  dry_run: bool, pictures: Path | None = None):
    """The template with the step counts replaced (warm-ups shortened to at most a tenth of a stage) and,
    with ``pictures``, every source reading that folder instead."""
    from romav2_plugin.train.config import load_config

    cfg = load_config(template)
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
    """``python -m benchmarks.gpu_session train-once``: one training run of the template (own process)."""
    import torch

    from romav2_plugin.signals import sigterm_as_interrupt
    from romav2_plugin.train.loop import Trainer

    ap = argparse.ArgumentParser(prog="gpu_session train-once")
    ap.add_argument("--template", type=Path, default=TEMPLATE)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--matcher-steps", type=int, required=True)
    ap.add_argument("--refiner-steps", type=int, required=True)
    ap.add_argument("--export", type=Path, default=None, help="fp16 export of the EMA weights")
    ap.add_argument("--pictures", type=Path, default=None, help="training pictures (default: the template's)")
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
        except KeyboardInterrupt as e:  # the session's time limit: keep what was trained
            stopped = f"{e or 'interrupted'} at global step {trainer.global_step}"
            print(f"train-once: {stopped}; exporting the EMA weights as they are", flush=True)
    if a.export is not None:
        card = {"trained_by": "benchmarks/gpu_session.py", "template": TEMPLATE.name,
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
    return {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": gpu, "cpus": os.cpu_count()}


class _Session:
    def __init__(self, out: Path, budget_s: float, dry_run: bool) -> None:
        self.out, self.dry_run = out, dry_run
        self.results = out / "results"
        self.results.mkdir(parents=True, exist_ok=True)
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
        log = self.results / f"{name}.log"
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


STEPS = ("kernels", "throughput", "train")


def run(out: Path, budget_s: float, dry_run: bool, pictures: Path | None = None,
        only: tuple[str, ...] = STEPS) -> int:
    py = sys.executable
    s = _Session(out, budget_s, dry_run)
    res = str(s.results)
    summary: dict = {"machine": _machine(), "budget_s": budget_s, "dry_run": dry_run, "steps": s.steps}
    if "kernels" in only:
        _kernels(s, py, res, dry_run)
    if "throughput" in only:
        _throughput(s, py, res, dry_run)
    if "train" in only:
        _train(s, py, out, dry_run, pictures, summary)
    return _pack(s, out, summary)


def _kernels(s: _Session, py: str, res: str, dry_run: bool) -> None:
    s.step("kernels", [py, "-m", "benchmarks.gpu_kernels", "--out", res, *(["--dry-run"] if dry_run else [])],
           60 if dry_run else 150)


def _throughput(s: _Session, py: str, res: str, dry_run: bool) -> None:
    speed = [py, "-m", "benchmarks.speed", "--out", res]
    if dry_run:
        speed += ["--dry-run", "--tag", "gpu_session_dry"]
    else:
        speed += ["--device", "cuda", "--batch", "8", "--dtype", "bf16", "--settings", "base",
                  "--input-size", "640", "--matchers", "ours,official", "--repeats", "5", "--warmup", "2",
                  "--tag", "cuda_b8_bf16"]
    s.step("throughput", speed, 120 if dry_run else 200)


def _train(s: _Session, py: str, out: Path, dry_run: bool, pictures: Path | None, summary: dict) -> None:
    """A probe measures seconds per step of each stage; the final run's steps fill the time left."""
    runs = out / "train_runs"
    once = [py, "-m", "benchmarks.gpu_session", "train-once", *(["--dry-run"] if dry_run else []),
            *(["--pictures", str(pictures)] if pictures is not None else [])]
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
        spare = 5 if dry_run else 30  # export, pack
        m, r = plan_steps(PLAN_SHARE * (s.left() - overhead - spare), sps.get("matcher", 0),
                          sps.get("refiners", 0))
        if dry_run:
            m, r = max(1, min(m, 2)), max(1, min(r, 1))
        summary["train_plan"] = {"probe_steps": {"matcher": probe_m, "refiners": probe_r}, "skipped_steps": buffer,
                                 "pairs_per_s": pps, "seconds_per_step": sps, "overhead_s": round(overhead, 1),
                                 "plan_share": PLAN_SHARE, "matcher_steps": m, "refiner_steps": r, "batch": batch}
        if m >= 1 and r >= 1:
            final = runs / "final"
            rec = s.step("train", [*once, "--out-dir", str(final), "--matcher-steps", str(m),
                                   "--refiner-steps", str(r), "--export", str(out / "romav2_tiny_gpu.pt")],
                         s.left() - spare / 2)
            if (final / "log.csv").is_file():
                shutil.copy(final / "log.csv", s.results / "train_log.csv")
    shutil.rmtree(runs, ignore_errors=True)


def _pack(s: _Session, out: Path, summary: dict) -> int:
    summary["total_s"] = round(time.monotonic() - s.t0, 1)
    (out / "gpu_session.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    shutil.copy(out / "gpu_session.json", s.results / "gpu_session.json")
    with tarfile.open(out / "gpu_session.tar.gz", "w:gz") as tar:
        for f in sorted(s.results.iterdir()):
            if f.is_file() and f.stat().st_size < 8 * 2**20:
                tar.add(f, arcname=f.name)
    shutil.rmtree(s.results)
    ok = all(st["rc"] == 0 for st in s.steps)
    print(f"gpu_session: {'all steps ok' if ok else 'some steps failed'} in {summary['total_s']} s; "
          f"wrote {out / 'gpu_session.tar.gz'} and {out / 'gpu_session.json'}", flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-once"]:
        return train_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="here: copy the training pictures, download the wheels")
    p.add_argument("--pictures", type=Path, default=ROOT / ".tiny-data" / "train")
    p.add_argument("--data-out", type=Path, default=ROOT / ".gpu-data" / "train")
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    p.add_argument("--no-download", action="store_true")
    r = sub.add_parser("run", help="on the GPU machine: every step, then pack")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--budget-s", type=float, default=500.0, help="wall-clock budget of all steps (default 500)")
    r.add_argument("--dry-run", action="store_true", help="CPU, token sizes: checks the plumbing")
    r.add_argument("--pictures", type=Path, default=None, help="training pictures (default: the template's)")
    r.add_argument("--only", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)} (default: all)")
    sub.add_parser("train-once", help="internal: one training run (own process)")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        info = prepare(a.pictures, a.data_out, a.wheels, download=not a.no_download)
        print(json.dumps(info, indent=1))
        print('then: device run, carry [".whl", ".gpu-data"], command "bash benchmarks/gpu_session.sh", '
              "timeout_s 600")
        return 0
    only = tuple(x.strip() for x in a.only.split(",") if x.strip())
    bad = sorted(set(only) - set(STEPS))
    if bad or not only:
        ap.error(f"--only: unknown step(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(STEPS)}")
    return run(a.out, a.budget_s, a.dry_run, a.pictures, only)


if __name__ == "__main__":
    sys.exit(main())
