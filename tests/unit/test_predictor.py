import io
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import make_images
from PIL import Image

from cnnpipe.errors import CnnpipeError
from cnnpipe.predictor import InputError, Predictor


@pytest.fixture(scope="module")
def predictor(onnx_model):
    return Predictor(onnx_model, threads=1)


def png(array: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_metadata_from_onnx(predictor):
    info = predictor.info
    assert info.classes == [str(d) for d in range(10)] and info.input_shape == (1, 28, 28)
    assert info.opset == 18 and len(info.sha256) == 64 and info.model == "bncnn"
    assert predictor.providers == ["CPUExecutionProvider"]


def test_predicts_generated_classes(predictor):
    x, y = make_images(40, 10, (1, 28, 28), seed=7)
    top = predictor.predict(list(x[:, 0]), k=3)
    assert len(top) == 40 and all(len(t) == 3 for t in top)
    accuracy = np.mean([t[0]["index"] == label for t, label in zip(top, y, strict=True)])
    assert accuracy >= 0.8
    probs = [p["probability"] for p in top[0]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_numpy_pil_and_bytes_agree(predictor):
    x, _ = make_images(1, 10, (1, 28, 28), seed=3)
    img = x[0, 0]
    a = predictor.predict(img)[0]
    b = predictor.predict(Image.fromarray(img))[0]
    c = predictor.predict(png(img))[0]
    d = predictor.predict(img[:, :, None])[0]  # H×W×1
    assert a == b == c == d


def test_rgb_and_resized_inputs_are_converted(predictor):
    x, _ = make_images(1, 10, (1, 28, 28), seed=5)
    rgb = np.repeat(x[0, 0][:, :, None], 3, axis=2)
    assert predictor.predict(rgb)[0][0]["index"] == predictor.predict(x[0, 0])[0][0]["index"]
    big = np.asarray(Image.fromarray(x[0, 0]).resize((56, 56), Image.Resampling.NEAREST))
    assert predictor.predict(png(big))[0][0]["index"] == predictor.predict(x[0, 0])[0][0]["index"]
    with pytest.raises(InputError, match="56×56, the model takes 28×28"):
        predictor.predict(png(big), resize=False)


@pytest.mark.parametrize("image, message", [
    (b"", "empty image data"),
    (b"hello, not an image", "not a readable image"),
    (np.full((28, 28), np.nan), "NaN"),
    (np.full((28, 28), 300.0), "within 0-255"),
    (np.zeros((28, 28, 2)), "not an image"),
    (np.zeros((2, 3, 4, 5, 6)), "not an image"),
])
def test_bad_images(predictor, image, message):
    with pytest.raises(InputError, match=message):
        predictor.predict(image)


def test_truncated_png(predictor):
    data = png(np.zeros((28, 28)))
    with pytest.raises(InputError, match="not a readable image"):
        predictor.predict(data[: len(data) // 2])


def test_missing_and_non_onnx_model(tmp_path):
    with pytest.raises(CnnpipeError, match="model file not found"):
        Predictor(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(CnnpipeError, match="not a loadable ONNX model"):
        Predictor(tmp_path / "bad.onnx")


def test_predictor_does_not_import_torch(onnx_model):
    code = ("import sys; from cnnpipe.predictor import Predictor; p = Predictor(sys.argv[1]); "
            "import numpy as np; p.predict(np.zeros((28, 28))); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(onnx_model)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_predict_cli(onnx_model, tmp_path):
    x, y = make_images(3, 10, (1, 28, 28), seed=11)
    for i in range(3):
        (tmp_path / f"img{i}.png").write_bytes(png(x[i, 0]))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    cli = [sys.executable, "-m", "cnnpipe.cli", "predict", "--model", str(onnx_model), "-k", "2", "--json"]
    proc = subprocess.run(cli + [str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1  # one file skipped
    assert "skipped" in proc.stderr and "broken.png" in proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["path"].rsplit("/", 1)[1] for r in rows] == ["img0.png", "img1.png", "img2.png"]
    assert all(len(r["top_k"]) == 2 for r in rows)
    table = subprocess.run(cli[:-1] + [str(tmp_path / "img0.png")], capture_output=True, text=True)
    assert table.returncode == 0 and "img0.png" in table.stdout and "top-2" in table.stdout
