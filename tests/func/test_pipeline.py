"""The real `dvc repro` in a temporary git + DVC repo holding a copy of the project files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from helpers import write_mnist_mirror

pytestmark = pytest.mark.slow

OUTPUTS = ["data/raw/manifest.json", "data/prepared/train_x.npy", "models/model.pt", "models/model.onnx",
           "metrics/split.json", "metrics/train.json", "metrics/eval.json", "metrics/export.json",
           "plots/train_history.csv", "plots/confusion.csv"]


def run(repo: Path, *args: str) -> str:
    proc = subprocess.run(list(args), cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def dvc(repo: Path, *args: str) -> str:
    return run(repo, sys.executable, "-m", "dvc", *args)


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def set_params(repo: Path, **sections) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_repo(tmp_path: Path, source: str, md5: dict[str, str]) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    set_params(
        repo,
        download={"dataset": "mnist", "sources": [source], "md5": md5, "retries": 1},
        split={"val_size": 50, "train_size": None, "seed": 0},
        train={"model": "lenet", "epochs": 2, "batch_size": 50, "lr": 0.01, "device": "cpu"},
        evaluate={"device": "cpu"},
        export={"check_images": 32},
    )
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.email", "ci@example.com")
    run(repo, "git", "config", "user.name", "CI")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.autostage", "true")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "project")
    return repo


def commit(repo: Path, message: str) -> None:
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", message)


def test_repro_runs_everything_then_only_what_changed(tmp_path):
    mirror = tmp_path / "mirror"
    md5 = write_mnist_mirror(mirror)
    repo = make_repo(tmp_path, str(mirror), md5)

    out = dvc(repo, "repro")
    assert ran(out) == ["download", "split", "train", "evaluate", "export"]
    for rel in OUTPUTS:
        assert (repo / rel).is_file(), rel
    assert json.loads((repo / "metrics/eval.json").read_text())["images"] == 100
    assert json.loads((repo / "metrics/export.json").read_text())["argmax_agreement"] == 1.0
    commit(repo, "baseline")

    assert ran(dvc(repo, "repro")) == []
    assert "up to date" in dvc(repo, "status")

    set_params(repo, train={"epochs": 3})
    assert ran(dvc(repo, "repro")) == ["train", "evaluate", "export"]
    diff = json.loads(dvc(repo, "metrics", "diff", "--json"))
    assert diff["metrics/train.json"]["epochs"] == {"old": 2, "new": 3, "diff": 1}
    assert "train.epochs" in json.loads(dvc(repo, "params", "diff", "--json"))["params.yaml"]
    commit(repo, "three epochs")

    set_params(repo, export={"check_images": 16})
    assert ran(dvc(repo, "repro")) == ["export"]
    assert json.loads((repo / "metrics/export.json").read_text())["check_images"] == 16

    set_params(repo, split={"seed": 1})
    assert ran(dvc(repo, "repro")) == ["split", "train", "evaluate", "export"]

    plots = dvc(repo, "plots", "show", "--json")
    assert "plots/confusion.csv" in plots and "plots/train_history.csv" in plots


def test_exp_run_set_param_and_show(tmp_path):
    mirror = tmp_path / "mirror"
    md5 = write_mnist_mirror(mirror)
    repo = make_repo(tmp_path, str(mirror), md5)
    dvc(repo, "repro")
    commit(repo, "baseline")

    out = dvc(repo, "exp", "run", "-S", "train.epochs=1", "-n", "one-epoch")
    assert ran(out) == ["train", "evaluate", "export"]
    exp = find_named(json.loads(dvc(repo, "exp", "show", "--json")), "one-epoch")
    assert exp is not None
    data = exp["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["epochs"] == 1
    assert data["metrics"]["metrics/train.json"]["data"]["epochs"] == 1
    assert 0 <= data["metrics"]["metrics/eval.json"]["data"]["accuracy"] <= 1


def find_named(node, name: str):
    """The experiment record called `name` anywhere in `dvc exp show --json` output."""
    if isinstance(node, dict):
        if node.get("name") == name and "data" in node:
            return node
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            if (found := find_named(child, name)) is not None:
                return found
    return None


def test_repro_from_loopback_http_source(tmp_path, http_server):
    mirror = tmp_path / "mirror"
    md5 = write_mnist_mirror(mirror)
    url, requests = http_server(mirror)
    repo = make_repo(tmp_path, url, md5)
    out = dvc(repo, "repro", "split")
    assert ran(out) == ["download", "split"]
    assert sorted(set(requests)) == sorted(md5)
    manifest = json.loads((repo / "data/raw/manifest.json").read_text())
    assert {f["name"]: f["md5"] for f in manifest["files"]} == md5
