"""The Prefect flow over the DVC pipeline, under prefect_test_harness (a real temporary Prefect API)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import yaml
from helpers import commit, make_repo, write_mnist_mirror

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.mlops.dvcops import apply_overrides, stage_order

pytestmark = pytest.mark.slow

ALL = ["download", "split", "train", "evaluate", "export", "quantize"]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow")
    md5 = write_mnist_mirror(tmp / "mirror")
    return make_repo(tmp, str(tmp / "mirror"), md5)


def artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:  # newest first
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                     sort=ArtifactSort.CREATED_DESC)


def test_stage_order_comes_from_dvc(repo):
    assert stage_order(repo) == ALL


def at(repo, rev: str, path: str) -> dict:
    return json.loads(subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True,
                                     check=True).stdout)


def test_each_run_is_an_experiment_overrides_stay_in_it_and_the_gate_decides(harness, repo):
    """Runs as DVC experiments named after them; an override reaches its own run only; the promotion gate as
    the flow's last task: the first run passes the absolute rule and is promoted (tags, artifact), a run that
    cannot beat production by the margin is refused and production stays."""
    from flows import train_pipeline
    from helpers import set_params

    from cnnpipe.mlops.dvcops import experiment_commit

    set_params(repo, promote={"rules": ["eval.acc >= 0.05", "eval.acc >= prod + 0.5"]})
    commit(repo, "rules")
    params = (repo / "params.yaml").read_text()
    assert train_pipeline(repo=str(repo), name="first", promote=True) == {s: "ran" for s in ALL} | {
        "promote": "promoted v1.0.0"}
    promotion = artifacts("cnnpipe-promotion")[0].data
    assert "**Promoted** as `v1.0.0`" in promotion and "skip  eval.acc >= prod + 0.5" in promotion
    first = experiment_commit(repo, "first")
    table = artifacts("cnnpipe-metrics")
    eval_acc = at(repo, first, "metrics/eval.json")["acc"]
    assert table and {"file": "metrics/eval.json", "metric": "acc", "value": eval_acc} in json.loads(table[0].data)
    assert f"**first** at commit `{first}`" in artifacts("cnnpipe-experiment")[0].data
    assert not (repo / "metrics/eval.json").exists()  # the checkout is left as it was

    # adopt the first run's results (a run with nothing changed then reruns nothing: "fourth" below)
    subprocess.run([sys.executable, "-m", "dvc", "exp", "apply", "first"], cwd=repo, check=True, capture_output=True)
    commit(repo, "first run's results")

    statuses = train_pipeline(overrides={"train.epochs": 3}, repo=str(repo), name="third", promote=True)
    assert statuses == {"download": "skipped", "split": "skipped", "train": "ran", "evaluate": "ran",
                        "export": "ran", "quantize": "ran", "promote": "refused"}
    promotion = artifacts("cnnpipe-promotion")[0].data
    assert "**Refused**" in promotion and "FAIL  eval.acc >= prod + 0.5" in promotion
    tags = subprocess.run(["git", "tag"], cwd=repo, capture_output=True, text=True).stdout.split()
    assert sorted(tags) == ["image-classifier#prod#1", "image-classifier-int8#prod#1",
                            "image-classifier-int8@v1.0.0", "image-classifier@v1.0.0"]
    third = experiment_commit(repo, "third")
    assert at(repo, third, "metrics/train.info.json")["epochs_run"] == 3
    diff = artifacts("cnnpipe-metrics-diff")[0].data  # against production (the first run): training time moved
    assert "metrics/train.json" in diff and "sec" in diff
    plots = artifacts("cnnpipe-plots")[0].data  # the pictures of production and of this run, linked
    page = repo / "dvc_plots" / "third" / "index.html"
    assert page.as_uri() in plots and "cdn.jsdelivr" not in page.read_text()
    for picture in ("train_history.png", "confusion.png", "per_class.png", "mistakes.png"):
        links = re.findall(rf"\| {re.escape(picture)} \| \[{first[:10]}\]\((file://[^)]+)\) \| "
                           rf"\[{third[:10]}\]\((file://[^)]+)\) \|", plots)
        assert links and all(Path(urllib.parse.urlparse(u).path).is_file() for u in links[0]), picture
    # the override stayed in its experiment: the checkout's params and the next run are the defaults
    assert (repo / "params.yaml").read_text() == params
    assert train_pipeline(repo=str(repo), name="fourth") == {s: "skipped" for s in ALL}
    assert at(repo, experiment_commit(repo, "fourth"), "metrics/train.info.json")["epochs_run"] == 2
    listed = subprocess.run([sys.executable, "-m", "dvc", "exp", "list", "--all-commits", "--name-only"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout.split()
    assert sorted(listed) == ["first", "fourth", "third"]


@pytest.mark.parametrize("overrides, message", [
    ({"train.nope": 1}, r"override train\.nope: params\.yaml has no such key"),
    ({"nosection.x": 1}, r"params\.yaml has no 'nosection'"),
    ({"train.epochs": "many"}, r"train\.epochs must be int, got 'many'"),
    ({"train.optimizer": "rmsprop"}, r"train\.optimizer must be"),
    # DVC's -S parser refuses a non-empty mapping; the flow says so before anything runs
    ({"download.md5": {"shapes.zip": "0" * 32}},
     r"^override download\.md5: dvc exp run -S cannot set a mapping \(.*\); set download\.md5 in params\.yaml"),
])
def test_bad_overrides_refused_before_any_stage(harness, repo, overrides, message):
    from flows import train_pipeline

    before = (repo / "params.yaml").read_text()
    lock = (repo / "dvc.lock").read_text() if (repo / "dvc.lock").exists() else None
    with pytest.raises(CnnpipeError, match=message):
        train_pipeline(overrides=overrides, repo=str(repo))
    assert (repo / "params.yaml").read_text() == before
    assert (repo / "dvc.lock").exists() == (lock is not None)
    assert lock is None or (repo / "dvc.lock").read_text() == lock


def test_failing_stage_fails_the_flow_and_stops(harness, tmp_path):
    from flows import train_pipeline

    md5 = write_mnist_mirror(tmp_path / "mirror")
    repo = make_repo(tmp_path, str(tmp_path / "mirror"), md5)
    state = train_pipeline(overrides={"train.batch_size": 100000}, repo=str(repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(CnnpipeError, match=r"stage 'train' failed .*batch_size 100000 does not fit"):
        state.result()
    assert not list(repo.glob("models/*"))  # the run happened in a temporary copy: nothing lands here
    assert not (repo / "metrics/eval.json").exists()


def test_overrides_keep_comments_and_other_values(tmp_path):
    from cnnpipe.core.params import defaults

    path = tmp_path / "params.yaml"
    full = {"train": defaults()["train"] | {"epochs": 12, "lr": 0.003},
            "split": defaults()["split"] | {"val_size": 5000, "train_size": None}}
    path.write_text(yaml.safe_dump(full, sort_keys=False).replace("epochs: 12", "epochs: 12  # why: budget"))
    assert apply_overrides(path, {"train.epochs": "5", "split.val_size": 100}) == {"train.epochs": 5,
                                                                                 "split.val_size": 100}
    text = path.read_text()
    assert re.search(r"epochs: 5 +# why: budget", text) and "lr: 0.003" in text and "val_size: 100" in text
    assert yaml.safe_load(text)["split"]["train_size"] is None


def test_no_api_reachable_message(monkeypatch):
    import flows
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with pytest.raises(CnnpipeError, match=r"no Prefect API reachable at http://127\.0\.0\.1:9/api.*server start"):
            flows.check_api()


@pytest.mark.parametrize("arg", ["[1]", "{bad", '"epochs"'])
def test_overrides_argument_must_be_a_json_object(arg, capsys):
    import flows

    assert flows.main([arg]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_pipeline: error: overrides must be a JSON object") and "\n" not in err
