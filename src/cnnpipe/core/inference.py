"""PyTorch inference shared by the stages that run a model: autocast, batched logits and flip TTA."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from cnnpipe.core.data import normalize


def autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   batch_size: int, channels_last: bool = False, amp: torch.dtype | None = None) -> torch.Tensor:
    """Logits (fp32) for uint8 images already on the model's device, in batches."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = normalize(x[i: i + batch_size], mean, std)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(x.device, amp):
            out.append(model(xb).float())
    return torch.cat(out) if out else torch.empty(0)


def tta_logits(model: nn.Module, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, batch_size: int,
               flip: bool) -> torch.Tensor:
    """Logits for uint8 images on the model's device; with `flip`, the mean of each image's and its mirror's
    logits (for datasets where a mirrored image keeps its class)."""
    logits = predict_logits(model, x, mean, std, batch_size, channels_last=True)
    if flip:
        logits = (logits + predict_logits(model, x.flip(3), mean, std, batch_size, channels_last=True)) / 2
    return logits
