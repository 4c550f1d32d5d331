import csv
import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
from helpers import train_workdir

from cnnpipe.core.checkpoint import load_checkpoint
from cnnpipe.core.data import augment, draw_augment
from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.figures import accuracy_notes, training_curves
from cnnpipe.core.params import TrainParams
from cnnpipe.mlops.sweep import conclude
from cnnpipe.stages.train import train

# fp32: the same training on every CPU (auto would choose bf16 where the CPU has it; tested on its own below)
TINY = TrainParams(model="bncnn", epochs=4, batch_size=32, lr=0.01, flip=False, translate=1, device="cpu",
                   precision="fp32")


def run(tmp_path, prepared, p: TrainParams):
    return train(p, prepared, tmp_path / "model.pt", tmp_path / "train.json", tmp_path / "history.csv")


def test_train_learns_and_writes_artifacts(tmp_path, prepared):
    metrics = run(tmp_path, prepared, TINY)
    assert metrics["val_acc"] >= 0.8  # the generated classes are easy; chance is 0.1
    written = json.loads((tmp_path / "train.json").read_text())
    assert written == {k: metrics[k] for k in written} and metrics["epochs_run"] == 4
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in written.values())  # numbers only
    info = json.loads((tmp_path / "train.info.json").read_text())
    assert info["torch"] == torch.__version__ and info["precision"] == "float32" and info["dataset"] == "mnist"
    assert not set(info) & set(written)
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["val_acc"]) == metrics["val_acc"] and metrics["epoch"] == 4  # the last epoch is kept
    model, state = load_checkpoint(tmp_path / "model.pt")
    assert state["model"] == "bncnn" and state["classes"] == [str(d) for d in range(10)]
    assert state["input_shape"] == [1, 28, 28] and state["epoch"] == metrics["epoch"]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_cpu_training_is_deterministic(tmp_path, prepared):
    p = dataclasses.replace(TINY, epochs=2)
    run(tmp_path / "a", prepared, p)
    run(tmp_path / "b", prepared, p)
    assert trajectory(tmp_path / "a/history.csv") == trajectory(tmp_path / "b/history.csv")
    _, a = load_checkpoint(tmp_path / "a/model.pt")
    _, b = load_checkpoint(tmp_path / "b/model.pt")
    assert all(torch.equal(a["state_dict"][k], t) for k, t in b["state_dict"].items())
    # and byte-identical files, so DVC sees an unchanged model.pt after a retrain that changed nothing
    assert (tmp_path / "a/model.pt").read_bytes() == (tmp_path / "b/model.pt").read_bytes()


@pytest.mark.parametrize("name", ["lenet", "simplecnn", "cifarnet", "cnn"])
def test_seed_models_train(tmp_path, prepared, name):
    """Each tutorial architecture learns the easy generated classes and is saved as that architecture."""
    from cnnpipe.core.models import build_model

    metrics = run(tmp_path, prepared, dataclasses.replace(TINY, model=name, epochs=3, optimizer="adam", lr=3e-3))
    assert metrics["val_acc"] >= 0.5  # chance is 0.1
    model, state = load_checkpoint(tmp_path / "model.pt")
    reference = build_model(name, (1, 28, 28), 10)
    assert [tuple(t.shape) for t in model.state_dict().values()] == [
        tuple(t.shape) for t in reference.state_dict().values()]


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
def test_norm_and_bias_parameters_learn_at_norm_lr_times_lr_all_through_the_schedule(kind):
    from cnnpipe.core.models import build_model
    from cnnpipe.stages.train import make_optimizer, make_schedule

    p = dataclasses.replace(TINY, model="rescnn", optimizer=kind, lr=0.002, weight_decay=0.01, norm_lr=4.0)
    net = build_model("rescnn", (1, 28, 28), 10)
    optimizer = make_optimizer(net, p)
    weights, norms = optimizer.param_groups
    bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {id(t) for t in norms["params"]} == {id(t) for t in net.parameters() if t.ndim == 1}
    assert {id(m.weight) for m in bn} | {id(m.bias) for m in bn} <= {id(t) for t in norms["params"]}
    assert (weights["lr"], weights["weight_decay"]) == (0.002, 0.01) and norms["weight_decay"] == 0.0
    assert norms["lr"] == pytest.approx(4 * 0.002)
    schedule = make_schedule(optimizer, p, total_steps=100)
    for _ in range(60):  # past the warmup, into the decay
        optimizer.step()
        schedule.step()
    assert 0 < weights["lr"] < 0.002 and norms["lr"] == pytest.approx(4 * weights["lr"])


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


def test_augment_shifts_with_zero_fill_and_flips_where_drawn():
    x = torch.arange(1, 2 * 1 * 3 * 3 + 1, dtype=torch.float32).view(2, 1, 3, 3)
    # image 0: dy=0, dx=2 with pad 1 -> content moves down 1 row and left 1 column; image 1: no shift, flipped
    choices = {"dy": torch.tensor([0, 1]), "dx": torch.tensor([2, 1]), "flip": torch.tensor([False, True])}
    out = augment(x, 1, choices)
    assert out[0, 0].tolist() == [[0, 0, 0], [2, 3, 0], [5, 6, 0]]
    assert torch.equal(out[1], x[1].flip(-1))
    assert torch.equal(augment(x, 0, {}), x)


def test_draw_augment_uses_every_shift_and_flips_about_half():
    g = torch.Generator().manual_seed(0)
    choices = draw_augment(2000, 2, True, g)
    assert set(choices["dy"].tolist()) == set(choices["dx"].tolist()) == {0, 1, 2, 3, 4}
    assert 900 < int(choices["flip"].sum()) < 1100
    assert set(draw_augment(8, 0, False, g)) == set()  # off: nothing drawn, nothing applied


def test_early_stopping_keeps_the_best_epoch_and_a_full_run_the_last(tmp_path, prepared):
    """Training stops exactly `patience` epochs after the best validation accuracy and keeps that epoch's
    weights; patience 0 runs every epoch and keeps the last one's, even where an earlier one validated better."""
    p = dataclasses.replace(TINY, epochs=30, patience=2, translate=0, schedule="constant")
    metrics, weights = run_keeping_weights(tmp_path, prepared, p)
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert metrics["stopped_early"] and metrics["epochs_run"] == len(rows) < 30
    assert metrics["epochs_run"] == metrics["epoch"] + 2
    best = float(rows[metrics["epoch"] - 1]["val_acc"])
    assert all(float(r["val_acc"]) <= best for r in rows[metrics["epoch"]:])
    assert all(float(r["val_acc"]) < best for r in rows[: metrics["epoch"] - 1])
    assert saved_weights_equal(tmp_path / "model.pt", weights[metrics["epoch"]])
    # the same epochs without early stopping (a constant schedule does not depend on their number)
    full, full_weights = run_keeping_weights(tmp_path / "full", prepared,
                                             dataclasses.replace(p, epochs=metrics["epochs_run"], patience=0))
    assert trajectory(tmp_path / "full/history.csv") == trajectory(tmp_path / "history.csv")
    assert full["epoch"] == full["epochs_run"] == metrics["epochs_run"] and not full["stopped_early"]
    assert full["val_acc"] == float(rows[-1]["val_acc"]) <= metrics["val_acc"]
    assert saved_weights_equal(tmp_path / "full/model.pt", full_weights[full["epochs_run"]])
    assert not saved_weights_equal(tmp_path / "full/model.pt", full_weights[metrics["epoch"]])


def test_the_accuracy_plot_labels_the_kept_epoch_and_a_better_one_not_kept(tmp_path):
    """The curves mark the saved model's epoch; a validation peak at another epoch is labelled as not kept."""
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "train_acc": a, "val_acc": a}
               for e, a in ((1, 0.80), (2, 0.86), (3, 0.84))]
    assert accuracy_notes(history, 3) == [("kept 84.00%\n(epoch 3)", history[2]),
                                          ("best 86.00%\n(epoch 2, not kept)", history[1])]
    assert accuracy_notes(history, 2) == [("kept 86.00%\n(epoch 2)", history[1])]
    with pytest.raises(ValueError, match="epoch 4 is not in the training history"):
        accuracy_notes(history, 4)
    png = training_curves(history, tmp_path / "curves.png", 3)
    assert described(png) == "Validation accuracy: kept 84.00% (epoch 3); best 86.00% (epoch 2, not kept)"


def described(png: Path) -> str:
    """A picture's Description text chunk: what its labels say."""
    from PIL import Image

    with Image.open(png) as image:
        return image.text["Description"]


@pytest.mark.parametrize("patience", [0, 2])
def test_a_sweep_trial_counts_with_the_epoch_its_model_keeps(tmp_path, prepared, monkeypatch, patience):
    """Reported to a real study as DVC's queue would run it: every epoch's validation accuracy for the pruner,
    and the trial's value is the kept epoch's: the last, or with early stopping the best. Noise for validation
    images makes their accuracy wander from epoch to epoch, so the two differ."""
    import numpy as np

    val = prepared / "val_x.npy"
    np.save(val, np.random.default_rng(0).integers(0, 256, np.load(val).shape, dtype=np.uint8))
    study, number = as_sweep_trial(tmp_path / "sweep", monkeypatch)
    p = dataclasses.replace(TINY, epochs=8, patience=patience, translate=0, schedule="constant")
    metrics = train(p, prepared, tmp_path / "model.pt", tmp_path / "train.json", tmp_path / "history.csv")
    history = [float(r["val_acc"]) for r in csv.DictReader((tmp_path / "history.csv").open())]
    assert conclude(study, number, True) == "complete"
    trial = study.trials[number]
    assert list(trial.intermediate_values.values()) == history
    assert trial.value == metrics["val_acc"] == (max(history) if patience else history[-1])
    assert max(history) > history[-1]  # so the value tells the two rules apart
    # the curves label the kept epoch, and with patience 0 the better one it did not keep
    label = described(tmp_path / "history.png")
    assert label.startswith(f"Validation accuracy: kept {metrics['val_acc']:.2%} (epoch {metrics['epoch']})")
    assert ("not kept" in label) == (patience == 0)


def as_sweep_trial(root: Path, monkeypatch) -> tuple:
    """The setting DVC's queue gives a sweep's trial: a study with the trial asked, its ticket, DVC's variables."""
    import optuna

    from cnnpipe.core import trial

    storage = str(root / "study.journal")
    study = optuna.create_study(study_name="s", storage=trial.open_storage(storage), direction="maximize")
    asked = study.ask()
    ticket = trial.ticket_path(root, "s-000")
    ticket.parent.mkdir(parents=True)
    ticket.write_text(json.dumps({"study": "s", "storage": storage, "trial_id": asked._trial_id,
                                  "pruner": {"kind": "none"}}))
    monkeypatch.setenv("DVC_EXP_NAME", "s-000")
    monkeypatch.setenv("DVC_ROOT", str(root))
    return study, asked.number


def run_keeping_weights(tmp_path, prepared, p: TrainParams) -> tuple[dict, dict[int, dict]]:
    """Train, and return the metrics and a copy of the model's weights after every epoch."""
    weights: dict[int, dict] = {}

    def keep(row, model):
        weights[row["epoch"]] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    metrics = train(p, prepared, tmp_path / "model.pt", tmp_path / "train.json", tmp_path / "history.csv",
                    on_epoch=keep)
    return metrics, weights


def saved_weights_equal(checkpoint: Path, weights: dict) -> bool:
    _, state = load_checkpoint(checkpoint)
    return all(torch.equal(state["state_dict"][k], t) for k, t in weights.items())


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, prepared, sig):
    """A real Ctrl-C (SIGINT) or kill -9 mid-run, then the same command: it continues after the last completed
    epoch and ends with bit-identical weights to a run that was never interrupted (bncnn has dropout, so the
    CPU random stream must be restored as well as the data order)."""
    import signal
    import subprocess
    import sys
    import time

    p = dataclasses.replace(TINY, epochs=12, batch_size=16)
    run(tmp_path / "ref", prepared, dataclasses.replace(p, resume=False))

    work = train_workdir(tmp_path / "work", prepared, p)
    cli = [str(Path(sys.executable).parent / "cnnpipe"), "train"]
    state = work / "models/.model.pt.resume"
    proc = subprocess.Popen(cli, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # a few epochs in
    proc.send_signal(getattr(signal, sig))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == (130 if sig == "SIGINT" else -signal.SIGKILL), out
    assert state.exists() and not (work / "models/model.pt").exists()

    proc = subprocess.run(cli, cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    resumed_from = int(proc.stderr.split("resuming after epoch ")[1].split()[0])
    assert 1 <= resumed_from < 12
    _, resumed = load_checkpoint(work / "models/model.pt")
    _, reference = load_checkpoint(tmp_path / "ref/model.pt")
    assert resumed["epoch"] == reference["epoch"]
    for name, tensor in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), name
    # and every epoch's losses show that the epochs on both sides of the interruption trained exactly as the
    # uninterrupted run's did
    assert trajectory(work / "plots/train_history.csv") == trajectory(tmp_path / "ref/history.csv")
    assert json.loads((work / "metrics/train.info.json").read_text())["epochs_run"] == 12 and not state.exists()


def trajectory(history: Path) -> list[dict]:
    """Every epoch's losses, accuracies and learning rate (not its duration)."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(history.open())]


def test_rng_states_round_trip():
    """What the resume state keeps of the random streams sets them back exactly."""
    from cnnpipe.core.resume import restore_rng, rng_states
    from cnnpipe.core.runtime import Dist

    torch.manual_seed(123)
    states = rng_states(torch.device("cpu"), Dist())
    torch.rand(5)
    restore_rng(states, torch.device("cpu"), Dist())
    torch.manual_seed(123)
    expected = torch.rand(3)
    restore_rng(states, torch.device("cpu"), Dist())
    assert torch.equal(torch.rand(3), expected)


def test_corrupt_resume_state(tmp_path, prepared):
    state = tmp_path / ".model.pt.resume"
    state.write_bytes(b"not a state")
    with pytest.raises(CnnpipeError, match=r"resume state .* is corrupt.*delete it to start over"):
        run(tmp_path, prepared, TINY)
    run(tmp_path, prepared, dataclasses.replace(TINY, epochs=1, resume=False))  # resume off: ignored


def test_a_resume_state_that_does_not_fit_the_model_is_a_one_line_error(tmp_path, prepared):
    """A state with the run's fingerprint whose weights do not fit the model (a damaged or hand-made file)."""
    import torch

    p = dataclasses.replace(TINY, epochs=3)
    with pytest.raises(KeyboardInterrupt):
        train(p, prepared, tmp_path / "model.pt", tmp_path / "train.json", tmp_path / "history.csv",
              on_epoch=interrupted_after_epoch(1))
    path = tmp_path / ".model.pt.resume"
    state = torch.load(path, weights_only=True)
    state["model"].popitem()
    torch.save(state, path)
    with pytest.raises(CnnpipeError, match=r"resume state .*\.model\.pt\.resume does not fit this run \(Error\(s\) "
                                           r"in loading state_dict for Classifier: Missing key\(s\) in state_dict: "
                                           r"\".+\"\.\); delete it to start over$"):
        run(tmp_path, prepared, p)


def interrupted_after_epoch(n: int):
    """An on_epoch callback that stops the run like a Ctrl-C after epoch n (its resume state is saved)."""
    def stop(row, model):
        if row["epoch"] == n:
            raise KeyboardInterrupt

    return stop


@pytest.mark.parametrize("changed", [None, "data", "code"])
def test_a_resume_state_from_other_data_or_code_is_ignored(tmp_path, prepared, caplog, monkeypatch, changed):
    """The same params and as many images, but other ones (a new split seed, a swapped image), or edited code:
    training starts over instead of continuing the weights of the old data or code. Nothing changed resumes."""
    import numpy as np

    from cnnpipe.core import resume

    caplog.set_level("INFO", logger="cnnpipe")
    p = dataclasses.replace(TINY, epochs=3)
    with pytest.raises(KeyboardInterrupt):
        train(p, prepared, tmp_path / "model.pt", tmp_path / "train.json", tmp_path / "history.csv",
              on_epoch=interrupted_after_epoch(1))
    if changed == "data":
        x = np.load(prepared / "train_x.npy")
        np.save(prepared / "train_x.npy", np.roll(x, 1, axis=0))
    if changed == "code":
        source = resume.code_digest()
        monkeypatch.setattr(resume, "code_digest", lambda: "edited " + source)
    caplog.clear()
    metrics = train(p, prepared, tmp_path / "model.pt", tmp_path / "train.json", tmp_path / "history.csv")
    assert ("resuming after epoch 1" in caplog.text) == (changed is None)
    assert ("made with other params, data or code" in caplog.text) == (changed is not None)
    assert metrics["epochs_run"] == 3 and not (tmp_path / ".model.pt.resume").exists()


def test_the_code_digest_follows_every_source_file(tmp_path):
    import shutil

    from cnnpipe.core import resume

    tree = shutil.copytree(resume.PACKAGE, tmp_path / "cnnpipe", ignore=shutil.ignore_patterns("__pycache__"))
    assert resume.code_digest(tree) == resume.code_digest()
    models = tree / "core" / "models.py"
    models.write_text(models.read_text().replace("nn.Dropout(0.25)", "nn.Dropout(0.3)", 1))
    edited = resume.code_digest(tree)
    assert edited != resume.code_digest()
    (tree / "core" / "models.py").rename(tree / "core" / "models2.py")  # the same bytes under another name
    assert resume.code_digest(tree) not in (edited, resume.code_digest())


@pytest.mark.parametrize("killed", ["after the epoch", "writing the outputs"])
@pytest.mark.parametrize("stop", ["patience", "pruned"])
def test_a_run_interrupted_after_deciding_to_stop_stops_there_when_rerun(tmp_path, prepared, monkeypatch, stop,
                                                                         killed):
    """Killed once its last epoch has decided to stop (early stopping, or a sweep's pruner), or while writing its
    outputs after that, the rerun writes the same outputs: it does not train on past the epoch where it ended."""
    from cnnpipe.stages import train as stage

    p = dataclasses.replace(TINY, epochs=30, patience=2 if stop == "patience" else 0, translate=0,
                            schedule="constant")
    if stop == "pruned":  # a sweep's pruner that stops the trial after its third epoch
        monkeypatch.setattr(stage.trial, "reporter_from_env", lambda: lambda epoch, *rest: epoch == 3)
    reference = run(tmp_path / "ref", prepared, p)
    assert reference["stopped_early"] and reference["epochs_run"] < 30

    work = tmp_path / "work"
    args = (p, prepared, work / "model.pt", work / "train.json", work / "history.csv")
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        if killed == "after the epoch":
            train(*args, on_epoch=interrupted_after_epoch(reference["epochs_run"]))
        else:
            m.setattr(stage, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
            train(*args)
    rerun = train(*args)
    assert rerun["epochs_run"] == reference["epochs_run"] and rerun["epoch"] == reference["epoch"]
    assert rerun["pruned"] == (stop == "pruned")
    assert trajectory(work / "history.csv") == trajectory(tmp_path / "ref/history.csv")
    _, kept = load_checkpoint(tmp_path / "ref/model.pt")
    assert saved_weights_equal(work / "model.pt", kept["state_dict"])


@pytest.mark.slow
def test_precision_on_cpu(tmp_path, prepared):
    with pytest.raises(CnnpipeError, match="train.precision fp16 needs a CUDA GPU; use fp32 or bf16"):
        run(tmp_path, prepared, dataclasses.replace(TINY, precision="fp16"))
    assert not any(tmp_path.glob("model.pt*")) and not (tmp_path / "train.json").exists()
    metrics = run(tmp_path, prepared, dataclasses.replace(TINY, precision="bf16", epochs=2))
    assert metrics["precision"] == "bfloat16" and metrics["val_acc"] >= 0.5


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("fp32, bf16", [(100.0, 500.0), (100.0, 105.0)])
def test_auto_on_the_cpu_trains_in_what_the_flags_and_the_probe_decide(tmp_path, prepared, monkeypatch, native,
                                                                       fp32, bf16):
    """The train stage's auto, with the CPU's flags and the probe's remembered outcome set: bf16 only where the
    CPU has native bf16 and the probe found it faster (a short bf16 run where it is emulated)."""
    from cnnpipe.core import cpuprecision
    from cnnpipe.stages import train as train_stage

    flags = frozenset({"avx2", "amx_bf16"} if native else {"avx2"})
    monkeypatch.setattr(train_stage, "cpu_flags", lambda: flags)
    monkeypatch.setenv("CNNPIPE_CACHE_DIR", str(tmp_path / "cache"))
    p = dataclasses.replace(TINY, epochs=1, precision="auto", threads=1)
    key = cpuprecision.probe_key(p.model, (1, 28, 28), p.batch_size, 1, flags)
    cpuprecision.remember(cpuprecision.decisions_file(), key, {"fp32": fp32, "bf16": bf16})
    metrics = run(tmp_path, prepared, p)
    bf16_wins = native and bf16 >= cpuprecision.MIN_GAIN * fp32
    assert metrics["precision"] == ("bfloat16" if bf16_wins else "float32")
    choice = metrics["precision_choice"]
    assert choice["chose"] == ("bf16" if bf16_wins else "fp32") and choice["native_bf16"] == native
    assert choice.get("probe") == ("remembered" if native else None)  # no native bf16: nothing probed


@pytest.mark.slow
def test_airnet_trains_on_cpu(tmp_path, prepared):
    metrics = run(tmp_path, prepared, dataclasses.replace(TINY, model="airnet", epochs=3, lr=0.003))
    assert metrics["val_acc"] >= 0.5  # chance is 0.1


@pytest.mark.slow
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


def fake_speed(calls: list, fp32: float, bf16: float):
    """A probe that answers these images/s and records each precision it was asked for."""
    def measure(dtype):
        calls.append(dtype)
        return bf16 if dtype == torch.bfloat16 else fp32
    return measure


def test_cpu_precision_auto_follows_the_flags_and_the_probe(caplog):
    from cnnpipe.core import cpuprecision

    calls = []
    speed = functools.partial(fake_speed, calls)

    avx2 = frozenset({"sse4_2", "avx2", "fma"})
    amx = avx2 | {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    dtype, why = cpuprecision.choose("auto", avx2, speed(100, 1000))
    assert dtype is None and why["chose"] == "fp32" and "no native bf16" in why["why"] and not calls  # no probe
    dtype, why = cpuprecision.choose("auto", amx, speed(100, 186))
    assert dtype == torch.bfloat16 and why["probe_images_per_s"] == {"fp32": 100, "bf16": 186}
    assert cpuprecision.choose("auto", amx, speed(100, 105))[0] is None  # native, but the probe finds no gain
    assert cpuprecision.choose("fp32", amx, speed(100, 186))[0] is None  # an explicit choice wins
    with caplog.at_level("WARNING"):
        assert cpuprecision.choose("bf16", avx2, speed(100, 10))[0] == torch.bfloat16
    slow = [r.getMessage() for r in caplog.records if "without native bf16" in r.getMessage()]
    assert len(slow) == 1 and "slower" in slow[0] and "amx_bf16" in slow[0]


def test_auto_remembers_its_probe_so_reruns_train_the_same_way(tmp_path):
    from cnnpipe.core import cpuprecision

    amx = frozenset({"avx2", "avx512_bf16", "amx_bf16"})
    path = tmp_path / "cache" / "cpu-precision.json"
    calls = []
    speed = functools.partial(fake_speed, calls)

    def at(key: str):
        return {"key": lambda: key, "path": lambda: path}

    dtype, why = cpuprecision.choose("auto", amx, speed(100, 186), **at("config a"))
    assert dtype == torch.bfloat16 and why["probe"] == "measured" and len(calls) == 2
    # the same config again: a noisy probe would now say fp32, but the first decision stands, unprobed
    dtype, why = cpuprecision.choose("auto", amx, speed(100, 90), **at("config a"))
    assert dtype == torch.bfloat16 and why["probe"] == "remembered" and len(calls) == 2
    assert why["probe_images_per_s"] == {"fp32": 100, "bf16": 186}
    # another config probes for itself and keeps the first one's figures
    assert cpuprecision.choose("auto", amx, speed(100, 90), **at("config b"))[0] is None and len(calls) == 4
    assert json.loads(path.read_text()) == {"config a": {"fp32": 100, "bf16": 186},
                                            "config b": {"fp32": 100, "bf16": 90}}
    path.write_text("{not json")  # damaged: probe again and rewrite it
    assert cpuprecision.choose("auto", amx, speed(100, 186), **at("config a"))[1]["probe"] == "measured"
    assert json.loads(path.read_text()) == {"config a": {"fp32": 100, "bf16": 186}}
    # a process that probed the same key at the same time, but saved second, trains as the first one saved
    assert cpuprecision.remember(path, "config a", {"fp32": 100, "bf16": 90}) == {"fp32": 100, "bf16": 186}
    assert json.loads(path.read_text()) == {"config a": {"fp32": 100, "bf16": 186}}


def test_auto_without_a_usable_cache_still_probes_and_trains(tmp_path, monkeypatch, caplog):
    """No home folder (a container run as an arbitrary uid), or a cache path that cannot be written: auto
    probes and decides as usual, remembering nothing."""
    from cnnpipe.core import cpuprecision

    amx = frozenset({"avx2", "amx_bf16"})
    for name in ("CNNPIPE_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(name, raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert cpuprecision.decisions_file() is None
    dtype, why = cpuprecision.choose("auto", amx, lambda dt: 186.0 if dt else 100.0, lambda: "k",
                                     cpuprecision.decisions_file)
    assert dtype == torch.bfloat16 and why["probe"] == "measured"

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("CNNPIPE_CACHE_DIR", str(tmp_path / "a-file"))  # its "folder" is a file
    with caplog.at_level("WARNING"):
        dtype, why = cpuprecision.choose("auto", amx, lambda dt: 186.0 if dt else 100.0, lambda: "k",
                                         cpuprecision.decisions_file)
    assert dtype == torch.bfloat16 and why["probe"] == "measured"
    assert any("could not remember the probe" in r.getMessage() for r in caplog.records)


def test_the_probe_key_names_what_the_outcome_depends_on():
    from cnnpipe.core import cpuprecision

    amx, avx512 = frozenset({"avx2", "amx_bf16"}), frozenset({"avx2", "avx512_bf16"})
    key = cpuprecision.probe_key("rescnn", (1, 28, 28), 128, 2, amx)
    others = [("bncnn", (1, 28, 28), 128, 2, amx), ("rescnn", (3, 32, 32), 128, 2, amx),
              ("rescnn", (1, 28, 28), 64, 2, amx), ("rescnn", (1, 28, 28), 128, 1, amx),
              ("rescnn", (1, 28, 28), 128, 2, avx512)]
    assert len({key, *(cpuprecision.probe_key(*o) for o in others)}) == 6
    assert key == cpuprecision.probe_key("rescnn", (1, 28, 28), 128, 2, amx | {"sse2"})  # other flags: no matter
    assert torch.__version__ in key


def test_cpu_flags_come_from_cpuinfo(tmp_path):
    from cnnpipe.core import cpuinfo, cpuprecision

    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Xeon X\n"
                                      "flags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\n\n")
    flags = cpuinfo.cpu_flags(tmp_path / "cpuinfo")
    assert cpuprecision.native_bf16(flags) and "avx2" in flags and cpuinfo.cpu_model(tmp_path / "cpuinfo") == "Xeon X"
    assert cpuinfo.cpu_flags(tmp_path / "absent") == frozenset() and cpuinfo.cpu_model(tmp_path / "absent") == ""


def test_the_real_probe_leaves_the_model_and_random_streams_alone():
    from cnnpipe.core import cpuprecision
    from cnnpipe.core.models import build_model

    torch.manual_seed(3)
    model = build_model("bncnn", (1, 28, 28), 10).to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    fp32 = cpuprecision.probe(model, (1, 28, 28), 32, None, steps=2, warmup=1)
    bf16 = cpuprecision.probe(model, (1, 28, 28), 32, torch.bfloat16, steps=2, warmup=1)
    assert fp32 > 0 and bf16 > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), state)


def test_bf16_cpu_training_exports_an_onnx_model_that_passes_the_parity_check(tmp_path, prepared):
    from cnnpipe.core.params import ExportParams
    from cnnpipe.stages.export import export

    run(tmp_path, prepared, dataclasses.replace(TINY, precision="bf16", epochs=2))
    info = json.loads((tmp_path / "train.info.json").read_text())
    assert info["precision"] == "bfloat16" and info["precision_choice"]["asked"] == "bf16"
    result = export(ExportParams(check_images=64), prepared, tmp_path / "model.pt", tmp_path / "model.onnx",
                    tmp_path / "export.json")
    assert result["agree"] == 1.0 and result["max_abs_diff"] < ExportParams().atol


def test_a_ctrl_c_during_the_resume_save_waits_for_the_write_then_interrupts(tmp_path):
    """SIGINT inside the held block does not cut it short: the block finishes, then KeyboardInterrupt."""
    import os
    import signal

    from cnnpipe.core.resume import sigint_held

    finished, handler = [], signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with sigint_held():
            os.kill(os.getpid(), signal.SIGINT)
            torch.save({"x": torch.zeros(1000)}, tmp_path / "state.pt")
            finished.append(True)
    assert finished and torch.load(tmp_path / "state.pt")["x"].shape == (1000,)
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C handled as before the block again
    with sigint_held():  # no Ctrl-C: nothing raised
        pass
