"""`cnnpipe bench serve`: inference latency and HTTP service throughput, side by side in one run.

(a) batch-1 and batch-64 latency (p50/p99) of onnxruntime fp32, onnxruntime int8 and torch eager;
(b) HTTP services on loopback under N concurrent keep-alive connections for a fixed time (wrk when it is
    installed, else our own asyncio clients; the report names which): the baseline a user writes in twenty
    lines (bench/baseline.py), `cnnpipe serve` through /predict and /v2 infer, with batching off, and with two
    worker processes; then the baseline and our service on a model whose inference dominates (airnet,
    32×32 colour). Requests/s, p50/p99 latency, errors; medians of interleaved repeats.
Prints a table and writes JSON.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnpipe.bench.launch import free_port, start_server, stop
from cnnpipe.bench.machine import machine
from cnnpipe.core.fsutil import write_json
from cnnpipe.core.prepared import load_split

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

    from cnnpipe.core.checkpoint import load_checkpoint
    from cnnpipe.core.onnx_io import session_options

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


WRK_SCRIPT = r"""
local f = io.open(os.getenv("CNNPIPE_BODY"), "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("CNNPIPE_TYPE")
local extra = os.getenv("CNNPIPE_HEADER")
if extra and extra ~= "" then
  local k, v = extra:match("^([^:]+): (.*)$")
  wrk.headers[k] = v
end
-- requests: those answered with a status below 400, as the asyncio client counts them (wrk's own count and its
-- latency percentiles include the error answers; a run with errors says how many)
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('\nRESULT {"requests": %d, "seconds": %f, "p50_ms": %f, "p99_ms": %f, "errors": %d}\n',
    summary.requests - e.status, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3,
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


@dataclass(frozen=True)
class Load:
    """One HTTP request, repeated: path, body, content type and an optional extra header."""
    path: str
    body: bytes
    content_type: str
    header: tuple[str, str] | None = None

    def raw(self) -> bytes:
        extra = f"{self.header[0]}: {self.header[1]}\r\n" if self.header else ""
        return (f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {self.content_type}\r\n{extra}"
                f"Content-Length: {len(self.body)}\r\n\r\n").encode() + self.body


def cnnpipe_server(model: Path, port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "cnnpipe.cli", "-q", "serve", str(model), "--port", str(port), *args]


def baseline_server(port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "cnnpipe.bench.baseline:app", "--port", str(port),
            "--log-level", "warning", "--no-access-log"]


async def closed_loop_client(port: int, request: bytes, deadline: float,
                             records: list[tuple[float, float, int]]) -> None:
    """One keep-alive connection sending `request` until the deadline; records (start, ms, status) per request.
    A broken connection is status 0; it reconnects then, and when the server closes the connection (as wrk
    does)."""
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while loop.time() < deadline:
                t0 = time.perf_counter()
                writer.write(request)
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = next((int(line[15:]) for line in head.split(b"\r\n")
                                   if line[:15].lower() == b"content-length:"), 0)
                    await reader.readexactly(length)
                    status = int(head[9:12])
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    records.append((t0, (time.perf_counter() - t0) * 1000, 0))
                    break
                records.append((t0, (time.perf_counter() - t0) * 1000, status))
                if b"connection: close" in head.lower():
                    break
        finally:
            writer.close()


async def _python_load(port: int, request: bytes, clients: int, seconds: float) -> dict:
    records: list[tuple[float, float, int]] = []
    deadline = asyncio.get_running_loop().time() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*(closed_loop_client(port, request, deadline, records) for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    latencies = [ms for _, ms, status in records if status == 200]
    return {"requests": len(latencies), "errors": len(records) - len(latencies), "seconds": elapsed,
            **percentiles(latencies)}


def _wrk_load(port: int, load: Load, clients: int, seconds: float, workdir: Path) -> dict:
    import os

    body = workdir / "body.bin"
    body.write_bytes(load.body)
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT)
    env = {**os.environ, "CNNPIPE_BODY": str(body), "CNNPIPE_TYPE": load.content_type,
           "CNNPIPE_HEADER": f"{load.header[0]}: {load.header[1]}" if load.header else ""}
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{max(seconds, 1):g}s", "-s", str(script),
                          f"http://127.0.0.1:{port}{load.path}"], capture_output=True, text=True, env=env,
                         timeout=seconds + 60)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed: {(out.stderr or out.stdout)[-300:]}")
    return json.loads(line[7:])


def load_generator() -> str:
    """wrk (an independent C load generator) when installed, else our own asyncio clients."""
    import shutil

    if shutil.which("wrk"):
        version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()
        return " ".join(version[:2]) if version else "wrk"
    return "python asyncio"


def measure(port: int, load: Load, clients: int, seconds: float, generator: str, workdir: Path) -> dict:
    if generator.startswith("wrk"):
        result = _wrk_load(port, load, clients, seconds, workdir)
    else:
        result = asyncio.run(_python_load(port, load.raw(), clients, seconds))
    result["requests_per_s"] = round(result["requests"] / result["seconds"], 1)
    result["seconds"] = round(result["seconds"], 2)
    return result


@dataclass(frozen=True)
class Setup:
    """One server under one load: what the service table's row shows."""
    name: str
    model: str  # "default" or "heavy"
    cmd: Callable[[int], list[str]]
    load: Load
    ready_path: str = "/readyz"
    env: dict | None = None


def run_setups(setups: list[Setup], clients: int, seconds: float, repeats: int, generator: str) -> list[dict]:
    """Each setup `repeats` times, interleaved (noise hits all alike); medians per setup."""
    runs: dict[tuple[str, str], list[dict]] = {(s.model, s.name): [] for s in setups}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for setup in setups:
                port = free_port()
                proc = start_server(setup.cmd(port), port, setup.ready_path, setup.env)
                try:
                    measure(port, setup.load, clients, min(2.0, seconds), generator, Path(tmp))  # warm-up
                    runs[(setup.model, setup.name)].append(
                        measure(port, setup.load, clients, seconds, generator, Path(tmp)))
                finally:
                    stop(proc)
    rows = []
    for setup in setups:
        results = runs[(setup.model, setup.name)]
        med = {k: round(statistics.median(r[k] for r in results), 3) for k in ("requests_per_s", "p50_ms", "p99_ms")}
        rows.append({"setup": setup.name, "model": setup.model, "route": setup.load.path.split("?")[0],
                     "clients": clients, "seconds": seconds, "repeats": repeats,
                     "errors": sum(r["errors"] for r in results), **med,
                     "requests_per_s_each": [r["requests_per_s"] for r in results]})
    return rows


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def oip_load(model_name: str, pixels: np.ndarray) -> Load:
    """An Open Inference Protocol request as tritonclient sends it: JSON header, raw UINT8 tensor bytes."""
    from cnnpipe.serve import oip

    raw = np.ascontiguousarray(pixels[None], dtype=np.uint8).tobytes()
    head = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, *pixels.shape],
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": "label"}]}).encode()
    return Load(f"/v2/models/{model_name}/infer", head + raw, "application/octet-stream",
                (oip.HEADER_LENGTH, str(len(head))))


def heavy_model(path: Path, shape: tuple[int, int, int] = (3, 32, 32)) -> Path:
    """airnet on 32×32 colour images, untrained (throughput does not depend on the weights), exported with
    the pipeline's own exporter and metadata: a model whose inference dominates the request."""
    import onnx
    import torch

    from cnnpipe.core.models import build_model, fold_batchnorm
    from cnnpipe.core.onnx_io import write_metadata
    from cnnpipe.stages.export import to_onnx

    torch.manual_seed(0)
    model = build_model("airnet", shape, 10).eval()
    proto = to_onnx(fold_batchnorm(model), list(shape), 18)
    state = {"model": "airnet", "dataset": "synthetic", "classes": [str(i) for i in range(10)],
             "input_shape": list(shape), "mean": [0.5] * shape[0], "std": [0.25] * shape[0]}
    for key, value in write_metadata(state).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save_model(proto, path)
    return path


BASELINE = "baseline (FastAPI + onnxruntime, inline)"  # the setup every ratio is against


def setups_for(model: Path, label: str, image: np.ndarray, threads: int, max_wait_ms: float,
               full: bool) -> list[Setup]:
    """Baseline and our service on one model; `full` adds OIP, batching off and two workers."""
    from cnnpipe.serve.predictor import Predictor

    info = Predictor(model, threads=1).info
    png = Load("/predict?k=1", png_bytes(image.squeeze()), "image/png")
    ours = ("--threads", str(threads), "--max-wait-ms", str(max_wait_ms))
    rows = [Setup(BASELINE, label, baseline_server, png, "/openapi.json",
                  {"CNNPIPE_MODEL": str(model)}),
            Setup("cnnpipe /predict", label, lambda port: cnnpipe_server(model, port, *ours), png)]
    if full:
        rows += [Setup("cnnpipe /v2 infer", label, lambda port: cnnpipe_server(model, port, *ours),
                       oip_load(info.model, image.transpose(2, 0, 1) if image.ndim == 3 else image[None])),
                 Setup("cnnpipe /predict --max-batch 1", label,
                       lambda port: cnnpipe_server(model, port, *ours, "--max-batch", "1"), png),
                 Setup("cnnpipe /predict --workers 2", label,
                       lambda port: cnnpipe_server(model, port, "--workers", "2", "--max-wait-ms", str(max_wait_ms)),
                       png)]
    return rows


def per_image_ms(model: Path, batches: tuple[int, ...] = (1, 64), runs: int = 5) -> dict[str, float]:
    """onnxruntime's time per image at each batch size (this process's share of the cores): what batching
    can save on this CPU."""
    from cnnpipe.serve.predictor import Predictor
    from cnnpipe.serve.server import worker_threads

    predictor = Predictor(model, threads=worker_threads(0, 1))
    out = {}
    for batch in batches:
        x = np.zeros((batch, *predictor.info.input_shape), np.float32)
        times = time_calls(lambda x=x: predictor.logits(x), runs, warmup=2)
        out[f"batch_{batch}"] = round(statistics.median(times) / batch, 4)
    return out


def service_load(model: Path, image: np.ndarray, clients: int, seconds: float, repeats: int, threads: int,
                 max_wait_ms: float, heavy: bool = True) -> tuple[list[dict], str, dict]:
    """The service table's rows, the load generator, and onnxruntime's ms per image by batch size per model."""
    generator = load_generator()
    with tempfile.TemporaryDirectory() as tmp:
        setups = setups_for(model, "default", image, threads, max_wait_ms, full=True)
        engine = {"default": per_image_ms(model)}
        if heavy:
            rng = np.random.default_rng(0)
            colour = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            airnet = heavy_model(Path(tmp) / "airnet.onnx")
            engine["airnet 32×32×3"] = per_image_ms(airnet)
            setups += setups_for(airnet, "airnet 32×32×3", colour, threads, max_wait_ms, full=False)
        return run_setups(setups, clients, seconds, repeats, generator), generator, engine


def rps(rows: list[dict], model: str, setup: str = BASELINE) -> float | None:
    """The requests/s of `setup` (the baseline when not given) on `model`, if it ran."""
    return next((r["requests_per_s"] for r in rows if r["model"] == model and r["setup"] == setup), None)


def ratio(rows: list[dict], setup: str, model: str = "default") -> float | None:
    base, mine = rps(rows, model), rps(rows, model, setup)
    return round(mine / base, 2) if base and mine is not None else None


def ceiling(rows: list[dict], per_image: dict, model: str) -> float | None:
    """The most any server could gain over the baseline on `model` when inference is all it does: the
    requests/s of onnxruntime alone at batch 64 on this process's cores, over the baseline's requests/s."""
    base, ms = rps(rows, model), per_image.get(model, {}).get("batch_64")
    return round(1000 / ms / base, 2) if base and ms else None


def bench_serve(onnx_path: Path, int8_path: Path | None, checkpoint: Path, prepared: Path, out: Path,
                clients: int, seconds: float, repeats: int, runs: int, threads: int, max_wait_ms: float = 1.0,
                heavy: bool = True) -> dict:
    from cnnpipe.serve.predictor import Predictor

    predictor = Predictor(onnx_path)
    x_test, _ = load_split(prepared, "test", mmap=True)
    images = np.asarray(x_test[:64])
    x = predictor.preprocess([im.transpose(1, 2, 0) for im in images])
    latency = engine_latency(onnx_path, int8_path, checkpoint, x, runs)
    service, generator, per_image = service_load(onnx_path, images[0].transpose(1, 2, 0), clients, seconds,
                                                 repeats, threads, max_wait_ms, heavy)
    by = {(r["engine"], r["batch"]): r["p50_ms"] for r in latency}
    result = {
        "model": predictor.info.model,  # the "default" model's architecture (train.model of its run)
        "latency": latency,
        "load_generator": generator,
        "service": service,
        "onnxruntime_ms_per_image": per_image,
        "ratios": {
            "torch_over_ort_fp32_batch1_p50": round(by[("torch eager", 1)] / by[("onnxruntime fp32", 1)], 2),
            "predict_over_baseline_rps": ratio(service, "cnnpipe /predict"),
            "v2_infer_over_baseline_rps": ratio(service, "cnnpipe /v2 infer"),
            "workers_2_over_baseline_rps": ratio(service, "cnnpipe /predict --workers 2"),
            "batching_off_over_baseline_rps": ratio(service, "cnnpipe /predict --max-batch 1"),
            "airnet_predict_over_baseline_rps": ratio(service, "cnnpipe /predict", "airnet 32×32×3"),
            "onnxruntime_batch64_over_baseline_rps": ceiling(service, per_image, "default"),
            "airnet_onnxruntime_batch64_over_baseline_rps": ceiling(service, per_image, "airnet 32×32×3"),
        },
        "machine": machine(),
    }
    write_json(out, result)
    print_report(result)
    return result


def print_report(result: dict) -> None:
    print(f"{'engine':<18}{'batch':>6}{'p50 ms':>10}{'p99 ms':>10}")
    for r in result["latency"]:
        print(f"{r['engine']:<18}{r['batch']:>6}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}")
    print()
    for model, ms in result["onnxruntime_ms_per_image"].items():
        print(f"onnxruntime ms per image, {model}: " + ", ".join(f"{k} {v}" for k, v in ms.items()))
    print(f"load generator: {result['load_generator']}, {result['service'][0]['clients']} connections")
    print(f"{'model':<16}{'setup':<42}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for r in result["service"]:
        print(f"{r['model']:<16}{r['setup']:<42}{r['requests_per_s']:>10.1f}{r['p50_ms']:>10.2f}"
              f"{r['p99_ms']:>10.2f}{r['errors']:>8}")
    print()
    print(json.dumps(result["ratios"]))
