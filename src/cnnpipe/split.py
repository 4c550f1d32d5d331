"""Stage 2, split: parse the raw files into uint8 arrays and make a stratified train/validation split.

Writes data/prepared/{train,val,test}_{x,y}.npy (N×C×H×W uint8 images, N uint8 labels: np.load can
memory-map them), data/prepared/meta.json (classes, shape, normalization from the train split) and
metrics/split.json (counts per class per split). The official test set is kept as it is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from cnnpipe.datasets import get_dataset
from cnnpipe.errors import CnnpipeError
from cnnpipe.formats import CIFAR_TEST, CIFAR_TRAIN, read_cifar_tar, read_idx
from cnnpipe.fsutil import atomic_dir, write_json
from cnnpipe.params import SplitParams

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def read_manifest(raw_dir: Path) -> dict:
    path = raw_dir / "manifest.json"
    if not path.is_file():
        raise CnnpipeError(f"{path}: not found; run the download stage first (dvc repro download)")
    return json.loads(path.read_text())


def load_raw(raw_dir: Path, dataset: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The official train and test sets as (images N×C×H×W uint8, labels N uint8)."""
    spec = get_dataset(dataset)
    d = raw_dir / dataset
    if spec.format == "idx":
        sets = {}
        for part, prefix in (("train", "train"), ("test", "t10k")):
            x = read_idx(d / f"{prefix}-images-idx3-ubyte.gz")
            y = read_idx(d / f"{prefix}-labels-idx1-ubyte.gz")
            if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                raise CnnpipeError(
                    f"{d}: {prefix} images {x.shape} and labels {y.shape} do not match; rerun download"
                )
            sets[part] = (x[:, None], y)
    else:
        archive = d / spec.files[0].name
        sets = {"train": read_cifar_tar(archive, CIFAR_TRAIN), "test": read_cifar_tar(archive, CIFAR_TEST)}
    for part, (x, y) in sets.items():
        if x.shape[1:] != spec.shape:
            raise CnnpipeError(f"{d}: {part} images are {x.shape[1:]}, expected {spec.shape}; rerun download")
        if y.size and y.max() >= len(spec.classes):
            raise CnnpipeError(f"{d}: {part} label {y.max()} out of range for {len(spec.classes)} classes")
    return sets


def allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split `total` across classes in proportion to `counts` (largest remainder, ties by class)."""
    exact = counts * total / counts.sum()
    alloc = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(len(counts)), -(exact - alloc)))
    alloc[order[: total - alloc.sum()]] += 1
    return alloc


def stratified_split(y: np.ndarray, val_size: int, train_size: int | None, seed: int,
                     num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified indices (train, val) into `y`; each class keeps its share in both."""
    n = len(y)
    train_size = n - val_size if train_size is None else train_size
    if val_size < 1 or train_size < 1 or val_size + train_size > n:
        raise CnnpipeError(
            f"split sizes do not fit: train_size {train_size} + val_size {val_size} must be between 2 and "
            f"the {n} training images; lower split.val_size or split.train_size"
        )
    counts = np.bincount(y, minlength=num_classes)
    val_per = allocate(counts, val_size)
    train_per = allocate(counts - val_per, train_size) if train_size < n - val_size else counts - val_per
    starved = [c for c in range(num_classes) if counts[c] and (val_per[c] == 0 or train_per[c] == 0)]
    if starved:
        raise CnnpipeError(
            f"split sizes leave class {starved[0]} with no train or validation image "
            f"({counts[starved[0]]} in all); raise split.val_size/split.train_size or use more data"
        )
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        val_idx.append(idx[: val_per[c]])
        train_idx.append(idx[val_per[c]: val_per[c] + train_per[c]])
    # Sorted: the arrays keep the file's order, and the split is a pure function of (y, sizes, seed).
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, on the 0-1 scale."""
    x = x.reshape(x.shape[0], x.shape[1], -1)
    mean = [float(x[:, c].mean(dtype=np.float64) / 255) for c in range(x.shape[1])]
    std = [float(x[:, c].std(dtype=np.float64) / 255) for c in range(x.shape[1])]
    return mean, std


def split(params: SplitParams, raw_dir: str | Path = "data/raw", out_dir: str | Path = "data/prepared",
          metrics_path: str | Path = "metrics/split.json") -> Path:
    raw_dir = Path(raw_dir)
    dataset = read_manifest(raw_dir)["dataset"]
    spec = get_dataset(dataset)
    sets = load_raw(raw_dir, dataset)
    train_x, train_y = sets["train"]
    tr, va = stratified_split(train_y, params.val_size, params.train_size, params.seed, len(spec.classes))
    arrays = {
        "train": (train_x[tr], train_y[tr]),
        "val": (train_x[va], train_y[va]),
        "test": sets["test"],
    }
    mean, std = channel_stats(arrays["train"][0])
    meta = {
        "dataset": dataset,
        "classes": list(spec.classes),
        "shape": list(spec.shape),
        "mean": mean,
        "std": std,
        "flip": spec.flip,
        "sizes": {s: int(len(arrays[s][1])) for s in SPLITS},
    }
    with atomic_dir(out_dir) as tmp:
        for s, (x, y) in arrays.items():
            np.save(tmp / f"{s}_x.npy", np.ascontiguousarray(x, dtype=np.uint8))
            np.save(tmp / f"{s}_y.npy", np.ascontiguousarray(y, dtype=np.uint8))
        write_json(tmp / "meta.json", meta)
    counts = {
        s: {spec.classes[c]: int(n) for c, n in enumerate(np.bincount(arrays[s][1], minlength=len(spec.classes)))}
        for s in SPLITS
    }
    write_json(metrics_path, {"dataset": dataset, "sizes": meta["sizes"], "per_class": counts})
    log.info("split %s: %s", dataset, meta["sizes"])
    return Path(out_dir)
