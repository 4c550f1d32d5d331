"""`cnnpipe bench serve`: inference latency and HTTP service throughput, side by side in one run.

(a) batch-1 and batch-64 latency (p50/p99) of onnxruntime fp32, onnxruntime int8 and torch eager;
(b) `cnnpipe serve` on loopback under a closed loop of N concurrent keep-alive clients for a fixed time,
    with dynamic batching on and off: requests/s, p50/p99 latency, errors.
Prints a table and writes JSON.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cnnpipe.data import load_split
from cnnpipe.fsutil import write_json

log = logging.getLogger(__name__)


def percentiles(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    return {"p50_ms": round(statistics.median(ms), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def time_calls(fn, runs: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def engine_latency(onnx_path: Path, int8_path: Path | None, checkpoint: Path, x: np.ndarray,
                   runs: int) -> list[dict]:
    """Latency rows for each engine and batch size, measured interleaved in one process."""
    import onnxruntime as ort
    import torch

    from cnnpipe.checkpoint import load_checkpoint
    from cnnpipe.predictor import session_options

    engines = {"onnxruntime fp32": ort.InferenceSession(str(onnx_path), session_options(),
                                                        providers=["CPUExecutionProvider"])}
    if int8_path is not None and int8_path.is_file():
        engines["onnxruntime int8"] = ort.InferenceSession(str(int8_path), session_options(),
                                                           providers=["CPUExecutionProvider"])
    model, _ = load_checkpoint(checkpoint, "cpu")
    rows = []
    for batch in (1, 64):
        xb = np.ascontiguousarray(x[:batch])
        tb = torch.from_numpy(xb)
        feeds = {name: s.get_inputs()[0].name for name, s in engines.items()}
        calls = {name: (lambda s=s, xb=xb, feed=feeds[name]: s.run(None, {feed: xb})) for name, s in engines.items()}

        def torch_call(tb=tb):
            with torch.inference_mode():
                model(tb)

        calls["torch eager"] = torch_call
        n = runs if batch == 1 else max(20, runs // 8)
        for name, fn in calls.items():
            rows.append({"engine": name, "batch": batch, "runs": n, **percentiles(time_calls(fn, n))})
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, max_batch: int, threads: int, max_wait_ms: float = 1.0) -> tuple[subprocess.Popen, int]:
    import urllib.request

    port = free_port()
    cmd = [sys.executable, "-m", "cnnpipe.cli", "-q", "serve", str(model), "--port", str(port),
           "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-500:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready within 60 s")


async def _client(port: int, request: bytes, deadline: float, latencies: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    try:
        while loop.time() < deadline:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if status == 200:
                latencies.append((time.perf_counter() - t0) * 1000)
            else:
                errors.append(status)
    except (OSError, asyncio.IncompleteReadError):
        errors.append(0)
    finally:
        writer.close()


async def _load(port: int, request: bytes, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors: list[int] = []
    deadline = asyncio.get_running_loop().time() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(port, request, deadline, latencies, errors) for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    return {"requests": len(latencies), "errors": len(errors), "seconds": round(elapsed, 2),
            "requests_per_s": round(len(latencies) / elapsed, 1), **percentiles(latencies)}


def png_request(image: np.ndarray, port_placeholder: str = "127.0.0.1") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    body = buf.getvalue()
    head = (f"POST /predict?k=1 HTTP/1.1\r\nHost: {port_placeholder}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


def service_load(model: Path, image: np.ndarray, clients: int, seconds: float, repeats: int,
                 threads: int, max_wait_ms: float) -> list[dict]:
    """Alternate batching on/off `repeats` times (noise hits both alike); report medians."""
    request = png_request(image)
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for _ in range(repeats):
        for mode, max_batch in (("on", 64), ("off", 1)):
            proc, port = start_server(model, max_batch, threads, max_wait_ms)
            try:
                asyncio.run(_load(port, request, clients, 1.0))  # warm-up
                runs[mode].append(asyncio.run(_load(port, request, clients, seconds)))
            finally:
                proc.terminate()
                proc.wait(30)
    rows = []
    for mode, results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in ("requests_per_s", "p50_ms", "p99_ms")}
        rows.append({"batching": mode, "clients": clients, "seconds": seconds, "repeats": repeats,
                     "threads": threads, "max_wait_ms": max_wait_ms if mode == "on" else 0,
                     "errors": sum(r["errors"] for r in results), **med,
                     "requests_per_s_each": [r["requests_per_s"] for r in results]})
    return rows


def bench_serve(onnx_path: Path, int8_path: Path | None, checkpoint: Path, prepared: Path, out: Path,
                clients: int, seconds: float, repeats: int, runs: int, threads: int, max_wait_ms: float = 1.0) -> dict:
    from cnnpipe.predictor import Predictor

    predictor = Predictor(onnx_path)
    x_test, _ = load_split(prepared, "test", mmap=True)
    images = np.asarray(x_test[:64])
    x = predictor.preprocess([im.transpose(1, 2, 0) for im in images])
    latency = engine_latency(onnx_path, int8_path, checkpoint, x, runs)
    service = service_load(onnx_path, images[0].transpose(1, 2, 0).squeeze(), clients, seconds, repeats, threads,
                           max_wait_ms)
    by = {(r["engine"], r["batch"]): r["p50_ms"] for r in latency}
    result = {
        "latency": latency,
        "service": service,
        "ratios": {
            "torch_over_ort_fp32_batch1_p50": round(by[("torch eager", 1)] / by[("onnxruntime fp32", 1)], 2),
            "batching_on_over_off_rps": round(service[0]["requests_per_s"] / service[1]["requests_per_s"], 2),
        },
        "machine": machine(),
    }
    write_json(out, result)
    print_report(result)
    return result


def machine() -> dict:
    import os
    import platform

    import onnxruntime as ort

    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "onnxruntime": ort.__version__, "python": platform.python_version()}


def print_report(result: dict) -> None:
    print(f"{'engine':<18}{'batch':>6}{'p50 ms':>10}{'p99 ms':>10}")
    for r in result["latency"]:
        print(f"{r['engine']:<18}{r['batch']:>6}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}")
    print()
    print(f"{'batching':<10}{'clients':>8}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for r in result["service"]:
        print(f"{r['batching']:<10}{r['clients']:>8}{r['requests_per_s']:>10.1f}{r['p50_ms']:>10.2f}"
              f"{r['p99_ms']:>10.2f}{r['errors']:>8}")
    print()
    print(json.dumps(result["ratios"]))
