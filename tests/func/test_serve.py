"""`cnnpipe serve` as a real uvicorn process on loopback, driven over HTTP."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import make_images, start_server, stop
from PIL import Image

CLI = str(Path(sys.executable).parent / "cnnpipe")



@pytest.fixture(scope="module")
def server(onnx_model):
    proc, url = start_server(onnx_model, "--max-images", "4", "--max-body-bytes", "200000")
    yield url
    stop(proc)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_health_ready_metadata(server):
    assert httpx.get(server + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server + "/readyz").json() == {"status": "ready"}
    meta = httpx.get(server + "/metadata").json()
    assert meta["classes"] == [str(d) for d in range(10)] and meta["input_shape"] == [1, 28, 28]
    assert len(meta["sha256"]) == 64 and meta["opset"] == 18 and meta["providers"] == ["CPUExecutionProvider"]
    assert set(meta["normalization"]) == {"mean", "std"}


def test_predict_multipart_json_and_raw(server):
    x, y = make_images(3, 10, (1, 28, 28), seed=21)
    files = [("files", (f"{i}.png", png(x[i, 0]), "image/png")) for i in range(3)]
    r = httpx.post(server + "/predict?k=2", files=files)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3 and all(len(p) == 2 for p in preds)
    by_json = httpx.post(server + "/predict?k=2", json=[x[i, 0].tolist() for i in range(3)]).json()["predictions"]
    assert [p[0]["label"] for p in by_json] == [p[0]["label"] for p in preds]
    raw = httpx.post(server + "/predict", content=png(x[0, 0]), headers={"content-type": "image/png"})
    assert raw.json()["predictions"][0][0]["label"] == preds[0][0]["label"]
    assert sum(p[0]["index"] == label for p, label in zip(preds, y, strict=True)) >= 2


@pytest.mark.parametrize("kwargs, status, message", [
    ({"content": b"not an image", "headers": {"content-type": "image/png"}}, 422, "not a readable image"),
    ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty request body"),
    ({"content": b"{bad json", "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
    ({"content": b"[[NaN, 1], [1, 1]]", "headers": {"content-type": "application/json"}}, 422, "NaN"),
    ({"json": [np.full((28, 28), 999).tolist()]}, 422, "within 0-255"),
    ({"json": [np.zeros((28, 28, 2)).tolist()]}, 422, "not an image"),
    ({"json": [[[1, 2], [3]]]}, 422, "rectangular array"),
    ({"json": {"nothing": 1}}, 422, "non-empty array"),
    ({"json": [np.zeros((28, 28)).tolist()] * 5}, 413, "limit is 4"),
    ({"content": b"x" * 300_000, "headers": {"content-type": "image/png"}}, 413, "200000-byte limit"),
    ({"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "unsupported content type"),
    ({"files": [("f", ("a.txt", b"hello", "text/plain"))]}, 422, "not a readable image"),
])
def test_bad_requests_get_4xx_json(server, kwargs, status, message):
    r = httpx.post(server + "/predict", **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_truncated_png_and_bad_k(server):
    data = png(np.zeros((28, 28)))
    r = httpx.post(server + "/predict", content=data[:40], headers={"content-type": "image/png"})
    assert r.status_code == 422
    r = httpx.post(server + "/predict?k=11", content=data, headers={"content-type": "image/png"})
    assert r.status_code == 422 and "k must be" in r.json()["error"]


def test_chunked_body_over_limit(server):
    def chunks():
        for _ in range(30):
            yield b"x" * 10_000

    r = httpx.post(server + "/predict", content=chunks(), headers={"content-type": "image/png"})
    assert r.status_code == 413


def test_unknown_route_and_method(server):
    r = httpx.get(server + "/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server + "/predict")
    assert r.status_code == 405 and "error" in r.json()


def test_concurrent_requests_are_batched_and_counted(server):
    x, _ = make_images(1, 10, (1, 28, 28), seed=1)
    body = json.dumps([x[0, 0].tolist()])
    errors = []

    def client():
        with httpx.Client() as c:
            for _ in range(10):
                r = c.post(server + "/predict", content=body, headers={"content-type": "application/json"})
                if r.status_code != 200:
                    errors.append(r.status_code)

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    text = httpx.get(server + "/metrics").text
    batches = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
               if line.startswith("cnnpipe_batch_size_") and not line.startswith("#")}
    runs = batches["cnnpipe_batch_size_count"]
    images = batches["cnnpipe_batch_size_sum"]
    assert images > runs  # some onnxruntime runs served more than one request
    assert 'cnnpipe_requests_total{method="POST",route="/predict",status="200"}' in text
    assert 'status="422"' in text and "cnnpipe_request_seconds_bucket" in text


def test_graceful_shutdown_finishes_in_flight(onnx_model):
    proc, url = start_server(onnx_model, "--max-wait-ms", "300", "--max-batch", "64")
    try:
        result = {}

        def slow_request():
            result["r"] = httpx.post(url + "/predict", json=[np.zeros((28, 28)).tolist()], timeout=30)

        t = threading.Thread(target=slow_request)
        t.start()
        time.sleep(0.1)  # the request now waits in the batcher (300 ms window)
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert result["r"].status_code == 200
        # uvicorn re-raises the SIGTERM it handled once shutdown is complete
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        stop(proc)


def test_missing_or_bad_model_fails_at_start(tmp_path):
    proc = subprocess.run([CLI, "serve", str(tmp_path / "none.onnx")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "model file not found" in proc.stderr
    (tmp_path / "bad.onnx").write_text("nope")
    proc = subprocess.run([CLI, "serve", str(tmp_path / "bad.onnx")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "not a loadable ONNX model" in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1


def test_no_resize_option_refuses_other_sizes(onnx_model):
    proc, url = start_server(onnx_model, "--no-resize")
    try:
        r = httpx.post(url + "/predict", content=png(np.zeros((30, 30))), headers={"content-type": "image/png"})
        assert r.status_code == 422 and "the model takes 28×28" in r.json()["error"]
        assert httpx.post(url + "/predict", content=png(np.zeros((28, 28))),
                          headers={"content-type": "image/png"}).status_code == 200
    finally:
        stop(proc)


