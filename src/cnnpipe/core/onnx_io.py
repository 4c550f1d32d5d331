"""What the exporter, the quantizer and the predictor agree on about an ONNX model: how pixels are normalized
into its input, and how an onnxruntime session is set up. numpy and onnxruntime only (no torch)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

from cnnpipe.core import cpushare
from cnnpipe.core.errors import CnnpipeError


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
