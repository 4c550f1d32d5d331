"""Stage 6, quantize: static int8 quantization of the ONNX model with onnxruntime.quantization.

Calibrated on validation images; writes models/model.int8.onnx (with the same cnnpipe metadata),
metrics/quantize.json (the int8 model's test accuracy, size and batch-1 latency and its accuracy drop against
fp32, so `dvc metrics diff` shows the trade) and metrics/quantize.info.json (both models in full).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from cnnpipe.core import cpushare
from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.fsutil import atomic_path, write_metrics
from cnnpipe.core.onnx_io import normalize_pixels, read_metadata
from cnnpipe.core.params import QuantizeParams
from cnnpipe.core.prepared import Meta, check_same_data, load_meta, load_split, spread

log = logging.getLogger(__name__)


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over normalized validation images."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int = 64):
        self.batches = iter([{input_name: x[i: i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


def quantize_file(src: Path, dst: Path, calibration: np.ndarray, per_channel: bool, reduce_range: bool) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        input_name = onnx.load(pre, load_external_data=False).graph.input[0].name
        quantize_static(str(pre), str(dst), _Calibration(input_name, calibration), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                        reduce_range=reduce_range)
    # quantization drops custom metadata: carry the server's metadata over
    model = onnx.load(dst)
    del model.metadata_props[:]
    for prop in onnx.load(src).metadata_props:
        model.metadata_props.add(key=prop.key, value=prop.value)
    onnx.save(model, dst)


def measure(path: Path, x: np.ndarray, y: np.ndarray, latency_runs: int) -> dict:
    """Test accuracy (batches of 1,000) and batch-1 latency percentiles, on one CPU session."""
    import onnxruntime as ort

    from cnnpipe.core.onnx_io import session_options

    session = ort.InferenceSession(str(path), sess_options=session_options(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    pred = np.concatenate([session.run(None, {name: x[i: i + 1000]})[0].argmax(1)
                           for i in range(0, len(x), 1000)])
    times = []
    for i in range(latency_runs + 10):
        t0 = time.perf_counter()
        session.run(None, {name: x[i % len(x): i % len(x) + 1]})
        if i >= 10:  # warm-up runs are not counted
            times.append((time.perf_counter() - t0) * 1000)
    return {
        "accuracy": round(float((pred == y).mean()), 5),
        "size_bytes": path.stat().st_size,
        "latency_ms_p50": round(statistics.median(times), 4),
        "latency_ms_p99": round(float(np.percentile(times, 99)), 4),
    }


def ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def onnx_meta(path: Path) -> Meta:
    """What the export stage wrote into the model's metadata about its training data."""
    m = read_metadata({p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}, path)
    return Meta(m.dataset, m.classes, m.input_shape, m.mean, m.std, False)


@cpushare.registered
def quantize(p: QuantizeParams, prepared: str | Path = "data/prepared", onnx_path: str | Path = "models/model.onnx",
             int8_path: str | Path = "models/model.int8.onnx",
             metrics_path: str | Path = "metrics/quantize.json") -> dict:
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise CnnpipeError(f"{onnx_path}: not found; run the export stage first (dvc repro export)")
    model = onnx_meta(onnx_path)  # its inputs are normalized as in its training, whatever the data's statistics
    check_same_data(model, load_meta(prepared), onnx_path, prepared)  # calibrated and scored on that data
    vx, vy = load_split(prepared, "val", mmap=True)
    tx, ty = load_split(prepared, "test")
    chosen = spread(len(vy), p.calibration_images)
    calibration = normalize_pixels(np.asarray(vx[chosen]), model.mean, model.std)
    x_test = normalize_pixels(tx, model.mean, model.std)
    with atomic_path(int8_path) as tmp:
        quantize_file(onnx_path, tmp, calibration, p.per_channel, p.reduce_range)
        int8 = measure(tmp, x_test, ty, p.latency_runs)
    fp32 = measure(onnx_path, x_test, ty, p.latency_runs)
    int8["size_bytes"] = Path(int8_path).stat().st_size
    metrics = {  # the int8 model's figures, and how it compares with fp32
        "acc": int8["accuracy"],
        "bytes": int8["size_bytes"],
        "drop": round(fp32["accuracy"] - int8["accuracy"], 5),  # test accuracy lost to int8
        "ms": int8["latency_ms_p50"],  # batch-1 latency, median
    }
    info = {"fp32": fp32, "int8": int8, "size_ratio": round(fp32["size_bytes"] / int8["size_bytes"], 3),
            "speedup": round(fp32["latency_ms_p50"] / int8["latency_ms_p50"], 3),
            "calibration_images": int(len(calibration)),
            "calibration_per_class": np.bincount(vy[chosen], minlength=len(model.classes)).tolist(),
            "test_images": int(len(ty)),
            "latency_runs": p.latency_runs, "onnxruntime": ort_version()}
    write_metrics(metrics_path, metrics, info)
    log.info("int8: accuracy %.4f (fp32 %.4f), %d bytes (fp32 %d), batch-1 p50 %.3f ms (fp32 %.3f ms)",
             int8["accuracy"], fp32["accuracy"], int8["size_bytes"], fp32["size_bytes"],
             int8["latency_ms_p50"], fp32["latency_ms_p50"])
    return metrics | info
