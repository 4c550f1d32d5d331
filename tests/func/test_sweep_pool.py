"""A sweep spread over machines, on loopback: a real Prefect server, `make deploy`, two process workers in two
separate clones of a bare git remote with a local DVC remote, a journal-file study both reach. Trials are
flow runs the workers take; each runs in its worker's clone and pushes its experiment to both remotes."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from helpers import BIN, add_makefile, api, commit, dvc, make_repo, run, sh, write_mnist_mirror

pytestmark = pytest.mark.slow


def test_sweep_trials_run_on_two_workers_in_their_own_clones(prefect_server, tmp_path):
    env, procs = prefect_server
    md5 = write_mnist_mirror(tmp_path / "mirror")
    repo = make_repo(tmp_path, str(tmp_path / "mirror"), md5)
    add_makefile(repo)
    spec = {"sampler": "random", "seed": 4, "trials": 2, "parallel": 2,
            "space": {"train.lr": {"low": 0.001, "high": 0.03, "log": True}, "train.epochs": [2]}}
    (repo / "sweeps").mkdir()
    (repo / "sweeps/pool.yaml").write_text(yaml.safe_dump(spec))
    remote, store = tmp_path / "remote.git", tmp_path / "dvc-store"
    run(tmp_path, "git", "init", "-q", "--bare", str(remote))
    run(repo, "git", "remote", "add", "origin", str(remote))
    dvc(repo, "remote", "add", "-d", "store", str(store))
    dvc(repo, "repro", "split")  # the data the trials train on
    commit(repo, "baseline")
    run(repo, "git", "push", "-q", "origin", "HEAD")

    stamp = tmp_path / "installed"  # this interpreter's venv stands in for `make setup`
    stamp.touch()
    sh(env, repo, "make", "deploy", f"VENV={BIN.parent}", f"STAMP={stamp}")
    clones = []
    for i in (1, 2):  # two hosts' clones, each with its worker, one trial at a time
        clone = tmp_path / f"host{i}" / "cnnpipe"
        run(tmp_path, "git", "clone", "-q", str(remote), str(clone))
        stamp.touch()  # newer than the clone's files: make takes the venv as set up and installs nothing
        log = open(tmp_path / f"worker{i}.log", "w")
        procs.append(subprocess.Popen(  # as documented: `make sweep-worker` in the host's clone
            ["make", "sweep-worker", f"VENV={BIN.parent}", f"STAMP={stamp}"], cwd=clone,
            env=dict(env, PREFECT_WORKER_QUERY_SECONDS="1"), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True))
        clones.append(clone)

    deadline = time.monotonic() + 120  # both workers polling before any trial is submitted
    while len([w for w in api(env["PREFECT_API_URL"], "/work_pools/cnnpipe-sweeps/workers/filter", {})
               if w.get("status") == "ONLINE"]) < 2:
        assert time.monotonic() < deadline, "".join((tmp_path / f"worker{i}.log").read_text() for i in (1, 2))
        time.sleep(0.5)

    journal = tmp_path / "shared" / "pool.journal"  # a shared disk, here a folder both clones reach
    proc = subprocess.run([sys.executable, "pipeline/sweeps.py", "sweeps/pool.yaml", "--storage", str(journal)],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=500)
    logs = "".join((tmp_path / f"worker{i}.log").read_text()[-1500:] for i in (1, 2))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    assert "2 trials: 2 complete, 0 pruned, 0 failed" in proc.stdout + proc.stderr  # Prefect logs to stderr

    study = optuna.load_study(study_name="pool", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    assert {t.user_attrs["worker"].split(":", 1)[1] for t in trials} == {str(c) for c in clones}  # both hosts

    names = [t.user_attrs["dvc_exp"] for t in trials]
    refs = run(tmp_path, "git", "ls-remote", str(remote), "refs/exps/*")
    assert sorted(r.rsplit("/", 1)[1] for r in refs.split()[1::2]) == sorted(names)  # pushed to git
    for t, line in zip(trials, sorted(refs.splitlines(), key=lambda r: names.index(r.rsplit("/", 1)[1])),
                       strict=True):
        commit_sha = line.split()[0]
        run(repo, "git", "fetch", "-q", "origin", line.split()[1])
        params = yaml.safe_load(run(repo, "git", "show", f"{commit_sha}:params.yaml"))
        assert params["train"]["lr"] == pytest.approx(t.params["train.lr"])
        lock = yaml.safe_load(run(repo, "git", "show", f"{commit_sha}:dvc.lock"))
        model = next(o for o in lock["stages"]["train"]["outs"] if o["path"] == "models/model.pt")
        assert (store / "files/md5" / model["md5"][:2] / model["md5"][2:]).is_file()  # and its model to DVC's
        metrics = json.loads(run(repo, "git", "show", f"{commit_sha}:metrics/train.json"))
        assert metrics["val_acc"] == pytest.approx(t.value)
    assert (repo / "sweeps/pool/trials.csv").is_file()

    # the same sweep from a newer commit is refused before the workers' shared ref moves to it
    pinned = run(tmp_path, "git", "ls-remote", str(remote), "refs/cnnpipe/sweeps/pool").split()[0]
    (repo / "NOTES").write_text("a later commit\n")
    commit(repo, "later")
    again = subprocess.run([sys.executable, "pipeline/sweeps.py", "sweeps/pool.yaml", "--storage", str(journal)],
                           cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and f"sweep pool started on commit {pinned[:12]}" in again.stdout + again.stderr
    assert run(tmp_path, "git", "ls-remote", str(remote), "refs/cnnpipe/sweeps/pool").split()[0] == pinned
