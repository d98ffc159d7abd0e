"""The two-stage training loop (matcher, then refiners), EMA, logging and exact resume.

Stage ``matcher`` trains the matcher (and the backbone when ``model.train_backbone``) with
:func:`~romav2_plugin.train.losses.matcher_loss`; the refiners are not run. Stage ``refiners`` trains the
fine-feature CNN and the refiners with :func:`~romav2_plugin.train.losses.refiner_loss`; the matcher is
frozen (no gradients, eval mode) and its warp detached, as in the paper's decoupled recipe. Each stage has
its own AdamW optimizer and warm-up + cosine schedule. An exponential moving average of all weights is kept
throughout and is what gets exported for inference.
"""

from __future__ import annotations

import csv
import math
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from romav2_plugin.config import config_from_dict, config_to_dict, get_architecture
from romav2_plugin.runtime import check_device
from romav2_plugin.signals import Terminated, deferred_interrupts
from romav2_plugin.train.checkpoint import (
    export_weights,
    load_training_state,
    save_training_state,
    set_rng_state,
)
from romav2_plugin.train.config import StageConfig, TrainConfig
from romav2_plugin.train.data import (
    HomographyPairs,
    ImageFolder,
    MegaDepthPairs,
    MixedPairs,
    PairDataset,
    RenderedPairs,
    collate,
)
from romav2_plugin.train.distill import DistillHead, build_teacher, distill_loss
from romav2_plugin.train.losses import matcher_loss, refiner_loss

__all__ = ["Trainer", "build_dataset", "trainable_modules", "EMA"]

PREFETCH_FACTOR = 4  # batches each data worker prepares ahead (the first steps of a stage are served from them)

_WORKER_KILLED = re.compile(r"DataLoader worker \(pid \d+\) is killed by signal: (\w+)")
_STOP_SIGNALS = {"Terminated": signal.SIGTERM, "Interrupt": signal.SIGINT, "Hangup": signal.SIGHUP}


def _interruption(e: RuntimeError) -> KeyboardInterrupt | None:
    """The interruption that ``e`` (a DataLoader error) stands for, or ``None`` when it is a real failure.

    A signal sent to the whole process group (``kill -TERM -PGID``, ``pkill -f``, a batch scheduler, Ctrl-C in
    a terminal) reaches the data workers too. Torch then reports the dead worker as a ``RuntimeError``, either
    instead of the main process's own interruption or raised while that interruption unwinds the loader. Both
    are a stop, not a crash: the interruption is returned (the run resumes from the last checkpoint).
    """
    ctx: BaseException | None = e
    while ctx is not None:
        if isinstance(ctx, KeyboardInterrupt):
            return ctx
        m = _WORKER_KILLED.search(str(ctx))
        if m is not None and m.group(1) in _STOP_SIGNALS:
            sig = _STOP_SIGNALS[m.group(1)]
            return KeyboardInterrupt() if sig == signal.SIGINT else Terminated(sig)
        ctx = ctx.__context__
    return None


def build_dataset(cfg: TrainConfig) -> PairDataset:
    """The (mixed) dataset of ``cfg.data``; every source checked up front (folders, readable images)."""
    size = tuple(cfg.data.size)
    parts: list[PairDataset] = []
    for i, src in enumerate(cfg.data.sources):
        seed = cfg.seed * 101 + i
        if src.kind == "megadepth":
            if len(src.path) != 1:
                raise ValueError(f"data.sources[{i}]: a megadepth source takes one scene folder, got {len(src.path)}")
            parts.append(MegaDepthPairs(src.path[0], size, seed=seed))
            continue
        images = ImageFolder(list(src.path), exclude=src.exclude, max_side=max(640, 2 * max(size)))
        if src.kind == "homography":
            parts.append(HomographyPairs(
                images, size, seed=seed, photometric_strength=src.photometric_strength,
                max_rotation_deg=src.max_rotation_deg, scale_range=src.scale_range,
                max_translation=src.max_translation, max_perspective=src.max_perspective,
                illumination=src.illumination,
            ))
        else:
            parts.append(RenderedPairs(images, size, seed=seed, photometric_strength=src.photometric_strength,
                                       max_angle_deg=src.max_angle_deg, illumination=src.illumination))
    if len(parts) == 1:
        return parts[0]
    return MixedPairs(parts, [s.weight for s in cfg.data.sources], seed=cfg.seed)


class _Batches(Dataset):
    """Item ``k`` = the collated batch of samples ``offset + k * batch_size + j``."""

    def __init__(self, data: PairDataset, batch_size: int, offset: int) -> None:
        self.data, self.batch_size, self.offset = data, batch_size, offset

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        start = self.offset + k * self.batch_size
        return collate([self.data.sample(start + j) for j in range(self.batch_size)])


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def trainable_modules(model, stage: str, train_backbone: bool) -> list[torch.nn.Module]:
    if stage == "matcher":
        return [model.matcher] + ([model.f] if train_backbone else [])
    return [model.refiner_features, model.refiners]


class EMA:
    """Exponential moving average of a model's floating-point state (parameters and buffers).

    Only the entries of the modules being trained are averaged (``keys``); frozen weights stay bit-identical.
    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` so early averages are not dominated by the
    initial weights; integer buffers are copied.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, keys: set[str]) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, v in model.state_dict().items():
            if k not in keys:
                continue
            e = self.state[k]
            if v.is_floating_point():
                e.mul_(d).add_(v.detach().to(e.dtype), alpha=1 - d)
            else:
                e.copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "state": self.state}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.decay, self.num_updates = sd["decay"], sd["num_updates"]
        for k, v in sd["state"].items():
            self.state[k].copy_(v)


def _schedule(stage: StageConfig):
    def f(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / max(1, stage.warmup_steps)
        t = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


class Trainer:
    """Runs ``cfg``'s stages; ``run()`` trains (resuming from ``out_dir/checkpoint.pt`` with ``resume``)
    and exports ``out_dir/model.pt`` (+ ``model.json``) from the EMA weights.

    Files in ``out_dir``: ``checkpoint.pt`` (exact resume), ``log.csv`` (one row per ``log_every`` steps),
    ``curves.png`` (with matplotlib), ``model.pt`` / ``model.json``.
    """

    def __init__(self, cfg: TrainConfig, *, progress: bool = True) -> None:
        from romav2_plugin.model import RoMaV2

        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.progress = progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        dev = cfg.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        try:  # before any data or model is loaded
            self.device = check_device(dev)
        except ValueError as e:
            raise ValueError(f"device: {e}") from None
        self.amp = cfg.amp if cfg.amp is not None else self.device.type == "cuda"
        self.data = build_dataset(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            arch = get_architecture(cfg.model.architecture)
            self.source: dict[str, torch.Tensor] | None = None
            if cfg.model.weights:  # built in fp32; the dtypes are chosen below
                self.model = RoMaV2.from_pretrained(cfg.model.weights, config=arch, amp=False)
                self.source = self._source_state(cfg.model.weights)
            else:
                self.model = RoMaV2(arch, amp=False)
        self.model.to(self.device)
        self.train_backbone = (cfg.model.train_backbone if cfg.model.train_backbone is not None
                               else cfg.model.weights is None)
        if self.train_backbone:
            self.model.amp = self.amp  # a trained backbone keeps fp32 weights under autocast
        else:
            self.model.set_amp(self.amp, self.device)  # a frozen one is held in bf16 under amp
        self.teacher, self.distill_head = self._distillation(cfg)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.stage_index = 0
        self.step = 0  # within the stage
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self._setup_stage()

    def _distillation(self, cfg: TrainConfig):
        """The teacher and the head of ``cfg.distill`` (``(None, None)`` without a teacher); checked first."""
        if cfg.distill.teacher is None:
            return None, None
        if not self.train_backbone:
            raise ValueError(
                f"distill.teacher = {cfg.distill.teacher!r} trains the backbone towards the teacher, but the backbone "
                "is frozen here (a model started from weights freezes it by default): set model.train_backbone = true"
            )
        if not any(st.name == "matcher" for st in cfg.stages):
            raise ValueError("distill.teacher acts in the matcher stage, and no stage is named 'matcher'")
        teacher = build_teacher(cfg.distill.teacher, self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 7919)
            head = DistillHead(self.model.cfg.backbone.embed_dim, teacher.channels).to(self.device)
        return teacher, head

    @staticmethod
    def _source_state(weights: str) -> dict[str, torch.Tensor] | None:
        from romav2_plugin.weights.download import resolve_weights
        from romav2_plugin.weights.layout import load_checkpoint
        from romav2_plugin.weights.named import is_named, load_named

        if is_named(weights):
            return load_named(weights)[0]
        return load_checkpoint(resolve_weights(weights))

    # ------------------------------------------------------------------ stages
    @property
    def stage(self) -> StageConfig:
        return self.cfg.stages[self.stage_index]

    def _setup_stage(self) -> None:
        st = self.stage
        self.model.requires_grad_(False)
        mods = trainable_modules(self.model, st.name, self.train_backbone)
        for m in mods:
            m.requires_grad_(True)
        if st.name == "matcher" and self.distill_head is not None:
            mods = [*mods, self.distill_head]
        params = [p for m in mods for p in m.parameters()]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": st.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=st.lr
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _schedule(st))
        self.trainable = mods  # the distillation head is not part of the model: no EMA, never exported
        ids = {id(m) for m in mods}
        prefixes = tuple(name + "." for name, m in self.model.named_modules() if id(m) in ids)
        self.ema_keys = {k for k in self.model.state_dict() if k.startswith(prefixes)}

    def _set_modes(self) -> None:
        self.model.eval()
        for m in self.trainable:
            m.train()

    def _sample_offset(self) -> int:
        """Index of the first sample of the current stage (stages draw disjoint sample ranges)."""
        return sum(s.steps * s.batch_size for s in self.cfg.stages[: self.stage_index])

    # ------------------------------------------------------------------ one step
    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        st = self.stage
        m = self.model
        m.bidirectional = st.bidirectional
        a, b = batch["image_A"], batch["image_B"]
        hw = tuple(a.shape[-2:])
        dirs = ("AB", "BA") if st.bidirectional else ("AB",)
        if st.name == "matcher":
            captured: list[torch.Tensor] = []
            hook = (m.f.register_forward_hook(lambda _m, _i, out: captured.append(out[-1]))
                    if self.distill_head is not None else None)
            try:
                preds = m(a, b, refine=False, return_attention=True)
            finally:
                if hook is not None:
                    hook.remove()
            parts = [matcher_loss(preds["matcher"], batch[f"warp_{d}"], batch[f"covis_{d}"], hw, self.cfg.loss, d)
                     for d in dirs]
        else:
            preds = m(a, b, refine=True)
            parts = [refiner_loss(preds, batch[f"warp_{d}"], batch[f"covis_{d}"], hw, self.cfg.loss, d) for d in dirs]
        out = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
        if st.name == "matcher" and self.distill_head is not None:
            # captured[0]: the backbone's last features of A and B as one batch, (2B, h, w, D)
            target = self.teacher(torch.cat((a, b)))
            out["distill"] = distill_loss(self.distill_head(captured[0].float()), target)
            out["total"] = out["total"] + self.cfg.distill.weight * out["distill"]
        return out

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self._set_modes()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self.opt.zero_grad(set_to_none=True)
        losses = self.loss(batch)
        losses["total"].backward()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        gnorm = torch.nn.utils.clip_grad_norm_(params, self.stage.grad_clip)
        self.opt.step()
        self.sched.step()
        self.ema.update(self.model, self.ema_keys)
        self.step += 1
        self.global_step += 1
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["grad_norm"] = float(gnorm)
        return out

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self) -> Path:
        """Write the checkpoint atomically; a stop signal arriving meanwhile is acted on once it is written."""
        with deferred_interrupts():
            return self._save()

    def _save(self) -> Path:
        return save_training_state(self.checkpoint_path, {
            "config": config_to_dict(self.cfg),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "stage_index": self.stage_index,
            "step": self.step,
            "global_step": self.global_step,
            "history": self.history,
            **({"distill_head": self.distill_head.state_dict()} if self.distill_head is not None else {}),
        })

    def resume(self) -> None:
        state = load_training_state(self.checkpoint_path)
        # the checkpoint's config read through today's classes (keys added since take their defaults)
        old = _identity(config_to_dict(config_from_dict(TrainConfig, state["config"])))
        new = _identity(config_to_dict(self.cfg))
        if old != new:
            changed = sorted(k for k in old if old.get(k) != new.get(k))
            raise ValueError(
                f"{self.checkpoint_path} was written with a different config (changed: {', '.join(changed)}). "
                "Use the original config, or a new out_dir to start over."
            )
        self.model.load_state_dict(state["model"])
        self.stage_index = state["stage_index"]
        if self.stage_index < len(self.cfg.stages):  # else: a finished run (export only)
            self._setup_stage()
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
        if self.distill_head is not None:
            self.distill_head.load_state_dict(state["distill_head"])
        self.ema.load_state_dict(state["ema"])
        self.step, self.global_step = state["step"], state["global_step"]
        self.history = list(state["history"])
        set_rng_state(state["rng"])
        self._truncate_log(self.global_step)

    def _truncate_log(self, global_step: int) -> None:
        """Drop log rows written after the checkpoint (a crash between checkpoints), so none repeats."""
        path = self.out / "log.csv"
        if not path.exists():
            return
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if int(r["global_step"]) <= global_step]
        if len(keep) != len(rows):
            with path.open("w", encoding="utf-8", newline="") as f:
                wr = csv.DictWriter(f, fieldnames=self.log_columns, restval="")
                wr.writeheader()
                wr.writerows(keep)

    # ------------------------------------------------------------------ run
    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        st = self.stage
        ds = _Batches(self.data, st.batch_size, self._sample_offset())
        sampler = range(self.step, st.steps)
        w = self.cfg.data.workers
        loader = DataLoader(ds, batch_size=None, sampler=sampler, num_workers=w,
                            worker_init_fn=_worker_init if w else None, prefetch_factor=PREFETCH_FACTOR if w else None,
                            persistent_workers=False)
        yield from loader

    @property
    def log_columns(self) -> list[str]:
        strides = [f"warp_{r.stride}" for r in self.model.cfg.refiners]
        distill = ["distill"] if self.distill_head is not None else []
        return ["global_step", "stage", "step", "lr", "pairs_per_s", "total", "nll", "warp", "overlap",
                "precision", *strides, *distill, "grad_norm"]

    def _log(self, row: dict[str, float]) -> None:
        path = self.out / "log.csv"
        new = not path.exists()
        with path.open("a", newline="", encoding="utf-8") as f:
            wr = csv.DictWriter(f, fieldnames=self.log_columns, restval="")
            if new:
                wr.writeheader()
            wr.writerow(row)

    def run(self, *, resume: bool = False, max_steps: int | None = None) -> Path | None:
        """Train to the end of the last stage (or for ``max_steps`` more steps: then no export).

        Returns the exported weights' path, or ``None`` when stopped early by ``max_steps``. A stop signal
        (Ctrl-C; SIGTERM where a handler turns it into :class:`KeyboardInterrupt`, as the commands do) raises
        ``KeyboardInterrupt`` even when it reached the data workers first; the last checkpoint is kept.
        """
        try:
            return self._run(resume=resume, max_steps=max_steps)
        except RuntimeError as e:
            stop = _interruption(e)
            if stop is None:
                raise
            raise stop from None

    def _run(self, *, resume: bool, max_steps: int | None) -> Path | None:
        self.out.mkdir(parents=True, exist_ok=True)
        from romav2_plugin.train.checkpoint import remove_stale_temporaries

        remove_stale_temporaries(self.out)  # checkpoint.pt.HOST-PID.*.tmp of a killed run
        if resume:
            self.resume()
        elif self.checkpoint_path.exists():
            raise FileExistsError(
                f"{self.checkpoint_path} exists: pass --resume to continue that run, or choose a new out_dir"
            )
        done = 0
        while self.stage_index < len(self.cfg.stages):
            st = self.stage
            bar = _progress(st, self.step, self.progress)
            t0, n0 = time.perf_counter(), self.step
            acc: dict[str, float] = {}
            for batch in self._batches():
                if max_steps is not None and done >= max_steps:
                    break
                out = self.train_step(batch)
                done += 1
                for k, v in out.items():
                    acc[k] = acc.get(k, 0.0) + v
                if self.step % self.cfg.log_every == 0 or self.step == st.steps:
                    n = self.step - n0
                    dt = time.perf_counter() - t0
                    row = {"global_step": self.global_step, "stage": st.name, "step": self.step,
                           "lr": self.sched.get_last_lr()[0], "pairs_per_s": n * st.batch_size / max(dt, 1e-9)}
                    row.update({k: v / max(n, 1) for k, v in acc.items()})
                    self._log(row)
                    self.history.append({k: v for k, v in row.items() if k != "stage"} | {"stage": st.name})
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['total']:.4f}", pairs_s=f"{row['pairs_per_s']:.2f}")
                    t0, n0, acc = time.perf_counter(), self.step, {}
                if bar is not None:
                    bar.update(1)
                if self.step % self.cfg.checkpoint_every == 0:
                    self.save()
            if bar is not None:
                bar.close()
            if max_steps is not None and done >= max_steps and self.step < st.steps:
                self.save()
                return None
            self.stage_index += 1
            self.step = 0
            if self.stage_index < len(self.cfg.stages):
                self._setup_stage()
            self.save()
        plot_curves(self.out / "log.csv", self.out / "curves.png")
        return self.export(self.out / "model.pt")

    def export(self, path: Path, **kw) -> Path:
        """Write the EMA weights in the official layout with a model card."""
        card = {
            "trained_with": "romav2_plugin.train",
            "train_config": config_to_dict(self.cfg),
            "global_step": self.global_step,
            "ema_decay": self.cfg.ema_decay,
        }
        card.update(kw.pop("card", {}))
        return export_weights(path, self.model, state_dict=self.ema.state, source=self.source, card=card, **kw)


def _identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config without the runtime knobs that cannot change the results (data loader workers, CPU
    threads, logging and checkpoint intervals): a run may be resumed with other values of these."""
    out = {k: v for k, v in cfg.items() if k not in ("threads", "log_every", "checkpoint_every")}
    out["data"] = {k: v for k, v in cfg["data"].items() if k != "workers"}
    return out


def _progress(st: StageConfig, start: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        return None
    return tqdm(total=st.steps, initial=start, desc=f"stage {st.name}", unit="step", dynamic_ncols=True)


def plot_curves(csv_path: Path, png_path: Path) -> Path | None:
    """Loss curves from ``log.csv`` (one panel per stage); ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not csv_path.exists():
        return None
    with csv_path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
    skip = {"global_step", "stage", "step", "lr", "pairs_per_s", "grad_norm", "part"}
    for ax, s in zip(axes[0], stages):
        rs = [r for r in rows if r["stage"] == s]
        x = [int(r["step"]) for r in rs]
        for k in rs[0]:
            if k in skip or k.startswith("warp_"):
                continue
            vals = [float(r[k]) for r in rs if r.get(k) not in (None, "")]
            if not vals:
                continue
            if len(vals) == len(x):
                ax.plot(x, vals, label=k)
        ax.set_title(f"stage {s}")
        ax.set_xlabel("step")
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


