"""`cnnpipe serve --registry image-classifier#prod`: a server that follows a registry stage.

Every `poll` seconds (and at once on SIGHUP, or on POST /admin/reload with the admin token) the server asks the
registry which version is in the stage. A new one is fetched (`dvc artifacts get`), loaded and warmed up beside
the model being served, then swapped in with one assignment: a request uses the model it started with to the
end, and the old model's batcher stops once its last request is answered, so no request fails or sees a
half-loaded model. A version that fails to fetch or load leaves the old model serving; the reason goes to the
log and to /readyz's `detail`, and /metrics counts reloads by result.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.mlops import registry
from cnnpipe.serve.predictor import Predictor

log = logging.getLogger(__name__)
_cache: list[Path] = []  # this process's folder of fetched models


def cache_dir() -> Path:
    """This process's folder of fetched models, removed when the process exits."""
    if not _cache:
        _cache.append(Path(tempfile.mkdtemp(prefix="cnnpipe-models-")))
        atexit.register(shutil.rmtree, _cache[0], ignore_errors=True)
    return _cache[0]


@dataclass(frozen=True)
class Follow:
    reference: str  # image-classifier#prod (or @vX.Y.Z: pinned, never changes)
    repo: str = "."
    poll: float = 10.0  # seconds between checks; 0: only on SIGHUP or /admin/reload
    token: str = ""  # bearer token of POST /admin/reload; empty: no admin route

    def __post_init__(self):
        if not 0 <= self.poll < math.inf:
            raise CnnpipeError(f"--poll {self.poll} is out of range; use a number of seconds of at least 0")


def target(follow: Follow) -> registry.Version:
    """The version the reference points at now."""
    name, version, stage = registry.parse_reference(follow.reference)
    if name not in registry.declared(follow.repo):
        raise CnnpipeError(f"no artifact {name!r} in {follow.repo}/dvc.yaml; it declares "
                           f"{', '.join(registry.declared(follow.repo)) or 'none'}")
    if version:
        return registry.Version(name, version, "", ())
    found = registry.in_stage(follow.repo, name, stage or "prod")
    if found is None:
        raise CnnpipeError(f"no version of {name} is in stage {stage or 'prod'} of {follow.repo}; promote one "
                           "with `cnnpipe promote`")
    return found


def cached(name: str, version: str) -> Path:
    return cache_dir() / f"{name}-{version}.onnx"


def fetch(follow: Follow, version: registry.Version) -> Path:
    return registry.fetch(follow.repo, f"{version.name}@{version.version}", cached(version.name, version.version))


def initial_model(follow: Follow) -> tuple[Path, str]:
    """The model file and version to start with; a bad reference is a one-line error before the server starts."""
    version = target(follow)
    return fetch(follow, version), version.version


class Follower:
    def __init__(self, follow: Follow, state: dict, options: Any, metrics: Any):
        self.follow = follow
        self.state = state
        self.options = options
        self.metrics = metrics
        self.lock = asyncio.Lock()
        self.failed: str | None = None  # a version that failed to load is not retried until the stage moves
        self.fetch_failures = 0  # in a row, for `failed`: a version that could not be fetched is tried again,
        self.next_fetch = 0.0  # after poll × 2^(failures - 1) seconds (at most 10 minutes)
        self.task: asyncio.Task | None = None
        self.pending: set[asyncio.Task] = set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.state["follower"] = self
        self.task = loop.create_task(self._poll())
        try:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not the main thread, or Windows
            pass

    async def stop(self) -> None:
        """Stop polling (at shutdown; a swap the poll task was making is abandoned with it)."""
        if self.task:
            self.task.cancel()
        try:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        except (NotImplementedError, RuntimeError):  # pragma: no cover
            pass

    def _on_sighup(self) -> None:  # someone asked to look now: a version that failed to load is tried again too
        task = asyncio.get_running_loop().create_task(self.check(retry_failed=True))
        self.pending.add(task)  # kept until done: the loop holds tasks only weakly
        task.add_done_callback(self.pending.discard)

    async def _poll(self) -> None:
        if self.follow.poll <= 0:
            return
        while True:
            await asyncio.sleep(self.follow.poll)
            await self.check()

    async def check(self, retry_failed: bool = False) -> dict:
        """Swap to the version in the stage if it is new; the answer says what happened. A version that
        failed to load is tried again only when the stage moves, or with `retry_failed` (SIGHUP, the admin
        route); one that could not be fetched (the registry or its storage unreachable) at the next check, then
        less often while it keeps failing."""
        from cnnpipe.serve.server import Live

        async with self.lock:
            old = self.state["live"]
            attempted, fetched = None, False
            try:
                version = await asyncio.to_thread(target, self.follow)
                attempted = version.version
                if version.version == old.version:
                    self.state["reload_error"], self.failed = None, None  # the stage is back on what is served
                    self.fetch_failures = 0
                    return {"status": "unchanged", "version": old.version}
                fetch_due = self.fetch_failures > 0 and time.monotonic() >= self.next_fetch
                if version.version == self.failed and not (retry_failed or fetch_due):
                    return {"status": "failed", "version": old.version, "detail": self.state["reload_error"]}
                path = await asyncio.to_thread(fetch, self.follow, version)
                fetched = True
                predictor = await asyncio.to_thread(Predictor, path, None, old.predictor.threads)
                new = await Live.start(predictor, self.options, self.metrics.batch_sizes, version.version)
            except Exception as e:  # any failure keeps the model being served
                reason = str(e) if isinstance(e, CnnpipeError) else f"{type(e).__name__}: {e}"
                self.failed = attempted
                self.fetch_failures = self.fetch_failures + 1 if attempted is not None and not fetched else 0
                if self.fetch_failures:  # storage may be back later; a file that does not load will not be
                    self.next_fetch = time.monotonic() + min(600.0, self.follow.poll * 2 ** (self.fetch_failures - 1))
                if attempted is not None and attempted != old.version:
                    cached(version.name, attempted).unlink(missing_ok=True)
                detail = (f"still serving {old.version}; the new version "
                          f"{'did not load' if fetched else 'could not be fetched'}: {reason}")
                self.state["reload_error"] = detail
                self.metrics.reloads.labels("failed").inc()
                log.error("%s", detail)
                return {"status": "failed", "version": old.version, "detail": detail}
            self.state["live"] = new  # the swap: requests from here on use the new model
            self.state["reload_error"] = None
            self.failed, self.fetch_failures = None, 0
            self.metrics.reloads.labels("ok").inc()
            log.warning("now serving %s %s (sha256 %s), was %s", version.name, version.version,
                        predictor.info.sha256[:12], old.version)
        await old.retire()
        cached(version.name, old.version).unlink(missing_ok=True)  # in memory now: the cache holds only what is served
        return {"status": "swapped", "from": old.version, "version": new.version, "sha256": predictor.info.sha256}

