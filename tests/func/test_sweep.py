"""`cnnpipe sweep` for real: Optuna proposes, DVC's queue runs every trial as an experiment, the train stage
reports each epoch to a journal-file study and the median pruner stops hopeless trials; a stopped sweep
resumes without rerunning what finished; a crashing trial is marked failed and the sweep goes on."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import dvc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(reproduced, tmp_path_factory) -> Path:
    """The project on tiny MNIST, reproduced and committed, as after `make run`."""
    return reproduced(tmp_path_factory.mktemp("sweep"))


def sweep(repo: Path, spec: dict, *args: str) -> subprocess.Popen:
    (repo / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec))
    return subprocess.Popen([sys.executable, "-m", "cnnpipe.cli", "sweep", f"{spec['name']}.yaml", *args], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=400)
    return proc.returncode, out


def experiments(repo: Path) -> dict[str, dict]:
    """Experiment name -> its params.yaml train section and its metrics/train.json, from `dvc exp show`."""
    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            data = exp["revs"][0]["data"]
            found[exp["name"]] = {"train": data["params"]["params.yaml"]["data"]["train"],
                                  "metrics": data["metrics"]["metrics/train.json"]["data"]}
    return found


def table(repo: Path, name: str) -> list[dict]:
    return list(csv.DictReader((repo / "sweeps" / name / "trials.csv").open()))


def test_sweep_queues_trials_prunes_and_resumes_after_a_stop(repo):
    spec = {"name": "lr", "sampler": "random", "seed": 5, "parallel": 2, "trials": 2,
            "pruner": {"kind": "median", "startup_trials": 1, "warmup_epochs": 1},
            "space": {"train.lr": {"low": 1e-7, "high": 0.03, "log": True}, "train.epochs": [3]}}
    first = sweep(repo, spec)
    queued = []
    for line in first.stdout:  # stop the sweep as soon as both trials are in DVC's queue
        queued += [line.split()[4].rstrip(":")] if " queued as " in line else []
        if len(queued) == 2:
            first.send_signal(signal.SIGINT)
            break
    assert first.wait(timeout=60) == 130 and queued == ["lr-000", "lr-001"]

    code, out = finish(sweep(repo, spec, "--trials", "3"))  # started again, with a larger budget
    assert code == 0, out
    resumed = re.search(r"resuming with (\d) finished trials, (\d) still queued", out)
    assert resumed and int(resumed[1]) + int(resumed[2]) == 2, out
    assert out.count(" queued as ") == 1  # only the new trial: the stopped sweep's two were not rerun
    rows = table(repo, "lr")
    assert [r["experiment"] for r in rows] == ["lr-000", "lr-001", "lr-002"]
    assert {r["state"] for r in rows} == {"complete", "pruned"}
    pruned = [r for r in rows if r["state"] == "pruned"]
    assert all(int(r["epochs"]) < 3 for r in pruned)
    assert all(int(r["epochs"]) == 3 for r in rows if r["state"] == "complete")
    assert all(float(r["train.lr"]) < min(float(c["train.lr"]) for c in rows if c["state"] == "complete")
               for r in pruned)  # the hopeless ones are the lowest learning rates

    shown = experiments(repo)  # every trial is a DVC experiment with the trial's params
    for r in rows:  # each with its params, and counted with the accuracy of the model it kept
        assert shown[r["experiment"]]["train"]["lr"] == pytest.approx(float(r["train.lr"]))
        assert shown[r["experiment"]]["metrics"]["val_acc"] == pytest.approx(float(r["val_acc"]))
    best = max((r for r in rows if r["state"] == "complete"), key=lambda r: float(r["val_acc"]))
    assert f"best: trial {best['trial']} ({best['experiment']})" in out

    plots = json.loads(dvc(repo, "plots", "show", "--json", "lr: val_acc vs train.lr"))
    values = plots["data"]["lr: val_acc vs train.lr"][0]["content"]["data"]["values"]
    assert sorted(v["experiment"] for v in values) == [r["experiment"] for r in rows]

    try:
        dvc(repo, "exp", "apply", best["experiment"])  # the best trial, ready to use: its params and model
        applied = yaml.safe_load((repo / "params.yaml").read_text())["train"]
        assert applied["lr"] == pytest.approx(float(best["train.lr"])) and applied["tag"] == best["experiment"]
        assert "evaluate" in dvc(repo, "status")  # `dvc repro` would now test it (trials never see the test set)
    finally:  # the module's repo back at its commit for the next test
        subprocess.run(["git", "checkout", "params.yaml", "dvc.lock"], cwd=repo, check=True)
        dvc(repo, "checkout", "-f")


def test_a_crashing_trial_is_marked_failed_and_the_sweep_goes_on(repo):
    spec = {"name": "batch", "sampler": "grid", "parallel": 2, "trials": 5,
            "space": {"train.batch_size": [50, 100000], "train.epochs": [1]}}
    code, out = finish(sweep(repo, spec))
    assert code == 0, out
    rows = {r["train.batch_size"]: r for r in table(repo, "batch")}
    assert len(rows) == 2  # a grid's budget is its size
    assert rows["50"]["state"] == "complete" and rows["100000"]["state"] == "failed"
    failed = rows["100000"]["experiment"]
    assert f"see `dvc queue logs {failed}`" in out
    assert "does not fit" in dvc(repo, "queue", "logs", failed)
    assert f"best: trial {rows['50']['trial']}" in out
