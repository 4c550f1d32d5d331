"""Stage 3, train: fit the model on the train split, validate every epoch, keep the best epoch.

Data lives on the device as uint8 for the whole run; each step gathers a batch by index, normalizes and
augments it there, in autocast (bf16/fp16) on GPUs. Under torchrun every process holds the data, takes its
shard of each global batch and DistributedDataParallel averages the gradients; only rank 0 writes.
Writes models/model.pt, metrics/train.json (accuracy, loss, speed), metrics/train.info.json (device, precision,
versions) and plots/train_history.csv.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cnnpipe.core.checkpoint import save_checkpoint
from cnnpipe.core.data import augment, draw_augment, load_meta, load_split, normalize, stats_tensors, to_device
from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.fsutil import atomic_path, write_metrics
from cnnpipe.core.inference import autocast, predict_logits
from cnnpipe.core.models import build_model
from cnnpipe.core.params import TrainParams
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
STATE_FORMAT = 3  # bump when the resume state's layout changes: older states are then ignored


def make_optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    # No weight decay on BN and bias parameters (1-D tensors), as is standard. Fused kernels: one op for
    # all parameters (measured on LeNet, CPU: 4,463 against 4,255 images/s).
    decay = [t for t in model.parameters() if t.ndim > 1]
    no_decay = [t for t in model.parameters() if t.ndim <= 1]
    groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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
    amp = resolve_precision(p.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    scheduler = make_schedule(optimizer, p, p.epochs * steps_per_epoch)
    return Engine(net, model, optimizer, scheduler, scaler, amp, device, p, d)


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


def train_epoch(engine: Engine, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                flip: bool, generator: torch.Generator, bar: tqdm | None) -> tuple[float, float, int]:
    """One pass over a fresh permutation; returns (mean loss, accuracy, images seen by all ranks).
    Every rank draws the same permutation and augmentation for the global batch and keeps its shard."""
    p, d = engine.p, engine.d
    engine.model.train()
    perm = torch.randperm(len(x), generator=generator, device=generator.device).to(x.device)
    steps = len(x) // p.batch_size  # drop the ragged last batch: BN and the LR schedule prefer full batches
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for s in range(steps):
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


def fingerprint(p: TrainParams, meta, n_train: int, world: int, device: torch.device,
                amp: torch.dtype | None) -> str:
    """What a resume state must have been made with: every param but `resume`, the data's shape, the number of
    processes (each has its own random streams), and the device type and precision `auto` resolved to."""
    params = {k: v for k, v in dataclasses.asdict(p).items() if k != "resume"}
    blob = json.dumps([STATE_FORMAT, params, meta.dataset, list(meta.shape), meta.classes, n_train, world,
                       device.type, str(amp)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def rng_states(device: torch.device, d: Dist) -> list[dict[str, torch.Tensor]]:
    """Every rank's global random streams (CPU, and CUDA on a GPU: dropout draws from them), by rank."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if d.world == 1:
        return [mine]
    states: list = [None] * d.world
    dist.all_gather_object(states, mine)
    return states


def restore_rng(states: list[dict[str, torch.Tensor]], device: torch.device, d: Dist) -> None:
    torch.set_rng_state(states[d.rank]["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[d.rank]["cuda"], device)


def save_state(path: Path, state: dict) -> None:
    """The last completed epoch: model, optimizer, schedule and RNG states, history (atomic)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def load_state(path: Path, expected: str) -> dict | None:
    """The resume state if it belongs to this run; None if there is none or it is from other params."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        ok = isinstance(state, dict) and "fingerprint" in state and "epoch" in state
    except Exception as e:  # torch raises several types for a damaged file
        raise CnnpipeError(f"resume state {path} is corrupt ({str(e).splitlines()[0][:100]}); "
                           "delete it to start over") from e
    if not ok:
        raise CnnpipeError(f"resume state {path} is not a cnnpipe training state; delete it to start over")
    if state["fingerprint"] != expected:
        log.warning("ignoring %s: it was made with other params or data", path)
        return None
    return state


def shared_state(path: Path, expected: str, d: Dist) -> dict | None:
    """Rank 0 reads the resume state; under torchrun it (or rank 0's error) goes to every rank, so all
    continue from the same epoch even without a shared filesystem."""
    state, error = None, None
    if d.main:
        try:
            state = load_state(path, expected)
        except CnnpipeError as e:
            error = str(e)
    if d.world > 1:
        box = [state, error]
        dist.broadcast_object_list(box, src=0)
        state, error = box
    if error:
        raise CnnpipeError(error)
    return state


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


def train(p: TrainParams, prepared: str | Path = "data/prepared", model_path: str | Path = "models/model.pt",
          metrics_path: str | Path = "metrics/train.json", history_path: str | Path = "plots/train_history.csv",
          state_path: str | Path | None = None,
          on_epoch: Callable[[dict, nn.Module], None] | None = None) -> dict:
    """Train, validate every epoch, keep the best epoch. The last completed epoch is kept in `state_path`
    (default: beside the checkpoint, `.model.pt.resume`) until the run finishes. Under torchrun (WORLD_SIZE > 1)
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


def _train(p: TrainParams, prepared: Path, model_path: Path, metrics_path: Path, history_path: Path,
           state_path: Path, device: torch.device, d: Dist, on_epoch) -> dict:
    set_threads(p.threads)
    seed_everything(p.seed)
    configure_backends(device, p.deterministic)
    if not d.main:
        logging.getLogger("cnnpipe").setLevel(logging.WARNING)
    meta = load_meta(prepared)
    check_fits(p, meta)
    x_np, y_np = load_split(prepared, "train")
    check_fits(p, dataclasses.replace(meta, sizes={"train": len(y_np)}))
    steps_per_epoch = len(y_np) // p.batch_size
    engine = build_engine(p, meta, steps_per_epoch, device, d)
    x, y = to_device(x_np, y_np, device)
    vx, vy = to_device(*load_split(prepared, "val"), device)
    mean, std = stats_tensors(meta, device)
    flip = p.flip and meta.flip
    generator = torch.Generator(device=device).manual_seed(p.seed)

    if d.world > 1:
        log.info("torchrun: %d processes (%s), each %d images of every %d-image batch", d.world,
                 dist.get_backend(), p.batch_size // d.world, p.batch_size)
    key = fingerprint(p, meta, len(y_np), d.world, device, engine.amp)
    history: list[dict] = []
    best: dict | None = None
    best_state = None
    images, elapsed, first = 0, 0.0, 1
    state = shared_state(state_path, key, d) if p.resume else None
    if state is not None:  # continue after the last completed epoch, exactly as if never stopped
        engine.net.load_state_dict(state["model"])
        engine.optimizer.load_state_dict(state["optimizer"])
        engine.scheduler.load_state_dict(state["scheduler"])
        engine.scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        restore_rng(state["rng"], device, d)
        history, best, best_state = state["history"], state["best"], state["best_state"]
        images, elapsed, first = state["images"], state["seconds"], state["epoch"] + 1
        log.info("resuming after epoch %d from %s", state["epoch"], state_path)
    interactive = sys.stderr.isatty() and d.main  # a bar on a terminal; plain lines in CI, DVC, Prefect
    start = time.perf_counter() - elapsed
    stopped_early = False
    for epoch in range(first, p.epochs + 1):
        t0 = time.perf_counter()
        bar = tqdm(total=steps_per_epoch * p.batch_size, unit="img", desc=f"epoch {epoch}/{p.epochs}",
                   leave=False, disable=None) if interactive else None
        tr_loss, tr_acc, seen = train_epoch(engine, x, y, mean, std, flip, generator, bar)
        if bar is not None:
            bar.close()
        images += seen
        va_loss, va_acc = evaluate_split(engine, vx, vy, mean, std, 1000)
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "train_loss": round(tr_loss, 5), "train_acc": round(tr_acc, 5),
               "val_loss": round(va_loss, 5), "val_acc": round(va_acc, 5),
               "lr": round(engine.optimizer.param_groups[0]["lr"], 8), "seconds": round(seconds, 2)}
        history.append(row)
        log.info("epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  %.0f img/s  %.1fs",
                 epoch, p.epochs, tr_loss, tr_acc, va_loss, va_acc, seen / seconds, seconds)
        if best is None or va_acc > best["val_acc"]:
            best = row
            best_state = {k: v.detach().clone() for k, v in engine.net.state_dict().items()}
        if p.resume:
            rng = rng_states(device, d)  # a collective: every rank takes part
            if d.main:
                save_state(state_path, {
                    "fingerprint": key, "epoch": epoch, "model": engine.net.state_dict(),
                    "optimizer": engine.optimizer.state_dict(), "scheduler": engine.scheduler.state_dict(),
                    "scaler": engine.scaler.state_dict(), "generator": generator.get_state(), "rng": rng,
                    "history": history, "best": best, "best_state": best_state,
                    "images": images, "seconds": time.perf_counter() - start})
        if on_epoch is not None:
            t1 = time.perf_counter()
            on_epoch(dict(row, train_seconds=round(t1 - start, 2)), engine.net)
            start += time.perf_counter() - t1
        if p.patience > 0 and epoch - best["epoch"] >= p.patience:
            log.info("early stop: no better validation accuracy for %d epochs", p.patience)
            stopped_early = True
            break
    seconds = time.perf_counter() - start

    engine.net.load_state_dict(best_state)
    metrics = {  # short names: `dvc metrics show` puts every stage's metrics side by side (see dvc.yaml)
        "val_acc": best["val_acc"],
        "val_loss": best["val_loss"],
        "epoch": best["epoch"],  # the best epoch: the one saved
        "sec": round(seconds, 2),
    }
    info = {
        "model": p.model,
        "dataset": meta.dataset,
        "epochs": p.epochs,
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "images_per_second": round(images / seconds, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "processes": d.world,
        "precision": str(engine.amp).removeprefix("torch.") if engine.amp else "float32",
        "compiled": p.compile,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if d.main:
        save_checkpoint(model_path, engine.net, p.model, meta,
                        {"epoch": best["epoch"], "val_acc": best["val_acc"], "train_params": dataclasses.asdict(p)})
        write_history(history_path, history)
        write_metrics(metrics_path, metrics, info)
        state_path.unlink(missing_ok=True)  # finished: the next run starts fresh
    return metrics | info
