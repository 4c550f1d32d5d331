"""`cnnpipe serve` under hostile or odd traffic, as a real uvicorn process on loopback: every case answers
with the right 4xx and a JSON body (or is counted as the client's doing), and the service keeps serving."""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from helpers import make_images, start_server, stop
from test_serve import assert_same_top_k, delta, metrics, png

from cnnpipe.serve.predictor import Predictor


@pytest.fixture(scope="module")
def server(onnx_model):
    proc, url = start_server(onnx_model, "--max-images", "4", "--max-body-bytes", "200000", "--max-pixels", "10000",
                             "--body-timeout", "1", "--header-timeout", "60")
    yield url
    stop(proc)


def black_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A valid black grey PNG of width×height (tiny once compressed); with `rows`, only that many rows of
    data follow the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    scanlines = zlib.compress(bytes((width + 1) * (height if rows is None else rows)), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", scanlines) + chunk(b"IEND", b"")


def raw_request(url: str, head: bytes, body_parts: list[bytes], pause: float = 0.0) -> socket.socket:
    """Send a request by hand: the head, then the body parts `pause` seconds apart; returns the open socket."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head)
    for part in body_parts:
        time.sleep(pause)
        sock.sendall(part)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < content_length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_pixel_budget_is_checked_from_the_header(server):
    """Refused from the header, before decoding: a complete, valid 49-megapixel PNG (50 kB compressed) and a
    header claiming 400 megapixels (past Pillow's own bomb limit); the budget (10,000 here) is exact: 100×100
    passes, 101×100 does not, and C×H×W arrays count H×W."""
    for image, pixels in ((black_png(7000, 7000), 49_000_000), (black_png(20_000, 20_000, rows=1), 400_000_000)):
        r = httpx.post(server + "/predict", content=image, headers={"content-type": "image/png"})
        assert r.status_code == 422 and f"{pixels} pixels, over the limit of 10000" in r.json()["error"]
    ok = httpx.post(server + "/predict", content=png(np.zeros((100, 100))), headers={"content-type": "image/png"})
    assert ok.status_code == 200
    over = httpx.post(server + "/predict", content=png(np.zeros((100, 101))), headers={"content-type": "image/png"})
    assert over.status_code == 422 and "10100 pixels" in over.json()["error"]
    for shape in ((101, 100), (1, 101, 100), (101, 100, 3)):  # arrays have the budget too, in every layout
        arrays = httpx.post(server + "/predict", json=[np.zeros(shape).tolist()])
        assert arrays.status_code == 422 and "10100 pixels" in arrays.json()["error"], shape


@pytest.mark.parametrize("body, status, message", [
    (b"[" * 100_000 + b"]" * 100_000, 400, "malformed JSON"),  # past the parser's depth limit
    (b"[" * 200 + b"0" + b"]" * 200, 422, "rectangular array"),  # parsed, but no image has 199 dimensions
    (b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "malformed JSON"),
])
def test_deeply_nested_json_is_a_4xx(server, body, status, message):
    r = httpx.post(server + "/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and message in r.json()["error"]


def test_absurd_query_values_are_a_4xx(server):
    for k in ("9" * 5000, "-1", "1e3", "0x10"):
        r = httpx.post(server + f"/predict?k={k}", content=png(np.zeros((28, 28))),
                       headers={"content-type": "image/png"})
        assert r.status_code == 422 and "k must be an integer from 1 to 10" in r.json()["error"], k


def test_too_many_images_is_413_however_many(server):
    for n in (5, 6, 50):
        files = [("f", (f"{i}.png", png(np.zeros((28, 28))), "image/png")) for i in range(n)]
        r = httpx.post(server + "/predict", files=files)
        assert r.status_code == 413 and "the limit is 4" in r.json()["error"], n
        r = httpx.post(server + "/predict", json=[np.zeros((28, 28)).tolist()] * n)
        assert r.status_code == 413 and "the limit is 4" in r.json()["error"], n


def test_an_answer_before_the_body_closes_the_connection(server):
    """A request refused before its body is read (bad k) gets its 4xx and the connection closes, so the rest
    of a huge announced body cannot be trickled in afterwards."""
    head = (b"POST /predict?k=x HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 150000\r\n\r\n")
    sock = raw_request(server, head, [b"\0" * 10])
    status, body = read_response(sock)
    assert status == 422 and "k must be" in body["error"]
    sock.settimeout(5)
    try:
        for _ in range(20):
            sock.sendall(b"\0" * 1000)
            time.sleep(0.05)
        closed = sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):  # closed as well
        closed = True
    except TimeoutError:  # still open: the server is waiting for the rest of the body
        closed = False
    sock.close()
    assert closed


def test_client_hanging_up_mid_body_is_not_a_server_error(server):
    before = metrics(server)
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n")
    raw_request(server, head, [b"\x89PNG" + b"\0" * 100]).close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = metrics(server)
        if delta(before, after, "cnnpipe_requests_total", route="/predict", method="POST", status="499"):
            break
        time.sleep(0.05)
    assert delta(before, after, "cnnpipe_requests_total", route="/predict", method="POST", status="499") == 1
    assert delta(before, after, "cnnpipe_requests_total", route="/predict", method="POST", status="500") == 0


def test_a_body_that_trickles_in_times_out_with_408(server):
    """Sent a byte every 0.3 s, the body would take 30 s; the service answers 408 after its 1-second limit,
    and answers everyone else meanwhile."""
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\n"
    result = {}

    def slow():
        sock = raw_request(server, head, [])
        t0 = time.perf_counter()
        for _ in range(100):
            if select.select([sock], [], [], 0.3)[0]:  # the answer came
                break
            sock.sendall(b"\0")
        result["status"], result["body"] = read_response(sock)
        result["closed"] = sock.recv(1) == b""
        result["seconds"] = time.perf_counter() - t0
        sock.close()

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.2)
    health = httpx.get(server + "/healthz", timeout=2)
    thread.join(30)
    assert health.status_code == 200
    assert result["status"] == 408 and "not received within 1 s" in result["body"]["error"]
    assert result["seconds"] < 5 and result["closed"]


def seconds_until_closed(sock: socket.socket, trickle: bytes = b"", limit: float = 8.0) -> float | None:
    """Wait for the server to close `sock`, sending `trickle` a byte every 0.2 s meanwhile; the seconds it
    took, or None when it was still open after `limit` seconds."""
    t0 = time.perf_counter()
    for i in range(int(limit / 0.2)):
        if select.select([sock], [], [], 0.2)[0]:
            try:
                if sock.recv(65536) == b"":
                    return time.perf_counter() - t0
            except ConnectionResetError:
                return time.perf_counter() - t0
        if trickle:
            try:
                sock.sendall(trickle[i % len(trickle): i % len(trickle) + 1])
            except (BrokenPipeError, ConnectionResetError):
                return time.perf_counter() - t0
    return None


@pytest.fixture
def head_server(onnx_model):
    proc, url = start_server(onnx_model, "--header-timeout", "1")
    yield url
    stop(proc)


def test_a_request_head_that_never_completes_is_cut_off(head_server):
    """Slowloris: connections that send nothing, trickle their headers a byte at a time, or go quiet after a
    first answer are closed after --header-timeout (1 s here) while the service answers everyone else; a
    head sent in two parts within the limit is served."""
    server = head_server
    host, port = server.removeprefix("http://").split(":")
    idle = socket.create_connection((host, int(port)))
    trickling = raw_request(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ", [])
    reused = raw_request(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", [])
    assert read_response(reused)[0] == 200
    results = {}
    threads = [threading.Thread(target=lambda name=name, sock=sock, trickle=trickle: results.__setitem__(
        name, seconds_until_closed(sock, trickle))) for name, sock, trickle in (
        ("idle", idle, b""), ("trickling", trickling, b"abcdefgh"), ("reused", reused, b"GET /healthz"))]
    for thread in threads:
        thread.start()
    health = [httpx.get(server + "/healthz", timeout=2).status_code for _ in range(5)]
    split = raw_request(server, b"GET /healthz HTTP/1.1\r\n", [b"Host: x\r\n\r\n"], pause=0.4)
    assert read_response(split)[0] == 200
    for thread in threads:
        thread.join(15)
    assert health == [200] * 5
    assert all(seconds is not None and 0.3 < seconds < 4 for seconds in results.values()), results
    for sock in (idle, trickling, reused, split):
        sock.close()


def test_an_endless_header_gets_431_and_a_large_body_is_not_a_header(server):
    """A header that never ends is refused at 64 kB (httptools alone buffers it all: 150 MB in 8 s of one
    connection); a body sent in the same packets as its headers is not counted as head."""
    sock = raw_request(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ", [])
    sent = 0
    while sent < 10_000_000 and not select.select([sock], [], [], 0)[0]:  # until the answer comes
        sock.sendall(b"a" * 16384)
        sent += 16384
    status, body = read_response(sock)
    assert status == 431 and "over 65536 bytes" in body["error"] and sent < 10_000_000  # answered midway
    sock.close()
    big = b"[[" + b",".join([b"0"] * 80_000) + b"]]"  # a 1×80,000 image: 160 kB of JSON, sent with its head
    sock = raw_request(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       + f"Content-Length: {len(big)}\r\n\r\n".encode() + big, [])
    status, body = read_response(sock)
    assert status == 422 and "80000" in body["error"]  # read whole and judged as an image, not refused as head
    sock.close()


def test_bodies_held_at_once_are_bounded(onnx_model):
    """Many connections each sending a large body slowly would hold that much memory: with room for 250 kB
    of bodies, three 80 kB halves fit, a fourth body gets 503 with Retry-After (by Content-Length, or while a
    chunked one streams), /healthz still answers, and once the three hang up there is room again."""
    proc, url = start_server(onnx_model, "--max-body-bytes", "100000", "--max-inflight-bytes", "250000",
                             "--body-timeout", "20")
    try:
        head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 90000\r\n\r\n"
        held = [raw_request(url, head, [b"\0" * 80_000]) for _ in range(3)]
        deadline = time.monotonic() + 10
        while True:  # a whole 90 kB body: 422 (not an image) until the server has counted the three halves
            fourth = raw_request(url, head, [b"\0" * 90_000])
            status, body = read_response(fourth)
            fourth.close()
            if status != 422 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status == 503 and "over 250000 bytes" in body["error"]
        chunked = raw_request(url, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n", [b"%x\r\n" % 20_000 + b"\0" * 20_000 + b"\r\n"])
        assert read_response(chunked)[0] == 503
        assert httpx.get(url + "/healthz", timeout=2).status_code == 200
        retry = httpx.post(url + "/predict", content=b"\0" * 90_000, headers={"content-type": "image/png"})
        assert retry.status_code == 503 and retry.headers["retry-after"] == "1"
        multipart = raw_request(url, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                                b"boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n",
                                [b"%x\r\n" % 20_000 + b"\0" * 20_000 + b"\r\n"])  # through FastAPI's route
        data = b""
        while chunk := multipart.recv(65536):  # the server closes it after the answer
            data += chunk
        assert data.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in data.lower() and b"over 250000" in data
        for sock in held + [chunked, multipart]:
            sock.close()
        time.sleep(0.5)  # their requests end: the bytes they held are released
        after = httpx.post(url + "/predict", content=b"\0" * 90_000, headers={"content-type": "image/png"})
        assert after.status_code == 422, after.text  # read whole and refused as not an image, not as busy
    finally:
        stop(proc)


def test_max_batch_is_a_true_bound(onnx_model):
    """With --max-batch 4, concurrent 3-image requests never share a run (3 + 3 > 4), a 7-image request is
    split into runs of at most 4, and every answer is still its own images' answer."""
    local = Predictor(onnx_model, threads=1)
    x, _ = make_images(7, 10, (1, 28, 28), seed=3)
    expected = local.predict(list(x[:, 0]), k=2)
    proc, url = start_server(onnx_model, "--max-batch", "4", "--max-images", "8", "--max-wait-ms", "50")
    try:
        before = metrics(url)
        results: dict[int, httpx.Response] = {}
        barrier = threading.Barrier(6)

        def send(i: int) -> None:
            barrier.wait()
            files = [("f", (f"{j}.png", png(x[j, 0]), "image/png")) for j in range(3)]
            results[i] = httpx.post(url + "/predict?k=2", files=files, timeout=30)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        big = httpx.post(url + "/predict?k=2", files=[("f", (f"{j}.png", png(x[j, 0]), "image/png"))
                                                        for j in range(7)], timeout=30)
        after = metrics(url)
    finally:
        stop(proc)
    for r in results.values():
        assert r.status_code == 200
        assert_same_top_k(r.json()["predictions"], expected[:3])
    assert big.status_code == 200
    assert_same_top_k(big.json()["predictions"], expected)
    runs = delta(before, after, "cnnpipe_batch_size_count")
    assert delta(before, after, "cnnpipe_batch_size_sum") == 6 * 3 + 7
    assert delta(before, after, "cnnpipe_batch_size_bucket", le="4.0") == runs  # no run above 4 images
    assert runs >= 6 + 2
