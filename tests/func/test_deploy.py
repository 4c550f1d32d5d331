"""End to end: a real `prefect server start` on loopback, the process work pool, the deployment of
pipeline/prefect.yaml, two runs picked up by one `prefect worker start`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from helpers import commit, make_repo, write_mnist_mirror

from cnnpipe.bench.launch import free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent



def api(url: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", DO_NOT_TRACK="1",
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("PREFECT_LOCAL_STORAGE_PATH", None)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    procs = [server]
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                api(env["PREFECT_API_URL"], "/health")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((tmp_path / "server.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        yield env, procs
    finally:
        for p in procs:  # every process started here stops, also on failure
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        log.close()


def sh(env: dict, cwd: Path, *args: str) -> str:
    proc = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_deploy_schedule_and_worker_run(prefect_server, tmp_path):
    env, procs = prefect_server
    md5 = write_mnist_mirror(tmp_path / "mirror")
    repo = make_repo(tmp_path, str(tmp_path / "mirror"), md5)
    root = Path(__file__).resolve().parents[2]
    for name in ("Makefile", "pyproject.toml"):
        (repo / name).write_text((root / name).read_text())
    commit(repo, "with Makefile")
    url = env["PREFECT_API_URL"]

    # `make deploy`, as documented, with this interpreter's venv standing in as already set up
    stamp = tmp_path / "installed"
    stamp.touch()
    sh(env, repo, "make", "deploy", f"VENV={BIN.parent}", f"STAMP={stamp}")

    deployments = api(url, "/deployments/filter", {})
    assert [d["name"] for d in deployments] == ["nightly"]
    deployment = deployments[0]
    schedules = [s["schedule"] for s in deployment["schedules"]]
    assert schedules and schedules[0]["cron"] == "0 2 * * *"
    assert deployment["work_pool_name"] == "cnnpipe-process"
    assert deployment["parameters"] == {"promote": True}
    # typed, described parameters: the UI's run form has a field per parameter
    schema = deployment["parameter_openapi_schema"]["properties"]
    assert schema["promote"]["type"] == "boolean" and schema["baseline"]["type"] == "string"
    assert {"type": "object", "additionalProperties": True} in schema["overrides"]["anyOf"]
    assert all(schema[k].get("description") for k in ("overrides", "repo", "baseline", "promote", "name"))
    # one run at a time in the checkout; a second one waits its turn instead of sharing it
    limit = deployment.get("global_concurrency_limit") or {}
    assert (limit.get("limit") or deployment.get("concurrency_limit")) == 1, deployment
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"

    # the alerts of pipeline/alerts.py, created twice: replaced, not duplicated
    for _ in range(2):
        sh(env, root, sys.executable, "pipeline/alerts.py", "http://127.0.0.1:9/not-called")
    automations = {a["name"]: a for a in api(url, "/automations/filter", {})}
    assert sorted(automations) == ["cnnpipe: nightly run failed or crashed",
                                   "cnnpipe: no completed nightly run in 26 hours"]
    failed = automations["cnnpipe: nightly run failed or crashed"]["trigger"]
    silent = automations["cnnpipe: no completed nightly run in 26 hours"]["trigger"]
    assert set(failed["expect"]) == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert failed["posture"] == "Reactive"
    assert silent["expect"] == ["prefect.flow-run.Completed"] and silent["posture"] == "Proactive"
    assert silent["within"] == 26 * 3600
    for trigger in (failed, silent):  # both watch this deployment only
        related = trigger["match_related"]
        related = related if isinstance(related, list) else [related]
        assert [r["prefect.resource.id"] for r in related] == [f"prefect.deployment.{deployment['id']}"]

    # two runs triggered at once, the first with an override: both finish, one after the other, each an
    # experiment; the override stays in the first one's experiment and never reaches the second
    first = sh(env, repo, str(BIN / "prefect"), "deployment", "run", "train_pipeline/nightly",
               "-p", 'overrides={"train.epochs": 1}')
    second = sh(env, repo, str(BIN / "prefect"), "deployment", "run", "train_pipeline/nightly")
    ids = [re.search(r"UUID: *([0-9a-f-]{36})", out).group(1) for out in (first, second)]

    worker_log = open(tmp_path / "worker.log", "w")  # a file, not a pipe nobody reads while the runs go on
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "cnnpipe-process"],
                              cwd=repo, env=dict(env, PREFECT_WORKER_QUERY_SECONDS="2"), stdout=worker_log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(worker)
    deadline = time.monotonic() + 500
    while True:
        runs = {r["id"]: r for r in api(url, "/flow_runs/filter", {"flow_runs": {"id": {"any_": ids}}})}
        if all(runs[i]["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for i in ids):
            break
        assert time.monotonic() < deadline, {i: runs[i]["state_name"] for i in ids}
        time.sleep(2)
    os.killpg(worker.pid, signal.SIGTERM)
    worker.wait(60)
    worker_log.close()
    output = (tmp_path / "worker.log").read_text()
    assert [runs[i]["state_type"] for i in ids] == ["COMPLETED", "COMPLETED"], output[-3000:]
    spans = sorted((datetime.fromisoformat(runs[i]["start_time"]), datetime.fromisoformat(runs[i]["end_time"]))
                   for i in ids)
    assert spans[0][1] <= spans[1][0], "the two runs shared the checkout at the same time"

    # each run is a DVC experiment named after its flow run, its results in the experiment's commit
    from cnnpipe.mlops.dvcops import experiment_commit
    commits = [experiment_commit(repo, f"{runs[i]['name']}-{i[:8]}") for i in ids]
    epochs = [yaml.safe_load(sh(env, repo, "git", "show", f"{c}:params.yaml"))["train"]["epochs"] for c in commits]
    checkout = yaml.safe_load((repo / "params.yaml").read_text())["train"]["epochs"]
    assert epochs == [1, checkout] and checkout != 1
    info = sh(env, repo, "git", "show", f"{commits[1]}:metrics/eval.info.json")
    assert json.loads(info)["images"] == 100
