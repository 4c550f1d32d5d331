"""DVC operations the orchestrator needs: the stage order from dvc.yaml, param overrides applied as
`dvc exp run -S` applies them, and running one stage through DVC (which decides whether it is stale)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.params import SECTIONS, parse_section

RAN = re.compile(r"Running stage '([^']+)'")


def stage_order(repo: str | Path) -> list[str]:
    """Stage names in dependency order, ties broken by their order in dvc.yaml."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        graph = r.index.graph  # edges point from a stage to the stages it depends on
        position = {s.name: i for i, s in enumerate(r.index.stages)}
        order = nx.lexicographical_topological_sort(graph.reverse(copy=True), key=lambda s: position[s.name])
        return [s.name for s in order]


def parse_override(value: Any) -> Any:
    """Strings are read as YAML, as `dvc exp run -S key=value` reads them ("5" -> 5, "[a]" -> ["a"])."""
    return yaml.safe_load(value) if isinstance(value, str) else value


def apply_overrides(params_path: str | Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Validate every override against params.yaml and its typed sections, then write them in place,
    keeping the file's other values and comments. Nothing is written if any override is refused."""
    from ruamel.yaml import YAML

    path = Path(params_path)
    rt = YAML()  # round-trip: comments and key order survive
    doc = rt.load(path.read_text())
    plain = yaml.safe_load(path.read_text())
    updated = copy.deepcopy(plain)
    applied = {}
    for key, raw in overrides.items():
        parts = key.split(".")
        node = updated
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise CnnpipeError(
                    f"override {key}: params.yaml has no '{part}'; use an existing key such as train.epochs")
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise CnnpipeError(f"override {key}: params.yaml has no such key; use an existing key such as train.epochs")
        node[parts[-1]] = parse_override(raw)
        applied[key] = node[parts[-1]]
    for section in {k.split(".")[0] for k in overrides}:
        if section in SECTIONS:
            try:
                parse_section(section, updated[section], "override")
            except CnnpipeError as e:
                raise CnnpipeError(str(e).replace("fix the value", "fix the override")) from e
    for key, value in applied.items():
        *parents, leaf = key.split(".")
        node = doc
        for part in parents:
            node = node[part]
        node[leaf] = value
    with open(path, "w") as f:
        rt.dump(doc, f)
    return applied


def _holds_mapping(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value)
    return isinstance(value, list) and any(_holds_mapping(v) for v in value)


def set_param_args(overrides: dict[str, Any]) -> list[str]:
    """`-Skey=value` arguments of `dvc exp run`, values as JSON. DVC's override parser reads strings, numbers,
    lists and {} but refuses a non-empty mapping (JSON's quoted keys or not): refused here, with the way out."""
    for key, value in overrides.items():
        if _holds_mapping(parse_override(value)):
            raise CnnpipeError(f"override {key}: dvc exp run -S cannot set a mapping ({json.dumps(value)}); set "
                               f"{key} in params.yaml instead")
    return [f"-S{key}={json.dumps(value)}" for key, value in overrides.items()]


def check_overrides(params_path: str | Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """apply_overrides on a copy: the overrides as they would apply, params.yaml untouched. Refuses what
    `dvc exp run -S` cannot set."""
    import shutil
    import tempfile

    set_param_args(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        copy_path = Path(tmp) / "params.yaml"
        shutil.copy(params_path, copy_path)
        return apply_overrides(copy_path, overrides)


@dataclass(frozen=True)
class Experiment:
    name: str
    commit: str  # the experiment's commit (a ref under refs/exps): its dvc.lock, params and metrics
    ran: list[str]  # stages that ran; the others were unchanged or restored from DVC's run cache
    output: str


EXP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def run_experiment(repo: str | Path, name: str, overrides: dict[str, Any],
                   log: Callable[[str], None] = print, targets: Sequence[str] = ()) -> Experiment:
    """`dvc exp run --temp -n NAME -S key=value ... [targets]`: the pipeline (up to the target stages) in a
    temporary copy of the checkout, recorded as the experiment NAME (`dvc exp show` lists it); the checkout,
    params.yaml included, is left as it was."""
    if not EXP_NAME.fullmatch(name):
        raise CnnpipeError(f"experiment name {name!r} is not valid; use letters, digits, '.', '_' or '-'")
    sets = set_param_args(overrides)
    baseline = head_commit(repo)  # DVC records the experiment under the commit it ran from
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name, *sets, *targets],
                            cwd=repo, env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # one merged stream, read as it comes: no pipe can fill up
        line = line.rstrip()
        lines.append(line)
        if line:
            log(line)
    code = proc.wait()
    output = "\n".join(lines)
    ran = RAN.findall(output)
    if code != 0:
        own = [ln for ln in lines if re.match(r"cnnpipe [\w-]+: error: ", ln)]
        dvc_errors = [ln for ln in lines if ln.startswith("ERROR")]
        where = f"stage '{ran[-1]}' failed" if ran else "dvc exp run failed"
        raise CnnpipeError(f"{where} (exit {code}): {(own or dvc_errors or lines or ['no output'])[-1]}")
    return Experiment(name, experiment_commit(repo, name, baseline), ran, output)


def head_commit(repo: str | Path) -> str:
    return checked(repo, "git", "rev-parse", "HEAD")


def experiment_refs(repo: str | Path, name: str) -> dict[str, str]:
    """The experiments named `name`: baseline commit -> experiment commit (DVC's refs/exps/ab/cdef.../name)."""
    refs = checked(repo, "git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").splitlines()
    found = {}
    for line in refs:
        commit, ref = line.split()
        parts = ref.split("/")
        if len(parts) == 5 and parts[4] == name:
            found[parts[2] + parts[3]] = commit
    return found


def experiment_commit(repo: str | Path, name: str, baseline: str | None = None) -> str:
    """The commit of the experiment `name` run from `baseline`; without one, the experiment run from HEAD, else
    the only experiment of that name. Names repeat across baselines: two or more elsewhere is an error."""
    found = experiment_refs(repo, name)
    if baseline is not None:
        if baseline not in found:
            raise CnnpipeError(f"dvc exp run finished but no experiment {name!r} is recorded on {baseline[:10]}")
        return found[baseline]
    if not found:
        raise CnnpipeError(f"no experiment {name!r} is recorded; see `dvc exp show --all-commits`")
    head = head_commit(repo)
    if head in found:
        return found[head]
    if len(found) == 1:
        return next(iter(found.values()))
    listed = ", ".join(f"{commit[:10]} (run from {base[:10]})" for base, commit in sorted(found.items()))
    raise CnnpipeError(f"experiment {name!r} is on several commits: {listed}; pass one of these commits instead")


def metrics_at(repo: str | Path, rev: str) -> list[dict[str, Any]]:
    """The metrics files of a revision (those dvc.yaml declares) as rows of (file, metric, value)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout

    stages = (yaml.safe_load(git("show", f"{rev}:dvc.yaml")) or {}).get("stages", {})
    files = sorted({next(iter(m)) if isinstance(m, dict) else m for stage in stages.values()
                    for m in stage.get("metrics", [])})
    rows = []
    for file in files:
        try:
            data = json.loads(git("show", f"{rev}:{file}"))
        except subprocess.CalledProcessError:  # a stage that has not run in that revision
            continue
        for metric, value in _flatten(data).items():
            rows.append({"file": file, "metric": metric, "value": value})
    return rows


def dvc_env() -> dict[str, str]:
    """Stage commands (`cnnpipe ...`) resolve through PATH: this interpreter's bin first."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def checked(cwd: str | Path, *args: str) -> str:
    """Run a command (with DVC's environment) in `cwd`; its stdout, or a one-line CnnpipeError."""
    proc = subprocess.run(list(args), cwd=cwd, env=dvc_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise CnnpipeError(f"{' '.join(args[:4])} failed in {cwd}: {error_line(proc.stderr)}")
    return proc.stdout.strip()


def error_line(stderr: str) -> str:
    """The line of a failed command's stderr that says what went wrong: DVC's last ERROR line (DVC ends with a
    support footer; `-q` drops the ERROR line itself) or git's last fatal/error line (git may follow it with
    usage), else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("ERROR", "fatal:", "error:"))]
    others = [line for line in lines if not line.startswith("Having any troubles?")]
    return (errors or others or ["no output"])[-1]


def dvc_checked(cwd: str | Path, *args: str) -> str:
    return checked(cwd, sys.executable, "-m", "dvc", *args)


def dvc_json(repo: str | Path, *args: str) -> Any:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args, "--json"], cwd=repo, env=dvc_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise CnnpipeError(f"dvc {' '.join(args)} failed: {error_line(proc.stderr)}")
    return json.loads(proc.stdout or "{}")


def metrics_table(repo: str | Path) -> list[dict[str, Any]]:
    """`dvc metrics show` of the workspace as rows of (file, metric, value); nested keys join with dots."""
    shown = dvc_json(repo, "metrics", "show")  # {"": {"data": {file: {"data": {...}}}}}
    files = shown.get("", {}).get("data", {})
    rows = []
    for file, entry in sorted(files.items()):
        for metric, value in _flatten(entry.get("data", {})).items():
            rows.append({"file": file, "metric": metric, "value": value})
    return rows


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, int | float | str | bool) or value is None else json.dumps(value)
    return out


def metrics_diff_markdown(repo: str | Path, baseline: str = "HEAD", target: str | None = None) -> str:
    """`dvc metrics diff` of the workspace (or `target`, a revision) against `baseline`, as Markdown."""
    revs = [baseline, target] if target else [baseline]
    proc = subprocess.run([sys.executable, "-m", "dvc", "metrics", "diff", *revs, "--md"], cwd=repo,
                          env=dvc_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        return f"No comparison with {baseline}: {proc.stderr.strip()[-300:]}"
    return f"## Metrics against {baseline}\n\n" + (proc.stdout.strip() or "No changes.")


PICTURES = ("train_history.png", "confusion.png", "per_class.png", "mistakes.png")
PLOT_PAGES_KEPT = 30  # runs whose dvc_plots/<run>/ page is kept; older ones are removed


def prune_plot_pages(folder: Path, keep: int) -> list[Path]:
    """Remove all but the `keep` newest run folders of `folder` (dvc_plots/); returns the removed ones."""
    pages = sorted((d for d in folder.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    for old in pages[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return pages[keep:]


def plots_markdown(repo: str | Path, baseline: str, target: str, name: str) -> str:
    """`dvc plots diff baseline target` written to dvc_plots/<name>/ in the repo (an ignored folder; the page
    works offline), as Markdown linking the page and each picture of both revisions."""
    out = Path(repo).resolve() / "dvc_plots" / name
    proc = subprocess.run([sys.executable, "-m", "dvc", "plots", "diff", baseline, target, "-o", str(out)],
                          cwd=repo, env=dvc_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        return f"No plots against {baseline}: {proc.stderr.strip()[-300:]}"
    prune_plot_pages(out.parent, keep=PLOT_PAGES_KEPT)

    def cell(rev: str, picture: str) -> str:  # DVC names the copies <rev, "/" as "_">_plots_<picture>
        f = out / "static" / f"{rev.replace('/', '_')}_plots_{picture}"
        return f"[{rev[:10]}]({f.as_uri()})" if f.is_file() else "—"

    rows = [f"| {picture} | {cell(baseline, picture)} | {cell(target, picture)} |" for picture in PICTURES]
    return "\n".join([f"## Plots: {baseline[:10]} against {target[:10]}", "",
                      f"All charts and pictures side by side: [{out / 'index.html'}]({(out / 'index.html').as_uri()})",
                      "", f"| picture | {baseline[:10]} | {target[:10]} |", "|---|---|---|", *rows])
