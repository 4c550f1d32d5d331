from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _quiet_tools(tmp_path_factory):
    """No analytics or updater checks from DVC; its site cache in a temp dir."""
    os.environ["DVC_TEST"] = "true"
    os.environ["DVC_NO_ANALYTICS"] = "1"
    os.environ["DVC_SITE_CACHE_DIR"] = str(tmp_path_factory.mktemp("dvc-site-cache"))
    os.environ["DO_NOT_TRACK"] = "1"
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
    from cnnpipe.download import download
    from cnnpipe.params import DownloadParams, SplitParams
    from cnnpipe.split import split

    mirror, md5 = mnist_mirror
    download(DownloadParams(dataset="mnist", sources=[str(mirror)], md5=md5), tmp_path / "raw")
    split(SplitParams(val_size=50, train_size=None, seed=0), tmp_path / "raw", tmp_path / "prepared",
          tmp_path / "split.json")
    return tmp_path / "prepared"
