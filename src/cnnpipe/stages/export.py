"""Stage 5, export: models/model.onnx with a dynamic batch dimension, checked and compared with PyTorch.

One function exports, runs the ONNX checker, runs onnxruntime on test images and compares with PyTorch
(max |difference| of the logits and argmax agreement). Beyond export.atol the stage fails and no file
is left. Class names, input shape and normalization go into the ONNX metadata for the server.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from cnnpipe.core import cpushare
from cnnpipe.core.checkpoint import load_checkpoint, meta_of
from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.fsutil import atomic_path, file_digest, write_metrics
from cnnpipe.core.models import fold_batchnorm
from cnnpipe.core.onnx_io import normalize_pixels, session_options, write_metadata
from cnnpipe.core.params import ExportParams
from cnnpipe.core.prepared import check_same_data, load_meta, load_split, spread

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
STACK_TRACE = "pkg.torch.onnx.stack_trace"  # node metadata of torch's exporter



def to_onnx(model: torch.nn.Module, input_shape: list[int], opset: int) -> onnx.ModelProto:
    """Export with the torch.export-based exporter; the batch dimension is dynamic."""
    example = torch.zeros(2, *input_shape)
    program = torch.onnx.export(
        model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
    )
    return without_stack_traces(program.model_proto)


def without_stack_traces(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the exporter's per-node Python stack traces: they hold this checkout's absolute paths, so the same
    model exported from two folders (or machines) would give two files, and the file would ship the paths."""
    graphs = [proto.graph, *(f for f in proto.functions)]
    while graphs:
        graph = graphs.pop()
        for node in graph.node if hasattr(graph, "node") else []:
            kept = [p for p in node.metadata_props if p.key != STACK_TRACE]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
            graphs += [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]
    return proto


def compare(path: Path, model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> dict:
    """Run the ONNX file with onnxruntime (CPU) and PyTorch on the same batch."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x)).numpy()
    onnx_pred, torch_pred = onnx_logits.argmax(1), torch_logits.argmax(1)
    return {
        "max_abs_diff": float(np.abs(onnx_logits - torch_logits).max()),
        "argmax_agreement": float((onnx_pred == torch_pred).mean()),
        "onnx_accuracy": float((onnx_pred == y).mean()),
        "torch_accuracy": float((torch_pred == y).mean()),
        "check_images": int(len(y)),
        "onnxruntime": ort.__version__,
        "providers": session.get_providers(),
    }


@cpushare.registered
def export(p: ExportParams, prepared: str | Path = "data/prepared", model_path: str | Path = "models/model.pt",
           onnx_path: str | Path = "models/model.onnx", metrics_path: str | Path = "metrics/export.json") -> dict:
    model, state = load_checkpoint(model_path, "cpu")
    check_same_data(meta_of(state), load_meta(prepared), model_path, prepared)  # its test images check the graph
    x_test, y_test = load_split(prepared, "test", mmap=True)
    checked = spread(len(y_test), p.check_images)
    x = normalize_pixels(np.asarray(x_test[checked]), state["mean"], state["std"])
    y = np.asarray(y_test[checked])
    onnx_path = Path(onnx_path)
    with atomic_path(onnx_path) as tmp:
        # the graph is the BN-folded model; it is compared below with the checkpoint's own model
        proto = to_onnx(fold_batchnorm(model), state["input_shape"], p.opset)
        for key, value in write_metadata(state).items():
            proto.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save_model(proto, tmp)
        result = compare(tmp, model, x, y)
        if result["max_abs_diff"] > p.atol:
            raise CnnpipeError(
                f"ONNX output differs from PyTorch by {result['max_abs_diff']:.2e} (> export.atol {p.atol}); "
                "try another export.opset or raise export.atol"
            )
    metrics = {"bytes": onnx_path.stat().st_size, "agree": result.pop("argmax_agreement")}
    info = {"opset": p.opset, "sha256": file_digest(onnx_path, "sha256"), **result,
            "check_per_class": np.bincount(y, minlength=len(state["classes"])).tolist()}
    write_metrics(metrics_path, metrics, info)
    log.info("exported %s (%d bytes): max |onnx - torch| %.2e, argmax agreement %.4f",
             onnx_path, metrics["bytes"], result["max_abs_diff"], metrics["agree"])
    return metrics | info
