"""`cnnpipe serve --workers N`: several processes on one port, /metrics merged over all of them."""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from helpers import make_images, start_server, stop
from prometheus_client.parser import text_string_to_metric_families
from test_serve_hostile import seconds_until_closed

from cnnpipe.bench.serve import Load, measure
from cnnpipe.serve.server import worker_threads

pytestmark = pytest.mark.slow


def samples(url: str) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(url + "/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def post_png(url: str, body: bytes) -> tuple[int, int]:
    """One request on a new connection (the kernel spreads connections over the processes): status, pid."""
    with httpx.Client() as client:
        status = client.post(url + "/predict?k=1", content=body, headers={"content-type": "image/png"}).status_code
        return status, client.get(url + "/metadata").json()["pid"]


def test_two_workers_share_the_port_and_metrics_count_all_of_them(onnx_model):
    import io

    from PIL import Image

    x, _ = make_images(1, 10, (1, 28, 28), seed=3)
    buf = io.BytesIO()
    Image.fromarray(x[0, 0]).save(buf, format="PNG")
    proc, url = start_server(onnx_model, "--workers", "2", "--header-timeout", "2")
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: post_png(url, buf.getvalue()), range(120)))
        assert {status for status, _ in answers} == {200}
        pids = {pid for _, pid in answers}
        assert len(pids) == 2 and proc.pid not in pids  # two worker processes answered, not the supervisor
        after = samples(url)
        # every process's requests are in the one /metrics, whichever process answers it
        assert after[("cnnpipe_requests_total", frozenset({"route": "/predict", "method": "POST",
                                                           "status": "200"}.items()))] == 120
        assert after[("cnnpipe_images_total", frozenset())] == 120
        assert after[("cnnpipe_requests_total", frozenset({"route": "/metadata", "method": "GET",
                                                           "status": "200"}.items()))] == 120
        host, port = url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(6)]  # spread over both processes
        with ThreadPoolExecutor(6) as pool:  # each worker process got --header-timeout from the supervisor
            closed = list(pool.map(seconds_until_closed, idle))
        assert all(seconds is not None and 1 < seconds < 6 for seconds in closed), closed
    finally:
        stop(proc)


def test_threads_default_to_an_even_share_of_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert worker_threads(0, 1) == cores
    assert worker_threads(0, cores) == 1
    assert worker_threads(0, 4 * cores) == 1  # never 0 (onnxruntime would take all cores again)
    assert worker_threads(3, 2) == 3  # an explicit count wins


def test_the_python_load_generator_counts_answers_and_errors(onnx_model, tmp_path):
    """The fallback when wrk is not installed: 200s counted as requests, 4xx as errors."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buf, format="PNG")
    proc, url = start_server(onnx_model)
    port = int(url.rsplit(":", 1)[1])
    try:
        good = measure(port, Load("/predict?k=1", buf.getvalue(), "image/png"), 4, 0.5, "python asyncio", tmp_path)
        bad = measure(port, Load("/predict?k=0", buf.getvalue(), "image/png"), 4, 0.5, "python asyncio", tmp_path)
    finally:
        stop(proc)
    assert good["requests"] > 0 and good["errors"] == 0
    assert bad["requests"] == 0 and bad["errors"] > 0
