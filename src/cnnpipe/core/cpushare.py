"""CPU threads for a process that shares the machine: the cores it may run on (its CPU affinity), divided
among the cnnpipe jobs running on them at the same time.

Every training, evaluation, export and quantize process registers itself while it runs: a file named after
its pid in a per-user directory (CNNPIPE_JOBS_DIR, default <tmp>/cnnpipe-jobs-<uid>). A job's share is its
affinity cores // the live jobs whose affinity overlaps its own (at least one thread). So `dvc queue start
-j 2`, a sweep's parallel trials and torchrun's local processes (LOCAL_WORLD_SIZE) split the cores without
anyone doing arithmetic. Training looks again every few steps, so a job that outlives the others takes the
cores they leave. An explicit thread count (train.threads) always wins.

CPU results are bitwise repeatable for a given thread count (metrics/*.info.json records it); set
train.threads to pin it when repeatability across different machine loads matters more than speed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

JOBS_DIR_ENV = "CNNPIPE_JOBS_DIR"


def affinity() -> frozenset[int]:
    """The CPUs this process may run on (taskset, cgroups' cpusets, a container's --cpuset-cpus)."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def jobs_dir() -> Path:
    return Path(os.environ.get(JOBS_DIR_ENV) or Path(tempfile.gettempdir()) / f"cnnpipe-jobs-{os.getuid()}")


def _start_time(pid: int) -> str:
    """The process's start time (Linux /proc; empty elsewhere): a reused pid is not the registered job."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not started or _start_time(pid) in ("", started)


@contextlib.contextmanager
def job(directory: Path | None = None) -> Iterator[Path]:
    """Register this process as a running job for the duration of the block."""
    directory = directory or jobs_dir()
    directory.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    path = directory / str(pid)
    tmp = directory / f".{pid}.tmp"
    tmp.write_text(f"{_start_time(pid)} {','.join(map(str, sorted(affinity())))}\n")
    os.replace(tmp, path)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def live_jobs(cpus: frozenset[int], directory: Path | None = None) -> int:
    """Registered jobs that are still running on CPUs overlapping `cpus`; files of dead ones are removed."""
    directory = directory or jobs_dir()
    count = 0
    for path in directory.glob("[0-9]*") if directory.is_dir() else ():
        try:
            started, cpu_list = path.read_text().split(" ")
        except (OSError, ValueError):
            continue
        if not _alive(int(path.name), started):
            path.unlink(missing_ok=True)
            continue
        theirs = {int(c) for c in cpu_list.split(",") if c.strip()}
        count += bool(theirs & cpus) or not theirs
    return count


def share(cpus: frozenset[int] | None = None, directory: Path | None = None) -> int:
    """This process's threads: its affinity cores // the live jobs on them (torchrun's local processes
    counted even before they register), at least 1."""
    cpus = cpus if cpus is not None else affinity()
    jobs = max(1, live_jobs(cpus, directory), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, len(cpus) // jobs)


def registered(fn):
    """Decorator: run `fn` as a registered job (see job())."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with job():
            return fn(*args, **kwargs)

    return wrapper
