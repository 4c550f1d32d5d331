"""Where and how torch runs: device, precision, seeding, CPU threads and torchrun's process group,
decided in one place."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from cnnpipe.core import cpushare
from cnnpipe.core.errors import CnnpipeError


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:  # only the main process writes artifacts, metrics and logs
        return self.rank == 0


def dist_from_env() -> Dist:
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for every process it starts."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' picks cuda when present, else cpu; an explicit device must exist. Under torchrun each
    process takes the GPU of its local rank (cuda or auto)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CnnpipeError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CnnpipeError(f"device '{name}' asked for but no CUDA GPU is available; use device: auto or cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise CnnpipeError(
                f"device '{device}' does not exist ({torch.cuda.device_count()} GPUs); use cuda:0 or auto"
            )
    elif device.type != "cpu":
        raise CnnpipeError(f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. auto: bf16 on GPUs that have it, fp16 (with a gradient
    scaler) on older GPUs; on the CPU the train stage then asks core/cpuprecision.py (bf16 only where the
    processor has it natively and a probe finds it faster)."""
    if name == "fp32":
        return None
    if device.type == "cpu":
        if name == "fp16":
            raise CnnpipeError("train.precision fp16 needs a CUDA GPU; use fp32 or bf16 on the CPU (or auto)")
        return torch.bfloat16 if name == "bf16" else None
    if name == "bf16" and not torch.cuda.is_bf16_supported():
        raise CnnpipeError(f"{torch.cuda.get_device_name(device)} has no bf16; use train.precision fp16 or auto")
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if name == "bf16" else torch.float16


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """cudnn autotuning for speed, or deterministic kernels where asked. CPU runs are deterministic
    either way (same params, same metrics)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores: ~10 bits of mantissa
        torch.backends.cudnn.allow_tf32 = True
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)


def init_process_group(d: Dist, device: torch.device) -> None:
    """nccl between GPUs, gloo between CPU processes; torchrun's env:// rendezvous."""
    if d.world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(threads: int) -> int:
    """torch's CPU threads: `threads` when set, else this process's share of the cores (core/cpushare.py).
    Returns the count."""
    n = threads if threads > 0 else cpushare.share()
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n
