"""Where and how torch runs: device choice, seeding and CPU threads, decided in one place."""

from __future__ import annotations

import random

import numpy as np
import torch

from cnnpipe.errors import CnnpipeError


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda when present, else cpu; an explicit device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CnnpipeError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CnnpipeError(f"device '{name}' asked for but no CUDA GPU is available; use device: auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CnnpipeError(
                f"device '{name}' does not exist ({torch.cuda.device_count()} GPUs); use cuda:0 or auto"
            )
    elif device.type != "cpu":
        raise CnnpipeError(f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
