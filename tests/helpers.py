"""Tiny generated datasets in the real raw formats, for tests (no downloads)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

from cnnpipe.bench import launch
from cnnpipe.bench.launch import free_port
from cnnpipe.core.formats import CIFAR_TEST, CIFAR_TRAIN, write_idx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def make_images(n: int, num_classes: int, shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: class c lights a bright block whose position depends on c, plus noise."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    y = np.arange(n) % num_classes
    rng.shuffle(y)
    x = rng.integers(0, 60, size=(n, c, h, w)).astype(np.uint8)
    bh, bw = h // 4, w // 4
    for i, label in enumerate(y):
        r, col = divmod(int(label), 4)
        x[i, :, r * bh: (r + 1) * bh, col * bw: (col + 1) * bw] = 220
    return x, y.astype(np.uint8)


def write_mnist_mirror(directory: Path, n_train: int = 400, n_test: int = 100, seed: int = 0) -> dict[str, str]:
    """Write the four MNIST-format files; returns their MD5s (for download.md5)."""
    directory.mkdir(parents=True, exist_ok=True)
    train_x, train_y = make_images(n_train, 10, (1, 28, 28), seed)
    test_x, test_y = make_images(n_test, 10, (1, 28, 28), seed + 1)
    for name, arr in zip(IDX_FILES, (train_x[:, 0], train_y, test_x[:, 0], test_y), strict=True):
        write_idx(directory / name, arr)
    return {name: md5_of(directory / name) for name in IDX_FILES}


def write_cifar_archive(path: Path, per_batch: int = 20, seed: int = 0) -> str:
    """A cifar-10-binary.tar.gz with tiny batches; returns its MD5."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate(CIFAR_TRAIN + CIFAR_TEST):
            x, y = make_images(per_batch, 10, (3, 32, 32), seed + i)
            data = np.concatenate([y[:, None], x.reshape(per_batch, -1)], axis=1).astype(np.uint8).tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return md5_of(path)


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --- temporary git + DVC repos holding a copy of the project -------------------------------------

def run(repo: Path, *args: str) -> str:
    proc = subprocess.run(list(args), cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def dvc(repo: Path, *args: str) -> str:
    return run(repo, sys.executable, "-m", "dvc", *args)


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def train_workdir(root: Path, prepared: Path, train_params) -> Path:
    """A folder where `cnnpipe train` runs as the stage does: data/prepared and a params.yaml with these
    train params (every other section at its default)."""
    import dataclasses

    from cnnpipe.core.params import defaults

    shutil.copytree(prepared, root / "data/prepared")
    (root / "params.yaml").write_text(yaml.safe_dump(defaults() | {"train": dataclasses.asdict(train_params)}))
    return root


def set_params(repo: Path, **sections) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_repo(tmp_path: Path, source: str, md5: dict[str, str]) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("src", "pipeline", "data/own"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    set_params(
        repo,
        download={"dataset": "mnist", "sources": [source], "md5": md5, "retries": 1},
        split={"val_size": 50, "train_size": None, "seed": 0},
        train={"model": "lenet", "epochs": 2, "batch_size": 50, "lr": 0.01, "device": "cpu"},
        evaluate={"device": "cpu"},
        export={"check_images": 32},
        quantize={"calibration_images": 32, "latency_runs": 10},
    )
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.email", "ci@example.com")
    run(repo, "git", "config", "user.name", "CI")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.autostage", "true")
    shutil.copy(ROOT / ".dvc/offline-plots.html", repo / ".dvc/offline-plots.html")  # as the project: plots offline
    dvc(repo, "config", "plots.html_template", "offline-plots.html")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "project")
    return repo


def add_makefile(repo: Path) -> None:
    """The Makefile and what its targets depend on, for tests that run `make` in a project copy."""
    for name in ("Makefile", "pyproject.toml", "uv.lock", "requirements/all.txt", "requirements/serve.txt"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)


def commit(repo: Path, message: str) -> None:
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", message)


def start_server(model: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`cnnpipe serve MODEL` on a free loopback port, once /readyz answers 200."""
    port = free_port()
    cli = str(Path(sys.executable).parent / "cnnpipe")
    proc = launch.start_server([cli, "serve", str(model), "--port", str(port), "--threads", "1", *extra], port)
    return proc, proc.url


stop = launch.stop


# --- a real Prefect server on loopback ------------------------------------------------------------

def api(url: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def sh(env: dict, cwd: Path, *args: str) -> str:
    proc = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


def start_prefect_server(home: Path, procs: list) -> dict:
    """`prefect server start` on a free loopback port (appended to `procs`); returns the env that reaches it."""
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", DO_NOT_TRACK="1",
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               # a deployment run queued behind its concurrency limit retries after 1 s, not the default 30
               PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="1")
    env.pop("PREFECT_LOCAL_STORAGE_PATH", None)
    log = home / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                   str(port)], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(server)
    deadline = time.monotonic() + 120
    while True:
        try:
            api(env["PREFECT_API_URL"], "/health")
            return env
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(log.read_text()[-2000:]) from None
            time.sleep(0.5)


def stop_all(procs: list) -> None:
    """Every process group started by a test stops, also on failure."""
    import signal

    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
