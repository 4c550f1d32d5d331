"""Stage 3, train: fit the model on the train split, validate every epoch, keep the best epoch.

Data lives on the device as uint8 for the whole run; each step gathers a batch by index, normalizes
and augments it there. Writes models/model.pt, metrics/train.json and plots/train_history.csv.
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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cnnpipe.checkpoint import save_checkpoint
from cnnpipe.data import (
    load_meta,
    load_split,
    normalize,
    random_flip,
    random_translate,
    stats_tensors,
    to_device,
)
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsutil import atomic_path, write_json
from cnnpipe.models import build_model
from cnnpipe.params import TrainParams
from cnnpipe.runtime import resolve_device, seed_everything, set_threads

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def make_optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    # No weight decay on BN and bias parameters (1-D tensors), as is standard.
    decay = [t for t in model.parameters() if t.ndim > 1]
    no_decay = [t for t in model.parameters() if t.ndim <= 1]
    groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if p.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, nesterov=p.momentum > 0)
    if p.optimizer == "adam":
        return torch.optim.Adam(groups, lr=p.lr)
    return torch.optim.AdamW(groups, lr=p.lr)


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


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   batch_size: int, channels_last: bool = False) -> torch.Tensor:
    """Logits for uint8 images already on the model's device, in batches."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = normalize(x[i: i + batch_size], mean, std)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        out.append(model(xb).float())
    return torch.cat(out) if out else torch.empty(0)


def train_epoch(model, optimizer, scheduler, x, y, mean, std, p: TrainParams, flip: bool,
                generator: torch.Generator, channels_last: bool, bar: tqdm | None) -> tuple[float, float, int]:
    """One pass over a fresh permutation; returns (mean loss, accuracy, images seen)."""
    model.train()
    n = len(x)
    perm = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
    steps = n // p.batch_size  # drop the ragged last batch: BN and the LR schedule prefer full batches
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for s in range(steps):
        idx = perm[s * p.batch_size: (s + 1) * p.batch_size]
        xb = normalize(x[idx], mean, std)  # B×C×H×W float
        yb = y[idx]
        xb = random_translate(xb, p.translate, generator)
        if flip:
            xb = random_flip(xb, generator)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb, label_smoothing=p.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if p.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(yb)
        correct += (logits.argmax(1) == yb).sum()
        if bar is not None:
            bar.update(len(yb))
            if s % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    seen = steps * p.batch_size
    return loss_sum.item() / seen, correct.item() / seen, seen


def evaluate_split(model, x, y, mean, std, batch_size: int, channels_last: bool) -> tuple[float, float]:
    logits = predict_logits(model, x, mean, std, batch_size, channels_last)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def write_history(path: str | Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def fingerprint(p: TrainParams, meta, n_train: int) -> str:
    """What a resume state must have been made with: every param but `resume`, and the data's shape."""
    params = {k: v for k, v in dataclasses.asdict(p).items() if k != "resume"}
    blob = json.dumps([params, meta.dataset, list(meta.shape), meta.classes, n_train], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_state(path: Path, state: dict) -> None:
    """The last completed epoch: model, optimizer, schedule and RNG states, history (atomic)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


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


def train(p: TrainParams, prepared: str | Path = "data/prepared", model_path: str | Path = "models/model.pt",
          metrics_path: str | Path = "metrics/train.json", history_path: str | Path = "plots/train_history.csv",
          state_path: str | Path | None = None) -> dict:
    """Train, validate every epoch, keep the best epoch. The last completed epoch is kept in `state_path`
    (default: beside the checkpoint, `.model.pt.resume`) until the run finishes."""
    device = resolve_device(p.device)
    set_threads(p.threads)
    seed_everything(p.seed)
    meta = load_meta(prepared)
    model = build_model(p.model, meta.shape, len(meta.classes))
    x_np, y_np = load_split(prepared, "train")
    if p.batch_size < 1 or p.batch_size > len(y_np):
        raise CnnpipeError(
            f"train.batch_size {p.batch_size} does not fit the {len(y_np)} training images; "
            "set train.batch_size between 1 and the train split size"
        )
    x, y = to_device(x_np, y_np, device)
    vx, vy = to_device(*load_split(prepared, "val"), device)
    mean, std = stats_tensors(meta, device)
    channels_last = True  # measured faster for these convnets on CPU (oneDNN) and on GPU
    model = model.to(device, memory_format=torch.channels_last)
    flip = p.flip and meta.flip
    optimizer = make_optimizer(model, p)
    steps_per_epoch = len(x) // p.batch_size
    scheduler = make_schedule(optimizer, p, p.epochs * steps_per_epoch)
    generator = torch.Generator(device=device).manual_seed(p.seed)

    state_path = Path(state_path) if state_path else Path(model_path).with_name(f".{Path(model_path).name}.resume")
    key = fingerprint(p, meta, len(y_np))
    history: list[dict] = []
    best: dict | None = None
    best_state = None
    images, elapsed, first = 0, 0.0, 1
    state = load_state(state_path, key) if p.resume else None
    if state is not None:  # continue after the last completed epoch, exactly as if never stopped
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, best, best_state = state["history"], state["best"], state["best_state"]
        images, elapsed, first = state["images"], state["seconds"], state["epoch"] + 1
        log.info("resuming after epoch %d from %s", state["epoch"], state_path)
    interactive = sys.stderr.isatty()  # a bar on a terminal; plain per-epoch lines in CI, DVC, Prefect
    start = time.perf_counter() - elapsed
    stopped_early = False
    for epoch in range(first, p.epochs + 1):
        t0 = time.perf_counter()
        bar = tqdm(total=steps_per_epoch * p.batch_size, unit="img", desc=f"epoch {epoch}/{p.epochs}",
                   leave=False, disable=None) if interactive else None
        tr_loss, tr_acc, seen = train_epoch(model, optimizer, scheduler, x, y, mean, std, p, flip, generator,
                                            channels_last, bar)
        if bar is not None:
            bar.close()
        images += seen
        va_loss, va_acc = evaluate_split(model, vx, vy, mean, std, 1000, channels_last)
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "train_loss": round(tr_loss, 5), "train_acc": round(tr_acc, 5),
               "val_loss": round(va_loss, 5), "val_acc": round(va_acc, 5),
               "lr": round(optimizer.param_groups[0]["lr"], 8), "seconds": round(seconds, 2)}
        history.append(row)
        log.info("epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  %.0f img/s  %.1fs",
                 epoch, p.epochs, tr_loss, tr_acc, va_loss, va_acc, seen / seconds, seconds)
        if best is None or va_acc > best["val_acc"]:
            best = row
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if p.resume:
            save_state(state_path, {
                "fingerprint": key, "epoch": epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
                "best": best, "best_state": best_state, "images": images,
                "seconds": time.perf_counter() - start})
        if p.patience > 0 and epoch - best["epoch"] >= p.patience:
            log.info("early stop: no better validation accuracy for %d epochs", p.patience)
            stopped_early = True
            break
    seconds = time.perf_counter() - start

    model.load_state_dict(best_state)
    save_checkpoint(model_path, model, p.model, meta,
                    {"epoch": best["epoch"], "val_acc": best["val_acc"], "train_params": dataclasses.asdict(p)})
    write_history(history_path, history)
    metrics = {
        "model": p.model,
        "dataset": meta.dataset,
        "best_epoch": best["epoch"],
        "val_loss": best["val_loss"],
        "val_acc": best["val_acc"],
        "epochs": p.epochs,
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "seconds": round(seconds, 2),
        "images_per_second": round(images / seconds, 1),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    write_json(metrics_path, metrics)
    state_path.unlink(missing_ok=True)  # finished: the next run starts fresh
    return metrics
