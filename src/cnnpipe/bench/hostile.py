"""`cnnpipe bench hostile`: how long a health probe waits while the service is under hostile traffic.

`cnnpipe serve` (default options) on loopback; for a fixed time, a probe (a process of its own) opens a new
connection every 50 ms and GETs /healthz, as a load balancer or Kubernetes does, while attackers on other
connections send, each in a loop with a pause between requests (the service is attacked, not merely flooded
beyond its CPUs; `--pause 0` floods): bodies that trickle in a byte at a time, headers that do (slowloris),
fifty connections at once that send nothing, a header a megabyte long, images whose header declares
billions of pixels, large real images (decoded off the event loop), deeply nested JSON, too many images,
bodies over the size limit, uploads abandoned mid-body, malformed multipart, and ordinary requests beside
them. Reports the probe's latency (p50, p99, max) and each attacker's answers by status (0: connection
closed, no answer; -1: still open after 30 s). Writes JSON.
"""

from __future__ import annotations

import asyncio
import io
import json
import statistics
import struct
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from cnnpipe.bench.launch import free_port, start_server, stop
from cnnpipe.bench.serve import cnnpipe_server
from cnnpipe.core.cpuinfo import cpu_model
from cnnpipe.core.fsutil import write_json


def png(width: int, height: int, rows: int | None = None, noise: bool = False) -> bytes:
    """A grey PNG of width×height; `rows` limits the data to that many rows (a header that lies)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    n = height if rows is None else rows
    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, (n, width + 1), dtype=np.uint8)
        pixels[:, 0] = 0
        scanlines = zlib.compress(pixels.tobytes(), 1)
    else:
        scanlines = zlib.compress(bytes((width + 1) * n), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", scanlines) + chunk(b"IEND", b""))


def request(path: str, body: bytes, ctype: str, length: int | None = None) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode() + body


async def read_status(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return int(head[9:12])


async def one_shot(port: int, data: bytes) -> int:
    """A request on its own connection: its status (0 when the server closed the connection instead)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(read_status(reader), 30)
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return 0
    finally:
        writer.close()


async def trickle(port: int) -> int:
    """Announce a 100 kB body, then send one byte every 200 ms (the server should give up with 408)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request("/predict", b"", "image/png", 100_000))
        status = asyncio.ensure_future(read_status(reader))
        while not status.done():
            writer.write(b"\0")
            await asyncio.sleep(0.2)
        return status.result()
    except (OSError, asyncio.IncompleteReadError):
        return 0
    finally:
        writer.close()


async def abandon(port: int) -> int:
    """Send half of a body and hang up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request("/predict", b"\x89PNG" + bytes(1000), "image/png", 50_000))
    await writer.drain()
    writer.close()
    return 0  # no answer expected


async def closed_by_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, trickle: bytes,
                           limit: float) -> int:
    """Send `trickle` a byte every 200 ms until the server closes the connection: 0, or -1 when it was still
    open after `limit` seconds."""
    loop = asyncio.get_running_loop()
    deadline, i = loop.time() + limit, 0
    try:
        while loop.time() < deadline:
            try:
                if await asyncio.wait_for(reader.read(65536), 0.2) == b"":
                    return 0
            except TimeoutError:
                pass
            if trickle:
                writer.write(trickle[i % len(trickle): i % len(trickle) + 1])
                i += 1
        return -1
    except OSError:
        return 0
    finally:
        writer.close()


async def slowloris(port: int, limit: float = 30.0) -> int:
    """A request line, then its headers a byte every 200 ms, never ending (the server should hang up)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Padding: ")
    return await closed_by_server(reader, writer, b"abcdefgh", limit)


async def idle_flood(port: int, connections: int = 50, limit: float = 30.0) -> int:
    """Open `connections` connections at once and send nothing on them (the server should hang up on each):
    0 when every one was closed, -1 when one was still open after `limit` seconds."""
    opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]
    closed = await asyncio.gather(*(closed_by_server(r, w, b"", limit) for r, w in opened))
    return min(closed)


def attacks() -> dict[str, Callable[[int], Awaitable[int]]]:
    big = png(1000, 1000, noise=True)  # a real megapixel image: decoded in a thread
    bomb = png(60_000, 60_000, rows=1)  # declares 3.6 billion pixels
    nested = b"[" * 100_000 + b"]" * 100_000
    many = json.dumps([np.zeros((28, 28), int).tolist()] * 65).encode()
    multipart = b"--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nbroken"
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buf, format="PNG")
    ok = buf.getvalue()
    return {
        "slow body (1 byte / 200 ms)": trickle,
        "slow headers (1 byte / 200 ms)": slowloris,
        "50 idle connections": idle_flood,
        "header 1 MB long": lambda port: one_shot(  # 431 at the server's head-size limit
            port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 1_048_576),
        "header declaring 3.6 gigapixels": lambda port: one_shot(port, request("/predict", bomb, "image/png")),
        "1-megapixel image": lambda port: one_shot(port, request("/predict", big, "image/png")),
        "JSON nested 100,000 deep": lambda port: one_shot(port, request("/predict", nested, "application/json")),
        "65 images in one request": lambda port: one_shot(port, request("/predict", many, "application/json")),
        "body over the size limit": lambda port: one_shot(port, request("/predict", b"", "image/png", 10**9)),
        "upload abandoned mid-body": abandon,
        "malformed multipart": lambda port: one_shot(
            port, request("/predict", multipart, "multipart/form-data; boundary=x")),
        "ordinary request": lambda port: one_shot(port, request("/predict", ok, "image/png")),
    }


async def attacker(port: int, attack: Callable[[int], Awaitable[int]], deadline: float, statuses: Counter,
                   pause: float) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        statuses[await attack(port)] += 1
        await asyncio.sleep(pause)


def probe(port: int, seconds: float, every: float, results) -> None:
    """The health probe, in a process of its own (the attackers' work does not delay its clock): a new
    connection and GET /healthz every `every` seconds; puts (waits in ms, failures) on `results`."""
    import socket

    waits: list[float] = []
    failures: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
            if data[9:12] != b"200":
                failures.append(data[9:12].decode() or "no answer")
        except OSError as e:
            failures.append(type(e).__name__)
        waits.append((time.perf_counter() - t0) * 1000)
        time.sleep(max(0.0, every - (time.perf_counter() - t0)))
    results.put((waits, failures))


async def _run(port: int, seconds: float, per_attack: int, pause: float) -> dict:
    deadline = asyncio.get_running_loop().time() + seconds
    statuses = {name: Counter() for name in attacks()}
    tasks = [attacker(port, attack, deadline, statuses[name], pause)
             for name, attack in attacks().items() for _ in range(per_attack)]
    await asyncio.gather(*tasks)
    return {name: {str(k): v for k, v in sorted(c.items())} for name, c in statuses.items()}


def summary(waits: list[float], failures: list[str], every: float) -> dict:
    ordered = sorted(waits)
    return {"every_ms": every * 1000, "probes": len(waits), "failures": failures,
            "p50_ms": round(statistics.median(ordered), 2), "p99_ms": round(float(np.percentile(ordered, 99)), 2),
            "max_ms": round(ordered[-1], 2)}


def bench_hostile(model: Path, out: Path, seconds: float, per_attack: int, pause: float = 0.05,
                  every_ms: float = 50.0, body_timeout: float = 10.0) -> dict:
    import multiprocessing

    port = free_port()
    proc = start_server(cnnpipe_server(model, port, "--body-timeout", str(body_timeout), "--header-timeout",
                                       str(body_timeout)), port, "/readyz")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    prober = context.Process(target=probe, args=(port, seconds, every_ms / 1000, results))
    try:
        prober.start()
        attacked = asyncio.run(_run(port, seconds, per_attack, pause))
        waits, failures = results.get(timeout=60)
        prober.join(30)
    finally:
        stop(proc)
    result = {"probe": summary(waits, failures, every_ms / 1000), "attacks": attacked}
    result.update({"seconds": seconds, "connections_per_attack": per_attack, "pause_s": pause,
                   "body_timeout_s": body_timeout, "header_timeout_s": body_timeout,
                   "processor": cpu_model()})
    write_json(out, result)
    p = result["probe"]
    print(f"/healthz every {p['every_ms']:g} ms, {p['probes']} probes: p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms, "
          f"max {p['max_ms']} ms, failures {len(p['failures'])}")
    for name, counts in result["attacks"].items():
        print(f"  {name:<34} {counts}")
    return result
