"""Stage 4, evaluate: the trained model on the untouched test split.

Writes metrics/eval.json (accuracy, loss, macro and worst-class F1, seconds), metrics/eval.info.json (dataset, device,
TTA), plots/per_class.csv (precision, recall, F1 per class) and plots/confusion.csv, one {actual, predicted} row
per test image: DVC's confusion-matrix plot format. Beside them, pictures: confusion.png (normalized, with class
names), per_class.png (bars) and mistakes.png (the test images the model is most confident about and wrong).
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cnnpipe.core import cpushare
from cnnpipe.core.checkpoint import load_checkpoint, meta_of
from cnnpipe.core.data import stats_tensors, to_device
from cnnpipe.core.figures import confusion_figure, mistakes_grid, per_class_figure
from cnnpipe.core.fsutil import atomic_path, write_metrics
from cnnpipe.core.inference import tta_logits
from cnnpipe.core.params import EvaluateParams
from cnnpipe.core.prepared import check_same_data, load_meta, load_split
from cnnpipe.core.runtime import resolve_device, set_threads

log = logging.getLogger(__name__)


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """K×K counts, rows = actual class, columns = predicted class."""
    return np.bincount(actual * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, -1)


def per_class_scores(cm: np.ndarray, classes: list[str]) -> dict[str, dict[str, float]]:
    tp = np.diag(cm).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(tp / cm.sum(0))
        recall = np.nan_to_num(tp / cm.sum(1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return {
        name: {"precision": round(float(precision[i]), 4), "recall": round(float(recall[i]), 4),
               "f1": round(float(f1[i]), 4), "support": int(cm[i].sum())}
        for i, name in enumerate(classes)
    }


def write_confusion(path: str | Path, actual: np.ndarray, predicted: np.ndarray, classes: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[a], classes[b]) for a, b in zip(actual, predicted, strict=True))


def write_per_class(path: str | Path, scores: dict[str, dict[str, float]]) -> None:
    """One row per class (precision, recall, F1, support): a table `dvc plots` draws as bars."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        writer.writerows([name, v["precision"], v["recall"], v["f1"], v["support"]] for name, v in scores.items())


def draw(confusion_path: Path, per_class_path: Path, cm: np.ndarray, scores: dict, x: torch.Tensor,
         actual: np.ndarray, logits: torch.Tensor, classes: list[str]) -> None:
    """The pictures beside the tables: confusion.png, per_class.png, and mistakes.png (the most confident
    wrong answers) in the same folder."""
    confusion_figure(cm, classes, confusion_path.with_suffix(".png"))
    per_class_figure(scores, per_class_path.with_suffix(".png"))
    probs = torch.softmax(logits.float(), 1).cpu().numpy()
    mistakes_grid(x.cpu().numpy(), actual, probs, classes, confusion_path.with_name("mistakes.png"))


def use_flip_tta(asked: bool, flip_safe: bool, trained_on_mirrors: bool) -> bool:
    """Average each image's logits with its mirror's where asked, where a mirror keeps the label on the
    model's dataset, and where the model was trained on mirrored images: one that never saw them scores
    points lower with the mirror's logits than without (docs/benchmarks.md)."""
    return asked and flip_safe and trained_on_mirrors


@cpushare.registered
def evaluate(p: EvaluateParams, prepared: str | Path = "data/prepared", model_path: str | Path = "models/model.pt",
             metrics_path: str | Path = "metrics/eval.json",
             confusion_path: str | Path = "plots/confusion.csv",
             per_class_path: str | Path = "plots/per_class.csv") -> dict:
    device = resolve_device(p.device)
    set_threads(0)
    model, state = load_checkpoint(model_path, device)
    meta = meta_of(state)
    check_same_data(meta, load_meta(prepared), model_path, prepared)
    x, y = to_device(*load_split(prepared, "test"), device)
    mean, std = stats_tensors(meta, device)
    model = model.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    tta = use_flip_tta(p.tta_flip, meta.flip, state.get("train_params", {}).get("flip", True))
    if p.tta_flip and meta.flip and not tta:
        log.info("flip TTA off: %s was trained without mirrored images (train.flip: false)", model_path)
    logits = tta_logits(model, x, mean, std, p.batch_size, tta)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the kernels queued above, all counted
    seconds = time.perf_counter() - t0
    loss = F.cross_entropy(logits, y).item()
    actual = y.cpu().numpy()
    predicted = logits.argmax(1).cpu().numpy()
    cm = confusion_matrix(actual, predicted, len(meta.classes))
    scores = per_class_scores(cm, meta.classes)
    metrics = {
        "acc": round(float((actual == predicted).mean()), 5),
        "loss": round(loss, 5),
        "f1": round(float(np.mean([s["f1"] for s in scores.values()])), 5),  # macro average over classes
        "min_f1": min(s["f1"] for s in scores.values()),  # the worst class
        "sec": round(seconds, 3),
    }
    info = {"dataset": meta.dataset, "images": int(len(actual)), "device": str(device), "tta_flip": tta}
    write_confusion(confusion_path, actual, predicted, meta.classes)
    write_per_class(per_class_path, scores)
    draw(Path(confusion_path), Path(per_class_path), cm, scores, x, actual, logits, meta.classes)
    write_metrics(metrics_path, metrics, info)
    log.info("test accuracy %.4f  loss %.4f  on %d images", metrics["acc"], loss, len(actual))
    return metrics | info | {"per_class": scores}
