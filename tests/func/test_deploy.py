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
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from helpers import BIN, add_makefile, api, commit, make_repo, sh, write_mnist_mirror

pytestmark = pytest.mark.slow

def test_deploy_schedule_and_worker_run(prefect_server, tmp_path):
    env, procs = prefect_server
    md5 = write_mnist_mirror(tmp_path / "mirror")
    repo = make_repo(tmp_path, str(tmp_path / "mirror"), md5)
    root = Path(__file__).resolve().parents[2]
    add_makefile(repo)
    commit(repo, "with Makefile")
    url = env["PREFECT_API_URL"]

    # `make deploy`, as documented, with this interpreter's venv standing in as already set up
    stamp = tmp_path / "installed"
    stamp.touch()
    sh(env, repo, "make", "deploy", f"VENV={BIN.parent}", f"STAMP={stamp}")

    deployments = {d["name"]: d for d in api(url, "/deployments/filter", {})}
    assert sorted(deployments) == ["nightly", "trial"]  # the nightly run, and the sweeps' trials
    assert deployments["trial"]["work_pool_name"] == "cnnpipe-sweeps"
    deployment = deployments["nightly"]
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
