"""Resuming training after Ctrl-C or a kill: the last completed epoch, saved atomically beside the checkpoint.

A state holds the model, optimizer, schedule, grad scaler, the batch generator and every rank's random streams,
so a resumed run continues exactly as if it had never stopped. Its fingerprint names what it was made with; a
state from other params, data or code is ignored, a damaged one is a one-line error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.fsutil import atomic_path
from cnnpipe.core.params import TrainParams
from cnnpipe.core.runtime import Dist

log = logging.getLogger(__name__)

STATE_FORMAT = 4  # bump when the state's layout changes: older states are then ignored
PACKAGE = Path(__file__).resolve().parents[1]  # the cnnpipe package's source


@dataclass
class Progress:
    """Where a run stands after its last completed epoch."""

    history: list[dict] = field(default_factory=list)  # one row per epoch (plots/train_history.csv)
    best: dict | None = None  # the history row of the best validation accuracy
    best_state: dict[str, torch.Tensor] | None = None  # the model's weights at that epoch (early stopping only)
    images: int = 0  # training images seen, all ranks together
    seconds: float = 0.0  # training time so far
    epoch: int = 0  # the last completed epoch
    stopped_early: str | None = None  # "patience" or "pruned" once the run has decided to end there


def code_digest(root: Path = PACKAGE) -> str:
    """A hash of the package's Python source: a state made by other code (another model, loss or data
    pipeline) would be continued as if the code had always been this."""
    digest = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def fingerprint(p: TrainParams, meta, arrays: Sequence[np.ndarray], world: int, device: torch.device,
                amp: torch.dtype | None) -> str:
    """What a resume state must have been made with: every param but `resume`, the data (its description and
    the bytes of `arrays`, the train and validation images and labels), the number of processes (each has its
    own random streams), the device type and precision `auto` resolved to, and the code and torch version."""
    params = {k: v for k, v in dataclasses.asdict(p).items() if k != "resume"}
    data = hashlib.sha256()
    for a in arrays:
        data.update(f"{a.dtype}{a.shape}".encode())
        data.update(np.ascontiguousarray(a).data)
    blob = json.dumps([STATE_FORMAT, params, dataclasses.asdict(meta), data.hexdigest(), world, device.type,
                       str(amp), code_digest(), torch.__version__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def rng_states(device: torch.device, d: Dist) -> list[dict[str, torch.Tensor]]:
    """Every rank's global random streams (CPU, and CUDA on a GPU: dropout draws from them), by rank."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if d.world == 1:
        return [mine]
    states: list = [None] * d.world
    dist.all_gather_object(states, mine)
    return states


def restore_rng(states: list[dict[str, torch.Tensor]], device: torch.device, d: Dist) -> None:
    torch.set_rng_state(states[d.rank]["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[d.rank]["cuda"], device)


def save(path: Path, key: str, engine: Any, generator: torch.Generator, progress: Progress, d: Dist) -> None:
    """Save the last completed epoch (atomic; rank 0 writes, every rank must call: the RNG gather is a
    collective). `engine` has net, optimizer, scheduler and scaler."""
    rng = rng_states(engine.device, d)
    if not d.main:
        return
    state = {"fingerprint": key, "model": engine.net.state_dict(), "optimizer": engine.optimizer.state_dict(),
             "scheduler": engine.scheduler.state_dict(), "scaler": engine.scaler.state_dict(),
             "generator": generator.get_state(), "rng": rng,
             **{f.name: getattr(progress, f.name) for f in dataclasses.fields(Progress)}}
    with sigint_held(), atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """A Ctrl-C during the block takes effect when it ends. torch.save interrupted mid-write raises its zip
    writer's RuntimeError in place of the KeyboardInterrupt, so the run would end as a crash, not as
    interrupted. Outside the main thread (where no signal handler can be set) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)  # to the handler restored above: KeyboardInterrupt by default


def restore(state: dict, engine: Any, generator: torch.Generator, d: Dist, path: Path) -> Progress:
    """Put a loaded state back into the engine and generator; returns the progress it had reached."""
    try:
        engine.net.load_state_dict(state["model"])
        engine.optimizer.load_state_dict(state["optimizer"])
        engine.scheduler.load_state_dict(state["scheduler"])
        engine.scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        restore_rng(state["rng"], engine.device, d)
        return Progress(**{f.name: state[f.name] for f in dataclasses.fields(Progress)})
    except (RuntimeError, KeyError, ValueError, TypeError) as e:  # a state its fingerprint vouches for, damaged
        detail = " ".join(str(e).split())[:200] or type(e).__name__  # torch's message spans lines: its keys too
        raise CnnpipeError(f"resume state {path} does not fit this run ({detail}); delete it to start over") from e


def load(path: Path, expected: str) -> dict | None:
    """The resume state if it belongs to this run; None if there is none or it is from other params."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        ok = isinstance(state, dict) and "fingerprint" in state and "epoch" in state
    except Exception as e:  # torch raises several types for a damaged file
        raise CnnpipeError(f"resume state {path} is corrupt ({str(e).splitlines()[0][:100]}); "
                           "delete it to start over") from e
    if not ok:
        raise CnnpipeError(f"resume state {path} is not a cnnpipe training state; delete it to start over")
    if state["fingerprint"] != expected:
        log.warning("ignoring %s: it was made with other params, data or code", path)
        return None
    return state


def shared(path: Path, expected: str, d: Dist) -> dict | None:
    """Rank 0 reads the resume state; under torchrun it (or rank 0's error) goes to every rank, so all
    continue from the same epoch even without a shared filesystem."""
    state, error = None, None
    if d.main:
        try:
            state = load(path, expected)
        except CnnpipeError as e:
            error = str(e)
    if d.world > 1:
        box = [state, error]
        dist.broadcast_object_list(box, src=0)
        state, error = box
    if error:
        raise CnnpipeError(error)
    return state
