from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipeline"))

# Prefect reads these when first imported (at collection): isolate its home, results and analytics.
_PREFECT_HOME = tempfile.mkdtemp(prefix="cnnpipe-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = os.path.join(_PREFECT_HOME, "storage")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.pop("PREFECT_API_URL", None)
# precision auto's remembered probes (core/cpuprecision.py): this session's own, never the user's. Set at
# import, before any test module copies os.environ for the processes it starts.
_CACHE = tempfile.mkdtemp(prefix="cnnpipe-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["CNNPIPE_CACHE_DIR"] = _CACHE


# Two pytest-xdist workers share the cores, and the torch processes of each take all of them (CNNPIPE_JOBS_DIR
# below counts one worker's jobs only). OpenMP threads that wait at a barrier spin up to 300,000 times before
# sleeping (libgomp's default), burning the time the other worker's threads need: a shorter spin keeps quick
# hand-offs and stops the waste.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

# A suite started in the background of a non-interactive shell inherits SIGINT ignored, and so would every
# process the tests Ctrl-C (stages, sweeps, workers): handled here, it is reset to the default in children.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True, scope="session")
def _quiet_tools(tmp_path_factory):
    """No analytics or updater checks from DVC; its site cache in a temp dir."""
    os.environ["DVC_TEST"] = "true"
    os.environ["DVC_NO_ANALYTICS"] = "1"
    os.environ["DVC_SITE_CACHE_DIR"] = str(tmp_path_factory.mktemp("dvc-site-cache"))
    os.environ["DO_NOT_TRACK"] = "1"
    # CPU shares (core/cpushare.py) count the jobs of this test process only: runs that a test compares
    # bitwise keep their thread count whatever the other pytest-xdist worker is running.
    os.environ["CNNPIPE_JOBS_DIR"] = str(tmp_path_factory.mktemp("cpu-jobs"))
    # Stage commands (`cnnpipe ...`) resolve through PATH: this interpreter's bin first.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


@pytest.fixture
def mnist_mirror(tmp_path) -> tuple[Path, dict[str, str]]:
    from helpers import write_mnist_mirror

    directory = tmp_path / "mirror"
    return directory, write_mnist_mirror(directory)


@pytest.fixture
def http_server():
    """Serve a directory on loopback; `fail_first[name] = n` makes the first n GETs of name answer 503."""
    import functools
    import http.server
    import threading

    servers = []

    def start(directory: Path, fail_first: dict[str, int] | None = None) -> tuple[str, list[str]]:
        failures = dict(fail_first or {})
        requests: list[str] = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                name = self.path.lstrip("/")
                requests.append(name)
                if failures.get(name, 0) > 0:
                    failures[name] -= 1
                    self.send_error(503, "try again")
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/", requests

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def prepared(tmp_path, mnist_mirror) -> Path:
    """data/prepared of a tiny generated MNIST-format set (350 train, 50 val, 100 test)."""
    from cnnpipe.core.params import DownloadParams, SplitParams
    from cnnpipe.stages.download import download
    from cnnpipe.stages.split import split

    mirror, md5 = mnist_mirror
    download(DownloadParams(dataset="mnist", sources=[str(mirror)], md5=md5), tmp_path / "raw")
    split(SplitParams(val_size=50, train_size=None, seed=0), tmp_path / "raw", tmp_path / "prepared",
          tmp_path / "split.json")
    return tmp_path / "prepared"


def built_once(tmp_path_factory, worker_id: str, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name`, filled by `build(folder)` once for the whole session: the pytest-xdist workers share
    it (the first one builds it under a lock, the others wait and read). Tests copy what they change."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent  # the workers' common parent
    folder, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory, worker_id) -> Path:
    """A tiny bncnn trained on generated 28×28 data and exported: models/model.onnx of a real run."""
    def build(d: Path) -> None:
        from helpers import write_mnist_mirror

        from cnnpipe.core.params import DownloadParams, ExportParams, SplitParams, TrainParams
        from cnnpipe.stages.download import download
        from cnnpipe.stages.export import export
        from cnnpipe.stages.split import split
        from cnnpipe.stages.train import train

        md5 = write_mnist_mirror(d / "mirror")
        download(DownloadParams(dataset="mnist", sources=[str(d / "mirror")], md5=md5), d / "raw")
        split(SplitParams(val_size=50, train_size=None, seed=0), d / "raw", d / "prepared", d / "split.json")
        train(TrainParams(model="bncnn", epochs=3, batch_size=32, lr=0.01, flip=False, device="cpu"),
              d / "prepared", d / "model.pt", d / "train.json", d / "history.csv")
        export(ExportParams(check_images=32), d / "prepared", d / "model.pt", d / "model.onnx", d / "export.json")

    return built_once(tmp_path_factory, worker_id, "onnx-model", build) / "model.onnx"


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory, worker_id) -> Callable[[Path], Path]:
    """`reproduced(folder)` gives folder/repo: a project on tiny MNIST-format data (make_repo's params) whose
    whole pipeline `dvc repro` ran and `git commit` recorded, as after `make run`. The run happens once per
    session; each call copies it (git, DVC cache and outputs), so every test owns its repo."""
    def build(d: Path) -> None:
        from helpers import commit, dvc, make_repo, write_mnist_mirror

        md5 = write_mnist_mirror(d / "mirror")
        repo = make_repo(d, str(d / "mirror"), md5)
        dvc(repo, "repro")
        commit(repo, "baseline")

    template = built_once(tmp_path_factory, worker_id, "reproduced", build) / "repo"

    def copy(folder: Path) -> Path:
        # .dvc/tmp holds locks and a path-bound index: DVC makes it again in the copy
        shutil.copytree(template, folder / "repo", symlinks=True,
                        ignore=lambda d, names: ["tmp"] if Path(d) == template / ".dvc" else [])
        return folder / "repo"

    return copy


@pytest.fixture
def prefect_server(tmp_path):
    """A real `prefect server start` on loopback: (env that reaches it, list of processes stopped afterwards)."""
    from helpers import start_prefect_server, stop_all

    procs: list = []
    try:
        yield start_prefect_server(tmp_path, procs), procs
    finally:
        stop_all(procs)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files with end-to-end tests first. `make test` runs `--dist loadfile --no-loadscope-reorder`, so
    xdist hands out whole files in this order: the long ones start at once, and the short unit files fill in
    at the end, instead of one worker running a long file alone while the other sits idle."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else 1)  # stable: file order kept
