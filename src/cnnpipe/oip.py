"""The Open Inference Protocol (KServe v2, REST): tensors in and out of a cnnpipe model.

Inputs: `input` (FP32, N×C×H×W, already normalized: what the ONNX graph takes) or `pixels` (UINT8, N×C×H×W,
0-255: normalized here as in training). Outputs: `logits` and `probabilities` (FP32, N×K) and `label` (BYTES,
N: the top class). `data` may be flat (row-major) or nested; an `id` in the request is echoed. Errors are
raised as OipError with the 4xx status the protocol asks for and a message for `{"error": ...}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnpipe.predictor import ModelInfo, normalize_pixels

DATATYPES = {"FP32": np.float32, "UINT8": np.uint8}
INPUTS = {"input": "FP32", "pixels": "UINT8"}
OUTPUTS = ("logits", "probabilities", "label")


class OipError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Request:
    x: np.ndarray  # N×C×H×W normalized float32
    outputs: list[str]
    id: str | None


def model_name(info: ModelInfo) -> str:
    return info.model


def model_version(info: ModelInfo) -> str:
    """The first 12 hex digits of the ONNX file's SHA-256: a new export is a new version."""
    return info.sha256[:12]


def model_metadata(info: ModelInfo, platform: str = "onnxruntime_onnx") -> dict[str, Any]:
    c, h, w = info.input_shape
    k = len(info.classes)
    return {
        "name": model_name(info),
        "versions": [model_version(info)],
        "platform": platform,
        "inputs": [{"name": name, "datatype": dtype, "shape": [-1, c, h, w]} for name, dtype in INPUTS.items()],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, k]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]}],
    }


def parse_request(body: Any, info: ModelInfo, max_images: int) -> Request:
    """Validate an infer request body (already parsed JSON) and return the model's input."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or len(body["inputs"]) != 1:
        raise OipError(400, 'the request must be {"inputs": [one tensor]} with the tensor "input" (FP32) or '
                            '"pixels" (UINT8)')
    tensor = body["inputs"][0]
    if not isinstance(tensor, dict):
        raise OipError(400, "each input must be an object with name, shape, datatype and data")
    name, dtype, shape, data = (tensor.get(k) for k in ("name", "datatype", "shape", "data"))
    if name not in INPUTS:
        raise OipError(400, f"unknown input {name!r}; this model takes 'input' (FP32) or 'pixels' (UINT8)")
    if dtype != INPUTS[name]:
        raise OipError(400, f"input {name!r} must have datatype {INPUTS[name]}, got {dtype!r}")
    expected = list(info.input_shape)
    if (not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(d, int) for d in shape)
            or shape[1:] != expected or shape[0] < 1):
        raise OipError(400, f"input {name!r} shape must be [N, {', '.join(map(str, expected))}] with N ≥ 1, "
                            f"got {shape!r}")
    if shape[0] > max_images:
        raise OipError(413, f"{shape[0]} images in one request; the limit is {max_images}")
    x = to_array(data, shape, dtype)
    if name == "pixels":
        x = normalize_pixels(x, info.mean, info.std)
    outputs = parse_outputs(body.get("outputs"))
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise OipError(400, "id must be a string")
    return Request(np.ascontiguousarray(x, np.float32), outputs, request_id)


def to_array(data: Any, shape: list[int], dtype: str) -> np.ndarray:
    if not isinstance(data, list):
        raise OipError(400, "tensor data must be a JSON array (flat in row-major order, or nested)")
    try:
        flat = np.asarray(data, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError) as e:
        raise OipError(400, "tensor data must be numbers in a flat or rectangular nested array") from e
    if flat.size != int(np.prod(shape)):
        raise OipError(400, f"tensor data has {flat.size} values; shape {shape} needs {int(np.prod(shape))}")
    if not np.isfinite(flat).all():
        raise OipError(400, "tensor data holds NaN or infinite values")
    if dtype == "UINT8" and (flat.min() < 0 or flat.max() > 255 or not np.array_equal(flat, np.round(flat))):
        raise OipError(400, "UINT8 data must be whole numbers from 0 to 255")
    return flat.astype(DATATYPES[dtype]).reshape(shape)


def parse_outputs(raw: Any) -> list[str]:
    if raw is None:
        return list(OUTPUTS)
    if not isinstance(raw, list) or not all(isinstance(o, dict) for o in raw):
        raise OipError(400, 'outputs must be a list of {"name": ...}')
    names = [o.get("name") for o in raw]
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise OipError(400, f"unknown output {unknown[0]!r}; this model has {', '.join(OUTPUTS)}")
    return names


def response(info: ModelInfo, request: Request, logits: np.ndarray) -> dict[str, Any]:
    n, k = logits.shape
    z = logits - logits.max(1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(1, keepdims=True)
    tensors = {
        "logits": {"datatype": "FP32", "shape": [n, k], "data": logits.reshape(-1).tolist()},
        "probabilities": {"datatype": "FP32", "shape": [n, k], "data": probs.reshape(-1).tolist()},
        "label": {"datatype": "BYTES", "shape": [n], "data": [info.classes[i] for i in logits.argmax(1)]},
    }
    out: dict[str, Any] = {"model_name": model_name(info), "model_version": model_version(info),
                           "outputs": [{"name": name, **tensors[name]} for name in request.outputs]}
    if request.id is not None:
        out["id"] = request.id
    return out
