"""Starting a server process and waiting until it answers: the one helper the benchmarks and the tests use.

The server's output goes to a temporary log file, never to an unread pipe (a full pipe would block the server
mid-benchmark); a server that exits or never gets ready is an error carrying the end of that log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(subprocess.Popen):
    """A server process with its log file (`log`) and base URL (`url`)."""

    log: Path
    url: str

    def output(self, tail: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-tail:]


def start_server(cmd: list[str], port: int, ready_path: str = "/readyz", env: dict | None = None,
                 timeout: float = 90.0) -> Server:
    """Run `cmd` (a server on loopback `port`) and return once GET `ready_path` answers 200."""
    fd, log = tempfile.mkstemp(prefix="cnnpipe-server-", suffix=".log")
    with os.fdopen(fd, "w") as out:
        proc = Server(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    proc.log, proc.url = Path(log), f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {proc.output(1500)}")
        try:
            with urllib.request.urlopen(proc.url + ready_path, timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"server did not become ready within {timeout:g} s: {proc.output(1500)}")


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM (graceful shutdown), then SIGKILL after `grace` seconds; removes the log file."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if isinstance(proc, Server):
        proc.log.unlink(missing_ok=True)
