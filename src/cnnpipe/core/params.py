"""Typed, validated sections of params.yaml: one dataclass per DVC stage.

Every key must be present in params.yaml (DVC tracks them there), unknown keys are refused, and each value is
checked against its type and its allowed range (`param(...)` below) before a stage loads any data, so a typo or
an out-of-range value fails at once with one line naming the key, the value, what is allowed and the fix.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cnnpipe import DEFAULT_PARAMS
from cnnpipe.core.errors import CnnpipeError


def param(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None, factory: Any = dataclasses.MISSING,
          fraction_or_count: bool = False, zero: str | None = None, pattern: tuple[str, str] | None = None) -> Any:
    """A field with its allowed values: ge/gt/le/lt bound a number; `fraction_or_count` allows a count ≥ 1 or a
    fraction in (0, 1); `zero` says what 0 means where it is allowed as a special value; `pattern` is (a regular
    expression a string must match whole, the allowed values in words)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = {"bounds": bounds, "fraction_or_count": fraction_or_count, "zero": zero, "pattern": pattern}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


SEED_MAX = 2**32 - 1  # numpy's legacy seeding takes 32-bit seeds
DEVICE = (r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N")
Dataset = Literal["fashion-mnist", "mnist", "cifar10", "imagefolder", "csv"]
Model = Literal["lenet", "simplecnn", "cifarnet", "cnn", "bncnn", "rescnn", "airnet"]


@dataclass(frozen=True)
class DownloadParams:
    dataset: Dataset = "fashion-mnist"  # built-in datasets, or your own images (imagefolder | csv)
    # Tried in order: "official" means the dataset's published URLs; other entries are mirror
    # directories, file:// or http(s):// base URLs holding the same file names.
    sources: list[str] = param(factory=lambda: ["official", "/usr/share/datasets/fashion-mnist"])
    # Per-file MD5 overrides for re-packed mirrors ({} = the published checksums).
    md5: dict[str, str] = param(factory=dict)
    retries: int = param(3, ge=1, le=100)  # attempts per source for transient errors (timeouts, 5xx)
    timeout: float = param(30.0, gt=0, le=3600)  # seconds per network read
    max_bytes: int = param(4_000_000_000, ge=1)  # largest unpacked size of an image archive (imagefolder/csv)


@dataclass(frozen=True)
class SplitParams:
    val_size: int | float = param(5000, fraction_or_count=True)  # held out for validation: a count or a fraction
    train_size: int | None = param(None, ge=1)  # None = all the rest; a number subsamples (quick experiments)
    seed: int = param(0, ge=0, le=SEED_MAX)  # the split is a pure function of (data, sizes, seed)
    # Your own images (imagefolder / csv) only:
    test_size: int | float = param(0.1, fraction_or_count=True)  # test images when the source has none
    image_size: int = param(32, ge=4, le=1024)  # images are resized to image_size × image_size
    channels: Literal[1, 3] = 3  # 3 = RGB, 1 = grayscale
    max_bad_fraction: float = param(0.05, ge=0, le=1)  # unreadable images are skipped and listed; more fails
    workers: int = param(0, ge=0, le=1024, zero="one per core")  # decoding processes
    flip: bool = False  # does a left-right mirror keep the label? (flip augmentation and flip TTA use it)


@dataclass(frozen=True)
class TrainParams:
    model: Model = "rescnn"  # architectures in src/cnnpipe/core/models.py
    epochs: int = param(9, ge=1, le=100_000)
    batch_size: int = param(128, ge=1, le=1_000_000)  # also at most the train split's size
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = param(3e-3, gt=0, le=10)  # peak learning rate of the schedule
    weight_decay: float = param(5e-4, ge=0, le=1)
    norm_lr: float = param(10.0, gt=0, le=1000)  # batch norm's scales and shifts, and biases: lr × norm_lr
    momentum: float = param(0.9, ge=0, lt=1)  # SGD only (Nesterov)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup: float = param(0.2, ge=0, le=1)  # fraction of steps spent warming up (onecycle/cosine)
    label_smoothing: float = param(0.1, ge=0, lt=1)
    grad_clip: float = param(0.0, ge=0, zero="off")  # max gradient norm
    patience: int = param(0, ge=0, zero="off")  # stop after this many epochs without a better val accuracy
    resume: bool = True  # after an interruption (Ctrl-C, kill), continue after the last completed epoch
    translate: int = param(0, ge=0, le=512, zero="off")  # random shift in pixels on the device (< image size)
    flip: bool = True  # random horizontal flip (only where the dataset's flips keep labels)
    device: str = param("auto", pattern=DEVICE)  # auto | cpu | cuda | cuda:N (torchrun: local rank's GPU)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # GPU: bf16, else fp16; CPU: cpuprecision.py
    compile: bool = False  # torch.compile the training step (a one-off compile; see docs/benchmarks.md)
    deterministic: bool = False  # GPU: deterministic kernels, no cudnn autotuning (CPU is deterministic anyway)
    seed: int = param(0, ge=0, le=SEED_MAX)
    threads: int = param(0, ge=0, le=1024, zero="its share of the cores")  # CPU threads
    tag: str = param("", pattern=(r"[A-Za-z0-9._-]{0,100}", "letters, digits, '.', '_' or '-'"))  # a run's label


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = param(1000, ge=1, le=1_000_000)  # inference only: large batches are fastest
    device: str = param("auto", pattern=DEVICE)
    tta_flip: bool = True  # average each image's and its mirror's logits (label-safe data, model trained on flips)


@dataclass(frozen=True)
class ExportParams:
    opset: int = param(18, ge=18, le=23)  # ONNX opsets the exporter and onnxruntime both support
    check_images: int = param(512, ge=1, le=1_000_000)  # test images run through both PyTorch and onnxruntime
    atol: float = param(1e-3, gt=0, le=1)  # largest allowed |onnx - torch| on the logits


@dataclass(frozen=True)
class QuantizeParams:
    calibration_images: int = param(512, ge=1, le=1_000_000)  # validation images that set activation ranges
    per_channel: bool = True  # one weight scale per output channel: closer to fp32 accuracy
    reduce_range: bool = True  # 7-bit weights: no int16 saturation on CPUs without VNNI (AVX2 only)
    latency_runs: int = param(200, ge=1, le=100_000)  # batch-1 runs timed for the p50/p99 latency


@dataclass(frozen=True)
class PromoteParams:
    stage: str = param("prod", pattern=(r"[a-z][a-z0-9-]*", "a lowercase stage name such as prod"))
    # each rule: "<stage>.<metric> >= <number>", "... <= <number>" or "... >= prod - <number>" (production's
    # value of the same metric, plus or minus a margin); every rule must hold for a run to be promoted
    rules: list[str] = param(factory=lambda: ["eval.acc >= 0.9", "eval.acc >= prod - 0.002",
                                              "quantize.drop <= 0.01"])


SECTIONS: dict[str, type] = {
    "download": DownloadParams,
    "split": SplitParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "export": ExportParams,
    "quantize": QuantizeParams,
    "promote": PromoteParams,
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
        return any(value == a and type(value) is type(a) for a in args)
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
        problem = range_problem(value, f.metadata)
        if problem:
            raise CnnpipeError(f"{source}: {name}.{key} is {value!r}, {problem}; set {name}.{key} to "
                               f"{allowed(f.metadata, hints[key])}")
        if hints[key] is float and isinstance(value, int):
            value = float(value)
        values[key] = value
    return cls(**values)


_WORDS = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}
_TESTS = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def range_problem(value: Any, meta: typing.Mapping[str, Any]) -> str | None:
    """Why a well-typed value is outside its field's allowed values (None if it is inside)."""
    if isinstance(value, str):
        pattern = meta.get("pattern")
        return "not a known value" if pattern and not re.fullmatch(pattern[0], value) else None
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    if meta.get("fraction_or_count"):
        ok = 0 < value < 1 if isinstance(value, float) else 1 <= value <= 10**9
        return None if ok else "out of range"
    bounds = meta.get("bounds", {})
    return None if all(_TESTS[op](value, b) for op, b in bounds.items()) else "out of range"


def allowed(meta: typing.Mapping[str, Any], tp: Any) -> str:
    """The allowed values in words, e.g. 'a whole number from 1 to 100000' or 'a number at least 0 (0 = off)'."""
    if meta.get("pattern"):
        return meta["pattern"][1]
    if meta.get("fraction_or_count"):
        return "a whole count from 1 to 1000000000 or a fraction strictly between 0 and 1 (e.g. 5000 or 0.1)"
    whole = tp is int or (typing.get_origin(tp) in (typing.Union, types.UnionType) and float not in typing.get_args(tp))
    kind = "a whole number" if whole else "a number"
    bounds = {op: str(b) if isinstance(b, int) else f"{b:g}" for op, b in meta.get("bounds", {}).items()}
    if "ge" in bounds and "le" in bounds:
        text = f"{kind} from {bounds['ge']} to {bounds['le']}"
    else:
        text = " and ".join([kind, *(f"{_WORDS[op]} {b}" for op, b in bounds.items())]).replace(" and ", " ", 1)
    if meta.get("zero"):
        text += f" (0 = {meta['zero']})"
    return text


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
