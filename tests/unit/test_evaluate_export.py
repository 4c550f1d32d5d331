import csv
import hashlib
import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.params import EvaluateParams, ExportParams, TrainParams
from cnnpipe.stages.evaluate import confusion_matrix, evaluate, per_class_scores
from cnnpipe.stages.export import export
from cnnpipe.stages.train import train


@pytest.fixture
def trained(tmp_path, prepared):
    p = TrainParams(model="bncnn", epochs=3, batch_size=32, lr=0.01, flip=False, device="cpu")
    train(p, prepared, tmp_path / "model.pt", tmp_path / "train.json", tmp_path / "history.csv")
    return tmp_path / "model.pt"


def test_confusion_and_scores():
    cm = confusion_matrix(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    s = per_class_scores(cm, ["a", "b", "c"])
    assert s["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert s["b"]["precision"] == round(2 / 3, 4) and s["b"]["recall"] == 1.0
    assert s["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_evaluate_writes_metrics_and_confusion_rows(tmp_path, prepared, trained):
    m = evaluate(EvaluateParams(batch_size=64, device="cpu"), prepared, trained, tmp_path / "eval.json",
                 tmp_path / "confusion.csv", tmp_path / "per_class.csv")
    rows = list(csv.DictReader((tmp_path / "confusion.csv").open()))
    assert len(rows) == 100 == m["images"]
    assert m["acc"] == pytest.approx(np.mean([r["actual"] == r["predicted"] for r in rows]))
    per_class = list(csv.DictReader((tmp_path / "per_class.csv").open()))
    assert [r["class"] for r in per_class] == [str(d) for d in range(10)]
    assert sum(int(r["support"]) for r in per_class) == 100
    f1 = [float(r["f1"]) for r in per_class]
    assert m["min_f1"] == min(f1) and m["f1"] == pytest.approx(np.mean(f1), abs=1e-4)
    assert m["acc"] > 0.5
    written = json.loads((tmp_path / "eval.json").read_text())
    assert set(written) == {"acc", "loss", "f1", "min_f1", "sec"}
    assert json.loads((tmp_path / "eval.info.json").read_text())["images"] == 100


def test_export_matches_torch_and_carries_metadata(tmp_path, prepared, trained):
    m = export(ExportParams(opset=18, check_images=500, atol=1e-3), prepared, trained, tmp_path / "m.onnx",
               tmp_path / "export.json")
    assert m["max_abs_diff"] <= 1e-3 and m["agree"] == 1.0 and m["check_images"] == 100  # all the test set
    assert json.loads((tmp_path / "export.json").read_text()) == {"bytes": (tmp_path / "m.onnx").stat().st_size,
                                                                   "agree": 1.0}
    assert m["sha256"] == hashlib.sha256((tmp_path / "m.onnx").read_bytes()).hexdigest()
    # nothing of this checkout's or environment's paths (the exporter's stack traces): the same model exported
    # from another folder or machine is the same file
    import sys
    from pathlib import Path

    import cnnpipe

    data = (tmp_path / "m.onnx").read_bytes()
    assert b"stack_trace" not in data
    for folder in (Path(cnnpipe.__file__).resolve().parent, Path(sys.prefix)):
        assert str(folder).encode() not in data, folder
    model = onnx.load(tmp_path / "m.onnx")
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["cnnpipe.classes"]) == [str(d) for d in range(10)]
    assert json.loads(meta["cnnpipe.input_shape"]) == [1, 28, 28]
    assert len(json.loads(meta["cnnpipe.mean"])) == 1
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7):  # dynamic batch dimension
        out = session.run(None, {"input": np.zeros((batch, 1, 28, 28), np.float32)})[0]
        assert out.shape == (batch, 10)


def test_export_beyond_tolerance_fails_and_leaves_nothing(tmp_path, prepared, trained):
    with pytest.raises(CnnpipeError, match=r"differs from PyTorch by .* export\.atol"):
        export(ExportParams(opset=18, check_images=16, atol=1e-12), prepared, trained,
               tmp_path / "m.onnx", tmp_path / "export.json")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "export.json").exists()
    assert not list(tmp_path.glob(".m.onnx*"))


OTHER_DATA = [
    ({"dataset": "fashion-mnist"}, "dataset mnist for the model, fashion-mnist here"),
    ({"shape": [3, 28, 28]}, "images 1×28×28 for the model, 3×28×28 here"),
    # own images are all `imagefolder`: a class added, or the same classes in another order, is other data
    ({"classes": [str(d) for d in range(10)] + ["10"]}, "10 classes for the model, 11 here"),
    ({"classes": [str(d) for d in reversed(range(10))]}, "class 0 is '0' for the model, '9' here"),
]


def test_evaluate_export_and_quantize_refuse_other_data(tmp_path, prepared, trained):
    """Each stage that scores or checks a model on prepared data refuses data unlike its training data, in one
    line that names the first difference, writing nothing."""
    from cnnpipe.core.params import QuantizeParams
    from cnnpipe.stages.quantize import quantize

    export(ExportParams(check_images=16), prepared, trained, tmp_path / "m.onnx", tmp_path / "export.json")
    meta = json.loads((prepared / "meta.json").read_text())
    for change, message in OTHER_DATA:
        (prepared / "meta.json").write_text(json.dumps(meta | change))
        pattern = rf"was trained on other data than .*prepared holds \({re.escape(message)}\); rerun the pipeline"
        with pytest.raises(CnnpipeError, match=pattern):
            evaluate(EvaluateParams(), prepared, trained, tmp_path / "e.json", tmp_path / "c.csv",
                     tmp_path / "p.csv")
        with pytest.raises(CnnpipeError, match=pattern):
            export(ExportParams(check_images=16), prepared, trained, tmp_path / "m2.onnx",
                   tmp_path / "export2.json")
        with pytest.raises(CnnpipeError, match=pattern):
            quantize(QuantizeParams(calibration_images=16, latency_runs=1), prepared, tmp_path / "m.onnx",
                     tmp_path / "m.int8.onnx", tmp_path / "q.json")
    refused = {"e.json", "c.csv", "p.csv", "m2.onnx", "export2.json", "m.int8.onnx", "q.json"}
    written = {f.name for f in tmp_path.iterdir()}
    assert "m.onnx" in written and not written & refused
    assert not [name for name in written if name.startswith((".m2.onnx", ".m.int8.onnx"))]


def test_export_and_quantize_sample_every_class_and_normalize_as_the_model_was_trained(tmp_path, prepared, trained):
    """Own images' splits are stored class by class: the export check and the int8 calibration take images
    spread over the whole split, so every class is in them. Data split again (other statistics) is normalized
    as the model was trained, as the server does."""
    from cnnpipe.core.params import QuantizeParams
    from cnnpipe.core.prepared import load_split
    from cnnpipe.stages.quantize import quantize

    for name in ("val", "test"):
        x, y = load_split(prepared, name)
        order = np.argsort(y, kind="stable")
        np.save(prepared / f"{name}_x.npy", x[order])
        np.save(prepared / f"{name}_y.npy", y[order])
    few = export(ExportParams(check_images=20), prepared, trained, tmp_path / "few.onnx", tmp_path / "few.json")
    assert few["check_per_class"] == [2] * 10
    every = export(ExportParams(check_images=100), prepared, trained, tmp_path / "m.onnx", tmp_path / "e.json")
    q = quantize(QuantizeParams(calibration_images=20, latency_runs=1), prepared, tmp_path / "m.onnx",
                 tmp_path / "m.int8.onnx", tmp_path / "q.json")
    assert q["calibration_per_class"] == [2] * 10  # 5 validation images a class
    assert q["fp32"]["accuracy"] == every["onnx_accuracy"]  # all 100 test images, both ways

    meta = json.loads((prepared / "meta.json").read_text())
    (prepared / "meta.json").write_text(json.dumps(meta | {"mean": [0.9], "std": [0.05]}))
    again = quantize(QuantizeParams(calibration_images=20, latency_runs=1), prepared, tmp_path / "m.onnx",
                     tmp_path / "m2.int8.onnx", tmp_path / "q2.json")
    assert again["fp32"]["accuracy"] == q["fp32"]["accuracy"] and again["acc"] == q["acc"]


def test_tta_flip_follows_the_models_dataset_and_its_training(tmp_path, prepared, trained):
    """Flip TTA runs only when asked, the checkpoint says flips keep labels and the model was trained on
    mirrored images; the prepared folder's flag does not decide it."""
    import torch

    def run(name: str, tta: bool) -> dict:
        return evaluate(EvaluateParams(device="cpu", tta_flip=tta), prepared, trained, tmp_path / f"{name}.json",
                        tmp_path / f"{name}.csv", tmp_path / f"{name}-per-class.csv")

    plain = run("plain", False)
    digits = run("digits", True)  # the tiny set is digits: the checkpoint says no flips
    assert not digits["tta_flip"] and digits["loss"] == plain["loss"]

    meta = json.loads((prepared / "meta.json").read_text())
    (prepared / "meta.json").write_text(json.dumps(meta | {"flip": True}))  # the folder claims flips are safe
    assert not run("folder", True)["tta_flip"]

    state = torch.load(trained, weights_only=True)
    assert state["train_params"]["flip"] is False
    torch.save(state | {"flip": True}, trained)  # the model's dataset is flip-safe, but it never saw a mirror
    unmirrored = run("unmirrored", True)
    assert not unmirrored["tta_flip"] and unmirrored["loss"] == plain["loss"]

    torch.save(state | {"flip": True, "train_params": state["train_params"] | {"flip": True}}, trained)
    flipped = run("flipped", True)  # flip-safe and trained on mirrors
    assert flipped["tta_flip"] and flipped["loss"] != plain["loss"]
    assert run("off", False)["loss"] == plain["loss"]

    torch.save({k: v for k, v in state.items() if k != "train_params"} | {"flip": True}, trained)
    assert run("unknown", True)["tta_flip"]  # no record of its training: the dataset's flag decides


@pytest.mark.parametrize("flip", [False, True])
def test_the_bench_scores_with_the_flip_where_the_evaluate_stage_would(tmp_path, prepared, flip):
    from cnnpipe.bench.train import time_to_accuracy

    meta = json.loads((prepared / "meta.json").read_text())
    (prepared / "meta.json").write_text(json.dumps(meta | {"flip": True}))  # flips keep labels here
    p = TrainParams(model="lenet", epochs=1, batch_size=25, lr=0.01, flip=flip, device="cpu", precision="fp32")
    assert time_to_accuracy(prepared, p, True, [0.5])["tta_flip"] is flip
