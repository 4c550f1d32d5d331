"""Prepared data: load the uint8 arrays whole, move them to the device once, normalize and augment
there in whole batches (no per-sample Python work, no DataLoader on the hot path)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cnnpipe.core.prepared import Meta


def to_device(x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images stay uint8 on the device (4× smaller than float); labels become int64."""
    return torch.from_numpy(np.asarray(x)).to(device), torch.from_numpy(np.asarray(y)).long().to(device)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 N×C×H×W -> float N×C×H×W, (x/255 - mean) / std; mean and std are C×1×1."""
    return (x.float() / 255 - mean) / std


def stats_tensors(meta: Meta, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(meta.mean, device=device).view(-1, 1, 1)
    std = torch.tensor(meta.std, device=device).view(-1, 1, 1)
    return mean, std


def draw_augment(n: int, pad: int, flip: bool, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The random choices for a batch of n images: shifts in [0, 2·pad] and flip flags. Drawn for the
    whole global batch on every rank, so a torchrun job augments exactly as one process would."""
    g, dev = generator, generator.device
    out = {}
    if pad > 0:
        out["dy"] = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=dev)
        out["dx"] = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=dev)
    if flip:
        out["flip"] = torch.rand(n, generator=g, device=dev) < 0.5
    return out


def augment(x: torch.Tensor, pad: int, choices: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply drawn choices to x (N×C×H×W): a zero-filled shift, one gather per batch, then the flips."""
    if "dy" in choices:
        n, c, h, w = x.shape
        xp = F.pad(x, (pad, pad, pad, pad))  # N×C×(H+2p)×(W+2p)
        dy, dx = choices["dy"].to(x.device), choices["dx"].to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # N×1×H×1
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # N×1×1×W
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(c, device=x.device)[None, :, None, None]
        x = xp[batch, chan, rows, cols]
    if "flip" in choices:
        x = torch.where(choices["flip"].to(x.device)[:, None, None, None], x.flip(3), x)
    return x
