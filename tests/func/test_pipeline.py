"""The real `dvc repro` in a temporary git + DVC repo holding a copy of the project files."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import commit, dvc, make_repo, ran, set_params, write_mnist_mirror

pytestmark = pytest.mark.slow

STAGES = ["download", "split", "train", "evaluate", "export", "quantize"]
OUTPUTS = ["data/raw/manifest.json", "data/prepared/train_x.npy", "models/model.pt", "models/model.onnx",
           "models/model.int8.onnx", "plots/train_history.csv", "plots/confusion.csv", "plots/per_class.csv",
           *(f"metrics/{s}{kind}.json" for s in ("split", "train", "eval", "export", "quantize")
             for kind in ("", ".info"))]


def test_repro_runs_everything_then_only_what_changed(tmp_path):
    """All stages run; then nothing; push/pull through a remote; then exactly what each param change needs."""
    mirror = tmp_path / "mirror"
    md5 = write_mnist_mirror(mirror)
    repo = make_repo(tmp_path, str(mirror), md5)

    out = dvc(repo, "repro")
    assert ran(out) == STAGES
    for rel in OUTPUTS:
        assert (repo / rel).is_file(), rel
    assert json.loads((repo / "metrics/eval.info.json").read_text())["images"] == 100
    assert json.loads((repo / "metrics/export.json").read_text())["agree"] == 1.0
    commit(repo, "baseline")

    assert ran(dvc(repo, "repro")) == []
    assert "up to date" in dvc(repo, "status")

    # a teammate's view: outputs and cache gone, `dvc pull` from the remote restores them, nothing reruns
    dvc(repo, "remote", "add", "-d", "storage", str(tmp_path / "remote"))
    dvc(repo, "push", "--run-cache")
    onnx_bytes = (repo / "models/model.onnx").read_bytes()
    shutil.rmtree(repo / ".dvc/cache")
    for out in ("data/raw", "data/prepared"):
        shutil.rmtree(repo / out)
    for f in (repo / "models").glob("model*"):
        f.unlink()
    assert "deleted" in dvc(repo, "status")
    dvc(repo, "pull", "--run-cache")
    assert (repo / "models/model.onnx").read_bytes() == onnx_bytes
    assert (repo / "data/prepared/train_x.npy").is_file()
    assert ran(dvc(repo, "repro")) == []

    set_params(repo, train={"epochs": 3})
    assert ran(dvc(repo, "repro")) == ["train", "evaluate", "export", "quantize"]
    assert json.loads((repo / "metrics/train.info.json").read_text())["epochs_run"] == 3
    assert_metrics_read_well(repo)
    assert "train.epochs" in json.loads(dvc(repo, "params", "diff", "--json"))["params.yaml"]
    commit(repo, "three epochs")

    set_params(repo, export={"check_images": 16})
    assert ran(dvc(repo, "repro")) == ["export"]  # same ONNX bytes: quantize is not stale
    assert json.loads((repo / "metrics/export.info.json").read_text())["check_images"] == 16

    set_params(repo, quantize={"latency_runs": 5})
    assert ran(dvc(repo, "repro")) == ["quantize"]
    q = json.loads((repo / "metrics/quantize.json").read_text())
    assert q["bytes"] == (repo / "models/model.int8.onnx").stat().st_size
    assert q["bytes"] < json.loads((repo / "metrics/export.json").read_text())["bytes"]

    plots = json.loads(dvc(repo, "plots", "show", "--json"))["data"]
    assert sorted(plots) == sorted(["Loss", "Accuracy", "Confusion matrix (test)", "F1 per class (test)",
                                    "plots/train_history.png", "plots/confusion.png", "plots/per_class.png",
                                    "plots/mistakes.png"])


def assert_metrics_read_well(repo):
    """`dvc metrics diff` shows numbers only and fits 120 columns; `dvc metrics show` fits 160."""
    diff = json.loads(dvc(repo, "metrics", "diff", "--json"))
    assert diff, "the change moved no metric"
    values = [v for changes in diff.values() for change in changes.values() for v in (change["old"], change["new"])]
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in values), values
    for command, width in ((("metrics", "diff"), 120), (("metrics", "show"), 160)):
        table = dvc(repo, *command)
        widest = max(table.splitlines(), key=len)
        assert len(widest) <= width, f"dvc {' '.join(command)} is {len(widest)} columns wide:\n{table}"


@pytest.fixture
def baseline(reproduced, tmp_path):
    """A temporary project whose whole pipeline has run and been committed."""
    return reproduced(tmp_path)


def test_exp_run_set_param_and_show(baseline):
    repo = baseline
    out = dvc(repo, "exp", "run", "-S", "train.epochs=1", "-n", "one-epoch")
    assert ran(out) == ["train", "evaluate", "export", "quantize"]
    exp = find_named(json.loads(dvc(repo, "exp", "show", "--json")), "one-epoch")
    assert exp is not None
    data = exp["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["epochs"] == 1
    assert data["metrics"]["metrics/train.json"]["data"]["epoch"] == 1  # the best of one epoch
    dvc(repo, "exp", "apply", "one-epoch")  # what exp show reported is what the experiment wrote
    assert data["metrics"]["metrics/eval.json"]["data"] == json.loads((repo / "metrics/eval.json").read_text())


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



def test_editing_a_module_makes_exactly_its_importers_stale(baseline):
    """A comment appended to a module of src/cnnpipe dirties exactly the stages whose commands import it."""
    from stagedeps import stage_closure

    repo = baseline
    assert "up to date" in dvc(repo, "status")
    for module in ("core/inference.py", "core/onnx_io.py", "core/own_images.py", "core/checkpoint.py",
                   "core/fsutil.py", "serve/predictor.py"):
        path = repo / "src/cnnpipe" / module
        original = path.read_text()
        path.write_text(original + "# edited\n")
        stale = set(json.loads(dvc(repo, "status", "--json")))
        path.write_text(original)
        expected = {s for s in STAGES if f"src/cnnpipe/{module}" in stage_closure(s)}
        assert expected or module == "serve/predictor.py", module  # the server's predictor: no stage runs it
        assert stale == expected, module
    assert "up to date" in dvc(repo, "status")


def test_plots_show_renders_offline_with_the_pictures(baseline, tmp_path):
    """`dvc plots show` writes a page whose charting scripts are inline (no CDN) and which shows the stages'
    pictures beside the charts."""
    repo = baseline
    dvc(repo, "plots", "show", "-o", str(tmp_path / "html"))
    html = (tmp_path / "html" / "index.html").read_text()
    assert "cdn.jsdelivr" not in html and "<script src" not in html
    assert html.count("vegaEmbed('#") >= 4  # loss, accuracy, confusion matrix, F1 per class
    for name in ("vega@", "vega-lite@", "vega-embed@"):
        assert f"/* {name}" in html, name
    for picture in ("train_history.png", "confusion.png", "per_class.png", "mistakes.png"):
        assert picture in html, picture
        assert list((tmp_path / "html").rglob(f"*{picture}")), picture  # the image file beside the page
