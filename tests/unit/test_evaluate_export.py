import csv
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cnnpipe.errors import CnnpipeError
from cnnpipe.evaluate import confusion_matrix, evaluate, per_class_scores
from cnnpipe.export import export
from cnnpipe.params import EvaluateParams, ExportParams, TrainParams
from cnnpipe.train import train


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
                 tmp_path / "confusion.csv")
    rows = list(csv.DictReader((tmp_path / "confusion.csv").open()))
    assert len(rows) == 100 == m["images"]
    assert m["accuracy"] == pytest.approx(np.mean([r["actual"] == r["predicted"] for r in rows]))
    assert [r["class"] for r in m["per_class"]] == [str(d) for d in range(10)]
    assert m["min_f1"] == min(r["f1"] for r in m["per_class"]) <= m["macro_f1"]
    assert m["accuracy"] > 0.5


def test_export_matches_torch_and_carries_metadata(tmp_path, prepared, trained):
    m = export(ExportParams(opset=18, check_images=64, atol=1e-3), prepared, trained, tmp_path / "m.onnx",
               tmp_path / "export.json")
    assert m["max_abs_diff"] <= 1e-3 and m["argmax_agreement"] == 1.0 and m["check_images"] == 64
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
        export(ExportParams(opset=18, check_images=16, atol=0.0 - 1.0), prepared, trained,
               tmp_path / "m.onnx", tmp_path / "export.json")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "export.json").exists()
    assert not list(tmp_path.glob(".m.onnx*"))


def test_evaluate_refuses_other_dataset(tmp_path, prepared, trained):
    meta = json.loads((prepared / "meta.json").read_text())
    (prepared / "meta.json").write_text(json.dumps(meta | {"dataset": "fashion-mnist"}))
    with pytest.raises(CnnpipeError, match="trained on mnist.*holds fashion-mnist"):
        evaluate(EvaluateParams(), prepared, trained, tmp_path / "e.json", tmp_path / "c.csv")




def test_tta_flip_only_where_flips_are_label_safe(tmp_path, prepared, trained):
    plain = evaluate(EvaluateParams(device="cpu"), prepared, trained, tmp_path / "a.json", tmp_path / "a.csv")
    digits = evaluate(EvaluateParams(device="cpu", tta_flip=True), prepared, trained, tmp_path / "b.json",
                      tmp_path / "b.csv")
    assert not plain["tta_flip"] and not digits["tta_flip"]  # the tiny set is digits: no flips
    assert digits["loss"] == plain["loss"]
    meta = json.loads((prepared / "meta.json").read_text())
    (prepared / "meta.json").write_text(json.dumps(meta | {"flip": True}))
    # the checkpoint carries its own flip flag: evaluate follows the model's dataset, not the folder's
    import torch

    state = torch.load(trained, weights_only=True)
    torch.save(state | {"flip": True}, trained)
    flipped = evaluate(EvaluateParams(device="cpu", tta_flip=True), prepared, trained, tmp_path / "c.json",
                       tmp_path / "c.csv")
    assert flipped["tta_flip"] and flipped["loss"] != plain["loss"]
