"""Speed and memory of dense matchers, side by side, on the machine at hand.

Matchers (``--matchers``):

* ``ours``     -- ``romav2_plugin.RoMaV2`` at ``--settings`` (turbo 320, base 640, precise 800 -> 1280);
* ``official`` -- the official ``romav2==2.0.1`` code at the same settings, assembled offline around the
  same weights with an identical-maths 24-block DINOv3 (see ``benchmarks/_official.py``);
* ``roma``     -- RoMa (``romatch``), outdoor architecture, coarse 560 -> upsampled 644 by default;
* ``loftr``    -- ``kornia.feature.LoFTR(pretrained=None)`` at 640x640;
* ``tiny``     -- romav2-tiny (the shipped weights, setting ``tiny``) on the shipped demo pair: ``match``
  alone, and ``match`` + ``sample(5000)`` (the one row where sampling is timed);
* ``double``   -- a ground-truth test double (no network), for ``--dry-run`` and CI.

Precisions (``--dtype``, a comma list; each one its own workers): ``default`` -- each code as released
(ours ``amp=None``: bf16 autocast on CUDA and on CPUs with native bf16, fp32 elsewhere; the official code's
own autocasts, bf16 on any device, with its fine-feature CNN in fp32 on CPU as its hard-coded
``device_type="cuda"`` leaves it), ``bf16`` (ours ``amp=True``, the official code as released) and ``fp32``
(ours ``amp=False``, the official code with every autocast off). Default: ``default,fp32`` on CPU,
``bf16`` on CUDA.

Weights are random unless ``--weights`` is given (one official-layout file, shared by ours and the
official pipeline); random weights do not change the cost of a dense forward pass.

Method: every configuration runs in its own worker process (so peak memory is per configuration) that
builds the model once, then the parent interleaves the runs: warm-up run(s), then ``--repeats`` rounds,
each round one run of every configuration of the group. Configurations that compare directly share a
group (ours and official at one setting; LoFTR with the 640 group; RoMa alone). Each run is timed around
``match`` (resize + network, synchronised on CUDA; sampling excluded), and measures the peak memory
above the process's live memory before the run (CPU: ``VmHWM`` reset through ``/proc/self/clear_refs``;
CUDA: ``torch.cuda.max_memory_allocated``).

Outputs ``speed_<tag>.md``, ``.csv``, ``.json`` and ``.png`` under ``--out`` (default ``benchmarks/results``).

Examples::

    python -m benchmarks.speed                                   # CPU, all matchers, 3 repeats
    python -m benchmarks.speed --matchers ours,official,tiny --settings turbo,base \
        --dtype default,fp32 --repeats 3 --warmup 1                # CPU side by side, as released and fp32
    python -m benchmarks.speed --device cuda --batch 8 --dtype bf16 --settings base \\
        --input-size 640 --roma-coarse 644 --roma-upsample 0 --repeats 10 --warmup 3 --tag h200
    python -m benchmarks.speed --dry-run --out /tmp/bench        # harness check, seconds
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks._common import (
    RESULTS,
    benchmark_pair,
    command_line,
    device_label,
    hwm_mb,
    machine_info,
    now_utc,
    provenance_markdown,
    release_memory,
    reset_peak_rss,
    rss_mb,
)

V2_SETTINGS = ("turbo", "fast", "base", "precise", "mega1500")
PAPER_TABLE8 = {"official": (30.9, 4.8), "roma": (18.5, None)}  # H200, batch 8, bf16, 640x640: pairs/s, GB
GOALS = {"cpu_time_ratio": 0.8, "cpu_mem_ratio": 0.5, "cuda_pairs_per_s": 45.0}
#: issue 33 (CPU, this machine): ours/official time per (setting, precision), and peak memory at precise
CPU_TARGETS = {("precise", "default"): 0.5, ("precise", "fp32"): 0.5, ("base", "default"): 0.5}
CPU_MEM_TARGET = 0.3
DTYPES = ("default", "bf16", "fp32")
#: Official pipeline, toronto pair, fp32, this repository's 2-core CPU (measured by the project lead).
LEAD_REFERENCE_CPU = {"precise": (199.0, 9.4), "base": (44.0, 2.1), "turbo": (8.1, None)}


# ====================================================================== configurations
@dataclass
class Config:
    matcher: str
    setting: str  # v2 setting name, or a label for the others
    resolution: str
    group: str
    heavy: bool = False
    params: dict = field(default_factory=dict)
    dtype: str | None = None  # None: the run's only --dtype (names and tables without a precision)

    @property
    def name(self) -> str:
        return f"{self.matcher}:{self.setting}" + (f":{self.dtype}" if self.dtype else "")


def _v2_resolution(setting: str) -> str:
    from romav2_plugin import get_setting

    s = get_setting(setting)
    r = f"{s.H_lr}x{s.W_lr}"
    if s.H_hr is not None:
        r += f" -> {s.H_hr}x{s.W_hr}"
    return r + (" bidir" if s.bidirectional else "")


def build_configs(args) -> list[Config]:
    if args.dry_run:
        return [
            Config("double", "turbo", "320x320", "dry"),
            Config("double", "base", "640x640", "dry"),
        ]
    out: list[Config] = []
    heavy_settings = {"precise", "mega1500"}
    many = len(args.dtypes) > 1
    for s in args.settings:
        if s not in V2_SETTINGS:
            raise SystemExit(f"--settings: unknown setting {s!r} (choose from {', '.join(V2_SETTINGS)})")
        for dt in args.dtypes:  # one group per (setting, precision): ours and official interleaved
            for m in ("ours", "official"):
                if m in args.matchers:
                    out.append(Config(m, s, _v2_resolution(s), f"{s}/{dt}", heavy=s in heavy_settings,
                                      dtype=dt if many else None))
    if "tiny" in args.matchers:
        for dt in args.dtypes:
            for label, n in (("match", 0), ("match+sample5000", 5000)):
                out.append(Config("tiny", label, _v2_resolution("tiny"), "tiny", params={"sample": n},
                                  dtype=dt if many else None))
    if "loftr" in args.matchers:
        group = "base" if "base" in args.settings else "loftr"
        out.append(Config("loftr", str(args.loftr_res), f"{args.loftr_res}x{args.loftr_res}", group,
                           params={"size": args.loftr_res}))
    if "roma" in args.matchers:
        up = args.roma_upsample
        res = f"{args.roma_coarse}x{args.roma_coarse}" + (f" -> {up}x{up}" if up else "") + " sym"
        label = f"{args.roma_coarse}" + (f"-{up}" if up else "")
        out.append(Config("roma", label, res, "roma", heavy=bool(up) and args.device == "cpu",
                          params={"coarse": args.roma_coarse, "upsample": up}))
    return out


# ====================================================================== worker (child process)
def _to_device_images(A, B, batch: int, device):
    import torch

    def t(x):
        return torch.from_numpy(x).permute(2, 0, 1).float().div(255)[None].expand(batch, -1, -1, -1).contiguous()

    return t(A).to(device), t(B).to(device)


def _load_weights(path: str | None):
    import torch

    if path is None:
        from romav2_plugin.testing import make_random_official_state_dict

        return make_random_official_state_dict(0)
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _row_dtype(row: dict, spec: dict) -> str:
    """The precision a row ran at: its own, else the run's only one; RoMa / LoFTR rows of a run with several
    precisions run in fp32 (they carry no precision of their own; fp32 is also what each does on a CPU as
    released: romatch turns its autocast off off-CUDA, kornia's LoFTR has none)."""
    return row.get("dtype") or (spec["dtype"] if "," not in spec["dtype"] else "fp32")


def _make_runner(cfg: dict, spec: dict, device):
    """Build the matcher; return ``(run, notes)`` where ``run(img_A, img_B)`` returns an output size."""
    import torch
    import torch.nn.functional as F

    dtype = _row_dtype(cfg, spec)
    amp = dtype in ("bf16", "default")  # the official code's default is its bf16 autocast
    ours_amp = None if dtype == "default" else amp  # ours: amp=None picks the device's default
    m = cfg["matcher"]
    if m == "double":
        from romav2_plugin.testing import HomographyWarpDouble

        model = HomographyWarpDouble(torch.eye(3, dtype=torch.float64), setting=cfg["setting"]).to(device)
        return (lambda a, b: int(model.match(a, b)["warp_AB"].numel())), "ground-truth double, no network"
    if m == "ours":
        from romav2_plugin import RoMaV2

        model = RoMaV2.from_pretrained(_load_weights(spec["weights"]), setting=cfg["setting"], amp=ours_amp, device=device)
        return (lambda a, b: int(model.match(a, b)["warp_AB"].numel())), _ours_precision(model, device)
    if m == "tiny":
        from romav2_plugin import RoMaV2

        model = RoMaV2.from_pretrained("tiny", setting="tiny", amp=ours_amp, device=device)
        n = cfg["params"]["sample"]

        def run_tiny(a, b):
            preds = model.match(a, b)
            if n:
                model.sample(preds, n, generator=0)
                return n
            return int(preds["warp_AB"].numel())

        return run_tiny, _ours_precision(model, device) + "; demo pair" + (f"; match + sample({n})" if n else "")
    if m == "official":
        from benchmarks._official import build_official, no_autocast

        model = build_official(_load_weights(spec["weights"]), cfg["setting"], amp=amp, device=device)

        def run_official(a, b):
            ctx = no_autocast() if not amp else _null()
            with ctx:
                return int(model.match(a, b)["warp_AB"].numel())

        return run_official, "official code; 24-block timm DINOv3 stand-in" + (
            "; as released (its bf16 autocasts; fine features fp32 on CPU)" if amp else "; fp32 (autocast off)")
    if m == "loftr":
        import kornia.feature as KF
        from kornia.color import rgb_to_grayscale

        model = KF.LoFTR(pretrained=None).eval().to(device)
        # Random weights give flat confidences below the 0.2 threshold, hence no coarse match and no fine
        # stage at all; threshold 0 sends every mutual nearest neighbour through the fine stage instead.
        model.coarse_matching.thr = 0.0
        size = cfg["params"]["size"]

        @torch.inference_mode()
        def run_loftr(a, b):
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                g = [rgb_to_grayscale(F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)) for x in (a, b)]
                out = model({"image0": g[0], "image1": g[1]})
            return int(out["keypoints0"].shape[0])

        return run_loftr, "coarse threshold 0 (random weights): all mutual nearest neighbours refined"
    if m == "roma":
        return _make_roma(cfg["params"], amp, device)
    raise ValueError(f"unknown matcher {m}")


def _ours_precision(model, device) -> str:
    from romav2_plugin import runtime

    on = model.amp if model.amp is not None else runtime.amp_default(device)
    return ("amp=None -> " if model.amp is None else "") + ("bf16 autocast" if on else "fp32")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _make_roma(params: dict, amp: bool, device):
    """RoMa (romatch) outdoor with random weights, built without any download."""
    from unittest import mock

    import torch
    import torch.nn.functional as F

    try:
        import romatch
        from romatch.models.matcher import RegressionMatcher
        from romatch.models.transformer import vit_large
    except ImportError as e:
        raise RuntimeError(f"romatch is not importable ({e}); pip install --no-deps romatch loguru opencv-python-headless") from e
    # A random DINOv2 ViT-L/14 state dict from romatch's own model class replaces the download.
    dino_sd = vit_large(img_size=518, patch_size=14, init_values=1.0, ffn_layer="mlp", block_chunks=0).state_dict()
    coarse, up = params["coarse"], params["upsample"]
    # ``weights={}`` + a no-op load keeps the PyTorch default initialisation of the matcher.
    with mock.patch.object(RegressionMatcher, "load_state_dict", lambda self, *a, **k: None):
        model = romatch.roma_outdoor(
            device, weights={}, dinov2_weights=dino_sd, coarse_res=coarse, upsample_res=up or coarse,
            amp_dtype=torch.bfloat16 if amp else torch.float32, use_custom_corr=False, upsample_preds=bool(up),
        )
    del dino_sd
    model.eval()
    mean = torch.tensor((0.485, 0.456, 0.406), device=device)[None, :, None, None]
    std = torch.tensor((0.229, 0.224, 0.225), device=device)[None, :, None, None]

    def prep(x, s):
        return (F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1) - mean) / std

    @torch.inference_mode()
    def run_roma(a, b):
        kw = {}
        if up:
            kw = {"im_A_high_res": prep(a, up), "im_B_high_res": prep(b, up)}
        warp, cert = model.match(prep(a, coarse), prep(b, coarse), device=device, **kw)
        return int(warp.numel())

    return run_roma, "romatch " + ("bf16" if amp else "fp32") + "; PyTorch local correlation (no fused-local-corr)"


def worker_main(cfg_json: str) -> None:
    """Child process: build one configuration, then answer ``run``/``quit`` lines on stdin."""
    import numpy as np
    import torch

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, the protocol stays clean
    job = json.loads(cfg_json)
    cfg, spec = job["config"], job["spec"]
    torch.set_num_threads(spec["threads"])
    torch.set_float32_matmul_precision("highest")
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"

    def send(**kw):
        proto.write(json.dumps(kw) + "\n")

    try:
        from benchmarks._common import benchmark_pair as _pair

        A, B, _ = _pair(tuple(spec["pair"]) if spec["pair"] else None)
        if cfg["matcher"] == "tiny":  # romav2-tiny's own demo pair (its shipped assets)
            import romav2_plugin

            assets = Path(romav2_plugin.__file__).parent / "assets"
            A, B, _ = _pair((str(assets / "demo_A.jpg"), str(assets / "demo_B.jpg")))
        if spec.get("input_size"):  # pre-resized inputs (outside the timing), e.g. the paper's 640x640
            from PIL import Image

            A, B = (np.asarray(Image.fromarray(x).resize((spec["input_size"],) * 2, Image.BICUBIC)) for x in (A, B))
        run, notes = _make_runner(cfg, spec, device)
        img_A, img_B = _to_device_images(A, B, spec["batch"], device)
        release_memory()
        base = rss_mb()
        send(status="ready", baseline_mb=base, notes=notes,
             cuda_model_mb=torch.cuda.memory_allocated(device) / 2**20 if cuda else None)
    except Exception as e:  # report and exit: the parent records the configuration as failed
        import traceback

        traceback.print_exc()
        send(status="error", error=f"{type(e).__name__}: {e}")
        return
    for line in sys.stdin:
        cmd = line.strip()
        if cmd != "run":
            break
        try:
            release_memory()
            before = rss_mb()
            exact = reset_peak_rss()
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                cuda0 = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            n_out = run(img_A, img_B)
            if cuda:
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            peak = hwm_mb()
            send(status="ok", seconds=dt, rss_before_mb=before, peak_delta_mb=(peak - before) if before else None,
                 peak_exact=exact, n_out=n_out,
                 cuda_peak_mb=torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
                 cuda_delta_mb=(torch.cuda.max_memory_allocated(device) - cuda0) / 2**20 if cuda else None)
        except Exception as e:
            import traceback

            traceback.print_exc()
            send(status="error", error=f"{type(e).__name__}: {e}")
            return


# ====================================================================== parent
class Worker:
    def __init__(self, cfg: Config, spec: dict, log) -> None:
        self.cfg = cfg
        job = json.dumps({"config": asdict(cfg), "spec": spec})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.speed", "--worker", job],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
            # the folder that holds this benchmarks/ as imported (not resolved: benchmarks/ may be imported
            # through a link outside the checkout, so that an installed romav2_plugin, not the source tree, is used)
            cwd=str(Path(__file__).absolute().parents[1]),
        )
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            return {"status": "error", "error": f"worker exited with code {rc} (killed for memory?)"}
        return json.loads(line)

    def run(self) -> dict:
        try:
            self.proc.stdin.write("run\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return {"status": "error", "error": "worker is gone"}
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_benchmark(configs: list[Config], spec: dict, *, repeats: int, heavy_repeats: int, warmup: int, log=None) -> list[dict]:
    """Interleaved runs, group by group. Returns one record per configuration."""
    log = log if log is not None else sys.stderr
    records: dict[str, dict] = {}
    groups: dict[str, list[Config]] = {}
    for c in configs:
        groups.setdefault(c.group, []).append(c)
    for gname, cfgs in groups.items():
        print(f"[speed] group {gname}: {', '.join(c.name for c in cfgs)}", file=sys.stderr, flush=True)
        workers = []
        for c in cfgs:  # build one at a time, so construction peaks do not overlap
            t0 = time.perf_counter()
            w = Worker(c, spec, log)
            rec = {"config": c, "runs": [], "warmup": [], "error": None, "build_s": time.perf_counter() - t0, **w.ready}
            records[c.name] = rec
            if w.ready.get("status") != "ready":
                rec["error"] = w.ready.get("error")
                w.close()
                continue
            workers.append(w)
        n_rounds = warmup + max(heavy_repeats if c.heavy else repeats for c in cfgs)
        for r in range(n_rounds):
            for w in workers:
                rec = records[w.cfg.name]
                want = warmup + (heavy_repeats if w.cfg.heavy else repeats)
                if rec["error"] or r >= want:
                    continue
                res = w.run()
                if res.get("status") != "ok":
                    rec["error"] = res.get("error")
                    continue
                (rec["warmup"] if r < warmup else rec["runs"]).append(res)
                kind = "warm-up" if r < warmup else f"run {r - warmup + 1}"
                print(f"[speed]   {w.cfg.name} {kind}: {res['seconds']:.2f} s, peak +{_fmt(res['peak_delta_mb'])} MiB",
                      file=sys.stderr, flush=True)
        for w in workers:
            w.close()
    return [summarize(records[c.name], spec["batch"]) for c in configs]


def summarize(rec: dict, batch: int) -> dict:
    c: Config = rec["config"]
    out = {
        "matcher": c.matcher, "setting": c.setting, "dtype": c.dtype, "resolution": c.resolution,
        "notes": rec.get("notes", ""),
        "error": rec["error"], "repeats": len(rec["runs"]), "build_s": rec["build_s"],
        "baseline_mb": rec.get("baseline_mb"), "cuda_model_mb": rec.get("cuda_model_mb"),
        "times_s": [r["seconds"] for r in rec["runs"]],
    }
    runs = rec["runs"]
    if runs:
        t = out["times_s"]
        out["median_s"] = statistics.median(t)
        out["min_s"], out["max_s"] = min(t), max(t)
        out["pairs_per_s"] = batch / out["median_s"]
        deltas = [r["peak_delta_mb"] for r in rec["warmup"] + runs if r["peak_delta_mb"] is not None]
        out["peak_delta_mb"] = max(deltas) if deltas else None
        out["peak_exact"] = all(r["peak_exact"] for r in runs)
        cud = [r["cuda_peak_mb"] for r in rec["warmup"] + runs if r["cuda_peak_mb"] is not None]
        out["cuda_peak_mb"] = max(cud) if cud else None
        cdd = [r["cuda_delta_mb"] for r in rec["warmup"] + runs if r["cuda_delta_mb"] is not None]
        out["cuda_delta_mb"] = max(cdd) if cdd else None
        out["n_out"] = runs[-1]["n_out"]
    return out


# ====================================================================== reporting
def _fmt(x, nd=0) -> str:
    if x is None:
        return "-"
    return f"{x:.{nd}f}"


def _key(r: dict) -> str:
    """``setting`` or ``setting/precision`` when the run compared several precisions."""
    return r["setting"] + (f"/{r['dtype']}" if r.get("dtype") else "")


def ratios(rows: list[dict]) -> dict[str, dict]:
    """``ours / official`` median time and peak memory per v2 setting (and precision, see :func:`_key`)."""
    by = {(r["matcher"], _key(r)): r for r in rows if r.get("median_s")}
    out = {}
    for (m, s), r in by.items():
        if m != "ours" or ("official", s) not in by:
            continue
        o = by[("official", s)]
        mem_key = "cuda_peak_mb" if r.get("cuda_peak_mb") is not None else "peak_delta_mb"
        mem = (r[mem_key] / o[mem_key]) if r.get(mem_key) and o.get(mem_key) else None
        absolute = None
        if mem_key == "peak_delta_mb" and mem is not None and r.get("baseline_mb") and o.get("baseline_mb"):
            absolute = (r["baseline_mb"] + r[mem_key]) / (o["baseline_mb"] + o[mem_key])
        out[s] = {"time": r["median_s"] / o["median_s"], "memory": mem, "memory_kind": mem_key,
                  "memory_absolute": absolute, "speedup": o["median_s"] / r["median_s"]}
    return out


def goals(rows: list[dict], spec: dict) -> list[str]:
    rat = ratios(rows)
    lines = []
    if spec["device"] == "cpu":
        p = rat.get("precise") or rat.get("precise/fp32")  # issue 6's goal: the official pipeline in fp32
        if p is None:
            lines.append("- CPU goal (precise: time <= 0.8x and peak memory <= 0.5x the official): not measured in this run")
        else:
            ok_t = p["time"] <= GOALS["cpu_time_ratio"]
            ok_m = p["memory"] is not None and p["memory"] <= GOALS["cpu_mem_ratio"]
            both = "" if "precise" in rat else " (fp32 vs fp32)"
            lines.append(f"- CPU goal at `precise`{both}: time {p['time']:.3f}x the official (goal <= 0.8x: "
                         f"{'met' if ok_t else 'NOT met'}), peak memory {_fmt(p['memory'], 3)}x (goal <= 0.5x: "
                         f"{'met' if ok_m else 'NOT met'})")
        for (setting, dt), target in CPU_TARGETS.items():
            v = rat.get(f"{setting}/{dt}")
            if v is None:
                continue
            line = (f"- Issue 33 target, `{setting}`, {dt} vs {dt}: time {v['time']:.3f}x the official (target <= "
                    f"{target}x: {'met' if v['time'] <= target else 'NOT met'})")
            if setting == "precise":
                ok = v["memory"] is not None and v["memory"] <= CPU_MEM_TARGET
                line += f", peak memory {_fmt(v['memory'], 3)}x (target <= {CPU_MEM_TARGET}x: {'met' if ok else 'NOT met'})"
            lines.append(line)
        by = {(r["matcher"], _key(r)): r for r in rows if r.get("median_s")}
        for m in ("ours", "official", "tiny"):
            for (mm, k), r in by.items():
                dt = r.get("dtype")
                if mm != m or dt in (None, "fp32"):
                    continue
                f = by.get((m, k[: -len(dt)] + "fp32"))
                if f is not None:
                    lines.append(f"- {m} `{r['setting']}`: {dt} / fp32 time {r['median_s'] / f['median_s']:.2f}x")
    else:
        ours = [r for r in rows if r["matcher"] == "ours" and r["setting"] == "base" and r.get("pairs_per_s")]
        for r in ours:
            ok = r["pairs_per_s"] >= GOALS["cuda_pairs_per_s"]
            lines.append(f"- GPU goal (>= 45 pairs/s at 640x640, batch 8): {r['pairs_per_s']:.1f} pairs/s at batch "
                         f"{spec['batch']} ({'met' if ok and spec['batch'] == 8 else 'NOT met' if spec['batch'] == 8 else 'other batch size'})")
    for s, v in rat.items():
        lines.append(f"- `{s}`: ours/official time {v['time']:.2f}x ({v['speedup']:.2f}x faster), "
                     f"peak memory ({'CUDA max allocated' if v['memory_kind'] == 'cuda_peak_mb' else 'RSS increase'}) "
                     f"{_fmt(v['memory'], 2)}x"
                     + (f" (whole-process peak RSS incl. model and libraries: {v['memory_absolute']:.2f}x)"
                        if v.get("memory_absolute") else ""))
    return lines


def write_outputs(rows: list[dict], spec: dict, out_dir: Path, tag: str, meta: dict) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / f"speed_{tag}.{k}" for k in ("md", "csv", "json", "png")}
    cuda = spec["device"].startswith("cuda")
    cols = ["matcher", "setting", "dtype", "resolution", "median_s", "min_s", "max_s", "pairs_per_s", "repeats",
            "baseline_mb", "peak_delta_mb", "cuda_peak_mb", "cuda_delta_mb", "build_s", "n_out", "notes", "error"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"# {meta['command']} | {meta['date']} | {meta['machine']['cpu']} x{meta['machine']['cores']}"
                    f" | torch {meta['machine']['versions'].get('torch')} | batch {spec['batch']} | {spec['dtype']}"])
        w.writerow(cols + ["times_s"])
        for r in rows:
            w.writerow([r.get(c) if not isinstance(r.get(c), float) else f"{r[c]:.4f}" for c in cols]
                       + [" ".join(f"{t:.3f}" for t in r["times_s"])])
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "spec": spec, "rows": rows, "ratios": ratios(rows)}, f, indent=1)
    _plot(rows, paths["png"], spec, meta)

    mem_head = "CUDA peak alloc MiB | CUDA +MiB" if cuda else "model RSS MiB | peak +MiB"
    md = [
        f"# Speed and memory ({spec['device']}, batch {spec['batch']}, {spec['dtype']})",

        "",
        provenance_markdown(meta["machine"], meta["command"], meta["date"]),
        f"- Input: {meta['pair']}; each matcher resizes it to its working resolution inside the timed call",
        f"- Timed: `match` = resize + network forward{' (CUDA-synchronised)' if cuda else ''}; sampling excluded. "
        f"{spec['warmup']} warm-up run(s), then interleaved rounds; median and min-max of the timed runs; "
        f"pairs/s = batch / median. {spec['threads']} torch threads.",
        "- Memory: " + ("`torch.cuda.max_memory_allocated` during the run (absolute, weights included) and its "
                        "increase over the memory allocated before the run." if cuda else
                        "RSS of the worker process after building the model, and the peak RSS increase during a run "
                        "(`VmHWM` reset before each run; max over all runs). One process per configuration."),
        "- Weights: " + (spec["weights"] or "random (seeded official-layout state dict for ours and official; PyTorch "
                         "default initialisation for RoMa and LoFTR)") + ". Random weights do not change the cost of "
                         "a dense forward pass (LoFTR's fine stage excepted: its cost grows with the number of coarse "
                         "matches; its threshold is set to 0 so that every mutual nearest neighbour is refined, the "
                         "count is in the `outputs` column).",
        "- `official`: the official `romav2==2.0.1` code (its `RoMaV2.match`, `Matcher`, `Refiners`, "
        "`FineFeatures`) assembled offline; its DINOv3 (torch.hub, unavailable offline) is replaced by timm "
        "`vit_large_patch16_dinov3_qkvb` with all 24 blocks and the same weights, called as "
        "`forward_intermediates(indices=[11, 17], norm=True)` without `stop_early`, i.e. the same maths and the "
        "same work as the official `get_intermediate_layers(n=[11, 17])`."
        + (" Precision per row: `default` = each code as released (ours `amp=None`, resolved in the notes; "
           "the official code's own bf16 autocasts, its fine-feature CNN in fp32 on a CPU), `bf16` = ours "
           "`amp=True` / the official as released, `fp32` = ours `amp=False` / the official with every autocast "
           "off." if "," in spec["dtype"] else "" if spec["dtype"] in ("bf16", "default")
           else " Run in fp32 with every autocast disabled (the as-is official code autocasts bf16 on CPU)."),
        *([f"- Load: {meta['load']}"] if meta.get("load") else []),
        "",
        f"| matcher | setting | precision | resolution | median s | spread s | pairs/s | {mem_head} | outputs | notes |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.get("median_s") is None:
            md.append(f"| {r['matcher']} | {r['setting']} | {_row_dtype(r, spec)} | {r['resolution']} | "
                      f"failed | | | | | | {r['error']} |")
            continue
        mem = (f"{_fmt(r['cuda_peak_mb'])} | {_fmt(r['cuda_delta_mb'])}" if cuda
               else f"{_fmt(r['baseline_mb'])} | {_fmt(r['peak_delta_mb'])}")
        md.append(f"| {r['matcher']} | {r['setting']} | {_row_dtype(r, spec)} | {r['resolution']} | {r['median_s']:.2f} | "
                  f"{r['min_s']:.2f}-{r['max_s']:.2f} | {r['pairs_per_s']:.3f} | {mem} | {r['n_out']} | {r['notes']} |")
    md += ["", "## Ratios and goals", "", *goals(rows, spec), ""]
    if spec["device"] == "cpu":
        md += ["Reference (official pipeline, toronto pair, fp32, 2 cores, as quoted in issue 6 (measured on this machine class before this project)): "
               "precise 199 s / +9.4 GB, base 44 s / +2.1 GB, turbo 8.1 s.", ""]
    else:
        md += ["Reference (paper, Table 8; H200, batch 8, bf16, 640x640): official RoMa v2 30.9 pairs/s, 4.8 GB; "
               "RoMa 18.5 pairs/s.", ""]
    md += [f"Chart: `{paths['png'].name}`; raw per-run times: `{paths['csv'].name}`, `{paths['json'].name}`.", ""]
    paths["md"].write_text("\n".join(md))
    return paths


def _plot(rows: list[dict], path: Path, spec: dict, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("median_s") is not None]
    if not ok:
        return
    labels = [f"{r['matcher']}\n{r['setting']}" + (f"\n{r['dtype']}" if r.get("dtype") else "") for r in ok]
    colors = {"ours": "tab:green", "official": "tab:blue", "roma": "tab:orange", "loftr": "tab:purple",
              "double": "tab:gray", "tiny": "tab:olive"}
    col = [colors.get(r["matcher"], "tab:gray") for r in ok]
    cuda = spec["device"].startswith("cuda")
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(ok) + 3), 4.5))
    x = range(len(ok))
    med = [r["median_s"] for r in ok]
    err = [[r["median_s"] - r["min_s"] for r in ok], [r["max_s"] - r["median_s"] for r in ok]]
    axes[0].bar(x, med, yerr=err, color=col, capsize=3)
    axes[0].set_ylabel("seconds per call (median, min-max)")
    if max(med) / max(min(med), 1e-9) > 20:
        axes[0].set_yscale("log")
    memk = "cuda_peak_mb" if cuda else "peak_delta_mb"
    mem = [(r.get(memk) or 0) / 1024 for r in ok]
    axes[1].bar(x, mem, color=col)
    for i, (t, m) in enumerate(zip(med, mem)):
        axes[0].annotate(f"{t:.3g}", (i, t), ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        axes[1].annotate(f"{m:.2f}", (i, m), ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    axes[1].set_ylabel("CUDA peak allocated (GiB)" if cuda else "peak RSS increase (GiB)")
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{meta['machine'].get('gpu', meta['machine']['cpu'])}: batch {spec['batch']}, {spec['dtype']}, "
                 f"{meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load_note() -> str | None:
    """The 1-minute load average and the core count at the start (a contended run says so)."""
    try:
        one = os.getloadavg()[0]
    except OSError:
        return None
    return f"1-min load average {one:.2f} on {os.cpu_count()} cores at the start of the run"


# ====================================================================== CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matchers", default="ours,official,roma,loftr,tiny", help="comma list of ours,official,roma,loftr,tiny")
    p.add_argument("--settings", default="turbo,base,precise", help="RoMa v2 settings for ours and official")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="comma list of default (each code as released), bf16, fp32; "
                   "default: default,fp32 on CPU, bf16 on CUDA")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--heavy-repeats", type=int, default=None, help="repeats of the CPU-heavy configurations "
                   "(precise, RoMa with upsampling); default --repeats")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--weights", default=None, help="official-layout checkpoint (default: seeded random weights)")
    p.add_argument("--pair", nargs=2, default=None, metavar=("IMG_A", "IMG_B"))
    p.add_argument("--input-size", type=int, default=None, help="resize both images to SxS before timing "
                   "(e.g. 640 for the paper's 640x640 condition); default: as loaded")
    p.add_argument("--roma-coarse", type=int, default=560)
    p.add_argument("--roma-upsample", type=int, default=644, help="0 = no upsampled second pass")
    p.add_argument("--loftr-res", type=int, default=640)
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default benchmarks/results; a temporary folder for --dry-run)")
    p.add_argument("--tag", default=None, help="file name tag (default: the device: cpu, or the GPU model, e.g. h200)")
    p.add_argument("--dry-run", action="store_true", help="ground-truth double only: checks the harness in seconds")
    p.add_argument("--render-from", type=Path, default=None, metavar="JSON",
                   help="rewrite the md/csv/png of an earlier run from its json (no measurement)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.matchers = [m.strip() for m in args.matchers.split(",") if m.strip()]
    unknown = set(args.matchers) - {"ours", "official", "roma", "loftr", "tiny"}
    if unknown:
        p.error(f"unknown matchers: {sorted(unknown)}")
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "default,fp32")
    args.dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if not args.dtypes or set(args.dtypes) - set(DTYPES) or len(set(args.dtypes)) != len(args.dtypes):
        p.error(f"--dtype: a comma list of distinct {', '.join(DTYPES)}")
    args.dtype = ",".join(args.dtypes)
    args.heavy_repeats = args.heavy_repeats or args.repeats
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "romav2_bench_dry" if args.dry_run else RESULTS
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--repeats and --batch must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return 0
    if args.render_from is not None:
        data = json.loads(args.render_from.read_text())
        tag = args.tag or args.render_from.stem.removeprefix("speed_")
        paths = write_outputs(data["rows"], data["spec"], args.out, tag, data["meta"])
        print(paths["md"].read_text())
        return 0
    if "official" in args.matchers and not args.dry_run:
        from benchmarks._official import official_available

        if not official_available():
            raise SystemExit("The official package is missing: pip install --no-deps romav2==2.0.1 einops")
    _, _, pair_desc = benchmark_pair(tuple(args.pair) if args.pair else None)
    if args.input_size:
        pair_desc += f", resized to {args.input_size}x{args.input_size} before timing"
    configs = build_configs(args)
    spec = {"device": args.device, "dtype": args.dtype, "batch": args.batch, "threads": args.threads,
            "pair": list(args.pair) if args.pair else None, "weights": args.weights, "input_size": args.input_size,
            "repeats": args.repeats, "heavy_repeats": args.heavy_repeats, "warmup": args.warmup}
    tmp = None
    if args.weights is None and any(c.matcher in ("ours", "official") for c in configs):
        # One seeded random file shared by the workers (same numbers for ours and official).
        from romav2_plugin.testing import make_random_official_checkpoint

        tmp = tempfile.TemporaryDirectory(prefix="romav2_bench_")
        print("[speed] writing seeded random weights (official layout) ...", file=sys.stderr, flush=True)
        spec["weights"] = str(make_random_official_checkpoint(Path(tmp.name) / "random_seed0.pt", seed=0))
    meta = {"machine": machine_info(args.device), "command": command_line(), "date": now_utc(), "pair": pair_desc,
            "load": _load_note()}
    try:
        rows = run_benchmark(configs, spec, repeats=args.repeats, heavy_repeats=args.heavy_repeats, warmup=args.warmup)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if tmp is not None:
        spec["weights"] = None  # the temporary file is gone; the report says "random"
    tag = args.tag or ("dry" if args.dry_run else device_label(args.device))
    paths = write_outputs(rows, spec, args.out, tag, meta)
    print(paths["md"].read_text())
    return 0 if all(r.get("median_s") is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
