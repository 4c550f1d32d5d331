"""What the exporter, the quantizer and the predictor agree on about an ONNX model: the metadata that describes
its data, how pixels are normalized into its input, and how an onnxruntime session is set up. numpy and
onnxruntime only (no torch)."""

from __future__ import annotations

import ctypes
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnpipe.core import cpushare
from cnnpipe.core.errors import CnnpipeError


@dataclass(frozen=True)
class ModelMeta:
    """What the export stage writes into an ONNX model's metadata besides the graph: the model's name and the
    data it was trained on."""
    model: str
    dataset: str
    classes: list[str]
    input_shape: tuple[int, int, int]  # C, H, W
    mean: list[float]  # per channel, 0-1 scale
    std: list[float]


def write_metadata(state: Mapping) -> dict[str, str]:
    """A checkpoint's ModelMeta fields as ONNX metadata (str -> str, values JSON)."""
    return {
        "cnnpipe.model": state["model"],
        "cnnpipe.dataset": state["dataset"],
        "cnnpipe.classes": json.dumps(state["classes"]),
        "cnnpipe.input_shape": json.dumps(state["input_shape"]),
        "cnnpipe.mean": json.dumps(state["mean"]),
        "cnnpipe.std": json.dumps(state["std"]),
        "cnnpipe.input_scale": "255",  # inputs are (pixels/255 - mean) / std, float32, N×C×H×W
    }


def read_metadata(props: Mapping[str, str], path: str | Path) -> ModelMeta:
    """ModelMeta from an ONNX model's metadata (onnx's metadata_props or onnxruntime's custom_metadata_map)."""
    try:
        return ModelMeta(props["cnnpipe.model"], props["cnnpipe.dataset"], json.loads(props["cnnpipe.classes"]),
                         tuple(json.loads(props["cnnpipe.input_shape"])), json.loads(props["cnnpipe.mean"]),
                         json.loads(props["cnnpipe.std"]))
    except (KeyError, ValueError) as e:
        raise CnnpipeError(f"{path}: the ONNX file lacks cnnpipe's metadata ({e}); export the model with "
                           "`dvc repro export` (or `cnnpipe export`)") from e


def normalize_pixels(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """N×C×H×W pixels (0-255) -> float32 (pixels/255 - mean) / std, as in training."""
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return ((pixels.astype(np.float32) / 255 - m) / s).astype(np.float32)


def gpu_present() -> bool:
    """Is a CUDA driver with at least one device really there? (asked without torch or onnxruntime)"""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise CnnpipeError(f"onnxruntime provider {missing[0]} is not available here ({', '.join(available)})")
        return list(requested)
    if "CUDAExecutionProvider" in available and gpu_present():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or cpushare.share()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle threads sleep instead of spinning: a server that waits for requests should not burn CPU.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts
