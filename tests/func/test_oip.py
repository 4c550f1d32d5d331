"""The Open Inference Protocol (KServe v2 REST) routes of `cnnpipe serve`, driven by Triton's own HTTP client
(tritonclient, a client we did not write) and by plain HTTP for the error cases."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from helpers import make_images, start_server, stop

from cnnpipe.core.onnx_io import normalize_pixels
from cnnpipe.serve.predictor import Predictor


@pytest.fixture(scope="module")
def served(onnx_model):
    proc, url = start_server(onnx_model, "--max-images", "8")
    yield url, Predictor(onnx_model, threads=1)
    stop(proc)


def client(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url.removeprefix("http://"))


def test_triton_client_health_and_metadata(served):
    url, local = served
    c = client(url)
    name, version = local.info.model, local.info.sha256[:12]
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready(name) and c.is_model_ready(name, version)
    assert not c.is_model_ready("resnet50")
    meta = c.get_model_metadata(name)
    assert meta["name"] == "bncnn" and meta["versions"] == [version]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "input": ("FP32", [-1, 1, 28, 28]), "pixels": ("UINT8", [-1, 1, 28, 28])}
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities", "label"]


@pytest.mark.parametrize("tensor", ["pixels", "input"])
def test_triton_client_infer_matches_predict(served, tensor):
    """The same images through tritonclient (UINT8 pixels or normalized FP32) and through /predict."""
    url, local = served
    x, _ = make_images(5, 10, (1, 28, 28), seed=7)  # 5×1×28×28 uint8
    data = x if tensor == "pixels" else normalize_pixels(x, local.info.mean, local.info.std)
    infer_input = triton.InferInput(tensor, list(data.shape), "UINT8" if tensor == "pixels" else "FP32")
    infer_input.set_data_from_numpy(data, binary_data=False)
    outputs = [triton.InferRequestedOutput(n, binary_data=False) for n in ("probabilities", "label", "logits")]
    result = client(url).infer("bncnn", [infer_input], outputs=outputs, request_id="req-7")
    probs = result.as_numpy("probabilities")
    assert probs.shape == (5, 10) and result.get_response()["id"] == "req-7"
    assert np.allclose(result.as_numpy("logits"), local.logits(normalize_pixels(x, local.info.mean, local.info.std)),
                       atol=1e-4)

    predicted = httpx.post(url + "/predict?k=10", json=[img[0].tolist() for img in x]).json()["predictions"]
    for row, p in zip(predicted, probs, strict=True):
        assert [e["index"] for e in row][0] == int(p.argmax())
        assert {e["index"]: e["probability"] for e in row} == pytest.approx(dict(enumerate(p.tolist())), abs=1e-5)
    labels = [b.decode() if isinstance(b, bytes) else b for b in result.as_numpy("label")]
    assert labels == [row[0]["label"] for row in predicted]


def test_flat_and_nested_data_and_selected_outputs(served):
    url, local = served
    x, _ = make_images(2, 10, (1, 28, 28), seed=8)
    route = f"{url}/v2/models/bncnn/infer"
    tensor = {"name": "pixels", "datatype": "UINT8", "shape": [2, 1, 28, 28]}
    flat = httpx.post(route, json={"inputs": [tensor | {"data": x.reshape(-1).tolist()}],
                                   "outputs": [{"name": "label"}]}).json()
    nested = httpx.post(route, json={"inputs": [tensor | {"data": x.tolist()}], "outputs": [{"name": "label"}]})
    assert nested.status_code == 200 and nested.json() == flat
    assert [o["name"] for o in flat["outputs"]] == ["label"] and "id" not in flat
    assert flat["outputs"][0]["data"] == [r[0]["label"] for r in local.predict(list(x[:, 0]), k=1)]
    assert flat["model_name"] == "bncnn" and flat["model_version"] == local.info.sha256[:12]


def pixels_request(tensor: dict | None = None, **request) -> dict:
    """A one-image UINT8 `pixels` request, with some of the tensor's or the request's fields replaced."""
    base = {"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}
    return {"inputs": [base | (tensor or {})], **request}


@pytest.mark.parametrize("path, body, status, message", [
    ("/v2/models/resnet/infer", None, 404, "no model 'resnet'"),
    ("/v2/models/bncnn/versions/0/infer", None, 404, "version '0'"),
    (None, {"inputs": []}, 400, "one tensor"),
    (None, pixels_request({"name": "image"}), 400, "unknown input 'image'"),
    (None, pixels_request({"name": ["pixels"]}), 400, "unknown input ['pixels']"),
    (None, pixels_request({"name": "input", "datatype": "FP32", "data": [1e39] * 784}), 400, "beyond float32"),
    (None, pixels_request({"datatype": "FP32"}), 400, "datatype UINT8"),
    (None, pixels_request({"shape": [1, 3, 28, 28], "data": [0] * 2352}), 400, "shape must be [N, 1, 28, 28]"),
    (None, pixels_request({"shape": [2, 1, 28, 28]}), 400, "784 values; shape [2, 1, 28, 28] needs 1568"),
    (None, pixels_request({"data": [300] * 784}), 400, "0 to 255"),
    (None, pixels_request({"shape": [9, 1, 28, 28], "data": [0] * 7056}), 413, "the limit is 8"),
    (None, pixels_request(outputs=[{"name": "embedding"}]), 400, "unknown output 'embedding'"),
    (None, pixels_request({"parameters": [1]}), 400, "input parameters must be an object"),
    (None, pixels_request(parameters="binary"), 400, "request parameters must be an object"),
    (None, pixels_request(outputs=[{"name": "label", "parameters": 3}]), 400, "output parameters must be an object"),
])
def test_bad_infer_requests_get_4xx_json(served, path, body, status, message):
    url, _ = served
    r = httpx.post(url + (path or "/v2/models/bncnn/infer"), json=body or {"inputs": []})
    assert r.status_code == status and message in r.json()["error"], r.text


@pytest.mark.parametrize("tensor", ["pixels", "input"])
def test_triton_client_binary_tensors(served, tensor):
    """tritonclient's defaults: raw tensor bytes in the request (binary extension) and binary outputs back;
    the answers equal the JSON tensors' ones."""
    url, local = served
    x, _ = make_images(4, 10, (1, 28, 28), seed=9)
    data = x if tensor == "pixels" else normalize_pixels(x, local.info.mean, local.info.std)
    infer_input = triton.InferInput(tensor, list(data.shape), "UINT8" if tensor == "pixels" else "FP32")
    infer_input.set_data_from_numpy(data)  # binary_data=True is the default
    result = client(url).infer("bncnn", [infer_input])  # no outputs named: all of them, binary
    expected = local.logits(normalize_pixels(x, local.info.mean, local.info.std))
    assert np.allclose(result.as_numpy("logits"), expected, atol=1e-4)
    assert np.allclose(result.as_numpy("probabilities").sum(1), 1, atol=1e-5)
    labels = [b.decode() if isinstance(b, bytes) else b for b in result.as_numpy("label")]
    assert labels == [local.info.classes[i] for i in expected.argmax(1)]

    body = b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28], ' \
           b'"parameters": {"binary_data_size": 784}}]}'
    short = httpx.post(url + "/v2/models/bncnn/infer", content=body + b"\0" * 100,
                       headers={"Inference-Header-Content-Length": str(len(body))})
    assert short.status_code == 400 and "needs 784 bytes" in short.json()["error"]

    asked = httpx.post(url + "/v2/models/bncnn/infer", json={
        "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                    "data": x[:1].reshape(-1).tolist()}],
        "outputs": [{"name": "label", "parameters": {"binary_data": True}}, {"name": "logits"}]})
    head = int(asked.headers["inference-header-content-length"])
    meta = json.loads(asked.content[:head])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == len(asked.content) - head
    assert np.allclose(meta["outputs"][1]["data"], expected[0], atol=1e-4)
    blob = asked.content[head:]
    assert blob[4:].decode() == labels[0] and int.from_bytes(blob[:4], "little") == len(labels[0])


@pytest.mark.parametrize("header", ["12x", "-1", "\u00b2", "\u0663", "999"])
def test_a_binary_header_length_that_is_not_an_ascii_count_within_the_body_is_a_400(header):
    """Inference-Header-Content-Length arrives as latin-1 text: a superscript two or an Arabic-Indic digit
    passes str.isdigit but not int(), and must be refused like any other bad length."""
    from cnnpipe.serve.oip import OipError, split_body

    with pytest.raises(OipError) as refused:
        split_body(b'{"inputs": []}', header)
    assert refused.value.status == 400 and "does not fit the 14-byte body" in str(refused.value)

