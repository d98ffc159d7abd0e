"""Whole-model GPU measurements for the GPU suite: a profile, parity with the official code, and A/B levers.

    python -m benchmarks.gpu_model profile --out benchmarks/results   # torch.profiler at base and precise
    python -m benchmarks.gpu_model parity  --out benchmarks/results   # ours vs official, every setting
    python -m benchmarks.gpu_model levers  --out benchmarks/results   # eager vs compile vs channels-last
    python -m benchmarks.gpu_model <step> --dry-run --out /tmp/x      # CPU, tiny shapes: the plumbing only

* ``profile``: one batch (640x640 at ``base``, the setting's sizes at ``precise``; batch 8, bf16) after a
  warm-up, under ``torch.profiler``: the top operators by device time and each stage's share (the
  ``romav2.*`` ranges of :mod:`romav2_plugin.profiling`) -> ``gpu_profile_<gpu>.md/.json``.
* ``parity``: ours and the official code (``romav2==2.0.1``, assembled by :mod:`benchmarks._official`) on the
  same seeded random official-layout weights, every named setting, bf16 (as released) and fp32 (TF32 off):
  warp difference in pixels (median, p99, max), overlap and precision differences, against the bounds of
  :data:`BOUNDS` -> ``gpu_parity_<gpu>.md/.json``. ``tests/test_gpu_parity.py`` asserts the same bounds
  wherever CUDA is present.
* ``levers``: ``base`` 640x640 batch 8 bf16, interleaved rounds of eager, ``compile=True`` and channels-last
  (``$ROMAV2_CHANNELS_LAST``) and both; median seconds per batch and the first call (compile time) ->
  ``gpu_levers_<gpu>.md/.json``. Measured only: nothing here changes a default.

Every step writes its file when it finishes. ``--dry-run`` runs on the CPU with romav2-tiny (profile,
levers) or the official architecture at 64x64 (parity, fp32 only), batch 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import RESULTS, command_line, git_commit, gpu_label, now_utc

#: parity bounds per precision: (max |warp difference| in pixels of the finest grid, p99 of it,
#: max |overlap difference|). fp32 with TF32 off differs by summation order only (our kernel vs the
#: official fused/native path, batched directions); bf16 rounds differently where we reorder work.
BOUNDS = {"fp32": (0.05, 0.01, 1e-3), "bf16": (8.0, 1.0, 0.05)}
STAGES = ("romav2.backbone", "romav2.matcher", "romav2.dpt", "romav2.fine_features", "romav2.refiner.s4",
          "romav2.refiner.s2", "romav2.refiner.s1", "romav2.sampling")


def _device(dry: bool) -> torch.device:
    return torch.device("cpu" if dry else "cuda")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _images(batch: int, size: int, dev: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, size, size, generator=g).to(dev), torch.rand(batch, 3, size, size, generator=g).to(dev))


_SD: dict = {}


def _random_sd() -> dict:
    """The seeded random official-layout weights, made once per process (read only)."""
    from romav2_plugin.testing import make_random_official_state_dict

    if "sd" not in _SD:
        _SD["sd"] = make_random_official_state_dict(0)
    return _SD["sd"]


def _ours(setting: str, amp: bool, dev: torch.device, dry: bool, **cfg_over):
    from romav2_plugin import RoMaV2
    from romav2_plugin.config import RoMaV2Config, tiny_config

    if dry:
        model = RoMaV2(dataclasses.replace(tiny_config(setting), **cfg_over), amp=amp, device=dev)
        model.H_lr = model.W_lr = 64
        if model.H_hr is not None:
            model.H_hr = model.W_hr = 96
        return model
    cfg = dataclasses.replace(RoMaV2Config(setting=setting), **cfg_over)
    return RoMaV2.from_pretrained(_random_sd(), config=cfg, setting=setting, amp=amp, device=dev)


def _write(out: Path, name: str, title: str, lines: list[str], data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    head = [f"# {title}", "", f"- Date: {now_utc()}", f"- Command: `{command_line()}`",
            f"- Commit: {git_commit() or 'unknown'}", f"- Device: {data['device']}; torch {torch.__version__}", ""]
    (out / f"{name}.md").write_text("\n".join(head + lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps({"date": now_utc(), "command": command_line(), "commit": git_commit(),
                                                  "torch": torch.__version__, **data}, indent=1, default=str))
    print(f"wrote {out / (name + '.md')} and .json", flush=True)


def _dev_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (dry run)"


# ------------------------------------------------------------------------------------------------ profile
def _evt_time(e, dev: torch.device, self_only: bool = False) -> float:
    """Microseconds of a profiler average on the device (CPU time on the CPU)."""
    if dev.type == "cuda":
        names = ("self_device_time_total", "self_cuda_time_total") if self_only else ("device_time_total", "cuda_time_total")
    else:
        names = ("self_cpu_time_total",) if self_only else ("cpu_time_total",)
    for n in names:
        v = getattr(e, n, None)
        if v is not None:
            return float(v)
    return 0.0


def profile_setting(setting: str, batch: int, dev: torch.device, dry: bool, top: int = 15) -> dict:
    from torch.profiler import ProfilerActivity, profile

    model = _ours(setting, True, dev, dry)
    size = 64 if dry else (640 if setting == "base" else model.H_lr)
    A, B = _images(batch, size, dev)
    with torch.inference_mode():
        model.sample(model.match(A, B), 5000)  # warm-up: kernels compiled and tuned, allocator warm
        _sync(dev)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        t = time.perf_counter()
        with profile(activities=acts) as prof:
            preds = model.match(A, B)
            model.sample(preds, 5000)
            _sync(dev)
        wall = time.perf_counter() - t
    avgs = prof.key_averages()
    stages = {}
    for e in avgs:
        if e.key in STAGES:
            # a range's device time is that of the kernels launched inside it (GPU user annotations)
            stages[e.key] = _evt_time(e, dev) or float(getattr(e, "cpu_time_total", 0.0))
    ops = sorted((e for e in avgs if not e.key.startswith("romav2.") and not e.key.startswith("ProfilerStep")),
                 key=lambda e: _evt_time(e, dev, True), reverse=True)[:top]
    total = sum(_evt_time(e, dev, True) for e in avgs if not e.key.startswith("romav2."))
    return {"setting": setting, "batch": batch, "size": size, "wall_s": wall, "total_us": total, "stages_us": stages,
            "top_ops": [{"op": e.key, "us": _evt_time(e, dev, True), "calls": e.count} for e in ops]}


def run_profile(out: Path, name: str, dry: bool, settings=("base", "precise")) -> int:
    dev = _device(dry)
    results, lines = [], []
    for st in settings:
        r = profile_setting(st, 1 if dry else 8, dev, dry)
        results.append(r)
        top_total = sum(r["stages_us"].get(k, 0.0) for k in STAGES if k != "romav2.dpt")
        lines += [f"## `{st}`, batch {r['batch']}, {r['size']}x{r['size']} input, bf16 (wall {r['wall_s']:.3f} s)", "",
                  "| stage | device ms | share of the stages |", "|---|---:|---:|"]
        for k in STAGES:
            if k in r["stages_us"]:
                us = r["stages_us"][k]
                note = " (inside matcher)" if k == "romav2.dpt" else ""
                lines.append(f"| {k}{note} | {us / 1e3:.2f} | {100 * us / max(top_total, 1e-9):.1f}% |")
        lines += ["", f"Top {len(r['top_ops'])} operators by self device time (total {r['total_us'] / 1e3:.1f} ms):", "",
                  "| operator | ms | calls | share |", "|---|---:|---:|---:|"]
        lines += [f"| `{o['op'][:80]}` | {o['us'] / 1e3:.2f} | {o['calls']} | {100 * o['us'] / max(r['total_us'], 1e-9):.1f}% |"
                  for o in r["top_ops"]]
        lines.append("")
        _write(out, name, "Profile of one batch (torch.profiler)", lines, {"device": _dev_name(dev), "results": results})
        del r
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return 0


# ------------------------------------------------------------------------------------------------ parity
def compare(po: dict, pr: dict, H: int, W: int) -> dict:
    """Differences of two ``match`` outputs: warp in pixels (x by W/2, y by H/2), overlap, precision."""
    out = {}
    for d in ("AB", "BA"):
        if po.get(f"warp_{d}") is None or pr.get(f"warp_{d}") is None:
            continue
        dw = (po[f"warp_{d}"].float() - pr[f"warp_{d}"].float()).abs()
        px = torch.maximum(dw[..., 0] * W / 2, dw[..., 1] * H / 2).flatten().double().cpu()
        ov = (po[f"overlap_{d}"].float() - pr[f"overlap_{d}"].float()).abs().double().cpu()
        pa, pb = po[f"precision_{d}"].double().cpu(), pr[f"precision_{d}"].double().cpu()
        spread = float((pb.amax() - pb.amin()).clamp_min(1e-12))
        out[d] = {"warp_px_median": float(px.median()), "warp_px_p99": float(px.quantile(0.99)) if px.numel() < 2**24 else float(px.sort().values[int(0.99 * (px.numel() - 1))]),
                  "warp_px_max": float(px.max()), "overlap_max": float(ov.max()), "overlap_mean": float(ov.mean()),
                  "precision_max_rel_spread": float((pa - pb).abs().max()) / spread}
    return out


def within(diff: dict, precision: str) -> bool:
    mx, p99, ov = BOUNDS[precision]
    return all(v["warp_px_max"] <= mx and v["warp_px_p99"] <= p99 and v["overlap_max"] <= ov for v in diff.values())


def parity_models(sd, precision: str, dev: torch.device):
    """Ours and the official model on the same official-layout weights ``sd`` (bf16 autocast or fp32)."""
    from benchmarks._official import build_official
    from romav2_plugin import RoMaV2

    amp = precision == "bf16"
    return RoMaV2.from_pretrained(sd, setting="base", amp=amp, device=dev), build_official(sd, "base", amp=amp, device=dev)


def parity_setting(setting: str, precision: str, dev: torch.device, dry: bool, sd=None, models=None) -> dict:
    """Ours vs official on one setting; ``sd``: the official-layout weights (default seeded random);
    ``models``: ``parity_models(sd, precision, dev)`` already built (the setting is applied here)."""
    from benchmarks._official import no_autocast
    from romav2_plugin.testing import make_random_official_state_dict

    amp = precision == "bf16"
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        if models is None:
            models = parity_models(make_random_official_state_dict(0) if sd is None else sd, precision, dev)
        ours, off = models
        for m in (ours, off):
            m.apply_setting(setting)
        if dry:
            for m in (ours, off):
                m.H_lr = m.W_lr = 64
                if m.H_hr is not None:
                    m.H_hr = m.W_hr = 96
        A, B = _images(1 if dry else 2, 64 if dry else 640, dev, seed=5)
        with torch.inference_mode():
            po = ours.match(A, B)
            with (no_autocast() if not amp else _null()):
                pr = off.match(A, B)
        H, W = po["warp_AB"].shape[1:3]
        diff = compare(po, pr, H, W)
        return {"setting": setting, "precision": precision, "grid": [H, W], "diff": diff, "ok": within(diff, precision)}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def run_parity(out: Path, name: str, dry: bool, settings=None) -> int:
    from romav2_plugin.config import SETTINGS

    dev = _device(dry)
    settings = settings or (("turbo",) if dry else tuple(s for s in SETTINGS if s != "tiny"))
    sd = _random_sd()
    rows = []
    lines = [f"Bounds (pixels of the finest grid, overlap absolute): {json.dumps(BOUNDS)}; TF32 off in both.", "",
             "| setting | precision | grid | dir | warp px median | p99 | max | overlap max | precision max / spread | ok |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    # the dry run (CPU, official-size models, minutes on a loaded machine) compares fp32 only; the bf16 path
    # is the same code with autocast on
    for prec in (("fp32",) if dry else ("bf16", "fp32")):
        models = parity_models(sd, prec, dev)
        for st in settings:
            try:
                r = parity_setting(st, prec, dev, dry, sd, models)
            except Exception as e:  # noqa: BLE001 - record and go on (a budget cut keeps the rest)
                r = {"setting": st, "precision": prec, "error": f"{type(e).__name__}: {e}"[:300], "ok": False, "diff": {}}
            rows.append(r)
            if "error" in r:
                lines.append(f"| {st} | {prec} | | | error: {r['error']} | | | | | False |")
            for d, v in r["diff"].items():
                lines.append(f"| {st} | {prec} | {r['grid'][0]}x{r['grid'][1]} | {d} | {v['warp_px_median']:.2e} | "
                             f"{v['warp_px_p99']:.2e} | {v['warp_px_max']:.2e} | {v['overlap_max']:.2e} | "
                             f"{v['precision_max_rel_spread']:.2e} | {r['ok']} |")
            _write(out, name, "GPU parity: ours vs the official code (same random official-layout weights)",
                   lines, {"device": _dev_name(dev), "bounds": BOUNDS, "rows": rows})
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return 0 if all(r["ok"] for r in rows) else 1


# ------------------------------------------------------------------------------------------------ levers
LEVERS = {"eager": ({}, "0"), "compile": ({"compile": True}, "0"), "channels_last": ({}, "1"),
          "compile+channels_last": ({"compile": True}, "1")}


def run_levers(out: Path, name: str, dry: bool, rounds: int = 5,
               groups=(("eager", "channels_last"), ("eager", "compile"))) -> int:
    """Each group's levers in interleaved rounds against a fresh eager model; the file is rewritten after
    each group (the compile group, minutes of compile time, comes last)."""
    dev = _device(dry)
    batch, size = (1, 64) if dry else (8, 640)
    A, B = _images(batch, size, dev)
    rows: list[dict] = []
    for gi, group in enumerate(groups):
        models, first = {}, {}
        for lv in group:
            over, cl = LEVERS[lv]
            os.environ["ROMAV2_CHANNELS_LAST"] = cl
            models[lv] = _ours("base", True, dev, dry, **over)
            t = time.perf_counter()
            with torch.inference_mode():
                models[lv].match(A, B)
            _sync(dev)
            first[lv] = time.perf_counter() - t
        times: dict[str, list[float]] = {lv: [] for lv in group}
        for _ in range(rounds):  # interleaved rounds
            for lv in group:
                os.environ["ROMAV2_CHANNELS_LAST"] = LEVERS[lv][1]
                _sync(dev)
                t = time.perf_counter()
                with torch.inference_mode():
                    models[lv].match(A, B)
                _sync(dev)
                times[lv].append(time.perf_counter() - t)
        os.environ.pop("ROMAV2_CHANNELS_LAST", None)
        med = {lv: statistics.median(v) for lv, v in times.items()}
        rows += [{"group": gi, "lever": lv, "median_s": med[lv], "vs_eager": med["eager"] / med[lv],
                  "first_call_s": first[lv], "times_s": times[lv]} for lv in group]
        del models
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        lines = [f"`base`, {size}x{size}, batch {batch}, bf16; per group {rounds} interleaved rounds after a first "
                 "call each (the compile row's first call includes compiling).", "",
                 "| group | lever | median s / batch | pairs/s | vs eager (same group) | first call s |",
                 "|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {r['group']} | {r['lever']} | {r['median_s']:.4f} | {batch / r['median_s']:.1f} | "
                  f"{r['vs_eager']:.2f}x | {r['first_call_s']:.1f} |" for r in rows]
        _write(out, name, "GPU levers (A/B, measured only; defaults unchanged)", lines,
               {"device": _dev_name(dev), "batch": batch, "rows": rows})
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("profile", "parity", "levers"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default=None, help="file stem (default gpu_<step>_<gpu>, gpu_<step>_dry)")
    ap.add_argument("--settings", default=None, help="comma list (profile: base,precise; parity: every setting)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the plumbing")
    a = ap.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_model: no CUDA device here; add --dry-run to check the plumbing on the CPU", file=sys.stderr)
        return 2
    label = "dry" if a.dry_run else gpu_label(torch.cuda.get_device_name(0))
    name = a.name or f"gpu_{a.step}_{label}"
    settings = tuple(s for s in (a.settings or "").split(",") if s) or None
    if a.step == "profile":
        return run_profile(a.out, name, a.dry_run, settings or ("base", "precise"))
    if a.step == "parity":
        return run_parity(a.out, name, a.dry_run, settings)
    if a.dry_run:  # inductor on 2 CPU cores takes minutes: the dry run checks the eager and channels-last rows
        return run_levers(a.out, name, True, rounds=2, groups=(("eager", "channels_last"),))
    return run_levers(a.out, name, False)


if __name__ == "__main__":
    sys.exit(main())
