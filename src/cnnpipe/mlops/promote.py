"""`cnnpipe promote`: the gate between a run and production.

The run's test metrics (metrics/<stage>.json in the checkout, which must be up to date with dvc.lock) are
checked against the rules of params.yaml's `promote` section; rules may compare with the model now in the
production stage (its commit's metrics). Passed: the run's results are committed, the next version of both
models is registered and assigned to the stage (Git tags in GTO's format, see registry.py), and the DVC cache
is pushed when a remote is configured. Refused: nothing changes, and the decision says which rule failed.
Promotions of one repository take turns, each gated against what the one before it put in production.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.params import PromoteParams
from cnnpipe.mlops import registry
from cnnpipe.mlops.dvcops import error_line, experiment_commit

log = logging.getLogger(__name__)

RULE = re.compile(r"\s*(?P<metric>[a-z_]+\.[a-z_0-9]+)\s*(?P<op>>=|<=)\s*"
                  r"(?:(?P<prod>prod)\s*(?:(?P<sign>[+-])\s*(?P<margin>\d+(?:\.\d*)?(?:e-?\d+)?))?"
                  r"|(?P<value>-?\d+(?:\.\d*)?(?:e-?\d+)?))\s*")
RESULTS = ("dvc.lock", "params.yaml", "metrics", "plots")  # what a run changes, committed on promotion


@dataclass(frozen=True)
class Rule:
    text: str
    metric: str  # stage.key, as in metrics/<stage>.json
    op: str  # >= or <=
    value: float | None  # a fixed bound, or None: production's value plus `margin`
    margin: float = 0.0

    def bound(self, production: dict[str, float]) -> float:
        return self.value if self.value is not None else production[self.metric] + self.margin


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    version: str | None = None  # the version registered when promoted
    production: str | None = None  # the version in production before
    unchanged: bool = False  # the run's model is the production model: nothing to promote

    def summary(self) -> str:
        if self.unchanged:
            head = f"unchanged: the run's model is production's ({self.production})"
        else:
            head = f"promoted as {self.version}" if self.version else ("passes" if self.promote else "refused")
        return "\n".join([head, *(f"  {r}" for r in self.reasons)])


def parse_rules(texts: list[str], metrics: dict[str, float]) -> list[Rule]:
    """Rules from params.yaml; a rule that cannot be read or names a metric the run does not have is an error."""
    if not texts:
        raise CnnpipeError("promote.rules is empty, so the gate would pass any run; list at least one rule such as "
                           "'eval.acc >= 0.9' (or 'eval.acc >= 0' to promote every run)")
    rules = []
    for text in texts:
        m = RULE.fullmatch(text)
        if not m:
            raise CnnpipeError(f"promote.rules: {text!r} is not a rule; write 'eval.acc >= 0.9' or "
                               "'eval.acc >= prod - 0.002' (a metric, >= or <=, a number or prod ± a number)")
        if m["metric"] not in metrics:
            raise CnnpipeError(f"promote.rules: {text!r} names the metric {m['metric']!r}, which the run does not "
                               f"have; use one of {', '.join(sorted(metrics))}")
        value = float(m["value"]) if m["value"] is not None else None
        margin = float(m["margin"] or 0) * (-1 if m["sign"] == "-" else 1)
        rules.append(Rule(text.strip(), m["metric"], m["op"], value, margin))
    return rules


def read_metrics(files: dict[str, str]) -> dict[str, float]:
    """{stage: JSON text of metrics/<stage>.json} -> {"stage.key": number}."""
    out = {}
    for stage, text in files.items():
        for key, value in json.loads(text).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"{stage}.{key}"] = float(value)
    return out


def checkout_metrics(repo: Path) -> dict[str, float]:
    return read_metrics({p.name.removesuffix(".json"): p.read_text() for p in sorted((repo / "metrics").glob("*.json"))
                         if not p.name.endswith(".info.json")})


def commit_metrics(repo: Path, commit: str) -> dict[str, float]:
    names = registry.git(repo, "ls-tree", "--name-only", commit, "metrics/").splitlines()
    return read_metrics({Path(n).name.removesuffix(".json"): registry.git(repo, "show", f"{commit}:{n}")
                         for n in names if n.endswith(".json") and not n.endswith(".info.json")})


def decide(rules: list[Rule], run: dict[str, float], production: dict[str, float] | None) -> Decision:
    """Every rule must hold. Rules against production are skipped when nothing is in production yet, and fail
    when the production version has no value of their metric."""
    decision = Decision(promote=True)
    for rule in rules:
        if rule.value is None and production is None:
            decision.reasons.append(f"skip  {rule.text}: nothing in production yet")
            continue
        if rule.value is None and rule.metric not in production:
            decision.promote = False
            decision.reasons.append(f"FAIL  {rule.text}: production has no {rule.metric} to compare with; "
                                    "use a fixed bound until a version with it is in production")
            continue
        bound = rule.bound(production or {})
        value = run[rule.metric]
        ok = value >= bound if rule.op == ">=" else value <= bound
        decision.promote &= ok
        decision.reasons.append(f"{'pass' if ok else 'FAIL'}  {rule.text}: {rule.metric} = {value:.6g}, "
                                f"bound {bound:.6g}")
    return decision


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)


def check_up_to_date(repo: Path) -> None:
    """The metrics must be the outputs of the checkout's code and params (dvc status clean)."""
    proc = dvc(repo, "status", "--json")
    if proc.returncode != 0:
        raise CnnpipeError(f"dvc status failed in {repo}: {error_line(proc.stderr)}")
    stale = sorted(json.loads(proc.stdout or "{}"))
    if stale:
        raise CnnpipeError(f"the run's outputs are stale ({', '.join(stale)}); run `dvc repro` before promoting")


def check_only_results_changed(repo: Path) -> None:
    """The commit a version tag points at must hold the code that made the run: other changes refuse."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    other = [path for path in changed if not any(path == r or path.startswith(r + "/") for r in RESULTS)]
    if other:
        raise CnnpipeError(f"uncommitted changes to {', '.join(other[:3])}{' ...' if len(other) > 3 else ''}; "
                           "commit them (and rerun dvc repro) before promoting")


def commit_results(repo: Path, message: str) -> None:
    paths = [p for p in RESULTS if (repo / p).exists()]
    registry.git(repo, "add", "--", *paths)
    if subprocess.run(["git", "diff", "--cached", "--quiet", "--", *paths], cwd=repo).returncode != 0:
        registry.git(repo, "commit", "-q", "-m", message, "--", *paths)


def push_models(repo: Path) -> None:
    """Send the models to the DVC remote when one is configured, so `dvc artifacts get` works elsewhere."""
    remote = dvc(repo, "remote", "default")
    if remote.returncode == 0 and remote.stdout.strip():
        proc = dvc(repo, "push", "--all-tags")  # not -q: it drops DVC's ERROR line
        if proc.returncode != 0:
            raise CnnpipeError(f"dvc push failed ({error_line(proc.stderr)})")


def model_md5(lock_text: str, path: str) -> str | None:
    """The md5 dvc.lock records for the output `path`."""
    import yaml

    for stage in (yaml.safe_load(lock_text) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") == path:
                return out.get("md5")
    return None


def same_models(repo: Path, lock: str, prod_lock: str) -> bool:
    """Every model the registry records has the same content in both dvc.lock texts."""
    declared = registry.declared(repo)
    paths = [declared.get(name, {}).get("path") for name in registry.ARTIFACTS]
    return all(path and model_md5(lock, path) is not None and model_md5(lock, path) == model_md5(prod_lock, path)
               for path in paths)


def check_run_finished(repo: Path, rev: str, lock_text: str) -> None:
    """A committed run must be the outputs of its commit: every stage run, each with the command, params and code
    of that commit, on the outputs of the stages before it. A run stopped part way (a sweep's trial stops after
    train) still holds the later stages' metrics of an older model."""
    import yaml

    def show(path: str) -> str | None:
        return None if (data := checked_out(path)) is None else data.decode("utf-8", "surrogateescape")

    def checked_out(path: str) -> bytes | None:
        """The file as a checkout of `rev` writes it (line endings and filters applied), as DVC hashed it."""
        proc = subprocess.run(["git", "cat-file", "--filters", f"{rev}:{path}"], cwd=repo, capture_output=True)
        return proc.stdout if proc.returncode == 0 else None

    def stale(why: str) -> CnnpipeError:
        return CnnpipeError(f"--rev {rev[:10]}: its results are not its commit's: {why}; reproduce the whole pipeline "
                            "for it (`dvc exp apply`, `dvc repro`, commit) before promoting")

    locked = (yaml.safe_load(lock_text) or {}).get("stages", {})
    for name, stage in ((yaml.safe_load(show("dvc.yaml") or "") or {}).get("stages") or {}).items():
        ran = [key for key in locked if key == name or key.startswith(f"{name}@")]
        if not ran:
            raise stale(f"its dvc.lock has no {name}")
        if isinstance(stage, dict) and isinstance(stage.get("cmd"), str) and locked[ran[0]].get("cmd") != stage["cmd"]:
            raise stale(f"{name}'s command changed after it ran")
    made = {out["path"]: (stage, out.get("md5")) for stage, entry in locked.items() for out in entry.get("outs", [])}
    params = {file: yaml.safe_load(show(file) or "") or {}  # YAML, or JSON (a subset)
              for entry in locked.values() for file in entry.get("params", {})
              if file.endswith((".yaml", ".yml", ".json"))}
    for stage, entry in locked.items():
        for dep in entry.get("deps", []):
            path, md5 = dep["path"], dep.get("md5")
            if path in made:
                if md5 != made[path][1]:
                    raise stale(f"{stage} last ran on another {path} than {made[path][0]} made")
            elif dep.get("hash") == "md5" and md5 and not md5.endswith(".dir") and (data := checked_out(path)):
                if hashlib.md5(data).hexdigest() != md5:  # a file in git (code): as the commit holds it
                    raise stale(f"{path} changed after {stage} ran")
        for file, values in entry.get("params", {}).items():
            for key, value in values.items() if file in params else ():
                if lookup(params[file], key) != value:
                    raise stale(f"{file}'s {key} changed after {stage} ran")


MISSING = object()


def lookup(tree: dict, dotted: str):
    """params.yaml's value at a dotted key (`train.epochs`); MISSING where it has none."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return MISSING
        tree = tree[part]
    return tree


def resolve_rev(repo: Path, rev: str) -> str:
    """A commit, from a Git revision or a DVC experiment's name (the one run from HEAD, else the only one)."""
    proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=repo,
                          capture_output=True, text=True)
    if proc.returncode == 0:
        return proc.stdout.strip()
    try:
        return experiment_commit(repo, rev)
    except CnnpipeError as e:
        raise CnnpipeError(f"--rev {rev}: not a commit, and {e}") from None


@contextlib.contextmanager
def one_at_a_time(repo: Path) -> Iterator[None]:
    """Promotions of one repository take turns (the nightly flow and a person at the CLI, say): each reads
    production after the one before it has registered its version, and so is gated against it."""
    path = repo / registry.git(repo, "rev-parse", "--git-common-dir") / "cnnpipe-promote.lock"
    try:
        f = open(path, "a")
    except OSError as e:
        raise CnnpipeError(f"cannot open the promotion lock {path} ({e.strerror}); promote from a checkout whose "
                           ".git folder is writable") from e
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another promotion is running in %s; waiting for it to finish", repo)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def promote(repo: str | Path, p: PromoteParams, run_name: str = "", dry_run: bool = False,
            rev: str | None = None) -> Decision:
    """Gate the run in the checkout, or the committed run `rev` (an experiment's commit), against production."""
    repo = Path(repo)
    rev = resolve_rev(repo, rev) if rev else None
    run = commit_metrics(repo, rev) if rev else checkout_metrics(repo)
    rules = parse_rules(p.rules, run)  # a bad rule fails before anything is read from the registry
    if rev is None:
        check_only_results_changed(repo)
        check_up_to_date(repo)
    lock = registry.git(repo, "show", f"{rev}:dvc.lock") if rev else (repo / "dvc.lock").read_text()
    if rev is not None:
        check_run_finished(repo, rev, lock)
    with one_at_a_time(repo):
        return gate(repo, p, rules, run, lock, run_name, dry_run, rev)


def gate(repo: Path, p: PromoteParams, rules: list[Rule], run: dict[str, float], lock: str, run_name: str,
         dry_run: bool, rev: str | None) -> Decision:
    """Against what is in production now: the decision, and with it passed (and not a dry run) the new version."""
    current = registry.in_stage(repo, registry.MODEL, p.stage)
    production = commit_metrics(repo, current.commit) if current else None
    if current and same_models(repo, lock, registry.git(repo, "show", f"{current.commit}:dvc.lock")):
        return Decision(promote=False, production=current.version, unchanged=True)
    decision = decide(rules, run, production)
    decision.production = current.version if current else None
    if decision.promote and not dry_run:
        label = f"run {run_name}" if run_name else "run"
        if rev is None:
            commit_results(repo, f"Results of {label}, promoted to {p.stage}")
        decision.version = registry.register_and_assign(repo, p.stage, f"{label}: " + "; ".join(
            r for r in decision.reasons), ref=rev or "HEAD")
        try:
            push_models(repo)  # after tagging: `--all-tags` then includes the new version's commit
        except CnnpipeError as e:
            raise CnnpipeError(f"registered {decision.version} in {p.stage}, but {e}: fix the remote and run "
                               "`dvc push --all-tags`") from e
    return decision
