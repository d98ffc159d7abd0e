"""CPU levers of ``match()``, each measured against the unchanged path in the same run (issue 33, item 3).

    python -m benchmarks.cpu_levers --settings tiny,base --repeats 5 --warmup 1 [--levers profile,layout,threads,compile]

Levers (``--levers``):

* ``profile``  -- ``torch.profiler`` over one ``match()`` per setting (the default precision): the operators with
  the most self CPU time, and the time spent in copies and dtype conversions (``aten::copy_``, ``aten::to``,
  ``aten::_to_copy``, ``aten::clone``, ``aten::contiguous``, ``aten::cat``) -- where "fewer copies between
  stages" could pay;
* ``layout``   -- channels-last (the code as it is) against contiguous NCHW, for the VGG fine features of both
  images and for the depthwise-separable block stacks of the refiners at every stride, at the setting's finest
  pass, under the setting's default precision. The NCHW variant runs the same modules on ``.contiguous()``
  inputs; parity: largest absolute difference of the outputs;
* ``threads``  -- ``match()`` with ``torch.set_num_threads(1)`` against the default (all cores), interleaved
  in one process; parity: the warps are compared;
* ``bnfold``   -- ``match()`` with the eval-mode batch norms folded into the convolutions before them (the code as
  it is) against the convolution and the batch norm run apart (before), interleaved; parity: the warps;
* ``gathercorr`` -- ``match()`` with the refiners' local correlation by whole-pixel gathers (the code as it is:
  ``romav2_plugin.ops.local_corr``, radius >= 2) against the ``grid_sample`` formulation (before: 4 interpolated
  corners per window offset and channel), interleaved; then each such call alone, on the inputs ``match()`` gave
  it and with a smooth warp (random weights scatter the warp; trained weights do not); parity: largest difference;
* ``corrblock`` -- ``match()`` with the local correlation as it is (whole-pixel gathers at radius >= 1, the
  neighbours of 64 pixels at a time: cache-sized) against before (a band's neighbours at once and a batched
  matrix-vector product at radius >= 2; ``grid_sample`` at radius 1), interleaved, then per call as ``gathercorr``;
* ``convrelu`` -- ``match()`` with convolution + batch norm + ReLU as one oneDNN convolution (the code as it is:
  ``romav2_plugin.nn.conv_bn.conv_bn_relu``) against the convolution followed by a separate ReLU; parity: the warps;
* ``earlyproj`` -- ``match()`` with the refiners' input projections applied as the CNN makes each fine-feature map
  (the code as it is) against the full-width maps kept until each refiner projects them; time and peak resident
  memory per run; parity: the warps;
* ``fusedlinear`` -- ``match()`` with linear layers as one oneDNN inner product, bias and exact GELU applied as it
  writes (the code as it is: ``romav2_plugin.nn.linear``; the backbone's MLPs and attention projections, the
  matcher transformer) against ``F.linear`` then a separate GELU; parity: the warps. In float32 only: the rows
  measured under bf16 autocast (slower fused: 1.04x at ``precise``) ran before the code kept ``F.linear`` for bf16;
* ``checks``   -- the input check of a float image (``romav2_plugin.io._check_values``, one ``aminmax`` pass) against
  the four passes it replaced (``isfinite().all()``, ``min``, ``max``), on both images of the pair at their
  full size; parity: both accept the pair and both reject it with one NaN / inf;
* ``compile``  -- ``torch.compile`` (inductor, CPU) of the fine-feature CNN and of each refiner's block stack
  (the convolution-bound parts) against eager, on the same inputs as ``layout``; the compile time is
  reported apart; parity: largest absolute difference. (Measured only: the package has no compile option.)

Weights: the shipped romav2-tiny for ``tiny``; seeded random official-layout weights otherwise (the cost does
not depend on the weights). Input: the toronto pair when present (``--pair``), else scikit-image photos.
Every timing is the median of ``--repeats`` interleaved runs after ``--warmup``; ratio = lever / unchanged.
Writes ``benchmarks/results/cpu_levers_<device>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import RESULTS, benchmark_pair, command_line, git_commit, machine_info, now_utc

COPY_OPS = ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat")


def _model(setting: str):
    from romav2_plugin import RoMaV2

    if setting == "tiny":
        return RoMaV2.from_pretrained("tiny", setting="tiny", device="cpu")
    from romav2_plugin.testing import make_random_official_state_dict

    return RoMaV2.from_pretrained(make_random_official_state_dict(0), setting=setting, device="cpu")


def _images(pair):
    A, B, desc = benchmark_pair(pair)

    def t(x):
        return torch.from_numpy(x).permute(2, 0, 1).float().div(255)[None].contiguous()

    return t(A), t(B), desc


def _interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    times = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[k].append(dt)
    return times


def _row(lever, setting, variant, times, ref_times=None, parity=None, note=""):
    med = statistics.median(times)
    ref = statistics.median(ref_times) if ref_times else None
    return {"lever": lever, "setting": setting, "variant": variant, "median_s": med, "min_s": min(times),
            "max_s": max(times), "times_s": times, "ratio": (med / ref) if ref else 1.0, "parity": parity, "note": note}


def _maxdiff(a, b) -> float:
    if isinstance(a, dict):
        return max(_maxdiff(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return max(_maxdiff(x, y) for x, y in zip(a, b))
    return float((a.float() - b.float()).abs().max())


def _finest_inputs(model, A, B):
    """The inputs of the fine features and of each refiner at the setting's finest pass (captured by hooks
    on one ``match()``): ``imgs (2B, 3, H, W)`` and per stride the block stack input ``d`` (channels-last)."""
    from romav2_plugin.nn import refiner as refmod

    caught: dict = {"fine": [], "blocks": {}}
    ff = model.refiner_features.forward

    def ff_hook(imgs, *, amp=False, **kw):
        caught["fine"].append((imgs, amp))
        return ff(imgs, amp=amp, **kw)

    handles = []
    for key, ref in model.refiners.items():
        def pre(mod, args, key=key):
            caught["blocks"][key] = args[0]  # last call wins: the finest pass
        handles.append(ref.block1.register_forward_pre_hook(pre))
    model.refiner_features.forward = ff_hook
    try:
        model.match(A, B)
    finally:
        model.refiner_features.forward = ff
        for h in handles:
            h.remove()
    del refmod
    imgs, amp = caught["fine"][-1]
    return imgs, amp, caught["blocks"]


def _fine_nchw(ff, img, amp):
    """The fine-feature CNN of ``ff`` on a contiguous NCHW input (the lever's "off" variant)."""
    import contextlib

    from torch import nn

    from romav2_plugin.nn.backbone import imagenet_normalize

    x = imagenet_normalize(img).contiguous()
    feats, stride = {}, 1
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with ctx:
        for layer in ff.layers:
            if isinstance(layer, nn.MaxPool2d):
                feats[stride] = x.permute(0, 2, 3, 1)
                stride *= 2
            x = layer(x)
        feats[stride] = x.permute(0, 2, 3, 1)
    return feats


def _blocks(ref, d, amp):
    import contextlib

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with ctx:
        return ref.hidden_blocks(ref.block1(d))


def lever_profile(setting, model, A, B, rows, extra):
    from torch.profiler import ProfilerActivity, profile

    model.match(A, B)  # warm-up
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        model.match(A, B)
        wall = time.perf_counter() - t0
    avg = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in avg) / 1e6
    top = sorted(avg, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    copies = {e.key: e.self_cpu_time_total / 1e6 for e in avg if e.key in COPY_OPS}
    extra.setdefault("profile", {})[setting] = {
        "wall_s": wall, "self_cpu_total_s": total,
        "top": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in top],
        "copies_s": copies, "copies_share": sum(copies.values()) / total if total else None,
    }


def lever_layout(setting, model, A, B, rows, extra, repeats, warmup):
    imgs, amp, blocks = _finest_inputs(model, A, B)
    ff = model.refiner_features
    with torch.inference_mode():
        ref_out = ff(imgs, amp=amp)
        alt_out = _fine_nchw(ff, imgs, amp)
        par = _maxdiff(ref_out, alt_out)
        t = _interleaved({"cl": lambda: ff(imgs, amp=amp), "nchw": lambda: _fine_nchw(ff, imgs, amp)}, repeats, warmup)
    res = f"{tuple(imgs.shape)}"
    rows.append(_row("layout", setting, "fine features, channels-last (as is)", t["cl"], note=res))
    rows.append(_row("layout", setting, "fine features, NCHW", t["nchw"], t["cl"], par, res))
    for key, d in blocks.items():
        ref = model.refiners[key]
        dn = d.contiguous()
        with torch.inference_mode():
            par = _maxdiff(_blocks(ref, d, amp), _blocks(ref, dn, amp))
            t = _interleaved({"cl": lambda ref=ref, d=d: _blocks(ref, d, amp), "nchw": lambda ref=ref, dn=dn: _blocks(ref, dn, amp)},
                              repeats, warmup)
        res = f"stride {key}, {tuple(d.shape)}"
        rows.append(_row("layout", setting, f"refiner {key} blocks, channels-last (as is)", t["cl"], note=res))
        rows.append(_row("layout", setting, f"refiner {key} blocks, NCHW", t["nchw"], t["cl"], par, res))


def lever_threads(setting, model, A, B, rows, extra, repeats, warmup):
    n = torch.get_num_threads()
    outs = {}

    def run(k):
        def f():
            torch.set_num_threads(k)
            try:
                outs[k] = model.match(A, B)["warp_AB"]
            finally:
                torch.set_num_threads(n)
        return f

    t = _interleaved({n: run(n), 1: run(1)}, repeats, warmup)
    rows.append(_row("threads", setting, f"match(), {n} threads (default)", t[n]))
    rows.append(_row("threads", setting, "match(), 1 thread", t[1], t[n], _maxdiff(outs[n], outs[1])))


def lever_bnfold(setting, model, A, B, rows, extra, repeats, warmup):
    """Batch norms folded into the convolutions before them (the code as it is: ``romav2_plugin.nn.conv_bn``)
    against the two modules run one after the other, in the fine features and the refiners' blocks."""
    import romav2_plugin.nn.fine_features as ff
    import romav2_plugin.nn.refiner as ref

    folded = ref.conv_bn
    outs = {}

    def run(name, fn):
        def f():
            ff.conv_bn = ref.conv_bn = fn
            try:
                outs[name] = model.match(A, B)["warp_AB"]
            finally:
                ff.conv_bn = ref.conv_bn = folded
        return f

    t = _interleaved({"folded": run("folded", folded), "apart": run("apart", lambda x, c, b: b(c(x)))},
                     repeats, warmup)
    rows.append(_row("bnfold", setting, "match(), batch norms apart (before)", t["apart"]))
    rows.append(_row("bnfold", setting, "match(), batch norms folded (now)", t["folded"], t["apart"],
                     _maxdiff(outs["folded"], outs["apart"])))


def _local_corr_ab(lever, setting, model, A, B, rows, repeats, warmup, before, labels, radius_ok=None):
    """A/B of the CPU local correlation: ``match()`` with ``romav2_plugin.ops.local_corr._local_corr_torch`` as
    it is ("now") against ``before(f_A, f_B, warp, radius, chunk_bytes)``, interleaved; then each call ``match()``
    made (one per shape and radius; ``radius_ok`` filters them) alone, on the inputs ``match()`` gave it and
    with a smooth warp. A gather's cost depends on where the warp points: random weights give scattered warps
    (cache-unfriendly), trained ones smooth warps (identity scaled by 0.8, shifted by 0.1, plus 0.02 noise).
    ``labels``: (match() before, match() now, per call before, per call now)."""
    import importlib

    lcm = importlib.import_module("romav2_plugin.ops.local_corr")  # the package attribute is the function
    now = lcm._local_corr_torch
    outs, calls = {}, {}

    def record(f_A, f_B, warp, radius, chunk_bytes):
        calls.setdefault((tuple(f_A.shape), radius), (f_A, f_B, warp, chunk_bytes))
        return now(f_A, f_B, warp, radius, chunk_bytes)

    def run(name, fn):
        def f():
            lcm._local_corr_torch = fn
            try:
                outs[name] = model.match(A, B)["warp_AB"]
            finally:
                lcm._local_corr_torch = now
        return f

    run("record", record)()
    t = _interleaved({"now": run("now", now), "before": run("before", before)}, repeats, warmup)
    rows.append(_row(lever, setting, labels[0], t["before"]))
    rows.append(_row(lever, setting, labels[1], t["now"], t["before"], _maxdiff(outs["now"], outs["before"])))
    for (shape, r), (f_A, f_B, warp, cb) in sorted(calls.items()):
        if radius_ok is not None and not radius_ok(r):
            continue
        Bn, _, H, W = shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
        g = torch.Generator().manual_seed(0)
        smooth = (torch.stack((xs, ys), -1) * 0.8 + 0.1 + 0.02 * torch.randn(Bn, H, W, 2, generator=g)).contiguous()
        for label, w in (("match()'s warp", warp), ("smooth warp", smooth)):
            res = {}

            def op(fn, key, args=(f_A, f_B, w, r, cb), res=res):
                def f():
                    res[key] = fn(*args)
                return f
            tt = _interleaved({"now": op(now, "now"), "before": op(before, "before")}, repeats, warmup)
            what = f"local_corr {tuple(shape)} r={r}, {label}"
            rows.append(_row(lever, setting, f"{what}: {labels[2]}", tt["before"]))
            rows.append(_row(lever, setting, f"{what}: {labels[3]}", tt["now"], tt["before"],
                             _maxdiff(res["now"], res["before"])))


def lever_gathercorr(setting, model, A, B, rows, extra, repeats, warmup):
    """The CPU local correlation by whole-pixel gathers (now) against the chunked ``grid_sample`` formulation
    it replaced (before), end to end and per call at radius >= 2 (:func:`_local_corr_ab`)."""
    import importlib

    lcm = importlib.import_module("romav2_plugin.ops.local_corr")
    _local_corr_ab("gathercorr", setting, model, A, B, rows, repeats, warmup, lcm._local_corr_grid,
                   ("match(), local corr by grid_sample (before)", "match(), local corr by whole-pixel gathers (now)",
                    "grid_sample", "gathers"), radius_ok=lambda r: r >= lcm.GATHER_MIN_RADIUS)


def _before_gather_torch(f_A, f_B, warp, radius, chunk_bytes):
    """The CPU local correlation as it was before the cache-sized blocks (kept here to measure against):
    radius >= 2 by whole-pixel gathers of a whole band of rows at once (2-D fancy indexing) and one batched
    matrix-vector product; radius 1 by the chunked ``grid_sample`` formulation."""
    import importlib

    lcm = importlib.import_module("romav2_plugin.ops.local_corr")
    if radius < 2:
        return lcm._local_corr_grid(f_A, f_B, warp, radius, chunk_bytes)
    B, C, H, W = f_A.shape
    dt = lcm._compute_dtype(f_A, f_B, warp)
    m = 2 * radius + 2
    out = torch.empty((B, (2 * radius + 1) ** 2, H, W), dtype=dt)
    rows = max(1, int(chunk_bytes) // ((m * m * C * (torch.finfo(dt).bits // 8) + m * m * 8) * W))
    steps = torch.arange(-radius, radius + 2)
    for b in range(B):
        fb = f_B[b].permute(1, 2, 0).reshape(H * W, C).to(dt)
        fa_all = f_A[b].permute(1, 2, 0).to(dt)
        for y0 in range(0, H, rows):
            fa, w = fa_all[y0:y0 + rows], warp[b, y0:y0 + rows]
            n = fa.shape[0] * W
            w = w.reshape(n, 2).double()
            px, py = ((w[:, 0] + 1) * W - 1) / 2, ((w[:, 1] + 1) * H - 1) / 2
            x0, yy0 = px.floor(), py.floor()
            tx, ty = (px - x0).to(dt)[:, None, None], (py - yy0).to(dt)[:, None, None]
            xs = x0.clamp(-radius - 2, W + radius).long()[:, None] + steps
            ys = yy0.clamp(-radius - 2, H + radius).long()[:, None] + steps
            inside = ((ys >= 0) & (ys < H))[:, :, None] & ((xs >= 0) & (xs < W))[:, None, :]
            idx = (ys.clamp(0, H - 1)[:, :, None] * W + xs.clamp(0, W - 1)[:, None, :]).reshape(n, m * m)
            dots = torch.bmm(fb[idx], fa.reshape(n, C, 1)).reshape(n, m, m)
            dots = torch.where(inside, dots / C**0.5, 0.0)
            top = dots[:, :-1, :-1] + tx * (dots[:, :-1, 1:] - dots[:, :-1, :-1])
            bottom = dots[:, 1:, :-1] + tx * (dots[:, 1:, 1:] - dots[:, 1:, :-1])
            out[b, :, y0:y0 + rows] = (top + ty * (bottom - top)).reshape(-1, W, (m - 1) ** 2).permute(2, 0, 1)
    return out


def lever_corrblock(setting, model, A, B, rows, extra, repeats, warmup):
    """The CPU local correlation now (whole-pixel gathers at radius >= 1, the neighbours of 64 pixels at a
    time: index_select + multiply + sum, cache-sized) against before (radius >= 2: a band's neighbours gathered
    at once and a batched matrix-vector product; radius 1: ``grid_sample``), end to end and per call
    (:func:`_local_corr_ab`)."""
    _local_corr_ab("corrblock", setting, model, A, B, rows, repeats, warmup, _before_gather_torch,
                   ("match(), local corr before (band gathers r>=2, grid_sample r=1)",
                    "match(), local corr now (cache-sized gathers, r>=1)", "before", "now"))


def lever_convrelu(setting, model, A, B, rows, extra, repeats, warmup):
    """Convolution + folded batch norm + ReLU as one oneDNN convolution (now: the refiners' depthwise blocks
    and the VGG fine features) against the convolution followed by a separate ReLU, ``match()`` interleaved."""
    import torch.nn.functional as F

    from romav2_plugin.nn import fine_features, refiner
    from romav2_plugin.nn.conv_bn import conv_bn

    fused = refiner.conv_bn_relu
    outs = {}

    def unfused(x, conv, bn):
        return F.relu(conv_bn(x, conv, bn))

    def run(name, fn):
        def f():
            refiner.conv_bn_relu = fine_features.conv_bn_relu = fn
            try:
                outs[name] = model.match(A, B)["warp_AB"]
            finally:
                refiner.conv_bn_relu = fine_features.conv_bn_relu = fused
        return f

    t = _interleaved({"fused": run("fused", fused), "unfused": run("unfused", unfused)}, repeats, warmup)
    rows.append(_row("convrelu", setting, "match(), convolution then ReLU (before)", t["unfused"]))
    rows.append(_row("convrelu", setting, "match(), convolution + ReLU fused (now)", t["fused"], t["unfused"],
                     _maxdiff(outs["fused"], outs["unfused"])))


def lever_fusedlinear(setting, model, A, B, rows, extra, repeats, warmup):
    """Linear layers as one oneDNN inner product with the bias and the exact GELU applied as it writes (now:
    the backbone's MLPs and attention output projections, the matcher transformer's linear layers; see
    ``romav2_plugin.nn.linear``) against ``F.linear`` (``addmm``: the bias broadcast into the output first)
    followed by a separate GELU (before), ``match()`` interleaved; parity: the warps."""
    from romav2_plugin.nn import linear as lin

    gate = lin.cpu_fused_dtype
    outs = {}

    def run(name):
        def f():
            if name == "before":
                lin.cpu_fused_dtype = lambda x, w: None
            try:
                outs[name] = model.match(A, B)["warp_AB"]
            finally:
                lin.cpu_fused_dtype = gate
        return f

    t = _interleaved({"now": run("now"), "before": run("before")}, repeats, warmup)
    rows.append(_row("fusedlinear", setting, "match(), F.linear then GELU (before)", t["before"]))
    now_label = "linear + bias + GELU fused (now)" if setting.endswith("fp32") else "F.linear: bf16 keeps it (now)"
    rows.append(_row("fusedlinear", setting, f"match(), {now_label}", t["now"], t["before"],
                     _maxdiff(outs["now"], outs["before"])))


def lever_earlyproj(setting, model, A, B, rows, extra, repeats, warmup):
    """The refiners' input projections applied as the fine-feature CNN makes each map (now: only the projected
    maps are kept) against the CNN's full-width maps kept and projected inside each refiner (before),
    ``match()`` interleaved; besides the time, the peak resident memory above the live memory before each run
    (``VmHWM`` reset; the largest over the runs); parity: the warps."""
    from benchmarks._common import hwm_mb, release_memory, reset_peak_rss, rss_mb

    ff = model.refiner_features
    outs, peaks = {}, {"now": [], "before": []}

    def raw_features(imgs, *, amp=False, project=None, _f=ff.forward):
        return _f(imgs, amp=amp)

    def before_mode(on):
        if on:
            ff.forward = raw_features
            for r in model.refiners.values():
                r.forward = lambda *a, projected=False, _f=r.forward, **kw: _f(*a, projected=False, **kw)
        else:
            del ff.forward
            for r in model.refiners.values():
                del r.forward

    def run(name):
        def f():
            if name == "before":
                before_mode(True)
            try:
                release_memory()
                base = rss_mb()
                exact = reset_peak_rss()
                outs[name] = model.match(A, B)["warp_AB"]
                if base is not None and exact:
                    peaks[name].append(hwm_mb() - base)
            finally:
                if name == "before":
                    before_mode(False)
        return f

    t = _interleaved({"now": run("now"), "before": run("before")}, repeats, warmup)

    def mem(name):
        return f"peak memory +{max(peaks[name]):.0f} MiB" if peaks[name] else "peak memory not measurable here"

    rows.append(_row("earlyproj", setting, "match(), full-width fine features kept (before)", t["before"],
                     note=mem("before")))
    rows.append(_row("earlyproj", setting, "match(), projected as the CNN makes them (now)", t["now"], t["before"],
                     _maxdiff(outs["now"], outs["before"]), note=mem("now")))


def _old_check(x):
    if not torch.isfinite(x).all():
        raise ValueError("contains NaN or inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError("float values must lie in [0, 1]")


def lever_checks(setting, model, A, B, rows, extra, repeats, warmup):
    from romav2_plugin.io import _check_values

    def both(fn):
        return lambda: (fn(A, "A"), fn(B, "B")) if fn is _check_values else (fn(A), fn(B))

    agree = True
    for bad in (float("nan"), float("inf")):
        y = A.clone()
        y[0, 1, y.shape[2] // 2, y.shape[3] // 3] = bad
        for fn in (lambda t: _check_values(t, "A"), _old_check):
            try:
                fn(y)
                agree = False
            except ValueError:
                pass
    t = _interleaved({"old": both(_old_check), "new": both(_check_values)}, repeats, warmup)
    res = f"{tuple(A.shape)} and {tuple(B.shape)}; same decisions on the pair and with a NaN / inf: {agree}"
    rows.append(_row("checks", setting, "input check, isfinite + min + max (before)", t["old"], note=res))
    rows.append(_row("checks", setting, "input check, one aminmax (now)", t["new"], t["old"], 0.0 if agree else 1.0, res))


def lever_compile(setting, model, A, B, rows, extra, repeats, warmup):
    imgs, amp, blocks = _finest_inputs(model, A, B)
    ff = model.refiner_features
    torch._dynamo.reset()
    cff = torch.compile(lambda x: ff(x, amp=amp), backend="inductor", dynamic=False)
    with torch.inference_mode():
        t0 = time.perf_counter()
        c_out = cff(imgs)
        ctime = time.perf_counter() - t0
        par = _maxdiff(ff(imgs, amp=amp), c_out)
        t = _interleaved({"eager": lambda: ff(imgs, amp=amp), "compiled": lambda: cff(imgs)}, repeats, warmup)
    res = f"{tuple(imgs.shape)}; compile {ctime:.1f} s"
    rows.append(_row("compile", setting, "fine features, eager (as is)", t["eager"], note=res))
    rows.append(_row("compile", setting, "fine features, torch.compile", t["compiled"], t["eager"], par, res))
    for key, d in blocks.items():
        ref = model.refiners[key]
        cb = torch.compile(lambda x, ref=ref: _blocks(ref, x, amp), backend="inductor", dynamic=False)
        with torch.inference_mode():
            t0 = time.perf_counter()
            c_out = cb(d)
            ctime = time.perf_counter() - t0
            par = _maxdiff(_blocks(ref, d, amp), c_out)
            t = _interleaved({"eager": lambda ref=ref, d=d: _blocks(ref, d, amp), "compiled": lambda cb=cb, d=d: cb(d)},
                              repeats, warmup)
        res = f"stride {key}, {tuple(d.shape)}; compile {ctime:.1f} s"
        rows.append(_row("compile", setting, f"refiner {key} blocks, eager (as is)", t["eager"], note=res))
        rows.append(_row("compile", setting, f"refiner {key} blocks, torch.compile", t["compiled"], t["eager"], par, res))


def write(rows, extra, meta, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_levers_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows, **extra}, indent=1))
    m = meta["machine"]
    md = ["# CPU levers of match() (issue 33, item 3)", "",
          f"- Machine: {m['cpu']}, {m['cores']} cores, {m.get('ram_gb')} GB RAM; torch {m['versions'].get('torch')}",
          f"- Command: `{meta['command']}`", f"- Date: {meta['date']}", f"- Commit: {meta['commit']}",
          f"- Input: {meta['pair']}; precision: each setting's default on this CPU ({meta['precision']}); rows and "
          "profiles whose setting says 'fp32' ran with `ROMAV2_CPU_BF16=0`",
          f"- Load: {meta['load']}",
          "- Each row: median of the interleaved timed runs; ratio = this variant / the unchanged path (the row "
          "above marked 'as is' / 'default') in the same run; parity = largest absolute output difference.", "",
          "| lever | setting | variant | median s | spread s | ratio | parity | inputs / notes |",
          "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        par = "" if r["parity"] is None else f"{r['parity']:.2e}"
        md.append(f"| {r['lever']} | {r['setting']} | {r['variant']} | {r['median_s']:.3f} | "
                  f"{r['min_s']:.3f}-{r['max_s']:.3f} | {r['ratio']:.2f} | {par} | {r['note']} |")
    for setting, p in extra.get("profile", {}).items():
        md += ["", f"## Profile, `{setting}` (one match(), {p['wall_s']:.2f} s wall under the profiler)", "",
               f"Self CPU total {p['self_cpu_total_s']:.2f} s; copies and conversions ({', '.join(COPY_OPS)}): "
               + ", ".join(f"{k} {v:.3f} s" for k, v in p["copies_s"].items())
               + f" = {100 * (p['copies_share'] or 0):.1f}% of self CPU time.", "",
               "| operator | self CPU s | calls |", "|---|---:|---:|"]
        md += [f"| {e['op']} | {e['self_cpu_s']:.3f} | {e['calls']} |" for e in p["top"]]
    (out / "cpu_levers_cpu.md").write_text("\n".join(md) + "\n")
    return out / "cpu_levers_cpu.md"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default="tiny,base")
    ap.add_argument("--levers", default="profile,layout,threads,compile")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pair", nargs=2, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores); "
                    "1 on a contended machine, where 2 threads run several times slower (see the threads lever)")
    ap.add_argument("--append", action="store_true", help="add to the rows of the existing results file (its "
                    "commands are kept), e.g. other levers at another setting")
    args = ap.parse_args(argv)
    import os

    from romav2_plugin import runtime

    if args.threads:
        torch.set_num_threads(args.threads)

    A, B, desc = _images(tuple(args.pair) if args.pair else None)
    meta = {"machine": machine_info("cpu"), "command": command_line(), "date": now_utc(), "commit": git_commit(),
            "pair": desc, "precision": "bf16 autocast" if runtime.amp_default("cpu") else "fp32",
            "load": f"1-min load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores at the start, "
                    f"{torch.get_num_threads()} torch thread(s)"}
    rows: list[dict] = []
    extra: dict = {}
    old = args.out / "cpu_levers_cpu.json"
    if args.append and old.is_file():
        data = json.loads(old.read_text())
        rows = data.pop("rows")
        prev = data.pop("meta")
        extra = data
        for k in ("command", "date", "load", "commit"):
            meta[k] = f"{prev[k]}; then {meta[k]}" if k != "command" else f"{prev[k]}` then `{meta[k]}"
    levers = [x.strip() for x in args.levers.split(",") if x.strip()]
    fp32 = not runtime.amp_default("cpu")  # e.g. ROMAV2_CPU_BF16=0 on a bf16 CPU: rows say so
    for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
        model = _model(setting)
        label = f"{setting}, fp32" if fp32 else setting
        for lever in levers:
            print(f"[cpu_levers] {label}: {lever}", file=sys.stderr, flush=True)
            fn = globals()[f"lever_{lever}"]
            try:
                if lever == "profile":
                    fn(label, model, A, B, rows, extra)
                else:
                    fn(label, model, A, B, rows, extra, args.repeats, args.warmup)
            except Exception as e:  # one lever failing (e.g. no compiler for inductor) must not lose the others
                extra.setdefault("errors", []).append(f"{label} {lever}: {type(e).__name__}: {e}")
                print(f"[cpu_levers] {label} {lever} failed: {e}", file=sys.stderr, flush=True)
            write(rows, extra, meta, args.out)
        del model
    print(write(rows, extra, meta, args.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
