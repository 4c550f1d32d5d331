"""Typed, validated sections of params.yaml: one dataclass per DVC stage.

Every key must be present in params.yaml (DVC tracks them there), unknown keys are refused,
and each value is checked against its type, so a typo fails at once with a line naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cnnpipe.errors import CnnpipeError

DEFAULT_PARAMS = "params.yaml"


@dataclass(frozen=True)
class DownloadParams:
    dataset: str = "fashion-mnist"  # fashion-mnist | mnist | cifar10
    # Tried in order: "official" means the dataset's published URLs; other entries are mirror
    # directories, file:// or http(s):// base URLs holding the same file names.
    sources: list[str] = field(default_factory=lambda: ["official", "/usr/share/datasets/fashion-mnist"])
    # Per-file MD5 overrides for re-packed mirrors ({} = the published checksums).
    md5: dict[str, str] = field(default_factory=dict)
    retries: int = 3  # attempts per source for transient errors (timeouts, 5xx)
    timeout: float = 30.0  # seconds per network read
    max_bytes: int = 4_000_000_000  # largest unpacked size of an image archive (imagefolder/csv)


@dataclass(frozen=True)
class SplitParams:
    val_size: int | float = 5000  # held out for validation: a count, or a fraction (< 1) of the pool
    train_size: int | None = None  # None = all the rest; a number subsamples (quick experiments)
    seed: int = 0  # the split is a pure function of (data, sizes, seed)
    # Your own images (imagefolder / csv) only:
    test_size: int | float = 0.1  # test images when the source has no test set: a count or a fraction
    image_size: int = 32  # images are resized to image_size × image_size
    channels: int = 3  # 3 = RGB, 1 = grayscale
    max_bad_fraction: float = 0.05  # unreadable images are skipped and listed; more than this fails
    workers: int = 0  # decoding processes; 0 = one per core


@dataclass(frozen=True)
class TrainParams:
    model: str = "bncnn"  # lenet | simplecnn | cifarnet | cnn | bncnn | airnet
    epochs: int = 10  # measured here: 93.22 % test accuracy in 264 s on 2 CPU cores (12 epochs: 93.64 %, 333 s)
    batch_size: int = 128
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = 3e-3  # peak learning rate of the schedule
    weight_decay: float = 5e-4
    momentum: float = 0.9  # SGD only (Nesterov)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup: float = 0.2  # fraction of steps spent warming up (onecycle/cosine)
    label_smoothing: float = 0.1  # measured here: +0.05 to +0.15 points of test accuracy
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    patience: int = 0  # stop after this many epochs without a better validation accuracy; 0 = off
    resume: bool = True  # after an interruption (Ctrl-C, kill), continue after the last completed epoch
    translate: int = 0  # random shift in pixels on the device; 0 = off (best for short CPU schedules)
    flip: bool = True  # random horizontal flip (off for digits)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: each process its local rank's GPU)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 (else fp16) on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the training step: faster GPU steps after a one-off compile
    deterministic: bool = False  # GPU: deterministic kernels, no cudnn autotuning (CPU is deterministic anyway)
    seed: int = 0
    threads: int = 0  # CPU threads; 0 = torch's default


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 1000  # inference only: large batches are fastest
    device: str = "auto"
    tta_flip: bool = True  # average the logits of each image and its mirror (where flips are label-safe)


@dataclass(frozen=True)
class ExportParams:
    opset: int = 18
    check_images: int = 256  # test images run through both PyTorch and onnxruntime
    atol: float = 1e-3  # largest allowed |onnx - torch| on the logits


@dataclass(frozen=True)
class QuantizeParams:
    calibration_images: int = 512  # validation images that set the int8 activation ranges
    per_channel: bool = True  # one weight scale per output channel: closer to fp32 accuracy
    # 7-bit weights: CPUs without VNNI (AVX2 only) saturate int16 sums with full 8-bit weights;
    # measured here: int8 test accuracy 0.8995 without it, 0.9201 with it (fp32 0.9209).
    reduce_range: bool = True
    latency_runs: int = 200  # batch-1 runs timed for the p50/p99 latency in metrics/quantize.json


SECTIONS: dict[str, type] = {
    "download": DownloadParams,
    "split": SplitParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "export": ExportParams,
    "quantize": QuantizeParams,
}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(value: Any, tp: Any) -> bool:
    """Is `value` (as parsed from YAML) acceptable for annotation `tp`?"""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_check(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_check(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _check(k, args[0]) and _check(v, args[1]) for k, v in value.items()
        )
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, tp)


def parse_section(name: str, raw: Any, source: str = DEFAULT_PARAMS) -> Any:
    """Validate one section's mapping and build its dataclass."""
    cls = SECTIONS[name]
    if not isinstance(raw, dict):
        raise CnnpipeError(f"{source}: section '{name}' is missing or not a mapping; add '{name}:' with its keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise CnnpipeError(
            f"{source}: unknown key {name}.{unknown[0]}; valid keys are: {', '.join(fields)}"
        )
    values = {}
    for key, f in fields.items():
        if key not in raw:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            raise CnnpipeError(f"{source}: {name}.{key} is missing; add it (default: {default!r})")
        value = raw[key]
        if not _check(value, hints[key]):
            raise CnnpipeError(
                f"{source}: {name}.{key} must be {_type_name(hints[key])}, got {value!r}; fix the value"
            )
        if hints[key] is float and isinstance(value, int):
            value = float(value)
        values[key] = value
    return cls(**values)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CnnpipeError(f"{path}: not found; run from the project root or pass --params PATH")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CnnpipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from e
    if not isinstance(data, dict):
        raise CnnpipeError(f"{path}: must be a mapping of sections (download, split, train, ...)")
    return data


def load_section(name: str, path: str | Path = DEFAULT_PARAMS) -> Any:
    return parse_section(name, read_yaml(path).get(name), str(path))


def defaults() -> dict[str, dict]:
    """All sections at their defaults, as plain dicts (what params.yaml holds)."""
    return {name: dataclasses.asdict(cls()) for name, cls in SECTIONS.items()}
