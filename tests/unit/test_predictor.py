import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_images
from PIL import Image

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.serve.predictor import InputError, Predictor


@pytest.fixture(scope="module")
def predictor(onnx_model):
    return Predictor(onnx_model, threads=1)


def png(array: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_metadata_from_onnx(predictor, onnx_model):
    info = predictor.info
    assert info.classes == [str(d) for d in range(10)] and info.input_shape == (1, 28, 28)
    assert info.opset == 18 and info.model == "bncnn"
    assert info.sha256 == hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    train_x = np.load(onnx_model.parent / "prepared" / "train_x.npy")  # normalization: the train split's
    assert info.mean == pytest.approx([train_x.mean(dtype=np.float64) / 255], rel=1e-6)
    assert info.std == pytest.approx([train_x.std(dtype=np.float64) / 255], rel=1e-6)
    assert predictor.providers == ["CPUExecutionProvider"]


def test_predicts_generated_classes(predictor):
    x, y = make_images(40, 10, (1, 28, 28), seed=7)
    top = predictor.predict(list(x[:, 0]), k=3)
    assert len(top) == 40 and all(len(t) == 3 for t in top)
    accuracy = np.mean([t[0]["index"] == label for t, label in zip(top, y, strict=True)])
    assert accuracy >= 0.8


def test_top_k_is_the_softmax_of_the_logits(predictor):
    x, _ = make_images(4, 10, (1, 28, 28), seed=8)
    logits = predictor.logits(predictor.preprocess(list(x[:, 0]))).astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    top = predictor.top_k(logits.astype(np.float32), k=3)
    for row, p in zip(top, probs, strict=True):
        order = np.argsort(-p)[:3]
        assert [t["index"] for t in row] == order.tolist()
        assert [t["label"] for t in row] == [predictor.info.classes[j] for j in order]
        assert [t["probability"] for t in row] == pytest.approx(p[order].tolist(), abs=2e-6)
    assert len(predictor.top_k(logits, k=99)[0]) == 10  # k is capped at the number of classes


def test_numpy_pil_and_bytes_agree(predictor):
    x, _ = make_images(3, 10, (1, 28, 28), seed=3)
    forms = {
        "numpy": list(x[:, 0]),
        "PIL": [Image.fromarray(img) for img in x[:, 0]],
        "PNG bytes": [png(img) for img in x[:, 0]],
        "H×W×1": [img[:, :, None] for img in x[:, 0]],
        "N×C×H×W batch": x,
    }
    results = {name: predictor.predict(images) for name, images in forms.items()}
    for name, result in results.items():
        assert result == results["numpy"], name
    rows = results["numpy"]
    assert rows[0] != rows[1] != rows[2] != rows[0]  # three images, three different answers


def test_a_3_by_h_by_w_array_is_refused_by_a_grayscale_model(predictor):
    """One colour image (C×H×W) or three grayscale ones? Read as the colour image, its three planes would be
    blended into one, and two answers lost without a word."""
    x, _ = make_images(3, 10, (1, 28, 28), seed=9)
    with pytest.raises(InputError, match=r"a 3×28×28 array is one colour image \(C×H×W\) or three grayscale"):
        predictor.predict(x[:, 0])
    assert len(predictor.predict(x)) == 3  # 3×1×H×W: three images
    assert predictor.predict(x[:1, 0]) == predictor.predict(x[0, 0])  # 1×H×W: one image


def test_rgb_and_resized_inputs_are_converted(predictor):
    x, _ = make_images(1, 10, (1, 28, 28), seed=5)
    rgb = np.repeat(x[0, 0][:, :, None], 3, axis=2)
    assert predictor.predict(rgb)[0][0]["index"] == predictor.predict(x[0, 0])[0][0]["index"]
    big = np.asarray(Image.fromarray(x[0, 0]).resize((56, 56), Image.Resampling.NEAREST))
    assert predictor.predict(png(big))[0][0]["index"] == predictor.predict(x[0, 0])[0][0]["index"]
    assert predictor.predict(big)[0][0]["index"] == predictor.predict(x[0, 0])[0][0]["index"]
    with pytest.raises(InputError, match="56×56, the model takes 28×28"):
        predictor.predict(png(big), resize=False)
    with pytest.raises(InputError, match="56×56, the model takes 28×28"):
        predictor.predict(big, resize=False)


def test_a_16_bit_png_is_scaled_not_clipped(predictor):
    """A 16-bit greyscale PNG is the picture its 8-bit version is (Pillow's own conversion clips it to white)."""
    x, _ = make_images(1, 10, (1, 28, 28), seed=5)
    wide = x[0, 0].astype(np.uint16) * 257  # 0-255 spread over 0-65535
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    assert np.array_equal(predictor.to_pixels(buf.getvalue()), predictor.to_pixels(png(x[0, 0])))


def test_an_rgba_array_drops_its_alpha_as_an_rgba_png_does(predictor):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (28, 28, 4)).astype(np.uint8)
    assert np.array_equal(predictor.to_pixels(rgba), predictor.to_pixels(rgba[:, :, :3]))
    from_png = predictor.to_pixels(png(rgba, "RGBA"))
    assert np.abs(predictor.to_pixels(rgba) - from_png).max() <= 1  # PIL's luma rounds to whole levels


def test_colour_arrays_get_pil_luma(predictor):
    """An H×W×3 array becomes grayscale as PIL's "L" conversion does (up to PIL's rounding)."""
    rng = np.random.default_rng(0)
    colour = np.zeros((28, 28, 3), np.uint8)
    colour[..., 0] = rng.integers(0, 256, (28, 28))  # the three channels differ: weights matter
    colour[:14, :, 1] = 255
    colour[:, :14, 2] = 200
    from_array = predictor.preprocess([colour])
    from_pil = predictor.preprocess([Image.fromarray(colour, "RGB")])
    one_level = 1 / (255 * predictor.info.std[0])  # one pixel level, normalized
    assert np.abs(from_array - from_pil).max() <= one_level


@pytest.mark.parametrize("image, message", [
    (b"", "empty image data"),
    (b"hello, not an image", "not a readable image"),
    (np.full((28, 28), np.nan), "NaN"),
    (np.full((28, 28), 300.0), "within 0-255"),
    (np.zeros((28, 28, 2)), "not an image"),
    (np.zeros((2, 3, 4, 5, 6)), "not an image"),
    (np.zeros((0, 0)), "shape \\[0, 0\\] is not an image"),
    (np.zeros((2, 0)), "not an image"),
    (np.zeros((3, 0, 5)), "not an image"),
])
def test_bad_images(predictor, image, message):
    with pytest.raises(InputError, match=message):
        predictor.predict(image)


BROKEN = sorted((Path(__file__).parents[1] / "data" / "broken_images").glob("*.bin"))


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_damaged_files_are_unreadable_images_not_crashes(predictor, path, tmp_path):
    """Mutated files that Pillow's DDS and IM plugins claim, or its TIFF decoder trips on (NotImplementedError,
    TypeError): the predictor refuses them as unreadable (a 4xx from the server), and the split stage skips
    them as unreadable files."""
    from cnnpipe.core.own_images import decode

    with pytest.raises(InputError, match=r"^not a readable image \(.+\)$"):
        predictor.predict(path.read_bytes())
    assert isinstance(decode(str(path), 1, 28), str)


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


@pytest.mark.parametrize("keep", [set(), {"cnnpipe.model", "cnnpipe.classes", "cnnpipe.input_shape",
                                            "cnnpipe.mean", "cnnpipe.std"}], ids=["none", "no-dataset"])
def test_onnx_without_cnnpipe_metadata_is_refused(onnx_model, tmp_path, keep):
    """The predictor and the quantize stage read the metadata the export stage writes: a file without it, or
    without any part of it, is refused in one line that says how to export the model; quantize writes nothing."""
    import onnx

    from cnnpipe.core.params import QuantizeParams
    from cnnpipe.stages.quantize import quantize

    proto = onnx.load(onnx_model)
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key in keep]
    del proto.metadata_props[:]
    for key, value in kept:
        proto.metadata_props.add(key=key, value=value)
    bare = tmp_path / "bare.onnx"
    onnx.save_model(proto, bare)
    message = r"bare.onnx: the ONNX file lacks cnnpipe's metadata \(.*\); export the model with `dvc repro export`"
    with pytest.raises(CnnpipeError, match=message):
        Predictor(bare, threads=1)
    with pytest.raises(CnnpipeError, match=message):
        quantize(QuantizeParams(calibration_images=16, latency_runs=1), onnx_model.parent / "prepared", bare,
                 tmp_path / "bare.int8.onnx", tmp_path / "quantize.json")
    assert [f.name for f in tmp_path.iterdir()] == ["bare.onnx"]


def test_predictor_does_not_import_torch(onnx_model):
    code = ("import sys; from cnnpipe.serve.predictor import Predictor; p = Predictor(sys.argv[1]); "
            "import numpy as np; p.predict(np.zeros((28, 28))); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(onnx_model)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_predict_cli(onnx_model, predictor, tmp_path):
    x, _ = make_images(3, 10, (1, 28, 28), seed=11)
    for i in range(3):
        (tmp_path / f"img{i}.png").write_bytes(png(x[i, 0]))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    cli = [sys.executable, "-m", "cnnpipe.cli", "predict", "--model", str(onnx_model), "-k", "2", "--json"]
    proc = subprocess.run(cli + [str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1  # one file skipped
    assert "skipped" in proc.stderr and "broken.png" in proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["path"].rsplit("/", 1)[1] for r in rows] == ["img0.png", "img1.png", "img2.png"]
    expected = predictor.predict([png(x[i, 0]) for i in range(3)], k=2)
    for row, want in zip(rows, expected, strict=True):
        assert [t["index"] for t in row["top_k"]] == [t["index"] for t in want]
        assert [t["probability"] for t in row["top_k"]] == pytest.approx([t["probability"] for t in want], abs=1e-4)
    table = subprocess.run(cli[:-1] + [str(tmp_path / "img0.png")], capture_output=True, text=True)
    assert table.returncode == 0 and "top-2" in table.stdout
    line = next(line for line in table.stdout.splitlines() if "img0.png" in line)
    assert line.split()[1:3] == [expected[0][0]["label"], f"{expected[0][0]['probability']:.3f}"]


@pytest.mark.parametrize("k", ["0", "-3", "two", "²"])
def test_predict_cli_refuses_a_k_below_one(onnx_model, tmp_path, k):
    (tmp_path / "img.png").write_bytes(png(np.zeros((28, 28))))
    proc = subprocess.run([sys.executable, "-m", "cnnpipe.cli", "predict", "--model", str(onnx_model), f"-k={k}",
                           str(tmp_path / "img.png")], capture_output=True, text=True)
    assert proc.returncode == 2 and not proc.stdout
    assert f"argument -k: '{k}' is not a whole number of at least 1" in proc.stderr


def test_predict_files_works_through_a_folder_a_batch_at_a_time(predictor, tmp_path, monkeypatch):
    """Files are read and run BATCH at a time (memory stays flat), with unreadable ones reported in place."""
    from cnnpipe.serve import predict

    x, _ = make_images(5, 10, (1, 28, 28), seed=4)
    files = []
    for i in range(5):
        files.append(tmp_path / f"img{i}.png")
        files[-1].write_bytes(png(x[i, 0]) if i != 2 else b"broken")
    monkeypatch.setattr(predict, "BATCH", 2)
    read = []
    monkeypatch.setattr(predictor, "preprocess", lambda images, resize, real=predictor.preprocess:
                        read.append(len(read)) or real(images, resize))
    results = predict.predict_files(predictor, files, 1)
    first = next(results)
    assert len(read) == 2  # only the first batch read so far
    rows = [first, *results]
    assert [f for f, _ in rows] == files and "not a readable image" in rows[2][1]
    expected = predictor.predict([png(x[i, 0]) for i in (0, 1, 3, 4)], k=1)
    got = [top for f, top in rows if f != files[2]]
    assert [[t["index"] for t in top] for top in got] == [[t["index"] for t in top] for top in expected]
    assert [top[0]["probability"] for top in got] == pytest.approx([top[0]["probability"] for top in expected],
                                                                   abs=1e-5)
