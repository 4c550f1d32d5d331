"""models/model.pt: weights plus everything needed to rebuild and feed the model.

Loaded with weights_only=True: a checkpoint holds tensors and plain values, never code.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.fsutil import atomic_path
from cnnpipe.core.models import build_model
from cnnpipe.core.prepared import Meta

FORMAT = "cnnpipe-checkpoint-1"


def save_checkpoint(path: str | Path, model: nn.Module, model_name: str, meta: Meta,
                    extra: dict[str, Any]) -> Path:
    state = {
        "format": FORMAT,
        "model": model_name,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "dataset": meta.dataset,
        "classes": list(meta.classes),
        "input_shape": list(meta.shape),
        "mean": list(meta.mean),
        "std": list(meta.std),
        "flip": meta.flip,
        **extra,
    }
    # through a file object: torch names the zip records after a path's stem (here the random temp name), so
    # the same weights would give different bytes and DVC would see a changed model.pt
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
    return Path(path)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from a checkpoint; returns (model in eval mode, the checkpoint's fields)."""
    path = Path(path)
    if not path.is_file():
        raise CnnpipeError(f"{path}: checkpoint not found; run the train stage first (dvc repro train)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError) as e:
        raise CnnpipeError(
            f"{path}: not a loadable checkpoint ({str(e).splitlines()[0]}); retrain with dvc repro train"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CnnpipeError(f"{path}: not a cnnpipe checkpoint; retrain with dvc repro train")
    model = build_model(state["model"], tuple(state["input_shape"]), len(state["classes"]))
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as e:
        raise CnnpipeError(
            f"{path}: weights do not match model '{state['model']}' ({str(e).splitlines()[0][:120]}); "
            "retrain with dvc repro train"
        ) from e
    return model.to(device).eval(), state


def meta_of(state: dict) -> Meta:
    return Meta(state["dataset"], state["classes"], tuple(state["input_shape"]), state["mean"], state["std"],
                state["flip"])
