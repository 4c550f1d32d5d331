"""uv.lock: it agrees with pyproject.toml, and the environment the tests run in is exactly the locked one."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.utils import canonicalize_name

from cnnpipe.core.provenance import INSTALLED_LOCK, environment

ROOT = Path(__file__).resolve().parents[2]
UV = str(Path(sys.executable).parent / "uv")


def uv(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([UV, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_lock_agrees_with_pyproject():
    result = uv("lock", "--check", "--offline")
    assert result.returncode == 0, f"uv.lock is out of date with pyproject.toml; run `make lock`\n{result.stderr}"


def test_lock_check_catches_a_requirement_the_lock_lacks(tmp_path):
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"pandas>=2.1",', '"pandas>=2.1", "rich>=13",', 1))
    result = uv("lock", "--check", cwd=tmp_path)
    assert result.returncode != 0 and "needs to be updated" in result.stderr


def locked_versions() -> dict[str, str]:
    """name -> version of every locked package that applies to this platform and Python."""
    out = uv("export", "--frozen", "--no-emit-project", "--no-hashes", "--no-header", "-q",
             "--extra", "pipeline", "--extra", "test").stdout
    pins = {}
    for line in out.splitlines():
        if "==" not in line or line.lstrip().startswith("#"):
            continue
        spec, _, marker = line.partition(";")
        name, _, version = spec.strip().partition("==")
        if not marker.strip() or Marker(marker.strip()).evaluate():
            pins[canonicalize_name(name)] = version.strip()
    return pins


@pytest.mark.skipif(not (Path(sys.prefix) / INSTALLED_LOCK).is_file(),
                    reason="this environment was not installed by `make setup` from uv.lock")
def test_installed_environment_is_the_locked_one():
    pins = locked_versions()
    assert {"torch", "dvc", "prefect", "optuna", "onnxruntime-gpu"} & set(pins)  # the export is the real list
    wrong = {name: (version, importlib.metadata.version(name)) for name, version in pins.items()
             if importlib.metadata.version(name) != version}
    assert not wrong, f"installed packages differ from uv.lock (locked, installed): {wrong}; run `make setup`"
    assert environment()["uv_lock_sha256"] is not None


def test_provenance_names_the_installed_lock(tmp_path):
    assert environment(tmp_path)["uv_lock_sha256"] is None  # not installed from a lock
    (tmp_path / INSTALLED_LOCK).write_text("version = 1\n")
    digest = environment(tmp_path)["uv_lock_sha256"]
    (tmp_path / INSTALLED_LOCK).write_text("version = 1\n# changed\n")
    assert len(digest) == 64 and environment(tmp_path)["uv_lock_sha256"] != digest


@pytest.mark.parametrize("path, extras", [("requirements/all.txt", ["pipeline", "test"]),
                                          ("requirements/serve.txt", [])])
def test_requirement_files_are_the_lock_exported(path, extras):
    """make setup and the Dockerfile install these with pip --require-hashes: they must be uv.lock's pins."""
    args = [a for e in extras for a in ("--extra", e)]
    exported = uv("export", "--frozen", "--no-emit-project", "--no-header", "-q", *args).stdout
    assert exported.count("--hash=sha256:") > 20
    assert (ROOT / path).read_text() == exported, f"{path} is not uv.lock's export; run `make lock`"
