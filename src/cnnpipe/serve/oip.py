"""The Open Inference Protocol (KServe v2, REST): tensors in and out of a cnnpipe model.

Inputs: `input` (FP32, N×C×H×W, already normalized: what the ONNX graph takes) or `pixels` (UINT8, N×C×H×W,
0-255: normalized here as in training). Outputs: `logits` and `probabilities` (FP32, N×K) and `label` (BYTES,
N: the top class). `data` may be flat (row-major) or nested; an `id` in the request is echoed. Errors are
raised as OipError with the 4xx status the protocol asks for and a message for `{"error": ...}`.

Triton's binary tensor extension is supported both ways (tritonclient uses it by default): a request whose
`Inference-Header-Content-Length` header splits the body into a JSON part and raw tensor bytes (an input's
`parameters.binary_data_size`), and outputs asked for with `parameters.binary_data` come back the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from cnnpipe.core.onnx_io import normalize_pixels
from cnnpipe.serve.predictor import ModelInfo, softmax

DATATYPES = {"FP32": np.float32, "UINT8": np.uint8}
INPUTS = {"input": "FP32", "pixels": "UINT8"}
OUTPUTS = ("logits", "probabilities", "label")
HEADER_LENGTH = "inference-header-content-length"  # the binary extension's split of a body


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
    binary: frozenset[str] = frozenset()  # outputs to return as raw bytes (binary extension)


def split_body(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """(parsed JSON part, raw tensor bytes) of a request body; without the header all of it is JSON."""
    if header_length is None:
        json_part, rest = body, b""
    else:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise OipError(400, f"Inference-Header-Content-Length {header_length[:20]!r} does not fit the "
                                f"{len(body)}-byte body")
        json_part, rest = body[: int(header_length)], body[int(header_length):]
    try:
        return orjson.loads(json_part), rest  # nesting deeper than 1024 levels is refused by the parser
    except orjson.JSONDecodeError as e:
        raise OipError(400, f"malformed JSON ({str(e)[:120]})") from e


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


def parse(raw: bytes, header_length: str | None, info: ModelInfo, max_images: int) -> Request:
    """A whole request body (JSON, or JSON and raw tensor bytes) -> the model's input."""
    body, binary = split_body(raw, header_length)
    return parse_request(body, info, max_images, binary)


def params_of(holder: dict, where: str) -> dict:
    value = holder.get("parameters") or {}
    if not isinstance(value, dict):
        raise OipError(400, f"{where} parameters must be an object")
    return value


def parse_request(body: Any, info: ModelInfo, max_images: int, binary: bytes = b"") -> Request:
    """Validate an infer request (its parsed JSON part and any raw tensor bytes) and return the model's input."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or len(body["inputs"]) != 1:
        raise OipError(400, 'the request must be {"inputs": [one tensor]} with the tensor "input" (FP32) or '
                            '"pixels" (UINT8)')
    tensor = body["inputs"][0]
    if not isinstance(tensor, dict):
        raise OipError(400, "each input must be an object with name, shape, datatype and data")
    name, dtype, shape, data = (tensor.get(k) for k in ("name", "datatype", "shape", "data"))
    if not isinstance(name, str) or name not in INPUTS:
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
    size = params_of(tensor, "input").get("binary_data_size")
    if size is not None:
        x = from_bytes(binary, size, shape, dtype)
    elif binary:
        raise OipError(400, "raw tensor bytes sent, but no input declares parameters.binary_data_size")
    else:
        x = to_array(data, shape, dtype)
    if name == "pixels":
        x = normalize_pixels(x, info.mean, info.std)
    outputs, wanted_binary = parse_outputs(body.get("outputs"), params_of(body, "request"))
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise OipError(400, "id must be a string")
    return Request(np.ascontiguousarray(x, np.float32), outputs, request_id, wanted_binary)


def from_bytes(binary: bytes, size: Any, shape: list[int], dtype: str) -> np.ndarray:
    itemsize = np.dtype(DATATYPES[dtype]).itemsize
    needed = int(np.prod(shape)) * itemsize
    if not isinstance(size, int) or size != needed or len(binary) != needed:
        raise OipError(400, f"binary tensor: shape {shape} of {dtype} needs {needed} bytes; "
                            f"binary_data_size says {size!r} and the body holds {len(binary)}")
    x = np.frombuffer(binary, dtype=np.dtype(DATATYPES[dtype]).newbyteorder("<")).reshape(shape)
    if dtype == "FP32" and not np.isfinite(x).all():
        raise OipError(400, "tensor data holds NaN or infinite values")
    return x


def to_array(data: Any, shape: list[int], dtype: str) -> np.ndarray:
    if not isinstance(data, list):
        raise OipError(400, "tensor data must be a JSON array (flat in row-major order, or nested)")
    try:
        flat = np.asarray(data, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError) as e:
        raise OipError(400, "tensor data must be numbers in a flat or rectangular nested array") from e
    if flat.size != int(np.prod(shape)):
        raise OipError(400, f"tensor data has {flat.size} values; shape {shape} needs {int(np.prod(shape))}")
    if dtype == "UINT8" and not (np.all(flat >= 0) and np.all(flat <= 255) and np.array_equal(flat, np.round(flat))):
        raise OipError(400, "UINT8 data must be whole numbers from 0 to 255")
    with np.errstate(over="ignore"):  # values beyond float32's range become infinite, refused just below
        x = flat.astype(DATATYPES[dtype])
    if not np.isfinite(x).all():
        raise OipError(400, "tensor data holds NaN or infinite values (or values beyond float32's range)")
    return x.reshape(shape)


def parse_outputs(raw: Any, parameters: dict) -> tuple[list[str], frozenset[str]]:
    """The outputs asked for (all when none are named) and which of them come back as raw bytes."""
    all_binary = parameters.get("binary_data_output") is True
    if raw is None:
        return list(OUTPUTS), frozenset(OUTPUTS if all_binary else ())
    if not isinstance(raw, list) or not all(isinstance(o, dict) for o in raw):
        raise OipError(400, 'outputs must be a list of {"name": ...}')
    names = [o.get("name") for o in raw]
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise OipError(400, f"unknown output {unknown[0]!r}; this model has {', '.join(OUTPUTS)}")
    binary = {o["name"] for o in raw if params_of(o, "output").get("binary_data", all_binary) is True}
    return names, frozenset(binary)


def response(info: ModelInfo, request: Request, logits: np.ndarray,
             probs: np.ndarray | None = None) -> tuple[bytes, int | None]:
    """The response body and, when some outputs are raw bytes, the length of its JSON part (for the
    Inference-Header-Content-Length header). `probs`: softmax(logits), when already computed."""
    n, k = logits.shape
    labels = [info.classes[i] for i in logits.argmax(1)]
    probs = softmax(logits) if probs is None else probs
    values = {"logits": logits.astype("<f4"), "probabilities": probs.astype("<f4"), "label": labels}
    shapes = {"logits": [n, k], "probabilities": [n, k], "label": [n]}
    outputs, blobs = [], []
    for name in request.outputs:
        tensor = {"name": name, "datatype": "BYTES" if name == "label" else "FP32", "shape": shapes[name]}
        if name in request.binary:
            blob = (b"".join(len(s.encode()).to_bytes(4, "little") + s.encode() for s in labels) if name == "label"
                    else values[name].tobytes())
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = labels if name == "label" else values[name].reshape(-1).tolist()
        outputs.append(tensor)
    out: dict[str, Any] = {"model_name": model_name(info), "model_version": model_version(info), "outputs": outputs}
    if request.id is not None:
        out["id"] = request.id
    head = orjson.dumps(out)
    return head + b"".join(blobs), len(head) if blobs else None
