import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import train_workdir

from cnnpipe.checkpoint import load_checkpoint
from cnnpipe.data import augment, draw_augment
from cnnpipe.errors import CnnpipeError
from cnnpipe.params import TrainParams
from cnnpipe.train import train

TINY = TrainParams(model="bncnn", epochs=4, batch_size=32, lr=0.01, flip=False, translate=1, device="cpu")


def run(tmp_path, prepared, p: TrainParams):
    return train(p, prepared, tmp_path / "model.pt", tmp_path / "train.json", tmp_path / "history.csv")


def test_train_learns_and_writes_artifacts(tmp_path, prepared):
    metrics = run(tmp_path, prepared, TINY)
    assert metrics["val_acc"] >= 0.8  # the generated classes are easy; chance is 0.1
    assert metrics["device"] == "cpu" and metrics["epochs"] == 4 and metrics["images_per_second"] > 0
    assert json.loads((tmp_path / "train.json").read_text()) == metrics
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert max(float(r["val_acc"]) for r in rows) == metrics["val_acc"]
    model, state = load_checkpoint(tmp_path / "model.pt")
    assert state["model"] == "bncnn" and state["classes"] == [str(d) for d in range(10)]
    assert state["input_shape"] == [1, 28, 28] and state["epoch"] == metrics["best_epoch"]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_cpu_training_is_deterministic(tmp_path, prepared):
    p = dataclasses.replace(TINY, epochs=2)
    a = run(tmp_path / "a", prepared, p)
    b = run(tmp_path / "b", prepared, p)
    assert a["val_loss"] == b["val_loss"] and a["val_acc"] == b["val_acc"]


@pytest.mark.parametrize("name", ["lenet", "simplecnn", "cifarnet", "cnn"])
def test_seed_models_train(tmp_path, prepared, name):
    metrics = run(tmp_path, prepared, dataclasses.replace(TINY, model=name, epochs=1, optimizer="sgd"))
    assert metrics["model"] == name


def test_batch_larger_than_data(tmp_path, prepared):
    with pytest.raises(CnnpipeError, match=r"train\.batch_size 5000 does not fit the 350 training images"):
        run(tmp_path, prepared, dataclasses.replace(TINY, batch_size=5000))
    assert not any(tmp_path.glob("model.pt*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_asked_but_absent(tmp_path, prepared):
    with pytest.raises(CnnpipeError, match="device 'cuda' asked for but no CUDA GPU is available"):
        run(tmp_path, prepared, dataclasses.replace(TINY, device="cuda"))


def test_corrupt_and_foreign_checkpoints(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CnnpipeError, match="not a loadable checkpoint"):
        load_checkpoint(bad)
    torch.save({"hello": torch.zeros(1)}, bad)
    with pytest.raises(CnnpipeError, match="not a cnnpipe checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(CnnpipeError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_checkpoint_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "cnnpipe-checkpoint-1", "x": Evil()}, path)
    with pytest.raises(CnnpipeError, match="not a loadable checkpoint"):
        load_checkpoint(path)


def test_augmentations_keep_shape_and_content():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    shifted = augment(x, 1, draw_augment(len(x), 1, False, g))
    assert shifted.shape == x.shape
    assert torch.equal(augment(x, 0, draw_augment(len(x), 0, False, g)), x)
    flipped = augment(x, 0, draw_augment(len(x), 0, True, torch.Generator().manual_seed(1)))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))


def test_early_stopping(tmp_path, prepared):
    p = dataclasses.replace(TINY, epochs=30, patience=2, lr=0.0)  # lr 0: nothing ever improves
    metrics = run(tmp_path, prepared, p)
    assert metrics["stopped_early"] and metrics["epochs_run"] == 3 and metrics["best_epoch"] == 1


def test_resume_after_sigint_matches_an_uninterrupted_run(tmp_path, prepared):
    """A real Ctrl-C (SIGINT) mid-run, then the same command: it continues after the last completed epoch
    and ends with exactly the metrics of a run that was never interrupted."""
    import signal
    import subprocess
    import sys
    import time

    p = dataclasses.replace(TINY, epochs=25, batch_size=16)
    reference = run(tmp_path / "ref", prepared, dataclasses.replace(p, resume=False))

    work = train_workdir(tmp_path / "work", prepared, p)
    cli = [str(Path(sys.executable).parent / "cnnpipe"), "train"]
    state = work / "models/.model.pt.resume"
    proc = subprocess.Popen(cli, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # a few epochs in
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert state.exists() and not (work / "models/model.pt").exists()

    proc = subprocess.run(cli, cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "resuming after epoch" in proc.stderr
    resumed_from = int(proc.stderr.split("resuming after epoch ")[1].split()[0])
    assert 1 <= resumed_from < 25
    metrics = json.loads((work / "metrics/train.json").read_text())
    assert metrics["val_loss"] == reference["val_loss"] and metrics["val_acc"] == reference["val_acc"]
    assert metrics["epochs_run"] == 25 and not state.exists()


def test_corrupt_resume_state(tmp_path, prepared):
    state = tmp_path / ".model.pt.resume"
    state.write_bytes(b"not a state")
    with pytest.raises(CnnpipeError, match=r"resume state .* is corrupt.*delete it to start over"):
        run(tmp_path, prepared, TINY)
    run(tmp_path, prepared, dataclasses.replace(TINY, epochs=1, resume=False))  # resume off: ignored


def test_precision_on_cpu(tmp_path, prepared):
    with pytest.raises(CnnpipeError, match="train.precision fp16 needs a CUDA GPU; use fp32 or bf16"):
        run(tmp_path, prepared, dataclasses.replace(TINY, precision="fp16"))
    assert not any(tmp_path.glob("model.pt*")) and not (tmp_path / "train.json").exists()
    metrics = run(tmp_path, prepared, dataclasses.replace(TINY, precision="bf16", epochs=2))
    assert metrics["precision"] == "bfloat16" and metrics["val_acc"] >= 0.5
    assert run(tmp_path, prepared, dataclasses.replace(TINY, epochs=1))["precision"] == "float32"  # auto


def test_airnet_trains_on_cpu(tmp_path, prepared):
    metrics = run(tmp_path, prepared, dataclasses.replace(TINY, model="airnet", epochs=1, lr=0.003))
    assert metrics["model"] == "airnet" and 0 <= metrics["val_acc"] <= 1


def test_progress_bar_on_a_terminal_log_lines_elsewhere(tmp_path, prepared):
    """On a terminal: a bar per epoch with loss, accuracy and images/s; piped (CI, DVC, Prefect): log lines."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    train_workdir(tmp_path / "work", prepared, dataclasses.replace(TINY, epochs=2, batch_size=16))
    cli = [str(Path(sys.executable).parent / "cnnpipe"), "train"]

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 columns (a new pty has 0)
    proc = subprocess.Popen(cli, cwd=tmp_path / "work", stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    os.close(master)
    tty = b"".join(chunks).decode(errors="replace")
    assert "epoch 1/2" in tty and "loss=" in tty and "acc=" in tty and "img/s" in tty

    piped = subprocess.run(cli, cwd=tmp_path / "work", capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0
    assert "acc=" not in piped.stderr and "\r" not in piped.stderr
    assert [line.split("INFO ")[1].split("  ")[0] for line in piped.stderr.splitlines()
            if "INFO epoch" in line] == ["epoch 1/2", "epoch 2/2"]
