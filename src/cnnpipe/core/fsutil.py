"""Atomic writes: every artifact appears whole or not at all (temp path, then rename)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cnnpipe.core.provenance import environment

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp directory beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | Path, data: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return Path(path)


def info_path(metrics_path: str | Path) -> Path:
    """Where a stage's provenance goes: beside its metrics file (metrics/train.json -> metrics/train.info.json)."""
    path = Path(metrics_path)
    return path.with_name(f"{path.stem}.info.json")


def write_metrics(metrics_path: str | Path, metrics: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """Measurements a change can move go to `metrics_path` (numbers only, what `dvc metrics diff` compares);
    provenance (device, versions, hashes, names) goes to its info file, an output that is not a metric.
    The info file also names the environment (its uv.lock's hash). Returns both in one dict, for callers."""
    info = info | {"environment": environment()}
    write_json(info_path(metrics_path), info)
    write_json(metrics_path, metrics)
    return metrics | info


def file_digest(path: str | Path, algorithm: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()
