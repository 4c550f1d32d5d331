"""The pictures the stages write beside their metrics: PNGs that `dvc plots show` and `dvc plots diff` display.

Train draws its loss and accuracy curves; evaluate draws the normalized confusion matrix, precision, recall and
F1 per class, and the test images the model gets wrong with the most confidence. matplotlib's Agg backend, no
display needed; the files carry no timestamp, so the same results give the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnnpipe.core.fsutil import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, description: str = "") -> Path:
    """Write the figure as a PNG; `description` goes into its Description text chunk."""
    plt = _pyplot()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    metadata = {"Software": None} | ({"Description": description} if description else {})
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata=metadata, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def accuracy_notes(history: Sequence[dict], kept_epoch: int) -> list[tuple[str, dict]]:
    """The validation points the accuracy plot labels: the epoch whose weights the run kept and, where
    validation peaked at another epoch, that one, so the peak is not read as the saved model."""
    kept = next((r for r in history if r["epoch"] == kept_epoch), None)
    if kept is None:
        raise ValueError(f"epoch {kept_epoch} is not in the training history (epochs {history[0]['epoch']} to "
                         f"{history[-1]['epoch']})")
    notes = [(f"kept {kept['val_acc']:.2%}\n(epoch {kept['epoch']})", kept)]
    best = max(history, key=lambda r: r["val_acc"])
    if best["val_acc"] > kept["val_acc"]:
        notes.append((f"best {best['val_acc']:.2%}\n(epoch {best['epoch']}, not kept)", best))
    return notes


def training_curves(history: Sequence[dict], path: str | Path, kept_epoch: int, train_note: str = "") -> Path:
    """Loss and accuracy per epoch, train beside validation (rows of plots/train_history.csv), with the
    epoch whose weights the run kept marked. `train_note` says how the train figures were measured where they
    differ from validation's (e.g. label smoothing)."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (loss, acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((loss, "loss", "Loss"), (acc, "acc", "Accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label="train", color="tab:blue")
        ax.plot(epochs, [r[f"val_{key}"] for r in history], "s-", label="validation", color="tab:orange")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    notes = accuracy_notes(history, kept_epoch)
    for (text, row), offset in zip(notes, ((-60, -34), (-70, -64)), strict=False):
        acc.annotate(text, (row["epoch"], row["val_acc"]), textcoords="offset points", xytext=offset,
                     arrowprops={"arrowstyle": "->"})
    from matplotlib.ticker import PercentFormatter

    acc.yaxis.set_major_formatter(PercentFormatter(1.0))
    fig.suptitle("Training" + (f" (train loss and accuracy: {train_note})" if train_note else ""))
    return _save(fig, path, "Validation accuracy: " + "; ".join(text.replace("\n", " ") for text, _ in notes))


def confusion_figure(cm: np.ndarray, classes: Sequence[str], path: str | Path) -> Path:
    """Rows: the true class, normalized to 100 %; columns: what the model predicted. The diagonal is recall."""
    plt = _pyplot()
    k = len(classes)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.nan_to_num(cm / cm.sum(1, keepdims=True))
    size = max(5.0, 0.62 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=40, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true class")
    if k <= 20:  # the share in each cell, where cells are big enough to read
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, f"{share[i, j]:.0%}" if share[i, j] >= 0.01 else "<1%", ha="center",
                            va="center", fontsize=8, color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, format=lambda v, _: f"{v:.0%}")
    ax.set_title(f"Confusion matrix, test set ({int(cm.sum()):,} images; each row sums to 100 %)")
    return _save(fig, path)


def per_class_figure(scores: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Precision, recall and F1 per class as grouped horizontal bars, the worst F1 at the top."""
    plt = _pyplot()
    names = sorted(scores, key=lambda c: scores[c]["f1"], reverse=True)
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.5 * len(names) + 1)))
    for offset, key, color in ((0.27, "precision", "tab:blue"), (0.0, "recall", "tab:orange"),
                               (-0.27, "f1", "tab:green")):
        ax.barh(y + offset, [scores[c][key] for c in names], height=0.26, label=key, color=color)
    for i, c in enumerate(names):
        ax.text(scores[c]["f1"] + 0.004, i - 0.27, f"F1 {scores[c]['f1']:.3f}", va="center", fontsize=7)
    low = min(min(s["precision"], s["recall"], s["f1"]) for s in scores.values())
    ax.set_xlim(max(0.0, np.floor(low * 10) / 10 - 0.05), 1.04)
    ax.set_yticks(y, names)
    ax.set_xlabel("score on the test set")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncols=3, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Precision, recall and F1 per class")
    return _save(fig, path)


def confident_mistakes(probs: np.ndarray, actual: np.ndarray, n: int) -> np.ndarray:
    """Indices of the `n` wrong predictions with the highest predicted probability, most confident first."""
    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != actual)
    confidence = probs[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")[:n]]


def mistakes_grid(images: np.ndarray, actual: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                  path: str | Path, n: int = 24, cols: int = 6) -> Path:
    """The test images the model is most confident about and wrong: each with its true class, the predicted one
    and the predicted probability. `images` are uint8 N×C×H×W."""
    plt = _pyplot()
    chosen = confident_mistakes(probs, actual, n)
    rows = max(1, -(-len(chosen) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.25), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, chosen, strict=False):
        image = images[i].transpose(1, 2, 0)
        if image.shape[2] == 1:
            ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(image)
        guess = int(probs[i].argmax())
        ax.set_title(f"true: {classes[actual[i]]}\npred: {classes[guess]} {probs[i, guess]:.0%}", fontsize=8,
                     color="firebrick")
    wrong = int((probs.argmax(1) != actual).sum())
    fig.suptitle(f"The {len(chosen)} most confident mistakes ({wrong:,} of {len(actual):,} test images are wrong)")
    return _save(fig, path)
