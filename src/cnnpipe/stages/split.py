"""Stage 2, split: parse the raw files into uint8 arrays and make a stratified train/validation split.

Writes data/prepared/{train,val,test}_{x,y}.npy (N×C×H×W uint8 images, N uint8 labels: np.load can
memory-map them), data/prepared/meta.json (classes, shape, normalization from the train split) and
metrics/split.json (images per split) and metrics/split.info.json (dataset, counts per class per split).
The official test set is kept as it is.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnpipe.core import own_images
from cnnpipe.core.catalog import get_dataset
from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.formats import CIFAR_TEST, CIFAR_TRAIN, read_cifar_tar, read_idx
from cnnpipe.core.fsutil import atomic_dir, write_metrics
from cnnpipe.core.params import SplitParams
from cnnpipe.core.prepared import Meta, write_meta

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


def resolve_size(size: int | float, n: int, name: str) -> int:
    """A count as it is; a fraction in (0, 1) of n, at least 1."""
    if isinstance(size, float):
        if not 0 < size < 1:
            raise CnnpipeError(f"split.{name} {size} must be a count or a fraction between 0 and 1")
        return max(1, round(size * n))
    return size


def stratified_split(y: np.ndarray, val_size: int | float, train_size: int | None, seed: int,
                     num_classes: int, class_names: list[str] | None = None,
                     held: str = "val") -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified indices (train, held out) into `y`; each class keeps its share in both. `held`
    names the part held out, for the errors: "val" (split.val_size), or "test" (split.test_size, own images
    without a test set: the rest is then training and validation images)."""
    n = len(y)
    val_size = resolve_size(val_size, n, f"{held}_size")
    train_size = n - val_size if train_size is None else train_size
    if val_size < 1 or train_size < 1 or val_size + train_size > n:
        raise CnnpipeError(
            f"split sizes do not fit: train_size {train_size} + val_size {val_size} must be between 2 and the {n} "
            "training images; lower split.val_size or split.train_size" if held == "val" else
            f"split sizes do not fit: test_size {val_size} must be 1 to {n - 1} of the {n} images (the rest are "
            "training and validation images); lower split.test_size")
    counts = np.bincount(y, minlength=num_classes)
    val_per = allocate(counts, val_size)
    train_per = allocate(counts - val_per, train_size) if train_size < n - val_size else counts - val_per
    starved = [c for c in range(num_classes) if counts[c] and (val_per[c] == 0 or train_per[c] == 0)]
    if starved:
        name = class_names[starved[0]] if class_names else starved[0]
        raise CnnpipeError(
            f"split sizes leave class {name} with no train or validation image ({counts[starved[0]]} in all); "
            "raise split.val_size/split.train_size or add images of that class" if held == "val" else
            f"split.test_size leaves class {name} with no test image or none to learn from "
            f"({counts[starved[0]]} in all); change split.test_size or add images of that class")
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


@dataclass
class Source:
    """What a split is made from: the official train (and test) sets, or the user's decoded images."""
    dataset: str
    classes: list[str]
    shape: tuple[int, int, int]
    flip: bool
    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray] | None  # None: carve a test split out of train
    paths: list[str] | None = None  # per image of train (then test), for the manifest
    test_paths: list[str] | None = None
    skipped: dict[str, str] | None = None
    decode_images_per_second: float | None = None


def builtin_source(raw_dir: Path, dataset: str) -> Source:
    spec = get_dataset(dataset)
    sets = load_raw(raw_dir, dataset)
    return Source(dataset, list(spec.classes), spec.shape, spec.flip, sets["train"], sets["test"])


def custom_source(raw_dir: Path, manifest: dict, p: SplitParams) -> Source:
    """Decode the user's images (a process pool), skipping unreadable ones up to split.max_bad_fraction."""
    kind = manifest["dataset"]
    root = raw_dir / manifest["root"] if manifest["in_raw"] else Path(manifest["root"])
    items: list[tuple[str, str, str]] = []  # (file, label, part)
    unsupported: list[str] = []
    if kind == "imagefolder":
        for part, folder in own_images.imagefolder_parts(root).items():
            found, other = own_images.list_imagefolder(folder)
            items += [(str(folder / rel), label, part) for rel, label in found]
            unsupported += [str(folder / rel) for rel in other]
    else:
        items = [(str(path), label, "all") for path, label in own_images.read_label_csv(root)]
    t0 = time.perf_counter()
    images, good, bad = own_images.decode_all([f for f, _, _ in items], p.channels, p.image_size, p.workers)
    rate = len(items) / max(time.perf_counter() - t0, 1e-9)
    skipped = {items[i][0]: reason for i, reason in bad.items()} | {f: "unsupported file type" for f in unsupported}
    total = len(items) + len(unsupported)
    if len(skipped) > p.max_bad_fraction * total:
        first = next(iter(skipped))
        raise CnnpipeError(
            f"{len(skipped)} of {total} files unreadable or unsupported (first: {first}: {skipped[first]}), over "
            f"split.max_bad_fraction {p.max_bad_fraction}; fix or remove them, or raise the threshold")
    kept = [items[i] for i in good]
    classes, y = own_images.label_indices(label for _, label, _ in kept)
    if len(classes) < 2 or len(classes) > 256:
        raise CnnpipeError(f"{root}: found {len(classes)} classes; need 2 to 256")
    y = y.astype(np.uint8)
    is_test = np.array([part == "test" for _, _, part in kept])
    untrained = sorted(set(range(len(classes))) - set(y[~is_test].tolist()))
    if untrained:
        names = ", ".join(classes[c] for c in untrained)
        raise CnnpipeError(f"{root}: class {names} has test images but no readable training images; add "
                           "training images for it under train/ or remove it from test/")
    paths = np.array([f for f, _, _ in kept], dtype=object)
    shape = (p.channels, p.image_size, p.image_size)
    test = (images[is_test], y[is_test]) if is_test.any() else None
    return Source(kind, classes, shape, p.flip, (images[~is_test], y[~is_test]), test,
                  paths=list(paths[~is_test]), test_paths=list(paths[is_test]), skipped=skipped,
                  decode_images_per_second=round(rate, 1))


def split(params: SplitParams, raw_dir: str | Path = "data/raw", out_dir: str | Path = "data/prepared",
          metrics_path: str | Path = "metrics/split.json") -> Path:
    raw_dir = Path(raw_dir)
    manifest = read_manifest(raw_dir)
    dataset = manifest["dataset"]
    src = custom_source(raw_dir, manifest, params) if dataset in own_images.KINDS else builtin_source(raw_dir, dataset)
    k = len(src.classes)
    train_x, train_y = src.train
    paths = {}
    if src.test is None:  # no test set of its own: a stratified test split first, then validation
        rest, te = stratified_split(train_y, params.test_size, None, params.seed + 1, k, src.classes, "test")
        test = (train_x[te], train_y[te])
        if src.paths is not None:
            paths["test"] = [src.paths[i] for i in te]
            src.paths = [src.paths[i] for i in rest]
        train_x, train_y = train_x[rest], train_y[rest]
    else:
        test = src.test
        paths["test"] = src.test_paths
    tr, va = stratified_split(train_y, params.val_size, params.train_size, params.seed, k, src.classes)
    arrays = {"train": (train_x[tr], train_y[tr]), "val": (train_x[va], train_y[va]), "test": test}
    if src.paths is not None:
        paths["train"] = [src.paths[i] for i in tr]
        paths["val"] = [src.paths[i] for i in va]
    mean, std = channel_stats(arrays["train"][0])
    meta = Meta(dataset, list(src.classes), tuple(src.shape), mean, std, src.flip,
                {s: int(len(arrays[s][1])) for s in SPLITS})
    with atomic_dir(out_dir) as tmp:
        for s, (x, y) in arrays.items():
            np.save(tmp / f"{s}_x.npy", np.ascontiguousarray(x, dtype=np.uint8))
            np.save(tmp / f"{s}_y.npy", np.ascontiguousarray(y, dtype=np.uint8))
        write_meta(tmp, meta)
        if src.paths is not None:
            write_manifest(tmp / "manifest.csv", paths, arrays, src.classes, src.skipped or {})
    counts = {s: np.bincount(arrays[s][1], minlength=k) for s in SPLITS}
    per_class = [{"class": name, **{s: int(counts[s][c]) for s in SPLITS}} for c, name in enumerate(src.classes)]
    metrics: dict = dict(meta.sizes)  # images per split
    info: dict = {"dataset": dataset, "per_class": per_class}
    if src.skipped is not None:
        info["skipped"] = len(src.skipped)
        info["decode_images_per_second"] = src.decode_images_per_second
        info["skipped_files"] = sorted(src.skipped)[:100]
    write_metrics(metrics_path, metrics, info)
    log.info("split %s: %s", dataset, meta.sizes)
    return Path(out_dir)


def write_manifest(path: Path, paths: dict[str, list[str]], arrays: dict, classes: list[str],
                   skipped: dict[str, str]) -> None:
    """Every image's fate: path, label, split (train/val/test, or skipped with the reason)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split", "reason"])
        for s in SPLITS:
            for file, label in zip(paths[s], arrays[s][1], strict=True):
                writer.writerow([file, classes[label], s, ""])
        for file, reason in sorted(skipped.items()):
            writer.writerow([file, "", "skipped", reason])
