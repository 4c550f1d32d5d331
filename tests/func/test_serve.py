"""`cnnpipe serve` as a real uvicorn process on loopback, driven over HTTP."""

from __future__ import annotations

import hashlib
import io
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
from prometheus_client.parser import text_string_to_metric_families

from cnnpipe.serve.predictor import Predictor

CLI = str(Path(sys.executable).parent / "cnnpipe")


@pytest.fixture(scope="module")
def server(onnx_model):
    proc, url = start_server(onnx_model, "--max-images", "4", "--max-body-bytes", "200000")
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def local(onnx_model) -> Predictor:
    """The same model in this process: what the service should answer."""
    return Predictor(onnx_model, threads=1)


def metrics(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics: (name, labels) -> value."""
    text = httpx.get(url + "/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def assert_same_top_k(got: list, expected: list) -> None:
    """Labels and order exactly; probabilities up to float noise between batch sizes."""
    assert [[(p["index"], p["label"]) for p in row] for row in got] == \
        [[(p["index"], p["label"]) for p in row] for row in expected]
    assert [p["probability"] for row in got for p in row] == pytest.approx(
        [p["probability"] for row in expected for p in row], abs=1e-4)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_health_ready_metadata(server, onnx_model):
    assert httpx.get(server + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server + "/readyz").json() == {"status": "ready"}
    meta = httpx.get(server + "/metadata").json()
    assert meta["classes"] == [str(d) for d in range(10)] and meta["input_shape"] == [1, 28, 28]
    assert meta["sha256"] == hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    assert meta["opset"] == 18 and meta["providers"] == ["CPUExecutionProvider"]
    train_x = np.load(onnx_model.parent / "prepared" / "train_x.npy")  # normalization: the train split's
    assert meta["normalization"]["mean"] == pytest.approx([train_x.mean(dtype=np.float64) / 255], rel=1e-6)
    assert meta["normalization"]["std"] == pytest.approx([train_x.std(dtype=np.float64) / 255], rel=1e-6)
    assert meta["max_images"] == 4


def test_predict_multipart_json_and_raw(server, local, onnx_model):
    x, y = make_images(3, 10, (1, 28, 28), seed=21)
    expected = local.predict(list(x[:, 0]), k=2)
    files = [("files", (f"{i}.png", png(x[i, 0]), "image/png")) for i in range(3)]
    r = httpx.post(server + "/predict?k=2", files=files)
    assert r.status_code == 200, r.text
    assert r.json()["model_sha256"] == hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    preds = r.json()["predictions"]
    assert_same_top_k(preds, expected)
    by_json = httpx.post(server + "/predict?k=2", json=[x[i, 0].tolist() for i in range(3)]).json()["predictions"]
    assert_same_top_k(by_json, expected)
    raw = httpx.post(server + "/predict", content=png(x[1, 0]), headers={"content-type": "image/png"})
    assert_same_top_k(raw.json()["predictions"], local.predict(x[1, 0], k=5))  # default k: 5
    assert sum(p[0]["index"] == label for p, label in zip(preds, y, strict=True)) >= 2


@pytest.mark.parametrize("kwargs, status, message", [
    ({"content": b"not an image", "headers": {"content-type": "image/png"}}, 422, "not a readable image"),
    ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty request body"),
    ({"content": b"{bad json", "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
    ({"content": b"[[NaN, 1], [1, 1]]", "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
    ({"json": [np.full((28, 28), 999).tolist()]}, 422, "within 0-255"),
    ({"json": [np.zeros((28, 28, 2)).tolist()]}, 422, "not an image"),
    ({"json": [[[]]]}, 422, "shape [1, 0] is not an image"),
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
    assert r.status_code == 422 and "not a readable image" in r.json()["error"]
    r = httpx.post(server + "/predict?k=11", content=data, headers={"content-type": "image/png"})
    assert r.status_code == 422 and "k must be" in r.json()["error"]


def test_chunked_body_over_limit(server):
    def chunks():
        for _ in range(30):
            yield b"x" * 10_000

    r = httpx.post(server + "/predict", content=chunks(), headers={"content-type": "image/png"})
    assert r.status_code == 413 and "200000-byte limit" in r.json()["error"]


def test_unknown_route_and_method(server):
    r = httpx.get(server + "/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server + "/predict")
    assert r.status_code == 405 and "error" in r.json()


def concurrent_predictions(url: str, images: np.ndarray, rounds: int) -> list[list]:
    """One thread per image, released together, each posting its image alone `rounds` times in a row;
    returns each thread's (status, predictions) per request."""
    barrier = threading.Barrier(len(images))
    results: list[list] = [[] for _ in images]

    def client(i: int) -> None:
        body = [images[i].tolist()]
        with httpx.Client(timeout=30) as c:
            barrier.wait()
            for _ in range(rounds):
                r = c.post(url + "/predict?k=3", json=body)
                results[i].append((r.status_code, r.json().get("predictions")))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize("max_batch", [64, 1])
def test_concurrent_requests_are_batched_and_counted(onnx_model, local, max_batch):
    """Concurrent one-image requests share onnxruntime runs, each gets its own image's answer, and the
    counters add up; with --max-batch 1 every image has a run of its own."""
    clients, rounds = 8, 3
    x, _ = make_images(clients, 10, (1, 28, 28), seed=1)
    expected = local.predict(list(x[:, 0]), k=3)
    proc, url = start_server(onnx_model, "--max-batch", str(max_batch), "--max-wait-ms", "50")
    try:
        before = metrics(url)
        results = concurrent_predictions(url, x[:, 0], rounds)
        after = metrics(url)
    finally:
        stop(proc)
    for i, got in enumerate(results):
        assert [status for status, _ in got] == [200] * rounds
        for _, predictions in got:
            assert_same_top_k(predictions, [expected[i]])
    n = clients * rounds
    runs = delta(before, after, "cnnpipe_batch_size_count")
    assert delta(before, after, "cnnpipe_batch_size_sum") == n
    assert delta(before, after, "cnnpipe_images_total") == n
    assert delta(before, after, "cnnpipe_requests_total", route="/predict", method="POST", status="200") == n
    assert delta(before, after, "cnnpipe_request_seconds_count", route="/predict") == n
    if max_batch == 1:
        assert runs == n
    else:
        assert runs < n  # some runs served several requests


def test_metrics_count_requests_by_route_and_status(server):
    before = metrics(server)
    assert httpx.post(server + "/predict?k=0", content=png(np.zeros((28, 28))),
                      headers={"content-type": "image/png"}).status_code == 422
    assert httpx.post(server + "/predict", content=b"x" * 300_000,
                      headers={"content-type": "image/png"}).status_code == 413
    assert httpx.get(server + "/nope").status_code == 404
    after = metrics(server)
    assert delta(before, after, "cnnpipe_requests_total", route="/predict", method="POST", status="422") == 1
    assert delta(before, after, "cnnpipe_requests_total", route="/predict", method="POST", status="413") == 1
    assert delta(before, after, "cnnpipe_requests_total", route="unmatched", method="GET", status="404") == 1
    assert delta(before, after, "cnnpipe_requests_total", route="/predict", method="POST", status="200") == 0
    assert delta(before, after, "cnnpipe_request_seconds_count", route="/predict") == 2
    assert delta(before, after, "cnnpipe_images_total") == 0
    assert delta(before, after, "cnnpipe_batch_size_count") == 0


def test_graceful_shutdown_finishes_in_flight(onnx_model):
    proc, url = start_server(onnx_model, "--max-wait-ms", "300", "--max-batch", "64")
    try:
        result = {}

        def slow_request():
            result["r"] = httpx.post(url + "/predict", json=[np.zeros((28, 28)).tolist()], timeout=30)
            result["answered"] = time.monotonic()

        t = threading.Thread(target=slow_request)
        t.start()
        time.sleep(0.1)  # the request now waits in the batcher (300 ms window)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert result["r"].status_code == 200
        assert result["answered"] > signalled  # it was still in flight when the signal came
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


