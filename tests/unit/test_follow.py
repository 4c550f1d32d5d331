"""A server following a registry stage (serve/follow.py): which failures are tried again, and when. The registry
lookup and fetch are replaced by a stand-in whose storage fails as told; the predictor, batcher and swap are the
server's own."""

from __future__ import annotations

import asyncio

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.mlops.registry import Version
from cnnpipe.serve import follow
from cnnpipe.serve.predictor import Predictor
from cnnpipe.serve.server import Live, Metrics, ServeOptions


def follower_with(monkeypatch, tmp_path, files: list):
    """A follower of a stage holding v2.0.0, whose fetches return `files` in turn (an exception is raised)."""
    fetched: list[str] = []

    def fetch(_, version: Version):
        fetched.append(version.version)
        result = files[min(len(fetched), len(files)) - 1]
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(follow, "target", lambda _: Version("image-classifier", "v2.0.0", "", ()))
    monkeypatch.setattr(follow, "fetch", fetch)
    monkeypatch.setattr(follow, "cached", lambda name, version: tmp_path / f"{name}-{version}.onnx")
    return fetched


async def serving(onnx_model, poll: float = 0.0) -> follow.Follower:
    """A follower whose checks are called by the test (its poll task is not started)."""
    options, metrics = ServeOptions(), Metrics()
    live = await Live.start(Predictor(onnx_model, threads=1), options, metrics.batch_sizes, "v1.0.0")
    state = {"live": live, "reload_error": None}
    return follow.Follower(follow.Follow("image-classifier#prod", poll=poll), state, options, metrics)


def test_a_version_that_could_not_be_fetched_is_fetched_again_after_a_poll_interval(onnx_model, tmp_path,
                                                                                     monkeypatch):
    """Storage that is down comes back: the version is fetched again once a poll interval has passed since the
    failure (twice that after a second failure, and so on), not at every check."""
    down = CnnpipeError("remote storage unreachable")
    fetched = follower_with(monkeypatch, tmp_path, [down, down, onnx_model])

    async def run():
        follower = await serving(onnx_model, poll=1.0)
        answers = [await follower.check(), await follower.check()]  # the second within the interval: no fetch
        answers.append(list(fetched))
        await asyncio.sleep(1.1)
        answers.append(await follower.check())  # due: fetched, and down again
        answers.append(await follower.check())  # within the doubled interval: no fetch
        await asyncio.sleep(2.1)
        answers.append(await follower.check())
        await follower.state["live"].batcher.stop()
        return answers, follower.state["live"].version

    (first, second, fetched_early, third, fourth, fifth), serving_now = asyncio.run(run())
    assert first["status"] == "failed" and "could not be fetched: remote storage unreachable" in first["detail"]
    assert second["status"] == "failed" and fetched_early == ["v2.0.0"]
    assert third["status"] == "failed" and fourth["status"] == "failed"
    assert fifth["status"] == "swapped" and serving_now == "v2.0.0"
    assert fetched == ["v2.0.0"] * 3


def test_a_version_that_did_not_load_waits_for_sighup_or_the_stage_to_move(onnx_model, tmp_path, monkeypatch):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    fixed = tmp_path / "fixed.onnx"
    fixed.write_bytes(onnx_model.read_bytes())
    fetched = follower_with(monkeypatch, tmp_path, [broken, fixed])

    async def run():
        follower = await serving(onnx_model)
        answers = [await follower.check(), await follower.check()]  # a poll does not fetch it again
        answers.append(list(fetched))
        follower._on_sighup()  # SIGHUP: look now, failed version included
        answers.append(await asyncio.gather(*follower.pending))
        await follower.state["live"].batcher.stop()
        return answers, follower.state["live"].version

    (first, second, fetched_by_polls, [third]), serving_now = asyncio.run(run())
    assert first["status"] == "failed" and "not a loadable ONNX model" in first["detail"]
    assert second["status"] == "failed" and fetched_by_polls == ["v2.0.0"]
    assert third["status"] == "swapped" and serving_now == "v2.0.0"
    assert fetched == ["v2.0.0", "v2.0.0"]
