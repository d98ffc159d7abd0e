"""benchmarks/gpu_suite.py: every GPU benchmark within a time budget, checked on CPU (no GPU needed).

The kernels and throughput steps call ``gpu_kernels.py`` and ``speed.py``, whose own ``--dry-run`` paths are
tested in tests/test_kernels.py and test_benchmarks.py; here: the refusal without CUDA, the training step's
sizing, its config, the results' names and the summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import gpu_suite as gs

ROOT = Path(__file__).resolve().parents[2]


def test_plan_steps_fills_the_time_left():
    m, r = gs.plan_steps(100.0, 0.5, 1.0)
    assert (m, r) == (160, 20)  # 80 s / 0.5 s, 20 s / 1 s
    assert gs.plan_steps(100.0, 0.5, 1.0, matcher_share=0.5) == (100, 50)
    assert gs.plan_steps(-5.0, 0.5, 1.0) == (0, 0)
    assert gs.plan_steps(100.0, 0.0, 1.0) == (0, 0)  # a stage the probe did not measure: no run
    assert gs.plan_steps(1e9, 1e-3, 1e-3, cap=7) == (7, 7)


def test_pairs_per_second_is_the_sustained_rate_past_the_prefetch_buffer(tmp_path):
    """All pairs over all seconds (not a median of window rates), from the windows that end after the
    skipped steps; a stage without such a window uses all of its windows; the last, shorter window counts
    by its own length."""
    log = tmp_path / "log.csv"
    log.write_text(
        "global_step,stage,step,pairs_per_s,total\n"
        "10,matcher,10,1000.0,1\n20,matcher,20,30.0,1\n30,matcher,30,10.0,1\n35,matcher,35,20.0,1\n"
        "45,refiners,10,4.0,1\n55,refiners,20,,1\n"
    )
    # matcher past step 10: 25 steps; seconds/batch = 10/30 + 10/10 + 5/20 = 19/12 -> 25 * 12 / 19 pairs/s
    assert gs.pairs_per_second(log, skip_steps=10) == pytest.approx({"matcher": 300 / 19, "refiners": 4.0})
    # nothing skipped: the 1000 pairs/s window (the prefetched batches) is in, and weighs by its time alone
    assert gs.pairs_per_second(log)["matcher"] == pytest.approx(35 / (10 / 1000 + 19 / 12))
    assert gs.pairs_per_second(log, skip_steps=100) == gs.pairs_per_second(log)  # no late window: all


def test_train_config_replaces_steps_only(tmp_path):
    """The template + the recipe's GPU overrides load (unknown keys would be rejected) and only the steps,
    warm-ups, out_dir and the pictures change; the dry run also moves to CPU at token sizes."""
    base = gs._train_config(gs.TEMPLATE, out_dir=tmp_path / "a", matcher_steps=400, refiner_steps=7,
                            dry_run=False, pictures=tmp_path / "pics")
    assert [(s.name, s.steps, s.warmup_steps, s.batch_size) for s in base.stages] == [
        ("matcher", 400, 40, 32), ("refiners", 7, 1, 32)]
    assert base.device == "cuda" and base.model.weights == "tiny" and base.data.workers == 14
    assert all(s.path == (str(tmp_path / "pics"),) for s in base.data.sources)
    assert base.seed == 100 and base.ema_decay == 0.995 and base.checkpoint_every == 100
    assert base.out_dir == str(tmp_path / "a")
    dry = gs._train_config(gs.TEMPLATE, out_dir=tmp_path / "b", matcher_steps=2, refiner_steps=1,
                           dry_run=True, pictures=tmp_path)
    assert dry.device == "cpu" and dry.data.size == (128, 128) and dry.data.workers == 0
    assert all(s.path == (str(tmp_path),) for s in dry.data.sources)
    assert [s.batch_size for s in dry.stages] == [2, 2]
    assert dry.seed == base.seed and dry.ema_decay == base.ema_decay  # the rest is the template's


def test_refuses_without_cuda_naming_the_problem(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gs.main(["--budget-s", "60", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--dry-run" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_refuses_a_missing_pictures_folder_when_training(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gs.main(["--budget-s", "60", "--out", str(tmp_path), "--pictures", str(tmp_path / "none")]) == 2
    assert "fetch_images" in capsys.readouterr().err


def test_budget_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        gs.main(["--budget-s", "0", "--dry-run"])
    assert "--budget-s" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_trains_exports_and_writes_the_results(tmp_path):
    """``--dry-run --only train`` on CPU: probe, sized run, fp16 export with its card; the results folder gets
    the log, the card and the summary under the scheme's names, the weights and step logs stay in --work."""
    pics = tmp_path / "pics"
    pics.mkdir()
    import skimage.data

    for name in ("astronaut", "chelsea", "rocket"):
        Image.fromarray(getattr(skimage.data, name)()).save(pics / f"{name}.jpg")
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_suite", "--dry-run", "--only", "train", "--out",
         str(out), "--work", str(work), "--pictures", str(pics), "--budget-s", "1500"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "gpu_suite_dry.json").read_text())
    assert summary["command"].startswith("python -m benchmarks.gpu_suite") and summary["date"]
    md = (out / "gpu_suite_dry.md").read_text()
    assert "- Commit: " in md and "| train_probe | 0 |" in md and "| train | 0 |" in md
    assert [s["step"] for s in summary["steps"]] == ["train_probe", "train"]
    plan = summary["train_plan"]
    assert plan["matcher_steps"] >= 1 and plan["refiner_steps"] >= 1
    assert set(plan["seconds_per_step"]) == {"matcher", "refiners"}
    assert {p.name for p in (work / "logs").iterdir()} == {"train_probe.log", "train.log"}
    weights = work / "romav2_tiny_dry.pt"
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    assert any(v.dtype == torch.float16 for v in sd.values())
    card = json.loads((out / "tiny_training_dry.json").read_text())
    assert card["matcher_steps"] == plan["matcher_steps"] and "not the paper's accuracy" in card["note"]
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_suite_dry.json", "gpu_suite_dry.md", "tiny_training_dry.csv", "tiny_training_dry.json"]
    from romav2_plugin import RoMaV2
    from romav2_plugin.weights.named import config_from_card

    # fp16 storage, recorded in the card: it loads by path alone
    assert card["storage_dtype"] == "float16"
    model = RoMaV2.from_pretrained(weights)
    assert model.cfg == config_from_card(weights)
    assert all(p.dtype == torch.float32 for p in model.matcher.parameters())


def test_step_past_its_limit_gets_sigterm_first_then_is_recorded(tmp_path, monkeypatch):
    """A step over its limit is sent SIGTERM (so training can export what it has), the whole process group
    goes, and the run records ``timeout`` and goes on."""
    monkeypatch.setattr(gs, "GRACE_S", 20)
    s = gs._Suite(tmp_path / "out", tmp_path / "work", budget_s=60, dry_run=True)
    marker = tmp_path / "got_sigterm"
    child = (
        "import signal, subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').close(), sys.exit(143)))\n"
        "print('started', flush=True)\n"
        "time.sleep(120)\n"
    )
    t = time.monotonic()
    rec = s.step("slow", [sys.executable, "-c", child], limit_s=3)
    assert rec["rc"] == "timeout" and marker.exists(), rec
    assert time.monotonic() - t < 20  # it exited on SIGTERM, no grace period spent
    assert "started" in (s.logs / "slow.log").read_text()
    assert s.step("quick", [sys.executable, "-c", "print('ok')"], limit_s=30)["rc"] == 0
    assert [r["step"] for r in s.steps] == ["slow", "quick"]


def test_only_rejects_unknown_steps(capsys):
    with pytest.raises(SystemExit):
        gs.main(["--out", "/nonexistent", "--only", "kernels,trian"])
    assert "trian" in capsys.readouterr().err


def test_gpu_run_plans_every_step_in_order_of_value_with_the_protocol(tmp_path, monkeypatch):
    """Without running anything: the steps' order, their commands (the paper's protocol for the comparison:
    640x640 batch 8 bf16, RoMa at 644, LoFTR at 640; batch 1 latency) and the skip of training without
    pictures."""
    seen = []

    def fake_step(self, name, cmd, limit_s):
        seen.append((name, cmd, limit_s))
        rec = {"step": name, "command": " ".join(cmd), "limit_s": limit_s, "rc": 0, "seconds": 0.0, "log": None}
        self.steps.append(rec)
        return rec

    monkeypatch.setattr(gs._Suite, "step", fake_step)
    monkeypatch.setattr(gs, "_machine", lambda: {"gpu": "NVIDIA H100 80GB HBM3", "cpu": "x", "cpus": 16,
                                                 "python": "3.12", "torch": "2.11", "host": "h", "platform": "p"})
    rc = gs.run(tmp_path / "out", 540, False, pictures=tmp_path / "none", work=tmp_path / "work")
    assert rc == 0
    assert [n for n, _, _ in seen] == ["kernels", "profile", "throughput", "parity", "compare", "latency", "levers"]
    cmds = {n: " ".join(c) for n, c, _ in seen}
    assert "benchmarks.gpu_model profile" in cmds["profile"] and "--name gpu_profile_h100" in cmds["profile"]
    assert "benchmarks.gpu_model parity" in cmds["parity"] and "benchmarks.gpu_model levers" in cmds["levers"]
    for flag in ("--batch 8", "--dtype bf16", "--settings turbo,base,precise", "--input-size 640",
                 "--matchers ours,official,roma,loftr", "--roma-coarse 644", "--roma-upsample 0", "--loftr-res 640"):
        assert flag in cmds["compare"], flag
    assert "--batch 1" in cmds["latency"] and "--tag h100_b1" in cmds["latency"]
    summary = json.loads((tmp_path / "out" / "gpu_suite_h100.json").read_text())
    assert summary["steps"][-1]["step"] == "train" and summary["steps"][-1]["rc"] == "skipped"


@pytest.mark.slow  # every step on the CPU at token sizes: about 10-13 minutes on 2 contended cores
def test_dry_run_of_the_whole_suite_runs_every_step_on_the_cpu(tmp_path):
    """``python -m benchmarks.gpu_suite --dry-run --budget-s 780``: every step but training (no pictures:
    recorded as skipped) exits 0 within the budget and writes its results file."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "ROMAV2_PLUGIN_CACHE": str(tmp_path / "cache")}
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_suite", "--dry-run", "--budget-s", "780", "--out", str(out),
         "--work", str(work), "--pictures", str(tmp_path / "no_pictures")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    summary = json.loads((out / "gpu_suite_dry.json").read_text())
    rcs = {s["step"]: s["rc"] for s in summary["steps"]}
    assert rcs == {**{s: 0 for s in gs.STEPS if s != "train"}, "train": "skipped"}, rcs
    for f in ("gpu_profile_dry", "gpu_parity_dry", "gpu_levers_dry", "speed_dry", "speed_dry_compare", "speed_dry_b1"):
        assert (out / f"{f}.md").is_file(), f
    prof = (out / "gpu_profile_dry.md").read_text()
    assert "romav2.backbone" in prof and "romav2.refiner.s4" in prof and "romav2.sampling" in prof
    assert "| turbo | fp32 |" in (out / "gpu_parity_dry.md").read_text()  # (the dry run compares fp32 only)
