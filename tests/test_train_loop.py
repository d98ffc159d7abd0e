"""The training loop: exact resume, learning on a fixed batch, fine-tuning official-layout weights, configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from romav2_plugin.train.config import (
    DataSection,
    DataSource,
    ModelSection,
    StageConfig,
    TrainConfig,
    load_config,
)
from romav2_plugin.train.data import HomographyPairs, ImageFolder, collate
from romav2_plugin.train.loop import Trainer


def _write_photos(folder: Path, n: int = 3, size: int = 160, seed: int = 0) -> Path:
    """Smooth multi-scale noise images (textured enough to match), written as PNG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        img = torch.zeros(3, size, size)
        for cells, w in ((4, 0.5), (16, 0.3), (48, 0.2)):
            img += w * torch.nn.functional.interpolate(torch.rand(1, 3, cells, cells, generator=g), size=(size, size),
                                                       mode="bicubic", align_corners=False)[0]
        arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return _write_photos(tmp_path_factory.mktemp("photos"))


def _cfg(out: Path, photos: Path, *, stages, size=(64, 64), arch="tiny", weights=None, **kw) -> TrainConfig:
    return TrainConfig(
        out_dir=str(out), stages=stages,
        data=DataSection(size=size, sources=(DataSource("homography", (str(photos),)),), workers=0),
        model=ModelSection(arch, weights=weights), log_every=1, checkpoint_every=2, ema_decay=0.9, **kw,
    )


def _state(t: Trainer) -> dict[str, torch.Tensor]:
    return {**{"m." + k: v for k, v in t.model.state_dict().items()}, **{"e." + k: v for k, v in t.ema.state.items()}}


@pytest.mark.slow  # three training runs
def test_resume_gives_bitwise_identical_weights(tmp_path, photos):
    stages = (StageConfig("matcher", steps=4, batch_size=2, warmup_steps=1),
              StageConfig("refiners", steps=4, batch_size=2, warmup_steps=1))
    straight = Trainer(_cfg(tmp_path / "a", photos, stages=stages), progress=False)
    straight.run()
    half = Trainer(_cfg(tmp_path / "b", photos, stages=stages), progress=False)
    assert half.run(max_steps=5) is None  # stops inside the refiner stage, checkpointed
    resumed = Trainer(_cfg(tmp_path / "b", photos, stages=stages), progress=False)
    resumed.run(resume=True)
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"not bitwise identical after resume: {diff[:5]}"
    # the logs of the resumed run have every step once
    rows = (tmp_path / "b" / "log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 9))
    sa = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow  # two training runs, one with a worker process
def test_data_workers_do_not_change_the_weights(tmp_path, photos):
    """Samples are seeded by their index, so a run whose pairs come from a worker process trains bit for bit as
    one that makes them in the main process (the recipes' ``data.workers`` is a speed knob, not a result knob)."""
    stages = (StageConfig("matcher", steps=3, batch_size=2, warmup_steps=1),)
    runs = []
    for w in (0, 1):
        cfg = _cfg(tmp_path / f"w{w}", photos, stages=stages)  # no threads: Trainer would set them process-wide
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=w))
        t = Trainer(cfg, progress=False)
        t.run()
        runs.append(_state(t))
    a, b = runs
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"data.workers=1 trained other weights than data.workers=0: {diff[:5]}"


def test_resume_refuses_another_config(tmp_path, photos):
    stages = (StageConfig("matcher", steps=2, batch_size=1, warmup_steps=1),)
    Trainer(_cfg(tmp_path, photos, stages=stages), progress=False).run(max_steps=1)
    other = (StageConfig("matcher", steps=3, batch_size=1, warmup_steps=1),)
    with pytest.raises(ValueError, match="different config.*stages"):
        Trainer(_cfg(tmp_path, photos, stages=other), progress=False).run(resume=True)
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(_cfg(tmp_path, photos, stages=stages), progress=False).run()


def _fixed_batch(photos: Path, n: int, size) -> dict[str, torch.Tensor]:
    ds = HomographyPairs(ImageFolder(photos), size, seed=3, photometric_strength=0.3)
    return collate([ds.sample(i) for i in range(n)])


@pytest.mark.slow  # 30 training steps
@pytest.mark.parametrize("stage, factor", [("matcher", 2.0), ("refiners", 1.4)])
def test_loss_falls_on_a_fixed_batch(tmp_path, photos, stage, factor):
    """Both stages can learn: 30 steps on one batch cut the stage's loss by at least ``factor``."""
    torch.manual_seed(0)
    st = StageConfig(stage, steps=30, batch_size=2, lr=2e-3, warmup_steps=1, min_lr_ratio=1.0)
    t = Trainer(_cfg(tmp_path, photos, stages=(st,), size=(128, 128)), progress=False)
    batch = _fixed_batch(photos, 2, (128, 128))
    key = "total" if stage == "matcher" else "warp"
    losses = [t.train_step(batch)[key] for _ in range(30)]
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < first / factor, f"{stage}: loss {first:.3f} -> {last:.3f}"


def test_stages_train_only_their_modules(tmp_path, photos):
    st = (StageConfig("refiners", steps=2, batch_size=1, warmup_steps=1),)
    t = Trainer(_cfg(tmp_path, photos, stages=st), progress=False)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.run()
    after = t.model.state_dict()
    moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"refiners", "refiner_features"}
    # frozen weights are exported bit for bit (the EMA only averages what trains)
    frozen = [k for k in before if k.startswith(("f.", "matcher."))]
    assert frozen and all(torch.equal(t.ema.state[k], before[k]) for k in frozen)


def test_finetune_official_layout_refiners_and_load_everywhere(tmp_path, photos, random_checkpoint):
    """Start from seeded random official-layout weights, train the refiners, load the result through
    from_pretrained, the kornia adapter and the CLI."""
    from romav2_plugin import RoMaV2
    from romav2_plugin.weights.layout import load_checkpoint

    st = (StageConfig("refiners", steps=2, batch_size=1, warmup_steps=1),)
    cfg = _cfg(tmp_path / "run", photos, stages=st, arch="official", weights=str(random_checkpoint), size=(64, 64))
    path = Trainer(cfg, progress=False).run()
    src, out = load_checkpoint(random_checkpoint), load_checkpoint(path)
    assert src.keys() == out.keys()
    assert all(src[k].dtype == out[k].dtype for k in src)
    moved = sorted({k.split(".")[0] for k in src if not torch.equal(src[k], out[k])})
    assert moved == ["refiner_features", "refiners"]
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["config"]["backbone"]["embed_dim"] == 1024 and card["global_step"] == 2

    model = RoMaV2.from_pretrained(path, setting="turbo", amp=False)
    assert torch.equal(model.state_dict()["refiners.4.warp_head.weight"], out["refiners.4.warp_head.weight"])
    img = torch.rand(1, 3, 48, 64)
    preds = model.match(img, img)
    assert torch.isfinite(preds["warp_AB"]).all()

    kornia = pytest.importorskip("kornia")
    import romav2_plugin  # noqa: F401  registers KF.RoMaV2

    matcher = kornia.feature.RoMaV2(weights=str(path), setting="turbo", num_samples=50, seed=0)
    res = matcher({"image0": img, "image1": img})
    assert res["keypoints0"].shape[1] == 2

    from PIL import Image

    from romav2_plugin.app.cli import main

    for name in ("a.png", "b.png"):
        Image.fromarray((img[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / name)
    code = main([str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--weights", str(path), "--setting", "turbo",
                 "--out", str(tmp_path / "cli"), "--device", "cpu"])
    assert code == 0 and (tmp_path / "cli" / "matches.npz").is_file()


def test_toml_config_is_validated(tmp_path, photos):
    good = tmp_path / "good.toml"
    good.write_text(f'out_dir = "run"\n[data]\nsize = [64, 64]\n[[data.sources]]\nkind = "homography"\npath = "{photos}"\n'
                    '[[stages]]\nname = "matcher"\nsteps = 2\n')
    cfg = load_config(good)
    assert cfg.out_dir == str(tmp_path / "run") and cfg.stages[0].steps == 2
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("steps = 2", "steps = 2\nlearning_rate = 1e-3"))
    with pytest.raises(ValueError, match=r"stages\[0\]\.learning_rate"):
        load_config(bad)
    bad.write_text(good.read_text().replace('name = "matcher"', 'name = "coarse"'))
    with pytest.raises(ValueError, match=r"stages\[0\]\.name.*'matcher', 'refiners'"):
        load_config(bad)
    bad.write_text(good.read_text().replace("steps = 2", 'steps = "two"'))
    with pytest.raises(ValueError, match=r"stages\[0\]\.steps: expected an integer"):
        load_config(bad)
    # a starting weights file is relative to the config file too; named weights stay names
    for weights, expected in (("w/model.pt", str(tmp_path / "w" / "model.pt")), ("tiny", "tiny")):
        bad.write_text(good.read_text() + f'[model]\narchitecture = "tiny"\nweights = "{weights}"\n')
        assert load_config(bad).model.weights == expected


def test_command_errors_are_clear(tmp_path, photos, capsys, random_checkpoint):
    from romav2_plugin.train.__main__ import main

    def write(name, body):
        p = tmp_path / name
        p.write_text(body)
        return str(p)

    base = '[data]\nsize = [64, 64]\n[[data.sources]]\nkind = "homography"\npath = "{path}"\n[[stages]]\nname = "matcher"\nsteps = 1\n'
    assert main([write("a.toml", 'out_dir = "r"\n' + base.format(path=tmp_path / "nope"))]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.jpg").write_bytes(b"not an image")
    cfgfile = write("b.toml", 'out_dir = "r2"\n' + base.format(path=broken))
    assert main([cfgfile]) == 2
    assert "Cannot read training image" in capsys.readouterr().err
    wrong = tmp_path / "wrong.pt"
    torch.save({"matcher.omega": torch.zeros(3)}, wrong)
    cfgfile = write("c.toml", f'out_dir = "r3"\n[model]\narchitecture = "official"\nweights = "{wrong}"\n'
                    + base.format(path=photos))
    assert main([cfgfile]) == 4  # weights of the wrong layout: the set-up code of every command
    assert "official RoMa v2 layout" in capsys.readouterr().err
    assert main([write("d.toml", 'out_dir = "r4"\nbogus = 1\n' + base.format(path=photos))]) == 2
    assert "bogus" in capsys.readouterr().err


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Checkpoints are written to a temporary file and renamed: a crash mid-write leaves the last good one."""
    from romav2_plugin.train import checkpoint

    path = tmp_path / "checkpoint.pt"
    checkpoint.save_training_state(path, {"step": 1})
    good = path.read_bytes()

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk gone")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError, match="disk gone"):
        checkpoint.save_training_state(path, {"step": 2})
    assert path.read_bytes() == good and checkpoint.load_training_state(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


def test_match_restores_the_training_mode():
    from romav2_plugin import RoMaV2
    from romav2_plugin.config import tiny_config

    model = RoMaV2(tiny_config(), amp=False).train()
    model.match(torch.rand(3, 32, 32), torch.rand(3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    model.match(torch.rand(3, 32, 32), torch.rand(3, 32, 32))
    assert not model.training


@pytest.mark.slow  # bf16 matches on the CPU
def test_forward_never_changes_the_backbone_dtype():
    """The backbone's dtype is chosen at construction / ``set_amp`` only, never by a forward pass."""
    from romav2_plugin import RoMaV2
    from romav2_plugin.config import tiny_config

    torch.manual_seed(0)
    dtype = lambda m: m.f.vit.patch_embed.proj.weight.dtype  # noqa: E731
    model = RoMaV2(tiny_config(), amp=False)  # fp32 (amp=None's choice per CPU: tests/test_amp_cpu.py)
    A, B = torch.rand(3, 32, 32), torch.rand(3, 32, 32)
    ref = model.match(A, B)["warp_AB"]
    assert dtype(model) == torch.float32
    model.amp = True  # autocast on with fp32 weights: runs, and leaves them as they are
    model.match(A, B)
    assert dtype(model) == torch.float32
    model.set_amp(True)  # the documented switch holds a frozen backbone in bf16, as the official model does
    assert dtype(model) == torch.bfloat16
    model.match(A, B)
    assert dtype(model) == torch.bfloat16
    model.amp = False  # bf16 weights with autocast off: runs in bf16, says so once, changes nothing
    with pytest.warns(UserWarning, match="set_amp"):
        model.match(A, B)
    assert dtype(model) == torch.bfloat16
    model.set_amp(False)
    assert dtype(model) == torch.float32
    torch.testing.assert_close(model.match(A, B)["warp_AB"], ref, rtol=0, atol=1e-2)  # bf16 round trip
    assert RoMaV2(tiny_config(), amp=True).f.vit.patch_embed.proj.weight.dtype == torch.bfloat16
    trained = RoMaV2(tiny_config(), amp=False)
    trained.f.requires_grad_(True)
    trained.set_amp(True)
    assert dtype(trained) == torch.float32  # set_amp leaves a backbone being trained in fp32


@pytest.mark.slow  # a training run under bf16 autocast on the CPU
@pytest.mark.parametrize("train_backbone", [False, True])
def test_bf16_autocast_training(tmp_path, photos, train_backbone):
    """``amp = true`` (the CUDA default) runs both stages under bf16 autocast, here on the CPU: the weights
    being trained stay fp32 (autocast computes in bf16), a frozen backbone is held in bf16 as the official
    model holds it, a trained one stays fp32, the losses are finite and the export loads in fp32."""
    from romav2_plugin import RoMaV2
    from romav2_plugin.config import tiny_config
    from romav2_plugin.train.checkpoint import export_weights

    torch.manual_seed(0)
    start = export_weights(tmp_path / "start.pt", RoMaV2(tiny_config(), amp=False))
    stages = (StageConfig("matcher", steps=2, batch_size=1, warmup_steps=1),
              StageConfig("refiners", steps=2, batch_size=1, warmup_steps=1))
    cfg = dataclasses.replace(
        _cfg(tmp_path / "run", photos, stages=stages, amp=True, device="cpu"),
        model=ModelSection("tiny", weights=str(start), train_backbone=train_backbone),
    )
    t = Trainer(cfg, progress=False)
    assert t.amp and t.model.amp
    backbone = t.model.f.vit.patch_embed.proj.weight
    assert backbone.dtype == (torch.float32 if train_backbone else torch.bfloat16)
    out = t.run()
    assert {r["stage"] for r in t.history} == {"matcher", "refiners"}  # both stages logged: not an empty history
    assert all(np.isfinite(float(r["total"])) for r in t.history)
    trained = [p for m in ("matcher", "refiners") for p in getattr(t.model, m).parameters()]
    assert all(p.dtype == torch.float32 for p in trained)
    assert t.model.f.vit.patch_embed.proj.weight.dtype == backbone.dtype
    loaded = RoMaV2.from_pretrained(out, amp=False)
    assert loaded.f.vit.patch_embed.proj.weight.dtype == torch.float32
    assert torch.isfinite(loaded.match(torch.rand(3, 64, 64), torch.rand(3, 64, 64))["warp_AB"]).all()


def test_float16_export_records_its_storage_and_loads_by_path(tmp_path):
    """An export stored in float16 on purpose (``dtype=torch.float16``: ``ship``, GPU-lease exports)
    records ``storage_dtype`` in its card and loads by path, upcast to the float32 the layout expects; the same
    tensors without that record are refused with the message naming the fix."""
    from romav2_plugin import RoMaV2
    from romav2_plugin.config import tiny_config
    from romav2_plugin.train.checkpoint import export_weights

    torch.manual_seed(0)
    model = RoMaV2(tiny_config(), amp=False)
    path = export_weights(tmp_path / "half.pt", model, dtype=torch.float16)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["storage_dtype"] == "float16"
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert {v.dtype for v in sd.values() if v.is_floating_point()} >= {torch.float16}
    loaded = RoMaV2.from_pretrained(path, amp=False).state_dict()
    # the same as the explicit upcast the refusal message gives, bit for bit
    manual = RoMaV2.from_pretrained({k: v.float() if v.dtype == torch.float16 else v for k, v in sd.items()},
                                    config=tiny_config(), amp=False).state_dict()
    assert loaded.keys() == manual.keys()
    assert all(torch.equal(loaded[k], manual[k]) and loaded[k].dtype == manual[k].dtype for k in loaded)
    ref = model.state_dict()  # and within half-precision rounding (fp16 here; bf16 for the backbone) of the model
    assert all(torch.allclose(loaded[k], ref[k], rtol=2**-7, atol=1e-6) for k in ref if ref[k].is_floating_point())
    assert not any(v.dtype == torch.float16 for v in loaded.values())
    assert "storage_dtype" not in json.loads(
        export_weights(tmp_path / "full.pt", model).with_suffix(".json").read_text())
    card.pop("storage_dtype")
    path.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="storage_dtype"):
        RoMaV2.from_pretrained(path, amp=False)


@pytest.mark.slow  # training subprocesses with data workers
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="process groups and /proc children: Linux only")
@pytest.mark.parametrize("target", ["group", "leader", "workers"])
def test_sigterm_stops_cleanly_with_data_workers(tmp_path, photos, target):
    """SIGTERM to the whole process group (``pkill -f``, a batch scheduler) reaches the data workers too; torch
    then reports a dead worker as a RuntimeError. romav2-train still stops as interrupted (143, the resume
    hint, no "bug" report) and the checkpoint it kept resumes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cfgfile = tmp_path / "run.toml"
    cfgfile.write_text(
        f'out_dir = "{tmp_path / "run"}"\nlog_every = 1\ncheckpoint_every = 1\n[model]\narchitecture = "tiny"\n'
        f'[data]\nsize = [64, 64]\nworkers = 2\n[[data.sources]]\nkind = "homography"\npath = "{photos}"\n'
        '[[stages]]\nname = "matcher"\nsteps = 100000\nbatch_size = 1\n'
    )
    # data slower than the step (as with rendered scenes): the main process waits on the workers when stopped
    slow = ("import time\nfrom romav2_plugin.train import loop\nget = loop._Batches.__getitem__\n"
            "loop._Batches.__getitem__ = lambda self, k: (time.sleep(0.5), get(self, k))[1]\n"
            "from romav2_plugin.train.__main__ import main\nraise SystemExit(main())\n")
    cmd = [sys.executable, "-c", slow, str(cfgfile), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        log = tmp_path / "run" / "log.csv"
        deadline = time.monotonic() + 240
        while (not log.exists() or len(log.read_text().splitlines()) < 3) and proc.poll() is None:
            assert time.monotonic() < deadline, "no training step logged in time"
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        if target == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        elif target == "leader":
            proc.send_signal(signal.SIGTERM)
        else:  # the workers alone, as ``pkill -f`` may reach them before the main process
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            assert children, "no data worker found"
            for pid in children:
                os.kill(int(pid), signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted" in err and "--resume" in err and "bug" not in err, err
    done = subprocess.run(cmd + ["--resume", "--max-steps", "1"], capture_output=True, text=True, env=env,
                          timeout=240)
    assert done.returncode == 0 and "stopped after --max-steps" in done.stdout, done.stderr
