"""The prepared data folder the split stage writes (data/prepared): meta.json and one pair of uint8 arrays per
split. numpy only: what every stage and the benchmarks read, and the one writer of meta.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.fsutil import write_json


@dataclass(frozen=True)
class Meta:
    dataset: str
    classes: list[str]
    shape: tuple[int, int, int]  # C, H, W
    mean: list[float]  # per channel, 0-1 scale
    std: list[float]
    flip: bool  # is a horizontal flip label-preserving for this dataset?
    sizes: dict[str, int] | None = None  # images per split (train, val, test), as written by the split stage


def load_meta(prepared: str | Path) -> Meta:
    path = Path(prepared) / "meta.json"
    if not path.is_file():
        raise CnnpipeError(f"{path}: not found; run the split stage first (dvc repro split)")
    m = json.loads(path.read_text())
    return Meta(m["dataset"], m["classes"], tuple(m["shape"]), m["mean"], m["std"], m["flip"], m.get("sizes"))


def check_same_data(model: Meta, data: Meta, model_path: str | Path, prepared: str | Path) -> None:
    """A model is scored or checked only on data like its training data: the same dataset, image shape and
    classes in the same order (own images are all named imagefolder or csv: the classes tell them apart)."""
    difference = data_difference(model, data)
    if difference:
        raise CnnpipeError(f"{model_path} was trained on other data than {prepared} holds ({difference}); rerun "
                           "the pipeline (dvc repro) to train on this data")


def data_difference(model: Meta, data: Meta) -> str | None:
    """What first differs between the model's training data and the data, in words; None if nothing does."""
    if model.dataset != data.dataset:
        return f"dataset {model.dataset} for the model, {data.dataset} here"
    if list(model.shape) != list(data.shape):
        return f"images {'×'.join(map(str, model.shape))} for the model, {'×'.join(map(str, data.shape))} here"
    mine, theirs = list(model.classes), list(data.classes)
    if len(mine) != len(theirs):
        return f"{len(mine)} classes for the model, {len(theirs)} here"
    for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        if a != b:
            return f"class {i} is {a!r} for the model, {b!r} here"
    return None


def write_meta(directory: str | Path, meta: Meta) -> Path:
    data = dataclasses.asdict(meta)
    data["shape"] = list(meta.shape)
    if meta.sizes is None:
        del data["sizes"]
    return write_json(Path(directory) / "meta.json", data)


def spread(n: int, k: int) -> np.ndarray:
    """min(n, k) indices spread evenly over range(n): a fair sample of a split in any order, and own images'
    splits are stored class by class (the folders' order), where the first k would hold one or two classes."""
    k = min(n, k)
    return np.linspace(0, n - 1, k).round().astype(np.int64) if k > 0 else np.zeros(0, np.int64)


def load_split(prepared: str | Path, name: str, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(images N×C×H×W uint8, labels N uint8) of one split."""
    prepared = Path(prepared)
    mode = "r" if mmap else None
    try:
        return np.load(prepared / f"{name}_x.npy", mmap_mode=mode), np.load(prepared / f"{name}_y.npy")
    except FileNotFoundError as e:
        raise CnnpipeError(f"{e.filename}: not found; run the split stage first (dvc repro split)") from e
