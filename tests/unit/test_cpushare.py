"""CPU shares: registered jobs, live-process counting, affinity overlap, torchrun's local processes, and the
train stage taking its share (or the explicit train.threads)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest

from cnnpipe.core import cpushare
from cnnpipe.core.params import TrainParams
from cnnpipe.stages.train import train

FOUR = frozenset(range(4))
HOLD = "import time; from cnnpipe.core.cpushare import job\nwith job():\n    print('up', flush=True); time.sleep(120)"


@pytest.fixture
def jobs(tmp_path, monkeypatch):
    """A private jobs directory and a starter of real registered job processes in it."""
    directory = tmp_path / "jobs"
    monkeypatch.setenv(cpushare.JOBS_DIR_ENV, str(directory))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ))
        assert proc.stdout.readline().strip() == "up"
        procs.append(proc)
        return proc

    yield directory, start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_share_divides_the_cores_among_live_jobs(jobs):
    directory, start = jobs
    assert cpushare.share(FOUR, directory) == 4
    a, b = start(), start()
    assert cpushare.live_jobs(FOUR, directory) == 2
    assert cpushare.share(FOUR, directory) == 2
    assert cpushare.share(frozenset({0}), directory) == 1  # never below one thread
    a.send_signal(signal.SIGKILL)
    a.wait()  # killed: its file stays behind, and is not counted (and is removed)
    assert (directory / str(a.pid)).exists()
    assert cpushare.share(FOUR, directory) == 4 // 1
    assert not (directory / str(a.pid)).exists()
    b.send_signal(signal.SIGINT)
    b.wait()  # Ctrl-C: the job removes its own file on the way out
    assert not (directory / str(b.pid)).exists() and cpushare.share(FOUR, directory) == 4


def test_jobs_on_other_cpus_and_reused_pids_do_not_count(jobs):
    directory, start = jobs
    proc = start()
    path = directory / str(proc.pid)
    started, _ = path.read_text().split(" ")
    path.write_text(f"{started} 6,7\n")  # pinned to CPUs this process does not use
    assert cpushare.live_jobs(FOUR, directory) == 0
    path.write_text(f"{started} 0,1\n")
    assert cpushare.live_jobs(FOUR, directory) == 1
    if started:  # Linux: the same pid with another start time is a different process
        path.write_text(f"{int(started) + 1} 0,1\n")
        assert cpushare.live_jobs(FOUR, directory) == 0


def test_torchrun_local_processes_count_before_they_register(jobs, monkeypatch):
    directory, _ = jobs
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cpushare.share(FOUR, directory) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpushare.share(FOUR, directory) == 2


def test_train_takes_its_share_and_an_explicit_count_wins(tmp_path, prepared, jobs):
    directory, start = jobs
    cores = len(cpushare.affinity())
    p = TrainParams(model="lenet", epochs=2, batch_size=32, flip=False, device="cpu", resume=False)

    def threads(name: str, params: TrainParams) -> list[int]:
        out = tmp_path / name
        train(params, prepared, out / "model.pt", out / "train.json", out / "history.csv")
        return json.loads((out / "train.info.json").read_text())["threads"]

    assert threads("alone", p) == [[cores], [cores]]
    start()  # another job on the same cores: this one is the second
    assert threads("shared", p) == [[max(1, cores // 2)]] * 2
    assert threads("pinned", dataclasses.replace(p, threads=3)) == [[3], [3]]
    assert not list(directory.glob("[0-9]*"))[1:]  # the trainings unregistered: only the holder is left
