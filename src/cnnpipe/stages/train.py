"""Stage 3, train: fit the model on the train split, validate every epoch, keep the last epoch (with early
stopping, the best).

Data lives on the device as uint8 for the whole run; each step gathers a batch by index, normalizes and
augments it there, in autocast (bf16/fp16) on GPUs. Under torchrun every process holds the data, takes its
shard of each global batch and DistributedDataParallel averages the gradients; only rank 0 writes.
Writes models/model.pt, metrics/train.json (accuracy, loss, speed), metrics/train.info.json (device, precision,
versions), plots/train_history.csv and its curves, plots/train_history.png.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cnnpipe.core import cpuprecision, cpushare, resume, trial
from cnnpipe.core.checkpoint import save_checkpoint
from cnnpipe.core.cpuinfo import cpu_flags
from cnnpipe.core.data import augment, draw_augment, normalize, stats_tensors, to_device
from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.figures import training_curves
from cnnpipe.core.fsutil import atomic_path, write_metrics
from cnnpipe.core.inference import autocast, predict_logits
from cnnpipe.core.models import build_model
from cnnpipe.core.params import TrainParams
from cnnpipe.core.prepared import load_meta, load_split
from cnnpipe.core.resume import Progress
from cnnpipe.core.runtime import (
    Dist,
    configure_backends,
    dist_from_env,
    init_process_group,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_threads,
)

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def make_optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    # BN and bias parameters (1-D tensors): no weight decay, as is standard, and a learning rate norm_lr
    # times the others'. Adam moves every parameter by about lr a step, slow for BN's scales, which start at
    # 1, against convolution weights of a few hundredths (SGD's steps follow the gradient instead: there
    # norm_lr 1 is the usual choice). Fused kernels: one op per group.
    decay = [t for t in model.parameters() if t.ndim > 1]
    no_decay = [t for t in model.parameters() if t.ndim <= 1]
    groups = [{"params": decay, "weight_decay": p.weight_decay},
              {"params": no_decay, "weight_decay": 0.0, "lr": p.lr * p.norm_lr}]
    if p.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, nesterov=p.momentum > 0, fused=True)
    if p.optimizer == "adam":
        return torch.optim.Adam(groups, lr=p.lr, fused=True)
    return torch.optim.AdamW(groups, lr=p.lr, fused=True)


def make_schedule(optimizer: torch.optim.Optimizer, p: TrainParams, total_steps: int):
    """Per-step LR multiplier: linear warmup then linear (onecycle) or cosine decay to zero."""
    warm = max(1, int(p.warmup * total_steps))

    def factor(step: int) -> float:
        if p.schedule == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 1.0 - t if p.schedule == "onecycle" else 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Engine:
    """Everything one optimizer step needs."""

    net: nn.Module  # the plain model: evaluated and saved
    model: nn.Module  # what the step calls: net, or its DDP and/or compiled wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    amp: torch.dtype | None
    device: torch.device
    p: TrainParams
    d: Dist
    channels_last: bool = True  # measured faster for these convnets on CPU (oneDNN) and on GPU
    precision_choice: dict = dataclasses.field(default_factory=dict)  # CPU: what decided the precision

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward, update; returns (loss, logits), both still on the device."""
        with autocast(self.device, self.amp):
            logits = self.model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=self.p.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.p.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.net.parameters(), self.p.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach(), logits.detach()


def build_engine(p: TrainParams, meta, steps_per_epoch: int, device: torch.device, d: Dist) -> Engine:
    net = build_model(p.model, meta.shape, len(meta.classes)).to(device, memory_format=torch.channels_last)
    model = net
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(p.seed * 1000 + d.rank)  # dropout: each rank its own masks (weights come from rank 0)
    if p.compile:
        model = torch.compile(model)
    optimizer = make_optimizer(net, p)
    amp, choice = resolve_precision(p.precision, device), {}
    if device.type == "cpu":
        shape, batch, flags = tuple(meta.shape), p.batch_size // d.world, cpu_flags()
        amp, choice = cpuprecision.choose(
            p.precision, flags, lambda dtype: cpuprecision.probe(net, shape, batch, dtype),
            lambda: cpuprecision.probe_key(p.model, shape, batch, p.threads or len(cpushare.affinity()), flags),
            cpuprecision.decisions_file if d.main else None)  # rank 0 decides (below) and alone remembers
        if d.world > 1:  # every rank trains in rank 0's choice
            flag = torch.tensor([int(amp is not None)])
            dist.broadcast(flag, 0)
            amp = torch.bfloat16 if flag.item() else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    scheduler = make_schedule(optimizer, p, p.epochs * steps_per_epoch)
    return Engine(net, model, optimizer, scheduler, scaler, amp, device, p, d, precision_choice=choice)


def next_batch(engine: Engine, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
               batch: torch.Tensor, flip: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard of a global batch (indices into x): gathered, normalized, augmented, on the device."""
    p, d = engine.p, engine.d
    idx = batch[d.rank::d.world]
    choices = {k: v[d.rank::d.world] for k, v in draw_augment(len(batch), p.translate, flip, generator).items()}
    xb = augment(normalize(x[idx], mean, std), p.translate, choices)  # B/world × C×H×W float
    if engine.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    return xb, y[idx]


RETUNE_STEPS = 25  # how often a run re-reads its share of the cores (core/cpushare.py)


def train_epoch(engine: Engine, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                flip: bool, generator: torch.Generator, bar: tqdm | None,
                retune: Callable[[], None] | None = None) -> tuple[float, float, int]:
    """One pass over a fresh permutation; returns (mean loss, accuracy, images seen by all ranks).
    Every rank draws the same permutation and augmentation for the global batch and keeps its shard.
    `retune` is called every RETUNE_STEPS steps (CPU threads follow the jobs that start and end)."""
    p, d = engine.p, engine.d
    engine.model.train()
    perm = torch.randperm(len(x), generator=generator, device=generator.device).to(x.device)
    steps = len(x) // p.batch_size  # drop the ragged last batch: BN and the LR schedule prefer full batches
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for s in range(steps):
        if retune is not None and s % RETUNE_STEPS == 0:
            retune()
        xb, yb = next_batch(engine, x, y, mean, std, perm[s * p.batch_size: (s + 1) * p.batch_size], flip,
                            generator)
        loss, logits = engine.step(xb, yb)
        loss_sum += loss * len(yb)
        correct += (logits.argmax(1) == yb).sum()
        if bar is not None:
            bar.update(len(yb) * d.world)
            if s % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct.item() / ((s + 1) * len(yb)):.3f}")
    totals = torch.stack([loss_sum, correct.to(loss_sum.dtype)])
    if d.world > 1:
        dist.all_reduce(totals)
    seen = steps * p.batch_size
    return totals[0].item() / seen, totals[1].item() / seen, seen


def evaluate_split(engine: Engine, x, y, mean, std, batch_size: int) -> tuple[float, float]:
    """(loss, accuracy) on a split; under torchrun each rank scores its shard and the sums are combined."""
    d = engine.d
    xs, ys = x[d.rank::d.world], y[d.rank::d.world]
    logits = predict_logits(engine.net, xs, mean, std, batch_size, engine.channels_last, engine.amp)
    totals = torch.stack([F.cross_entropy(logits, ys, reduction="sum"), (logits.argmax(1) == ys).sum().float()])
    if d.world > 1:
        dist.all_reduce(totals)
    return totals[0].item() / len(y), totals[1].item() / len(y)


def write_history(path: str | Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def train_note(p: TrainParams, flip_safe: bool) -> str:
    """Why train loss and accuracy read differently from validation's: what the training batches went through."""
    parts = [f"label smoothing {p.label_smoothing:g}"] if p.label_smoothing else []
    parts += ["augmented batches"] if p.translate or (p.flip and flip_safe) else []
    return ", ".join(parts)


def check_fits(p: TrainParams, meta) -> None:
    """Params that must fit the data: checked from meta.json before the arrays are loaded."""
    n = (meta.sizes or {}).get("train")
    if n is not None and p.batch_size > n:
        raise CnnpipeError(f"train.batch_size {p.batch_size} does not fit the {n} training images; "
                           f"set train.batch_size to at most {n}")
    _, h, w = meta.shape
    if p.translate >= min(h, w):
        raise CnnpipeError(f"train.translate {p.translate} shifts {h}×{w} images out of the frame; "
                           f"set train.translate below {min(h, w)}")


@cpushare.registered
def train(p: TrainParams, prepared: str | Path = "data/prepared", model_path: str | Path = "models/model.pt",
          metrics_path: str | Path = "metrics/train.json", history_path: str | Path = "plots/train_history.csv",
          state_path: str | Path | None = None,
          on_epoch: Callable[[dict, nn.Module], None] | None = None) -> dict:
    """Train, validate every epoch, keep the last epoch's weights: the schedule anneals to them, and picking
    an earlier epoch by its validation accuracy picks noise. With early stopping (`patience`) the run ends past
    its best epoch and keeps that one's. The last completed epoch is kept in `state_path` (default: beside the
    checkpoint, `.model.pt.resume`) until the run finishes. Under torchrun (WORLD_SIZE > 1)
    this runs in every process; rank 0 alone writes. `on_epoch(row, model)` is called after each epoch (the
    benchmark scores the test set there); its time is not counted as training time."""
    d = dist_from_env()
    device = resolve_device(p.device, d.local_rank)
    if p.batch_size % d.world:
        raise CnnpipeError(f"train.batch_size {p.batch_size} does not split over {d.world} processes; "
                           f"use a multiple of {d.world}")
    model_path = Path(model_path)
    state_path = Path(state_path) if state_path else model_path.with_name(f".{model_path.name}.resume")
    init_process_group(d, device)
    try:
        return _train(p, Path(prepared), model_path, Path(metrics_path), Path(history_path), state_path,
                      device, d, on_epoch)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class Run:
    """What the epochs work on, built once: the engine, the data on the device, the batch generator."""

    engine: Engine
    meta: Any
    x: torch.Tensor  # train images, uint8 on the device
    y: torch.Tensor
    vx: torch.Tensor  # validation
    vy: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    flip: bool  # flip augmentation: asked for and label-safe for this data
    generator: torch.Generator  # batches and augmentation, the same on every rank
    key: str  # the resume fingerprint
    threads: list[list[int]] = dataclasses.field(default_factory=list)  # CPU thread counts of each epoch


def build_run(p: TrainParams, prepared: Path, device: torch.device, d: Dist) -> Run:
    """Check the params against the data, load it onto the device and build the engine."""
    meta = load_meta(prepared)
    check_fits(p, meta)
    x_np, y_np = load_split(prepared, "train")
    check_fits(p, dataclasses.replace(meta, sizes={"train": len(y_np)}))
    engine = build_engine(p, meta, len(y_np) // p.batch_size, device, d)
    vx_np, vy_np = load_split(prepared, "val")
    x, y = to_device(x_np, y_np, device)
    vx, vy = to_device(vx_np, vy_np, device)
    mean, std = stats_tensors(meta, device)
    generator = torch.Generator(device=device).manual_seed(p.seed)
    if d.world > 1:
        log.info("torchrun: %d processes (%s), each %d images of every %d-image batch", d.world,
                 dist.get_backend(), p.batch_size // d.world, p.batch_size)
    key = resume.fingerprint(p, meta, [x_np, y_np, vx_np, vy_np], d.world, device, engine.amp) if p.resume else ""
    return Run(engine, meta, x, y, vx, vy, mean, std, p.flip and meta.flip, generator, key)


def should_stop(report: trial.Reporter | None, epoch: int, val_acc: float, kept_val_acc: float, last: bool,
                d: Dist) -> bool:
    """A sweep's pruner decides on rank 0; under torchrun every rank learns the decision."""
    stop = bool(report(epoch, val_acc, kept_val_acc, last)) if report is not None and d.main else False
    if d.world > 1:
        flag = torch.tensor([int(stop)])
        dist.broadcast(flag, 0)
        stop = bool(flag.item())
    return stop


def run_epochs(p: TrainParams, run: Run, progress: Progress, state_path: Path, d: Dist,
               on_epoch: Callable[[dict, nn.Module], None] | None,
               report: trial.Reporter | None = None) -> Progress:
    """Train from the epoch after `progress.epoch` to the last, validating each epoch and saving the resume
    state after it. Stops early on train.patience or when a sweep's pruner says so (`report`); the progress
    returned says why in `stopped_early` ("patience", "pruned", or None)."""
    engine = run.engine
    steps = len(run.y) // p.batch_size
    interactive = sys.stderr.isatty() and d.main  # a bar on a terminal; plain lines in CI, DVC, Prefect
    start = time.perf_counter() - progress.seconds
    if progress.stopped_early:  # interrupted after deciding to stop, before the outputs were written
        return progress
    for epoch in range(progress.epoch + 1, p.epochs + 1):
        used: set[int] = set()
        t0 = time.perf_counter()
        bar = tqdm(total=steps * p.batch_size, unit="img", desc=f"epoch {epoch}/{p.epochs}",
                   leave=False, disable=None) if interactive else None
        tr_loss, tr_acc, seen = train_epoch(engine, run.x, run.y, run.mean, run.std, run.flip, run.generator, bar,
                                            lambda used=used: used.add(set_threads(p.threads)))
        run.threads.append(sorted(used))
        if bar is not None:
            bar.close()
        va_loss, va_acc = evaluate_split(engine, run.vx, run.vy, run.mean, run.std, 1000)
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "train_loss": round(tr_loss, 5), "train_acc": round(tr_acc, 5),
               "val_loss": round(va_loss, 5), "val_acc": round(va_acc, 5),
               "lr": round(engine.optimizer.param_groups[0]["lr"], 8),  # the weights'; BN's is × norm_lr
               "seconds": round(seconds, 2)}
        log.info("epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  %.0f img/s  %.1fs",
                 epoch, p.epochs, tr_loss, tr_acc, va_loss, va_acc, seen / seconds, seconds)
        progress.history.append(row)
        progress.images += seen
        progress.epoch = epoch
        if progress.best is None or va_acc > progress.best["val_acc"]:
            progress.best = row
            if p.patience > 0:  # early stopping ends on the best epoch's weights
                progress.best_state = {k: v.detach().clone() for k, v in engine.net.state_dict().items()}
        patience_out = p.patience > 0 and epoch - progress.best["epoch"] >= p.patience
        kept_acc = kept_row(p, progress)["val_acc"]  # if the run ended now
        if should_stop(report, epoch, va_acc, kept_acc, epoch == p.epochs or patience_out, d):
            log.info("pruned by the sweep after epoch %d: validation accuracy %.4f is below the median of "
                     "earlier trials at this epoch", epoch, va_acc)
            progress.stopped_early = "pruned"
        elif patience_out:
            log.info("early stop: no better validation accuracy for %d epochs", p.patience)
            progress.stopped_early = "patience"
        progress.seconds = time.perf_counter() - start
        if p.resume:  # the stop decision is saved with the epoch: a rerun after an interruption ends here too
            resume.save(state_path, run.key, engine, run.generator, progress, d)
        if on_epoch is not None:
            t1 = time.perf_counter()
            on_epoch(dict(row, train_seconds=round(t1 - start, 2)), engine.net)
            start += time.perf_counter() - t1
        if progress.stopped_early:
            break
    progress.seconds = time.perf_counter() - start
    return progress


def kept_row(p: TrainParams, progress: Progress) -> dict:
    """The history row of the epoch whose weights the run keeps: the last, or with early stopping the best."""
    return progress.best if p.patience > 0 else progress.history[-1]


def finish(p: TrainParams, run: Run, progress: Progress, model_path: Path, metrics_path: Path,
           history_path: Path, state_path: Path, d: Dist) -> dict:
    """Keep the last epoch's weights, or with early stopping the best epoch's; rank 0 writes the checkpoint,
    history, curves and metrics, and removes the resume state."""
    engine, kept = run.engine, kept_row(p, progress)
    if p.patience > 0:
        engine.net.load_state_dict(progress.best_state)
    metrics = {  # short names: `dvc metrics show` puts every stage's metrics side by side (see dvc.yaml)
        "val_acc": kept["val_acc"],
        "val_loss": kept["val_loss"],
        "epoch": kept["epoch"],  # the epoch saved
        "sec": round(progress.seconds, 2),
    }
    device = engine.device
    info = {
        "model": p.model,
        "dataset": run.meta.dataset,
        "epochs": p.epochs,
        "epochs_run": len(progress.history),
        "stopped_early": progress.stopped_early is not None,
        "pruned": progress.stopped_early == "pruned",  # a sweep's trial, stopped by its pruner (the outputs are whole)
        "images_per_second": round(progress.images / progress.seconds, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "processes": d.world,
        "precision": str(engine.amp).removeprefix("torch.") if engine.amp else "float32",
        **({"precision_choice": engine.precision_choice} if engine.precision_choice else {}),
        "compiled": p.compile,
        "torch": torch.__version__,
        "threads": run.threads,  # per epoch run by this process; results repeat bitwise for equal counts
    }
    if d.main:
        save_checkpoint(model_path, engine.net, p.model, run.meta,
                        {"epoch": kept["epoch"], "val_acc": kept["val_acc"], "train_params": dataclasses.asdict(p)})
        write_history(history_path, progress.history)
        training_curves(progress.history, history_path.with_suffix(".png"), kept["epoch"],
                        train_note(p, run.meta.flip))
        write_metrics(metrics_path, metrics, info)
        state_path.unlink(missing_ok=True)  # finished: the next run starts fresh
    return metrics | info


def _train(p: TrainParams, prepared: Path, model_path: Path, metrics_path: Path, history_path: Path,
           state_path: Path, device: torch.device, d: Dist, on_epoch) -> dict:
    """build -> loop -> finish, continuing from the resume state when there is one for these params."""
    set_threads(p.threads)  # build and the first epoch's validation
    seed_everything(p.seed)
    configure_backends(device, p.deterministic)
    if not d.main:
        logging.getLogger("cnnpipe").setLevel(logging.WARNING)
    run = build_run(p, prepared, device, d)
    progress = Progress()
    state = resume.shared(state_path, run.key, d) if p.resume else None
    if state is not None:  # continue after the last completed epoch, exactly as if never stopped
        progress = resume.restore(state, run.engine, run.generator, d, state_path)
        log.info("resuming after epoch %d from %s", progress.epoch, state_path)
    report = trial.reporter_from_env() if d.main else None
    progress = run_epochs(p, run, progress, state_path, d, on_epoch, report)
    return finish(p, run, progress, model_path, metrics_path, history_path, state_path, d)
