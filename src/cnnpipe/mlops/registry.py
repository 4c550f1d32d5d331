"""The model registry: the ONNX models declared under `artifacts:` in dvc.yaml, versioned and staged by Git tags
in GTO's format, which DVC reads (`dvc artifacts get . image-classifier --stage prod`).

A version is an annotated tag `image-classifier@v1.2.0` on the commit whose dvc.lock holds the model; a stage
assignment is a tag `image-classifier#prod#N` (the highest N is the current one). The files themselves live
in DVC's cache and remote, addressed by that commit's dvc.lock.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cnnpipe.core.errors import CnnpipeError

log = logging.getLogger(__name__)

MODEL = "image-classifier"  # models/model.onnx, fp32: what `cnnpipe serve` follows
MODEL_INT8 = "image-classifier-int8"  # models/model.int8.onnx
ARTIFACTS = (MODEL, MODEL_INT8)
REFERENCE = re.compile(r"(?P<name>[a-z0-9][a-z0-9-]*)(?:@(?P<version>v\d+\.\d+\.\d+)|#(?P<stage>[a-z][a-z0-9-]*))?")


@dataclass(frozen=True)
class Version:
    name: str
    version: str  # v1.2.0
    commit: str  # the commit the version tag points at
    stages: tuple[str, ...]  # stages this version is in now


def git(repo: str | Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CnnpipeError(f"git {' '.join(args)} failed in {repo}: "
                           f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return proc.stdout.strip()


def declared(repo: str | Path) -> dict[str, dict]:
    """The artifacts dvc.yaml declares: name -> {path, type, desc, labels}."""
    import yaml

    path = Path(repo) / "dvc.yaml"
    if not path.is_file():
        raise CnnpipeError(f"{path}: not found; run in a cnnpipe project (or pass --repo)")
    return (yaml.safe_load(path.read_text()) or {}).get("artifacts") or {}


def parse_reference(reference: str) -> tuple[str, str | None, str | None]:
    """'image-classifier#prod' -> (name, None, 'prod'); 'image-classifier@v1.0.0' -> (name, 'v1.0.0', None)."""
    match = REFERENCE.fullmatch(reference)
    if not match:
        raise CnnpipeError(f"registry reference {reference!r} is not valid; use NAME#STAGE (e.g. {MODEL}#prod) "
                           f"or NAME@vX.Y.Z")
    return match["name"], match["version"], match["stage"]


def versions(repo: str | Path, name: str) -> list[Version]:
    """Every registered version of `name`, newest first, with the stages each is in now."""
    from gto import api
    from gto.exceptions import ArtifactNotFound

    try:
        shown = api.show(repo, name, assignments_per_version=-1, versions_per_stage=1)
    except ArtifactNotFound:  # no version registered yet
        return []
    except Exception as e:  # GTO raises its own types for bad repos
        raise CnnpipeError(f"cannot read the registry of {repo}: {e}") from e
    commits, current = _read_tags(repo, name)
    out = []
    for row in shown:
        version = row["version"]
        # the listing holds vX.Y.Z versions; one GTO took with more to it (v1.2.0-rc.1) is looked up alone
        commit = commits.get(version) or git(repo, "rev-list", "-n", "1", f"{name}@{version}")
        out.append(Version(name, version, commit, tuple(s for s, (v, _) in current.items() if v == version)))
    return out


def stage_assignments(repo: str | Path, name: str) -> dict[str, tuple[str, str]]:
    """stage -> (version now in it, its commit): the version its latest assignment names. GTO numbers the
    assignment tags `name#stage#N` (and unassignments `name#stage!#N`) in the order they were made, so the
    highest N is the latest, a rollback to an older version included (GTO's own lookup picks the highest
    version ever assigned)."""
    return _read_tags(repo, name)[1]


def _read_tags(repo: str | Path, name: str) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """From one listing of the repo's tags: ({version: its commit}, stage_assignments)."""
    refs = git(repo, "for-each-ref", "--format=%(refname:strip=2) %(*objectname) %(objectname)", "refs/tags")
    latest: dict[str, tuple[int, bool, str]] = {}  # stage -> (N, still assigned, commit)
    commit_of: dict[str, str] = {}  # version -> the commit it was registered at
    stage_tag = re.compile(rf"{re.escape(name)}#([^#!]+)(!?)#(\d+)")
    version_tag = re.compile(rf"{re.escape(name)}@(v\d+\.\d+\.\d+)")
    for line in refs.splitlines():
        tag, *objects = line.split()
        commit = objects[0]  # the commit an annotated tag points at (its peeled object comes first)
        if m := stage_tag.fullmatch(tag):
            if int(m.group(3)) > latest.get(m.group(1), (-1,))[0]:
                latest[m.group(1)] = (int(m.group(3)), not m.group(2), commit)
        elif m := version_tag.fullmatch(tag):
            commit_of[m.group(1)] = commit
    version_at: dict[str, list[str]] = {}  # commit -> versions registered there
    for version, commit in commit_of.items():
        version_at.setdefault(commit, []).append(version)
    return commit_of, {stage: (max(version_at[commit], key=version_key), commit)
                       for stage, (_, assigned, commit) in latest.items() if assigned and commit in version_at}


def in_stage(repo: str | Path, name: str, stage: str) -> Version | None:
    """The version of `name` now in `stage`, or None when none is."""
    found = stage_assignments(repo, name).get(stage)
    return None if found is None else Version(name, found[0], found[1], (stage,))


def next_version(repo: str | Path, name: str) -> str:
    """v1.0.0 for the first version, then the minor version bumped."""
    known = versions(repo, name)
    if not known:
        return "v1.0.0"
    major, minor, _ = (int(x) for x in max(known, key=lambda v: version_key(v.version)).version[1:].split("."))
    return f"v{major}.{minor + 1}.0"


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version[1:].split("."))


def register_and_assign(repo: str | Path, stage: str, message: str, ref: str = "HEAD") -> str:
    """Register the next version of every declared model at `ref` and assign it to `stage`; returns it."""
    from gto import api

    missing = [name for name in ARTIFACTS if name not in declared(repo)]
    if missing:
        raise CnnpipeError(f"dvc.yaml declares no artifact {', '.join(missing)}; add it under `artifacts:`")
    version = max((next_version(repo, name) for name in ARTIFACTS), key=version_key)
    for name in ARTIFACTS:
        try:
            api.register(repo, name, ref, version=version, message=message)
            api.assign(repo, name, stage, version=version, message=message)
        except Exception as e:  # GTO's own errors, e.g. a commit that already has a version of the artifact
            raise CnnpipeError(f"cannot register {name}@{version} at {ref}: {e}") from e
    log.info("registered %s at %s and assigned it to %s", version, ref, stage)
    return version


def fetch(repo: str | Path, reference: str, out: Path) -> Path:
    """The model file of a registry reference, fetched by `dvc artifacts get` (from the cache or the remote)."""
    name, version, stage = parse_reference(reference)
    if not version and not stage:
        stage = "prod"
    if name not in declared(repo):
        raise CnnpipeError(f"no artifact {name!r} in {repo}/dvc.yaml; the registry has {', '.join(declared(repo))}")
    cmd = [sys.executable, "-m", "dvc", "artifacts", "get", str(Path(repo).resolve()), name, "-o", str(out),
           "--force"]
    cmd += ["--stage", stage] if stage else ["--rev", version]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("ERROR: ")
        raise CnnpipeError(f"cannot fetch {reference} from {repo}: {detail}")
    return out


def table(repo: str | Path) -> list[dict]:
    """Rows for `cnnpipe registry`: every version of every declared model, newest first."""
    rows = []
    for name in declared(repo):
        for v in sorted(versions(repo, name), key=lambda v: version_key(v.version), reverse=True):
            rows.append({"artifact": name, "version": v.version, "commit": v.commit[:10],
                         "stages": ",".join(v.stages), "path": declared(repo)[name].get("path", "")})
    return rows
