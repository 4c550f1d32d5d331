"""What a benchmark ran on, recorded beside its figures: the code's git commit, the processor and its
vector/matrix extensions, and for GPU runs the GPU, its driver and the torch, CUDA and cuDNN builds. Figures are
only comparable within one file."""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cnnpipe.core import cpuinfo

if TYPE_CHECKING:
    import torch


def command_line() -> str | None:
    """The `cnnpipe ...` command this process runs, to record beside its figures; None when it is not one."""
    if Path(sys.argv[0]).name != "cnnpipe":
        return None
    return shlex.join(["cnnpipe", *sys.argv[1:]])


CODE = (":/src", ":/scripts", ":/params.yaml", ":/pyproject.toml", ":/uv.lock")  # what a benchmark's figures follow


def source_revision(where: Path = Path(__file__).parent) -> str | None:
    """The git commit of the checkout holding `where` (by default this code), "-dirty" where its code or
    settings (CODE) differ from that commit; None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(where), *args], capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", *CODE)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def cpu_flags() -> list[str]:
    """The vector and matrix extensions that matter for these figures (AVX2, AVX-512, AMX)."""
    return sorted(f for f in cpuinfo.cpu_flags() if f == "avx2" or f.startswith(("avx512", "amx")))


def machine() -> dict:
    """The CPU side and the serving runtime (cnnpipe serve's benchmarks)."""
    import onnxruntime as ort

    return {"cpus": os.cpu_count(), "processor": cpuinfo.cpu_model() or platform.processor() or platform.machine(),
            "cpu_flags": cpu_flags(), "onnxruntime": ort.__version__,
            "onnxruntime_providers": ort.get_available_providers(), "python": platform.python_version(),
            "source_revision": source_revision()}


def gpu_driver() -> str | None:
    """The NVIDIA driver's version, from nvidia-smi (torch does not report it)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def train_machine(device: torch.device) -> dict:
    """machine() plus torch's build and, on a CUDA device, the GPU, its memory and driver, CUDA and cuDNN."""
    import torch

    m = dict(machine(), torch=torch.__version__)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        m.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                 compute_capability=f"{props.major}.{props.minor}", driver=gpu_driver(), cuda=torch.version.cuda,
                 cudnn=torch.backends.cudnn.version())
    return m
