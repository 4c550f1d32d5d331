"""`cnnpipe serve`: the ONNX model behind HTTP (FastAPI + uvicorn), with dynamic batching.

Routes: POST /predict, GET /healthz, /readyz, /metadata, /metrics (Prometheus text), and the Open Inference
Protocol's (KServe v2) REST routes under /v2 (health, server and model metadata, readiness, infer; see oip.py),
so Triton's and KServe's clients work unchanged. Concurrent requests
are gathered into one onnxruntime run (at most max_batch images, waiting at most max_wait_ms), so
throughput grows with concurrency. Every bad request gets a 4xx with a JSON body saying what was wrong;
hostile ones are bounded: body size and arrival time, pixels declared by an image's header (checked before it
is decoded; large images decode off the event loop), JSON nesting, images per request. A client that hangs up
is counted with status 499, not as a server error.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cnnpipe import __version__
from cnnpipe.core.errors import CnnpipeError
from cnnpipe.serve import oip
from cnnpipe.serve.predictor import InputError, Predictor, Scores, open_header

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 64  # images per onnxruntime run; 1 turns dynamic batching off
    max_wait_ms: float = 1.0  # how long the first request of a batch waits for company
    max_body_bytes: int = 8 * 1024 * 1024  # larger bodies get 413
    max_images: int = 64  # images per request
    resize: bool = True  # resize images of another size (False: refuse them with 422)
    top_k: int = 5
    max_pixels: int = 0  # pixels an image may declare; 0 = auto (16 model-sized images, 1 to 25 megapixels)
    body_timeout: float = 10.0  # seconds a request body may take to arrive (slower: 408)
    header_timeout: float = 10.0  # seconds a request's line and headers may take (slower: connection closed)
    max_inflight_bytes: int = 0  # request bodies held at once by one server process (more: 503); 0 = 32 bodies

    def inflight_budget(self) -> int:
        return self.max_inflight_bytes or 32 * self.max_body_bytes

    def __post_init__(self):
        for name, low in (("max_batch", 1), ("max_images", 1), ("max_body_bytes", 1), ("max_pixels", 0),
                          ("max_inflight_bytes", 0)):
            if getattr(self, name) < low:
                flag = "--" + name.replace("_", "-")
                raise CnnpipeError(f"{flag} {getattr(self, name)} is out of range; use at least {low}")
        if not (0 <= self.max_wait_ms < math.inf and 0 < self.body_timeout < math.inf
                and 0 < self.header_timeout < math.inf):
            raise CnnpipeError("--max-wait-ms must be a number of at least 0, --body-timeout and --header-timeout "
                               "numbers above 0")

    def pixel_budget(self, input_shape: tuple[int, int, int]) -> int:
        """Pixels one image may declare; a request may declare at most 4 times that in all."""
        return self.max_pixels or min(max(1_000_000, 16 * input_shape[1] * input_shape[2]), 25_000_000)


INLINE_PIXELS = 65_536  # images up to this size decode on the event loop; larger ones in a thread
INLINE_IMAGE_BYTES = 64 * 1024  # encoded images up to this size are opened on the event loop; larger in a thread
                                # (a file can declare few pixels and still take seconds to parse: padding chunks)
INLINE_JSON_BYTES = 256 * 1024  # JSON bodies up to this size parse on the event loop; larger ones in a thread
DISCONNECTED = 499  # nginx's status for a client that closed the connection before the answer

class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Batcher:
    """Gathers concurrent requests' images into one onnxruntime run on a single worker thread; no run holds
    more than max_batch images (a larger request is split, a request that would overflow waits for the next)."""

    def __init__(self, predictor: Predictor, max_batch: int, max_wait_ms: float, batch_sizes: Histogram):
        self.predictor = predictor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.batch_sizes = batch_sizes
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
        self.task: asyncio.Task | None = None
        self.held: tuple | None = None  # taken from the queue but left for the next run: it would overflow

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        await self.queue.join()  # requests in flight finish first
        if self.task:
            self.task.cancel()
        self.executor.shutdown(wait=True)

    async def scores(self, x: np.ndarray) -> Scores:
        """Logits, probabilities and ranking of normalized images x, computed in a shared batch."""
        if len(x) > self.max_batch:
            parts = [x[i: i + self.max_batch] for i in range(0, len(x), self.max_batch)]
            done = await asyncio.gather(*(self.scores(part) for part in parts))
            return Scores(*(np.concatenate(arrays) for arrays in zip(*done, strict=True)))
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((x, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first, self.held = self.held or await self.queue.get(), None
            items = [first]
            total = len(first[0])
            if total < self.max_batch and self.max_wait > 0 and self.queue.empty():
                await asyncio.sleep(self.max_wait)  # one timer, then take whatever arrived meanwhile
            while total < self.max_batch and not self.queue.empty():
                item = self.queue.get_nowait()
                if total + len(item[0]) > self.max_batch:
                    self.held = item  # first in the next run
                    break
                items.append(item)
                total += len(item[0])
            try:
                batch = np.concatenate([x for x, _ in items]) if len(items) > 1 else items[0][0]
                self.batch_sizes.observe(len(batch))
                out = await loop.run_in_executor(self.executor, self.predictor.scores, batch)
                start = 0
                for x, future in items:
                    if not future.done():
                        end = start + len(x)
                        future.set_result(Scores(out.logits[start:end], out.probs[start:end], out.order[start:end]))
                    start += len(x)
            except Exception as e:  # pragma: no cover - an onnxruntime failure reaches each waiting request
                for _, future in items:
                    if not future.done():
                        future.set_exception(e)
            finally:
                for _ in items:
                    self.queue.task_done()


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("cnnpipe_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("cnnpipe_request_seconds", "Request latency", ["route"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.batch_sizes = Histogram("cnnpipe_batch_size", "Images per onnxruntime run", registry=self.registry,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.images = Counter("cnnpipe_images", "Images classified", registry=self.registry)
        self.reloads = Counter("cnnpipe_model_reloads", "Registry checks that loaded a new model (ok) or kept "
                               "the old one after a failed load (failed)", ["result"], registry=self.registry)


ROUTES = ("/predict", "/healthz", "/readyz", "/metadata", "/metrics")


def route_label(path: str) -> str:
    """The metrics label of a path: fixed routes as they are, /v2 routes without the model name and version."""
    if path in ROUTES:
        return path
    if path.startswith("/v2/models/"):
        return "/v2/models/infer" if path.endswith("/infer") else "/v2/models"
    return path if path in ("/v2", "/v2/health/live", "/v2/health/ready") else "unmatched"


FastHandler = Callable[[dict, dict, Callable[[], Awaitable[bytes]]], Awaitable[tuple[int, bytes, list]]]


class Guard:
    """Pure ASGI middleware (cheaper than FastAPI's http middleware): refuses bodies over the limit with
    413 (by Content-Length, or while streaming), bodies that take longer than `body_timeout` seconds to arrive
    with 408, a body that would take the bytes of all bodies held at once past `inflight_bytes` with 503 and
    Retry-After (many connections each sending a large body slowly would otherwise hold that much memory), and
    records every request's status and latency.

    The hot routes (the ones `fast_route` returns a handler for) are answered here, without FastAPI's
    middleware stack, router and request objects: the handler takes (scope, headers, read_body) and returns
    (status, body, headers); it checks what it can before it reads the body. FastAPI keeps the same routes
    for the OpenAPI schema and the other cases."""

    def __init__(self, app, max_bytes: int, metrics: Metrics, body_timeout: float = 10.0,
                 fast_route: Callable[[dict, dict], FastHandler | None] = lambda scope, headers: None, *,
                 inflight_bytes: int):
        self.app = app
        self.max_bytes = max_bytes
        self.inflight_budget = inflight_bytes
        self.inflight = 0  # bytes of request bodies received by requests still being answered
        self.metrics = metrics
        self.body_timeout = body_timeout
        self.fast_route = fast_route
        self.counters: dict[tuple[str, str, int], Any] = {}  # label lookups cached: they lock and hash
        self.histograms: dict[str, Any] = {}

    def record(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        counter = self.counters.get(key)
        if counter is None:
            counter = self.counters[key] = self.metrics.requests.labels(route, method, str(status))
        counter.inc()
        histogram = self.histograms.get(route)
        if histogram is None:
            histogram = self.histograms[route] = self.metrics.latency.labels(route)
        histogram.observe(seconds)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500
        route = route_label(scope["path"])

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if expects_body and not complete:  # answered before the body was read: drop the connection,
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)  # or a client could go on trickling the rest of it in forever

        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        expects_body = (length is not None and length != b"0") or b"transfer-encoding" in headers
        seen, complete = 0, False
        deadline = asyncio.get_running_loop().time() + self.body_timeout

        async def limited_receive():
            nonlocal seen, complete
            if complete:  # the body is in: later receives wait for a disconnect, without a deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BadRequest(408, f"request body not received within {self.body_timeout:g} s") from None
            if message["type"] == "http.request":
                chunk = len(message.get("body", b""))
                seen += chunk
                self.inflight += chunk
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise BadRequest(413, f"request body over the {self.max_bytes}-byte limit")
                if self.inflight > self.inflight_budget and not complete:
                    raise BadRequest(503, f"busy: request bodies in flight over {self.inflight_budget} bytes; "
                                          "retry shortly")
            return message

        try:
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                return await _send_json(recording_send, 413, f"request body over the {self.max_bytes}-byte limit")
            if length is not None and self.inflight + int(length) > self.inflight_budget:
                return await _send_json(recording_send, 503, f"busy: request bodies in flight over "
                                        f"{self.inflight_budget} bytes; retry shortly")
            handler = self.fast_route(scope, headers)
            if handler is None:
                return await self.app(scope, limited_receive, recording_send)
            try:
                code, body, extra = await handler(scope, headers, lambda: read_body(limited_receive))
            except BadRequest as e:
                return await _send_json(recording_send, e.status, e.message)
            except ClientDisconnect:
                status = DISCONNECTED
                return
            except Exception as e:
                log.exception("error in %s %s", scope["method"], scope["path"])
                return await _send_json(recording_send, 500, f"internal error ({type(e).__name__})")
            await recording_send({"type": "http.response.start", "status": code,
                                  "headers": [(b"content-length", str(len(body)).encode()), *extra]})
            await recording_send({"type": "http.response.body", "body": body})
        finally:
            self.inflight -= seen
            self.record(route, scope["method"], status, time.perf_counter() - start)


async def read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _send_json(send, status: int, message: str) -> None:
    """A JSON error; a 503 (busy) tells the client when to retry."""
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def parse_k(raw: str | None, options: ServeOptions, num_classes: int) -> int:
    raw = str(options.top_k) if raw is None else raw
    if len(raw) > 6 or not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= num_classes:
        raise BadRequest(422, f"k must be an integer from 1 to {num_classes}, got {raw!r}")
    return int(raw)


def query_value(scope: dict, name: str) -> str | None:
    qs = scope.get("query_string", b"")
    if not qs:
        return None
    return dict(parse_qsl(qs.decode("latin-1"), keep_blank_values=True)).get(name)


async def off_loop_if(large: bool, executor: ThreadPoolExecutor, fn, *args) -> Any:
    """fn(*args) in a thread when the input is large (the event loop keeps serving); inline when it is small,
    where a thread hop would cost more than the work."""
    if not large:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


async def read_form(request: Request, options: ServeOptions) -> list[bytes]:
    """Images of a multipart request: its file uploads."""
    try:
        form = await request.form(max_files=options.max_images, max_fields=options.max_images)
    except (BadRequest, ClientDisconnect):
        raise
    except Exception as e:
        detail = str(getattr(e, "detail", e))
        if detail.startswith("Too many"):  # starlette stops parsing past max_files / max_fields
            raise BadRequest(413, too_many(f"over {options.max_images}", options)) from e
        raise BadRequest(400, f"malformed multipart body ({detail[:120]})") from e
    images = [await v.read() for _, v in form.multi_items() if hasattr(v, "read")]
    if not images:
        raise BadRequest(400, "multipart body has no file parts; send images as file uploads")
    return images


async def images_in_body(ctype: str, body: bytes, options: ServeOptions, executor: ThreadPoolExecutor) -> list:
    """Images of a one-part request: a JSON array of pixel arrays, or one raw image body."""
    if not body:
        raise BadRequest(400, "empty request body; send images (multipart, JSON pixel arrays or image bytes)")
    if ctype == "application/json":
        try:  # orjson refuses nesting past 1024 levels
            data = await off_loop_if(len(body) > INLINE_JSON_BYTES, executor, orjson.loads, body)
        except orjson.JSONDecodeError as e:
            raise BadRequest(400, f"malformed JSON ({str(e)[:120]})") from e
        if isinstance(data, dict):
            data = data.get("instances")
        if not isinstance(data, list) or not data:
            raise BadRequest(422, 'JSON must be a non-empty array of pixel arrays, or {"instances": [...]}')
        if len(data) > options.max_images:
            raise BadRequest(413, too_many(str(len(data)), options))
        try:
            return await off_loop_if(len(body) > INLINE_JSON_BYTES, executor,
                                     lambda: [np.asarray(item, dtype=np.float64) for item in data])
        except (ValueError, TypeError) as e:
            raise BadRequest(422, "each instance must be a rectangular array of numbers (H×W or H×W×C)") from e
    if ctype.startswith("image/") or ctype in ("application/octet-stream", ""):
        return [body]
    raise BadRequest(415, f"unsupported content type '{ctype}'; use multipart/form-data, application/json or image/*")


def content_type(value: str | bytes | None) -> str:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return (value or "").split(";")[0].strip().lower()


def too_many(count: str, options: ServeOptions) -> str:
    return f"{count} images in one request; the limit is {options.max_images}"


@dataclass
class Live:
    """The model being served and its batcher: requests take the current one when they start, so a swap
    (follow.py) never mixes two models within a request."""
    predictor: Predictor
    batcher: Batcher
    budget: int  # pixels one image may declare
    version: str | None = None  # the registry version, when served from the registry
    users: int = 0  # requests using it now
    retired: asyncio.Event | None = None  # set once it is swapped out and its last request is done

    def enter(self) -> Live:
        self.users += 1
        return self

    def exit(self) -> None:
        self.users -= 1
        if self.users == 0 and self.retired is not None:
            self.retired.set()

    async def retire(self) -> None:
        """After a swap: wait for the requests still using it, then stop its batcher."""
        self.retired = asyncio.Event()
        if self.users == 0:
            self.retired.set()
        await self.retired.wait()
        await self.batcher.stop()

    @classmethod
    async def start(cls, predictor: Predictor, options: ServeOptions, batch_sizes: Histogram,
                    version: str | None = None) -> Live:
        """Start its batcher and warm it up: the first request does not pay for onnxruntime's first run."""
        batcher = Batcher(predictor, options.max_batch, options.max_wait_ms, batch_sizes)
        batcher.start()
        try:
            await batcher.scores(predictor.preprocess([np.zeros(predictor.info.input_shape[1:], np.float32)]))
        except Exception:
            await batcher.stop()  # a model that cannot run leaves no batcher behind
            raise
        return cls(predictor, batcher, options.pixel_budget(predictor.info.input_shape), version)


def create_app(predictor: Predictor, options: ServeOptions = ServeOptions(), follow: Any = None,
               version: str | None = None) -> FastAPI:
    """The service of `predictor`; with `follow` (follow.Follow), it also follows a registry stage."""
    metrics = Metrics()
    decoders = ThreadPoolExecutor(thread_name_prefix="decode")  # large images decode here, off the event loop
    state: dict[str, Any] = {"ready": False, "live": None, "reload_error": None}

    def live() -> Live:
        return state["live"]

    def preprocess(m: Live, images: list) -> np.ndarray:  # the budget is checked before, from the declared pixels
        try:
            return m.predictor.preprocess(images, resize=options.resize)
        except InputError as e:
            raise BadRequest(422, str(e)) from e

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["live"] = await Live.start(predictor, options, metrics.batch_sizes, version)
        follower = None
        if follow is not None:
            from cnnpipe.serve.follow import Follower

            follower = Follower(follow, state, options, metrics)
            follower.start()
        # Long-lived start-up objects (FastAPI, onnxruntime, numpy) leave the GC's view: its full
        # collections then stay short and stop adding pauses to the latency tail under load.
        gc.collect()
        gc.freeze()
        state["ready"] = True
        log.info("model %s ready on %s", predictor.path, predictor.providers)
        yield
        state["ready"] = False
        if follower is not None:
            await follower.stop()
        await live().batcher.stop()
        decoders.shutdown(wait=True)

    app = FastAPI(title="cnnpipe model server", lifespan=lifespan)

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, e: BadRequest):
        # a body cut short (too slow, too large) leaves the connection mid-request: close it after the answer
        headers = {"connection": "close"} if e.status in (408, 413, 503) else None
        if e.status == 503:
            headers["retry-after"] = "1"
        return JSONResponse({"error": e.message}, status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(_: Request, e: ClientDisconnect):
        return Response(status_code=DISCONNECTED)  # nobody reads it: recorded in /metrics as 499

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception):  # uvicorn logs the traceback
        return JSONResponse({"error": f"internal error ({type(e).__name__})"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError):
        return JSONResponse({"error": "invalid request", "detail": json.loads(json.dumps(e.errors(), default=str))},
                            status_code=422)

    async def classify(m: Live, images: list, k: int) -> bytes:
        """The /predict answer for a request's images: checked, decoded, batched, top-k as JSON."""
        if len(images) > options.max_images:
            raise BadRequest(413, too_many(str(len(images)), options))
        encoded = sum(len(im) for im in images if isinstance(im, bytes | bytearray | memoryview))
        large = encoded > INLINE_IMAGE_BYTES
        headers = await off_loop_if(large, decoders, lambda: [open_header(im) for im in images])  # read once
        try:
            for n, _ in headers:
                m.predictor.check_pixels(n, m.budget)
        except InputError as e:
            raise BadRequest(422, str(e)) from e
        pixels = sum(n for n, _ in headers)
        if pixels > 4 * m.budget:
            raise BadRequest(422, f"images have {pixels} pixels in all, over the request limit of "
                                  f"{4 * m.budget}; send fewer or smaller images")
        x = await off_loop_if(large or pixels > INLINE_PIXELS, decoders, preprocess, m, [im for _, im in headers])
        scores = await m.batcher.scores(x)
        metrics.images.inc(len(x))
        return orjson.dumps({"predictions": m.predictor.ranked(scores, k), "model_sha256": m.predictor.info.sha256})

    @app.post("/predict")
    async def predict(request: Request):
        m = live().enter()
        try:
            k = parse_k(request.query_params.get("k"), options, len(m.predictor.info.classes))
            ctype = content_type(request.headers.get("content-type"))
            images = (await read_form(request, options) if ctype == "multipart/form-data"
                      else await images_in_body(ctype, await request.body(), options, decoders))
            return Response(await classify(m, images, k), media_type="application/json")
        finally:
            m.exit()

    async def fast_predict(scope: dict, headers: dict, read) -> tuple[int, bytes, list]:
        m = live().enter()
        try:
            k = parse_k(query_value(scope, "k"), options, len(m.predictor.info.classes))
            images = await images_in_body(content_type(headers.get(b"content-type")), await read(), options,
                                          decoders)
            return 200, await classify(m, images, k), [(b"content-type", b"application/json")]
        finally:
            m.exit()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not state["ready"]:
            return JSONResponse({"status": "loading"}, status_code=503)
        if state["reload_error"]:  # still serving the model it had: ready, with the reason the new one is not
            return {"status": "ready", "detail": state["reload_error"]}
        return {"status": "ready"}

    @app.get("/metadata")
    async def metadata():
        m = live()
        info = m.predictor.info
        return {"model": info.model, "dataset": info.dataset, "classes": info.classes,
                "input_shape": list(info.input_shape), "normalization": {"mean": info.mean, "std": info.std},
                "sha256": info.sha256, "opset": info.opset, "providers": m.predictor.providers,
                "version": m.version, "registry": follow.reference if follow else None,
                "max_batch": options.max_batch, "max_images": options.max_images,
                "pid": os.getpid(), "threads": m.predictor.threads}  # pid: which worker process answered

    if follow is not None and follow.token:
        @app.post("/admin/reload")
        async def admin_reload(request: Request):
            import hmac

            scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), follow.token.encode()):
                raise BadRequest(401, "admin routes need the header `Authorization: Bearer <token>` with the "
                                      "server's CNNPIPE_ADMIN_TOKEN")
            answer = await state["follower"].check(retry_failed=True)
            # a reload that could not fetch or load the stage's version is the registry's failure: 502, so that
            # `curl --fail` and deploy scripts see it (the body says why; the old version is still served)
            return JSONResponse(answer, status_code=502 if answer["status"] == "failed" else 200)

    # --- Open Inference Protocol (KServe v2, REST) ----------------------------------------------------
    def oip_model(m: Live, name: str, version: str | None) -> None:
        info = m.predictor.info
        if name != oip.model_name(info) or version not in (None, oip.model_version(info)):
            raise BadRequest(404, f"no model {name!r}" + (f" version {version!r}" if version else "") +
                             f"; this server has {oip.model_name(info)!r} version {oip.model_version(info)!r}")

    @app.get("/v2")
    async def v2_server():
        return {"name": "cnnpipe", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def v2_live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def v2_ready():
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def v2_model(name: str, version: str | None = None):
        m = live()
        oip_model(m, name, version)
        return oip.model_metadata(m.predictor.info)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def v2_model_ready(name: str, version: str | None = None):
        oip_model(live(), name, version)
        return JSONResponse({"name": name, "ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    async def infer(m: Live, name: str, version: str | None, raw: bytes,
                    header_length: str | None) -> tuple[bytes, dict]:
        oip_model(m, name, version)
        info = m.predictor.info
        try:
            parsed = await off_loop_if(len(raw) > INLINE_JSON_BYTES, decoders, oip.parse, raw, header_length,
                                       info, options.max_images)
        except oip.OipError as e:
            raise BadRequest(e.status, e.message) from e
        scores = await m.batcher.scores(parsed.x)
        metrics.images.inc(len(parsed.x))
        content, json_length = oip.response(info, parsed, scores.logits, scores.probs)
        if json_length is None:
            return content, {"content-type": "application/json"}
        return content, {"content-type": "application/octet-stream", oip.HEADER_LENGTH: str(json_length)}

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer(name: str, request: Request, version: str | None = None):
        m = live().enter()
        try:
            content, headers = await infer(m, name, version, await request.body(),
                                           request.headers.get(oip.HEADER_LENGTH))
        finally:
            m.exit()
        return Response(content, headers=headers)

    async def fast_infer(scope: dict, headers: dict, read) -> tuple[int, bytes, list]:
        parts = scope["path"].split("/")  # /v2/models/{name}[/versions/{version}]/infer
        name, version = parts[3], (parts[5] if len(parts) == 7 else None)
        m = live().enter()
        try:
            oip_model(m, name, version)
            length = headers.get(oip.HEADER_LENGTH.encode())
            content, out = await infer(m, name, version, await read(), length.decode("latin-1") if length else None)
        finally:
            m.exit()
        return 200, content, [(k.lower().encode(), v.encode()) for k, v in out.items()]

    def fast_route(scope: dict, headers: dict) -> FastHandler | None:
        if scope["method"] != "POST":
            return None
        path = scope["path"]
        if path == "/predict":
            multipart = content_type(headers.get(b"content-type")) == "multipart/form-data"
            return None if multipart else fast_predict
        if path.startswith("/v2/models/") and path.endswith("/infer"):
            parts = path.split("/")
            if (len(parts) == 5 and parts[3]) or (len(parts) == 7 and parts[3] and parts[4] == "versions"
                                                  and parts[5]):
                return fast_infer
        return None

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics_text(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Guard(app, options.max_body_bytes, metrics, options.body_timeout, fast_route,
                 inflight_bytes=options.inflight_budget())


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multiprocess mode: one file set per process
SERVE_ENV = "CNNPIPE_SERVE"  # what each worker process of `serve --workers N` builds its app from


def cores() -> int:
    """CPUs this process may run on (its affinity mask, as a container or taskset sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


MAX_HEAD_BYTES = 64 * 1024  # a request line and headers larger than this get 431
HEAD_TOO_LARGE = orjson.dumps({"error": f"request line and headers over {MAX_HEAD_BYTES} bytes"})


class HeadTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on each request's head: a deadline from the moment the
    connection opens (or the previous response is sent) to the end of the headers, and a size. uvicorn itself
    arms no timer before a connection's first response and disarms its keep-alive timer on any byte, and
    httptools buffers a header of any length, so a connection that sends nothing, trickles its headers a byte
    at a time (slowloris) or sends one endless header would be held open forever, the last one growing the
    server's memory without bound."""

    timeout = 10.0  # this process's ServeOptions.header_timeout, set before serving
    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0
    _refused = False
    _close_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._refused:  # answered 431: what still arrives is dropped until the connection closes
            return
        super().data_received(data)
        if self._head_timer is not None and not self.transport.is_closing():  # the head is still incomplete
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse_head()

    def _refuse_head(self) -> None:
        """431, then a lingering close: closing at once with the client's bytes unread would reset the
        connection and lose the answer on its way."""
        self._cancel_head_timer()
        self._refused = True
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json"
                             b"\r\nconnection: close\r\ncontent-length: " + str(len(HEAD_TOO_LARGE)).encode()
                             + b"\r\n\r\n" + HEAD_TOO_LARGE)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._close_timer = self.loop.call_later(2.0, self.transport.close)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.timeout, self._head_expired)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        waiting = not self.pipeline  # no request queued behind this one: the next head is still to come
        super().on_response_complete()
        if waiting and not self.transport.is_closing():
            self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        if self._close_timer is not None:
            self._close_timer.cancel()
        super().connection_lost(exc)


def worker_threads(threads: int, workers: int) -> int:
    """onnxruntime threads per server process: as asked, or an even share of the cores (at least one)."""
    return threads or max(1, cores() // workers)


def metrics_text(registry: CollectorRegistry) -> bytes:
    """/metrics: this process's registry, or every worker's merged in multiprocess mode."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)
    return generate_latest(registry)


def app_from_env():
    """The app of one worker process of `serve --workers N` (uvicorn's factory), from SERVE_ENV."""
    spec = json.loads(os.environ[SERVE_ENV])
    predictor = Predictor(spec["model"], threads=spec["threads"])
    options = ServeOptions(**spec["options"])
    HeadTimeoutProtocol.timeout = options.header_timeout
    return create_app(predictor, options)


def serve(model_path: str, host: str, port: int, options: ServeOptions, threads: int = 0, workers: int = 1,
          follow: Any = None) -> None:
    import uvicorn

    if workers < 1 or threads < 0:
        raise CnnpipeError(f"--workers {workers} / --threads {threads} out of range; use --workers ≥ 1, --threads ≥ 0")
    HeadTimeoutProtocol.timeout = options.header_timeout
    run = dict(host=host, port=port, log_level="warning", timeout_graceful_shutdown=30, access_log=False,
               http=HeadTimeoutProtocol)
    if follow is not None:
        if workers != 1:
            raise CnnpipeError("--registry serves one process; leave out --workers (or run one server per core)")
        from cnnpipe.serve.follow import initial_model

        path, version = initial_model(follow)
        predictor = Predictor(path, threads=worker_threads(threads, 1))
        uvicorn.run(create_app(predictor, options, follow=follow, version=version), **run)
        return
    if workers == 1:
        uvicorn.run(create_app(Predictor(model_path, threads=worker_threads(threads, 1)), options), **run)
        return
    Predictor(model_path, threads=1)  # a bad model fails here, in one line, before any worker starts
    with tempfile.TemporaryDirectory(prefix="cnnpipe-metrics-") as metrics_dir:
        os.environ[MULTIPROC_ENV] = metrics_dir
        os.environ[SERVE_ENV] = json.dumps({"model": str(model_path), "threads": worker_threads(threads, workers),
                                            "options": asdict(options)})
        uvicorn.run("cnnpipe.serve.server:app_from_env", factory=True, workers=workers, **run)
