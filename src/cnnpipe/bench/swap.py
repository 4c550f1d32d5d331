"""`cnnpipe bench swap`: a server that follows the registry's prod stage, measured while prod moves under load.

A throwaway Git + DVC repo holds the model as two registry versions (v1.0.0 in prod, v1.1.0 registered on the
next commit). `cnnpipe serve --registry image-classifier#prod` starts on v1.0.0, closed-loop clients keep
sending requests, and after `promote_at` seconds the prod stage moves to v1.1.0. The report gives requests,
errors and latency before the move, from the move until one second after the server reports the new version,
and after that; and how long the server took to follow.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from cnnpipe.bench.launch import free_port, start_server, stop
from cnnpipe.bench.serve import Load, closed_loop_client, png_bytes
from cnnpipe.core.cpuinfo import cpu_model
from cnnpipe.core.fsutil import write_json
from cnnpipe.mlops.registry import ARTIFACTS, git, register_and_assign

DVC_YAML = """artifacts:
  {fp32}:
    path: model.onnx
    type: model
  {int8}:
    path: model.int8.onnx
    type: model
"""


def registry_repo(directory: Path, onnx: Path, int8: Path) -> Path:
    """A Git + DVC repo whose registry has v1.0.0 in prod and v1.1.0 registered one commit later, unassigned."""
    repo = directory / "registry"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.name", "cnnpipe bench")
    git(repo, "config", "user.email", "bench@cnnpipe.invalid")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, capture_output=True)
    shutil.copyfile(onnx, repo / "model.onnx")
    shutil.copyfile(int8, repo / "model.int8.onnx")
    (repo / "dvc.yaml").write_text(DVC_YAML.format(fp32=ARTIFACTS[0], int8=ARTIFACTS[1]))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first model")
    register_and_assign(repo, "prod", "first model")
    git(repo, "commit", "-q", "--allow-empty", "-m", "second model")
    return repo


def _served_version(port: int) -> str:
    import json

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metadata", timeout=5) as r:
        return json.loads(r.read())["version"]


def _move_prod(repo: Path, port: int, at: float, marks: dict, timeout: float = 60.0) -> None:
    """After `at` seconds, move prod to the next version; mark when the tags are written and when the server
    first reports the new version (asked every 50 ms). An error is kept in marks["error"]."""
    try:
        time.sleep(at)
        marks["version"] = register_and_assign(repo, "prod", "second model")
        marks["promoted"] = time.perf_counter()
        while _served_version(port) != marks["version"]:
            if time.perf_counter() - marks["promoted"] > timeout:
                raise RuntimeError(f"still serving the old version {timeout:g} s after the tags moved")
            time.sleep(0.05)
        marks["served"] = time.perf_counter()
    except Exception as e:  # reported by bench_swap, in the main thread
        marks["error"] = f"{type(e).__name__}: {e}"


def window(records: list[tuple[float, float, int]]) -> dict:
    ms = sorted(r[1] for r in records if r[2] == 200)
    pct = (lambda q: round(float(np.percentile(ms, q)), 2)) if ms else (lambda q: None)
    return {"requests": len(records), "errors": sum(r[2] != 200 for r in records), "p50_ms": pct(50),
            "p99_ms": pct(99), "max_ms": round(ms[-1], 2) if ms else None}


def bench_swap(onnx: Path, int8: Path, out: Path, seconds: float = 15.0, promote_at: float = 5.0,
               clients: int = 16, poll: float = 0.2) -> dict:
    image = np.zeros((28, 28), np.uint8)
    request = Load("/predict?k=1", png_bytes(image), "image/png").raw()
    records: list[tuple[float, float, int]] = []
    marks: dict = {}
    with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-swap-") as tmp:
        repo = registry_repo(Path(tmp), onnx, int8)
        port = free_port()
        cmd = [sys.executable, "-m", "cnnpipe.cli", "-q", "serve", "--registry", f"{ARTIFACTS[0]}#prod",
               "--repo", str(repo), "--port", str(port), "--poll", str(poll)]
        proc = start_server(cmd, port, "/readyz")
        try:
            mover = threading.Thread(target=_move_prod, args=(repo, port, promote_at, marks), daemon=True)
            mover.start()

            async def load() -> None:
                deadline = asyncio.get_running_loop().time() + seconds
                await asyncio.gather(*(closed_loop_client(port, request, deadline, records) for _ in range(clients)))

            asyncio.run(load())
            mover.join(timeout=60)
        finally:
            stop(proc)
    if "served" not in marks:
        raise RuntimeError(f"the server did not follow prod to {marks.get('version', 'a new version')} within the "
                           f"run: {marks.get('error', 'the load ended first; give it more --seconds')}")
    start, end = marks["promoted"], marks["served"] + 1.0
    result = {
        "follow_s": round(marks["served"] - marks["promoted"], 2),
        "before": window([r for r in records if r[0] < start]),
        "during": window([r for r in records if start <= r[0] < end]),
        "after": window([r for r in records if r[0] >= end]),
        "versions": ["v1.0.0", marks["version"]], "seconds": seconds, "promoted_at_s": promote_at,
        "clients": clients, "poll_s": poll, "processor": cpu_model(),
    }
    write_json(out, result)
    print(f"prod moved to {marks['version']} at {promote_at:g} s; the server followed {result['follow_s']} s later")
    for name in ("before", "during", "after"):
        w = result[name]
        print(f"  {name:<7} {w['requests']:>6} requests, {w['errors']} errors, p50 {w['p50_ms']} ms, "
              f"p99 {w['p99_ms']} ms, max {w['max_ms']} ms")
    return result
