"""The train stage under torchrun: 2 CPU processes with gloo, each on its shard of every batch, give the
same model and metrics as one process (up to float summation order), and only rank 0 writes; the same on
two "nodes" (two torchrun launchers, each in its own folder, meeting at a static rendezvous on loopback)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import train_workdir

from cnnpipe.bench.launch import free_port
from cnnpipe.core.checkpoint import load_checkpoint
from cnnpipe.core.params import TrainParams

BIN = Path(sys.executable).parent
# LeNet has no BatchNorm, whose per-process batch statistics would (by design) differ from one process's.
# SGD, not Adam: Adam divides by the gradient's running RMS, which turns float-rounding differences in
# near-zero gradients into full-size steps; SGD keeps them at rounding size. fp32: bf16's rounding (auto's
# choice on CPUs with AMX) is far above the tolerance these comparisons hold. The biases at the weights' lr:
# norm_lr's faster steps are for Adam.
P = TrainParams(model="lenet", epochs=3, batch_size=50, optimizer="sgd", lr=0.05, norm_lr=1.0, translate=1,
                flip=False, device="cpu", precision="fp32")


def env() -> dict[str, str]:
    """The test session's environment as it is when a test runs (conftest's fixtures set parts of it)."""
    return dict(os.environ, OMP_NUM_THREADS="1")


TRAIN = [str(BIN / "cnnpipe"), "train"]


def train_in(cwd: Path, *launcher: str) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, *TRAIN], cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)


def assert_same_model(single: Path, ddp: Path) -> None:
    m1 = json.loads((single / "metrics/train.json").read_text())
    m2 = json.loads((ddp / "metrics/train.json").read_text())
    info1 = json.loads((single / "metrics/train.info.json").read_text())
    info2 = json.loads((ddp / "metrics/train.info.json").read_text())
    assert info1["processes"] == 1 and info2["processes"] == 2 and info1["epochs_run"] == info2["epochs_run"]
    for key in ("val_loss", "val_acc", "epoch"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-3), key
    h1 = (single / "plots/train_history.csv").read_text().splitlines()
    h2 = (ddp / "plots/train_history.csv").read_text().splitlines()
    assert len(h1) == len(h2) == P.epochs + 1
    a, _ = load_checkpoint(single / "models/model.pt")
    b, _ = load_checkpoint(ddp / "models/model.pt")
    for (name, wa), wb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(wa, wb, atol=1e-4), name
    # rank 0 alone wrote: one checkpoint, no leftover resume state or temp files
    assert sorted(p.name for p in (ddp / "models").iterdir()) == ["model.pt"]
    assert sorted(p.name for p in (ddp / "metrics").iterdir()) == ["train.info.json", "train.json"]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_one(tmp_path, prepared):
    single = train_workdir(tmp_path / "single", prepared, P)
    ddp = train_workdir(tmp_path / "ddp", prepared, P)
    one = train_in(single)
    assert one.returncode == 0, one.stderr
    two = train_in(ddp, str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python")
    assert two.returncode == 0, two.stderr
    assert_same_model(single, ddp)
    assert two.stderr.count(f"epoch {P.epochs}/{P.epochs}") == 1
    assert "torchrun: 2 processes (gloo), each 25 images of every 50-image batch" in two.stderr

    # two nodes of one process each: rank 1 has LOCAL_RANK 0 too, and must still write nothing
    nodes = [train_workdir(tmp_path / f"node{i}", prepared, P) for i in range(2)]
    port = str(free_port())
    procs = [subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(i), "--nproc_per_node", "1",
                               "--master_addr", "127.0.0.1", "--master_port", port, "--no-python", *TRAIN],
                              cwd=node, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, node in enumerate(nodes)]
    try:
        outs = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in outs]
    assert_same_model(single, nodes[0])
    assert not (nodes[1] / "metrics").exists() and not any((nodes[1] / "models").glob("*"))
    assert outs[0][1].count(f"epoch {P.epochs}/{P.epochs}") == 1
    assert f"epoch {P.epochs}/{P.epochs}" not in outs[1][1]


def test_batch_must_split_over_processes(tmp_path, prepared):
    d = train_workdir(tmp_path, prepared, dataclasses.replace(P, batch_size=51))
    proc = train_in(d, str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python")
    assert proc.returncode != 0
    assert "train.batch_size 51 does not split over 2 processes; use a multiple of 2" in proc.stderr
    assert not (d / "models").exists() or not any((d / "models").iterdir())


@pytest.mark.slow
def test_torchrun_resume_after_kill_matches_an_uninterrupted_run(tmp_path, prepared):
    """kill -9 of a 2-process torchrun job, then the same command: it resumes after the last completed epoch
    and ends with bit-identical weights. Each rank draws its own dropout masks, so each rank's random stream
    must come back as it was (a re-seeded stream would give other masks and other weights)."""
    import signal
    import time

    p = dataclasses.replace(P, model="simplecnn", epochs=8)  # simplecnn has dropout and no BatchNorm
    launcher = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python"]
    ref = train_workdir(tmp_path / "ref", prepared, dataclasses.replace(p, resume=False))
    assert train_in(ref, *launcher).returncode == 0

    work = train_workdir(tmp_path / "work", prepared, p)
    state = work / "models/.model.pt.resume"
    job = subprocess.Popen([*launcher, *TRAIN], cwd=work, env=env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
    workers = children(job.pid)  # torchrun starts each worker in a session of its own
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    job.kill()
    job.wait(30)
    while any(alive(pid) for pid in workers):  # gone: nothing can still write into the folder
        time.sleep(0.05)
    saved = torch.load(state, weights_only=True)
    assert len(saved["rng"]) == 2 and not torch.equal(saved["rng"][0]["cpu"], saved["rng"][1]["cpu"])
    assert not (work / "models/model.pt").exists()

    resumed = train_in(work, *launcher)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {saved['epoch']}" in resumed.stderr and saved["epoch"] < p.epochs, resumed.stderr
    a = torch.load(ref / "models/model.pt", weights_only=True)["state_dict"]
    b = torch.load(work / "models/model.pt", weights_only=True)["state_dict"]
    for name, tensor in a.items():
        assert torch.equal(b[name], tensor), name
    # and every epoch's losses show that the epochs on both sides of the kill trained identically
    history = [(d / "plots/train_history.csv").read_text().splitlines() for d in (ref, work)]
    assert [line.rsplit(",", 1)[0] for line in history[0]] == [line.rsplit(",", 1)[0] for line in history[1]]


def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited
