"""The loop's second half, all real: a run in a git + DVC repo, `cnnpipe promote` (the gate, GTO tags),
`dvc artifacts get` and `cnnpipe registry`, and `cnnpipe serve --registry` swapping to each new production
version while a client keeps sending requests."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from helpers import commit, dvc, run, set_params
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from cnnpipe.bench.launch import free_port, start_server

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "cnnpipe")


def cnnpipe(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "-q", *args], cwd=repo, capture_output=True, text=True, timeout=300)


def set_rules(repo: Path, *rules: str) -> None:
    set_params(repo, promote={"rules": list(rules)})


def tags(repo: Path) -> list[str]:
    return sorted(run(repo, "git", "tag").split())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(reproduced, tmp_path_factory) -> Path:
    """A project repo after one real `dvc repro` (tiny MNIST-format data, lenet, 2 epochs), committed with its
    promotion rules (no stage reads them: the pipeline stays up to date)."""
    repo = reproduced(tmp_path_factory.mktemp("registry"))
    set_rules(repo, "eval.acc >= 0.05", "eval.acc >= prod - 1", "quantize.drop <= 1")
    assert "up to date" in dvc(repo, "status")
    commit(repo, "first run")
    return repo


def serve(repo: Path, *extra: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = start_server([CLI, "serve", "--registry", "image-classifier#prod", "--repo", str(repo), "--port", str(port),
                         "--threads", "1", *extra], port, env=env)
    return proc, proc.url


def reloads(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {s.labels["result"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "cnnpipe_model_reloads_total"}


class Load(threading.Thread):
    """A client sending one PNG after another until stopped; every status and latency is kept."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        buf = io.BytesIO()
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(buf, format="PNG")
        self.body, self.url = buf.getvalue(), url
        self.statuses: list[int] = []
        self.versions: set[str] = set()
        self.stopped = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stopped.is_set():
                try:
                    r = client.post(self.url + "/predict?k=1", content=self.body,
                                    headers={"content-type": "image/png"})
                    self.statuses.append(r.status_code)
                except httpx.HTTPError:
                    self.statuses.append(0)


def wait_for_version(url: str, version: str, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        meta = httpx.get(url + "/metadata").json()
        if meta["version"] == version:
            return meta
        time.sleep(0.2)
    raise AssertionError(f"server still on {meta['version']}, not {version}")


def test_promote_fetch_and_a_server_that_follows_production(repo, tmp_path):
    # a rule naming a metric the run does not have: one line, nothing promoted
    set_rules(repo, "eval.accuracy >= 0.5")
    bad = cnnpipe(repo, "promote", "--dry-run")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "eval.accuracy" in bad.stderr and "eval.acc" in bad.stderr  # names the bad one and the choices
    # no rule at all would be an open gate: refused in one line that says how to write one
    set_rules(repo)
    empty = cnnpipe(repo, "promote", "--dry-run")
    assert empty.returncode == 1 and empty.stderr.strip() == (
        "cnnpipe promote: error: promote.rules is empty, so the gate would pass any run; list at least one rule "
        "such as 'eval.acc >= 0.9' (or 'eval.acc >= 0' to promote every run)"), empty.stderr
    # a floor the run does not reach: refused, and says which rule
    set_rules(repo, "eval.acc >= 1.5")
    refused = cnnpipe(repo, "promote")
    assert refused.returncode == 3 and "refused" in refused.stdout and "FAIL  eval.acc >= 1.5" in refused.stdout
    assert tags(repo) == []

    # the first run: nothing in production, so rules against prod are skipped; the floor holds
    set_rules(repo, "eval.acc >= 0.05", "eval.acc >= prod - 1", "quantize.drop <= 1")
    first = cnnpipe(repo, "promote", "--run-name", "first")
    assert first.returncode == 0, first.stderr
    assert "promoted as v1.0.0" in first.stdout and "skip  eval.acc >= prod - 1" in first.stdout
    assert tags(repo) == ["image-classifier#prod#1", "image-classifier-int8#prod#1", "image-classifier-int8@v1.0.0",
                          "image-classifier@v1.0.0"]
    listing = cnnpipe(repo, "registry")
    assert "image-classifier        v1.0.0" in listing.stdout and "prod" in listing.stdout
    registered = run(repo, "git", "rev-parse", "image-classifier@v1.0.0^{commit}").strip()  # not the tag object
    line = next(line for line in listing.stdout.splitlines() if line.startswith("image-classifier "))
    assert registered[:10] in line.split(), line
    # DVC's own command fetches the production model the tags point at
    dvc(repo, "artifacts", "get", ".", "image-classifier", "--stage", "prod", "-o", str(tmp_path / "prod.onnx"))
    assert sha256(tmp_path / "prod.onnx") == sha256(repo / "models/model.onnx")
    v1_sha = sha256(repo / "models/model.onnx")

    tmp = tmp_path / "server-tmp"  # where the server keeps the versions it fetched
    tmp.mkdir()
    # the admin token as a file or a Kubernetes secret gives it, with a newline
    proc, url = serve(repo, "--poll", "0.5", env={**os.environ, "TMPDIR": str(tmp), "CNNPIPE_ADMIN_TOKEN": "s3cret\n"})
    try:
        assert httpx.get(url + "/metadata").json()["version"] == "v1.0.0"
        for authorization, status in (("", 401), ("Bearer wrong", 401), ("Basic s3cret", 401),
                                      ("bearer s3cret", 200), ("Bearer s3cret", 200)):
            r = httpx.post(url + "/admin/reload", headers={"authorization": authorization} if authorization else {})
            assert r.status_code == status, (authorization, r.text)
            if status == 401:
                assert "Authorization: Bearer <token>" in r.json()["error"]
            else:
                assert r.json() == {"status": "unchanged", "version": "v1.0.0"}
        assert cached(tmp) == ["image-classifier-v1.0.0.onnx"]
        load = Load(url)
        load.start()
        time.sleep(1)
        # a second run (3 epochs) that passes the gate: the server swaps to it under load
        set_params(repo, train={"epochs": 3})
        dvc(repo, "repro")
        second = cnnpipe(repo, "promote", "--run-name", "second")
        assert second.returncode == 0 and "promoted as v1.1.0" in second.stdout, second.stdout + second.stderr
        meta = wait_for_version(url, "v1.1.0")
        time.sleep(1)
        load.stopped.set()
        load.join(30)
        assert meta["sha256"] == sha256(repo / "models/model.onnx") != v1_sha
        assert len(load.statuses) > 20 and set(load.statuses) == {200}, sorted(set(load.statuses))
        assert reloads(url) == {"ok": 1.0}
        assert cached(tmp) == ["image-classifier-v1.1.0.onnx"]  # the file of a retired version goes

        # the same model again is not a new version (a run refused by the gate: test_flows.py)
        again = cnnpipe(repo, "promote")
        assert again.returncode == 0 and again.stdout.startswith("unchanged: the run's model is production's (v1.1.0)")
        assert "image-classifier@v1.2.0" not in tags(repo)

        # a promoted model that cannot load: the server keeps v1.1.0 and says why
        (repo / "models/model.onnx").write_bytes(b"not an onnx model")
        dvc(repo, "commit", "-f", "export")
        commit(repo, "a corrupt model")
        from cnnpipe.mlops.registry import register_and_assign
        assert register_and_assign(repo, "prod", "corrupt") == "v1.2.0"
        deadline = time.monotonic() + 60
        while reloads(url).get("failed", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        ready = httpx.get(url + "/readyz")
        detail = ready.json()["detail"]
        assert ready.status_code == 200 and httpx.get(url + "/metadata").json()["version"] == "v1.1.0"
        assert "still serving v1.1.0" in detail and "not a loadable ONNX model" in detail
        still = httpx.post(url + "/predict", content=load.body, headers={"content-type": "image/png"})
        assert still.status_code == 200
        assert reloads(url) == {"ok": 1.0, "failed": 1.0}
        assert cached(tmp) == ["image-classifier-v1.1.0.onnx"]  # and so does one that did not load
        retried = httpx.post(url + "/admin/reload", headers={"authorization": "Bearer s3cret"})
        assert retried.status_code == 502, retried.text  # tried again at once, and still failing
        assert retried.json()["status"] == "failed" and "not a loadable ONNX model" in retried.json()["detail"]
        assert reloads(url) == {"ok": 1.0, "failed": 2.0}
    finally:
        proc.terminate()
        proc.wait(30)


def cached(tmp: Path) -> list[str]:
    """The model files in a server's cache of fetched versions."""
    return sorted(f.name for f in tmp.glob("cnnpipe-models-*/*"))


def test_bad_registry_references_are_one_line_errors(repo):
    for ref, message in (("nonexistent#prod", "no artifact 'nonexistent'"),
                         ("image-classifier#staging", "no version of image-classifier is in stage staging"),
                         ("Image Classifier", "is not valid")):
        proc = subprocess.run([CLI, "serve", "--registry", ref, "--repo", str(repo), "--port", str(free_port())],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


def test_promote_refuses_stale_outputs(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    set_params(repo, train={"epochs": params["train"]["epochs"] + 5})
    try:
        proc = cnnpipe(repo, "promote", "--dry-run")
        assert proc.returncode == 1 and "stale" in proc.stderr and "dvc repro" in proc.stderr
    finally:
        set_params(repo, train={"epochs": params["train"]["epochs"]})


def test_promote_refuses_uncommitted_changes_beside_the_results(repo):
    """A version tag must point at the code that made the run: other uncommitted changes refuse promotion."""
    ignore = repo / ".dvcignore"
    before = ignore.read_text()
    ignore.write_text(before + "\n# an uncommitted edit\n")
    try:
        proc = cnnpipe(repo, "promote", "--dry-run")
        assert proc.returncode == 1 and "uncommitted changes to .dvcignore" in proc.stderr, proc.stderr
    finally:
        ignore.write_text(before)


# --- the gate's edge cases, on a one-stage project that writes its models and metrics from params.yaml ---

MAKE = """import json, pathlib, yaml
p = yaml.safe_load(open("params.yaml"))["make"]
pathlib.Path("models").mkdir(exist_ok=True)
pathlib.Path("metrics").mkdir(exist_ok=True)
pathlib.Path("models/model.onnx").write_text(p["fp32"])
pathlib.Path("models/model.int8.onnx").write_text(p["int8"])
pathlib.Path("metrics/eval.json").write_text(json.dumps(p["metrics"]))
"""


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A git + DVC project whose one stage writes both registered models and metrics/eval.json from params.yaml's
    `make` section (fast: nothing is trained)."""
    repo = tmp_path / "tiny"
    repo.mkdir()
    (repo / "make.py").write_text(MAKE)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({
        "stages": {"make": {"cmd": f"{sys.executable} make.py", "deps": ["make.py"], "params": ["make"],
                            "outs": ["models/model.onnx", "models/model.int8.onnx"],
                            "metrics": [{"metrics/eval.json": {"cache": False}}]}},
        "artifacts": {"image-classifier": {"path": "models/model.onnx", "type": "model"},
                      "image-classifier-int8": {"path": "models/model.int8.onnx", "type": "model"}}}))
    (repo / "params.yaml").write_text(yaml.safe_dump({"make": {"fp32": "a", "int8": "b", "metrics": {"acc": 0.9}},
                                                      "promote": {"stage": "prod", "rules": ["eval.acc >= 0.5"]}}))
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.email", "ci@example.com")
    run(repo, "git", "config", "user.name", "CI")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.autostage", "true")
    commit(repo, "project")
    return repo


def made(repo: Path, message: str, **values) -> None:
    """Set `make` (and `promote`) values, reproduce and commit the run."""
    set_params(repo, **values)
    dvc(repo, "repro")
    commit(repo, message)


def head(repo: Path) -> str:
    return run(repo, "git", "rev-parse", "HEAD").strip()


def test_a_rollback_puts_the_older_version_back_in_prod(tiny):
    """Assigning an older version to prod again (a rollback, with GTO's own command) makes it production's for
    the registry, the gate, a following server and DVC alike: the latest assignment counts, not the highest
    version ever assigned."""
    from cnnpipe.mlops import registry

    made(tiny, "first")
    assert cnnpipe(tiny, "promote").stdout.startswith("promoted as v1.0.0")
    made(tiny, "second", make={"fp32": "q", "metrics": {"acc": 0.95}})
    assert cnnpipe(tiny, "promote").stdout.startswith("promoted as v1.1.0")
    gto = str(Path(sys.executable).parent / "gto")
    run(tiny, gto, "assign", "image-classifier", "--version", "v1.0.0", "--stage", "prod", "--force")
    assert registry.in_stage(tiny, "image-classifier", "prod").version == "v1.0.0"
    assert registry.in_stage(tiny, "image-classifier-int8", "prod").version == "v1.1.0"  # not rolled back
    listing = {r["version"]: r["stages"] for r in registry.table(tiny) if r["artifact"] == "image-classifier"}
    assert listing == {"v1.1.0": "", "v1.0.0": "prod"}
    dvc(tiny, "artifacts", "get", ".", "image-classifier", "--stage", "prod", "-o", str(tiny / "prod.onnx"))
    assert (tiny / "prod.onnx").read_text() == "a"  # the first run's model, as DVC resolves the stage too
    run(tiny, gto, "deprecate", "image-classifier", "v1.0.0", "prod")  # unassigned: no version in prod
    assert registry.in_stage(tiny, "image-classifier", "prod") is None


def test_promote_registers_a_run_where_only_the_int8_model_changed(tiny):
    made(tiny, "first")
    assert cnnpipe(tiny, "promote").stdout.startswith("promoted as v1.0.0")
    made(tiny, "int8 only", make={"int8": "c"})
    second = cnnpipe(tiny, "promote")
    assert second.returncode == 0 and second.stdout.startswith("promoted as v1.1.0"), second.stdout + second.stderr
    again = cnnpipe(tiny, "promote")
    assert again.returncode == 0 and again.stdout.startswith("unchanged: the run's model is production's (v1.1.0)")


def test_a_rule_against_production_fails_when_production_lacks_the_metric(tiny):
    made(tiny, "first")
    assert cnnpipe(tiny, "promote").stdout.startswith("promoted as v1.0.0")
    made(tiny, "a new metric", make={"fp32": "z", "metrics": {"acc": 0.9, "f1": 0.8}},
         promote={"rules": ["eval.acc >= prod - 0.002", "eval.f1 >= prod - 0.002"]})
    proc = cnnpipe(tiny, "promote")
    assert proc.returncode == 3 and proc.stdout.startswith("refused"), proc.stdout + proc.stderr
    assert "pass  eval.acc >= prod - 0.002" in proc.stdout
    assert "FAIL  eval.f1 >= prod - 0.002: production has no eval.f1" in proc.stdout
    assert "image-classifier@v1.1.0" not in tags(tiny)


def test_a_failed_push_says_what_dvc_said_and_that_the_version_is_registered(tiny, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    dvc(tiny, "remote", "add", "-d", "store", str(tmp_path / "a-file" / "store"))
    made(tiny, "first")
    proc = cnnpipe(tiny, "promote")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("cnnpipe promote: error: registered v1.0.0 in prod, but dvc push failed (ERROR")
    assert "Not a directory" in lines[0] and "run `dvc push --all-tags`" in lines[0]
    assert "image-classifier#prod#1" in tags(tiny)


def empty_commit_until(repo: Path, wanted, tries: int = 64) -> bool:
    """Empty commits on HEAD until HEAD's hash is `wanted`; False if none of `tries` was."""
    for i in range(tries):
        if wanted(head(repo)):
            return True
        run(repo, "git", "commit", "-q", "--allow-empty", "-m", f"next {i}")
    return wanted(head(repo))


def test_an_experiment_name_means_the_run_from_head_and_an_ambiguous_one_is_refused(tiny):
    from cnnpipe.mlops.dvcops import run_experiment
    from cnnpipe.mlops.promote import resolve_rev

    # two baselines, the second's hash sorting before the first's, as refs/exps/<ab>/<cdef...> sort: a first
    # baseline in the upper half of the hashes makes each empty commit after it a fair coin for the second
    assert empty_commit_until(tiny, lambda sha: sha >= "8")
    older = run_experiment(tiny, "x", {}, log=lambda line: None)
    base = head(tiny)
    assert empty_commit_until(tiny, lambda sha: sha < base)
    newer = run_experiment(tiny, "x", {"make.fp32": "q"}, log=lambda line: None)
    assert newer.commit != older.commit
    assert run(tiny, "git", "rev-parse", f"{newer.commit}^").strip() == head(tiny)
    assert resolve_rev(tiny, "x") == newer.commit

    run(tiny, "git", "commit", "-q", "--allow-empty", "-m", "neither")  # HEAD has no run named x
    proc = cnnpipe(tiny, "promote", "--rev", "x", "--dry-run")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert older.commit[:10] in lines[0] and newer.commit[:10] in lines[0]
    assert "pass one of these commits instead" in lines[0]
    assert cnnpipe(tiny, "promote", "--rev", newer.commit[:10], "--dry-run").returncode == 0
    unknown = cnnpipe(tiny, "promote", "--rev", "nosuch", "--dry-run")
    assert unknown.returncode == 1 and unknown.stderr.strip().splitlines() == [
        "cnnpipe promote: error: --rev nosuch: not a commit, and no experiment 'nosuch' is recorded; see "
        "`dvc exp show --all-commits`"], unknown.stderr


def test_promote_rev_refuses_a_run_that_is_not_its_commits_outputs(tiny):
    """A sweep's trial runs the pipeline only up to train: its commit holds a new model beside the later stages'
    results for the old one. A commit that changed params or code without `dvc repro` holds results of the
    commit before. Promoting either would register metrics that are not the model's."""
    from cnnpipe.mlops.dvcops import run_experiment

    stages = yaml.safe_load((tiny / "dvc.yaml").read_text())
    stages["stages"]["score"] = {"cmd": f"{sys.executable} -c \"import shutil; shutil.copy('models/model.onnx', "
                                        "'metrics/scored.txt')\"",
                                 "deps": ["models/model.onnx"], "outs": [{"metrics/scored.txt": {"cache": False}}]}
    (tiny / "dvc.yaml").write_text(yaml.safe_dump(stages))
    made(tiny, "first")

    def refused(rev: str, why: str) -> None:
        proc = cnnpipe(tiny, "promote", "--rev", rev)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert f"--rev {rev[:10]}: its results are not its commit's: {why}; reproduce" in lines[0], lines[0]
        assert tags(tiny) == []

    half = run_experiment(tiny, "half", {"make.fp32": "q"}, targets=("make",), log=lambda line: None)
    refused(half.commit, "score last ran on another models/model.onnx than make made")
    set_params(tiny, make={"fp32": "r"})
    commit(tiny, "params, not reproduced")
    refused(head(tiny), "params.yaml's make changed after make ran")
    made(tiny, "reproduced")
    (tiny / "make.py").write_text(MAKE + "# a change\n")
    commit(tiny, "code, not reproduced")
    refused(head(tiny), "make.py changed after make ran")

    run_experiment(tiny, "whole", {"make.fp32": "q"}, log=lambda line: None)
    whole = cnnpipe(tiny, "promote", "--rev", "whole")
    assert whole.returncode == 0 and whole.stdout.startswith("promoted as v1.0.0"), whole.stdout + whole.stderr


def test_promotions_take_turns_and_the_later_one_is_gated_against_the_earlier(tiny):
    """A promotion started while another is registering waits for it, then reads production afresh: here it
    finds its own model there and registers nothing (run side by side, both would have read an empty
    production and registered the same model twice, or one would have failed on git's tag lock)."""
    from cnnpipe.mlops.promote import one_at_a_time
    from cnnpipe.mlops.registry import register_and_assign

    made(tiny, "first")
    with one_at_a_time(tiny):
        proc = subprocess.Popen([CLI, "-q", "promote"], cwd=tiny, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        said = ""
        while "another promotion is running" not in said and (line := proc.stderr.readline()):
            said += line
        assert "waiting for it to finish" in said, said
        assert register_and_assign(tiny, "prod", "the other promotion") == "v1.0.0"
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.startswith("unchanged: the run's model is production's (v1.0.0)"), out + err
    assert "image-classifier@v1.1.0" not in tags(tiny)
