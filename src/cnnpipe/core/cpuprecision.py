"""`train.precision: auto` on the CPU: bf16 autocast where the processor computes bf16 natively (AMX-BF16 or
AVX512-BF16) and a few timed training steps in each precision confirm it is faster; fp32 elsewhere, where
autocast emulates bf16 and trains several times slower. The choice and the probe's figures go to the run's
provenance (metrics/train.info.json).

A probe is timing, and timing is noisy: two runs of the same config could choose differently and so train
differently. The decision is therefore remembered per machine and config (processor, torch, model, input shape,
batch size, threads) in `$CNNPIPE_CACHE_DIR/cpu-precision.json` (default `~/.cache/cnnpipe`): the first run
probes, the runs after it train the same way, and a resumed run continues in the precision it started in
(where that file can be written; where it cannot, each run probes anew). Delete the file to probe again."""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnpipe.core.cpuinfo import cpu_model
from cnnpipe.core.fsutil import atomic_path

log = logging.getLogger(__name__)

NATIVE_BF16 = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs that compute bf16 in hardware
MIN_GAIN = 1.1  # bf16 must train at least this much faster than fp32 in the probe


def native_bf16(flags: frozenset[str]) -> bool:
    return any(f in flags for f in NATIVE_BF16)


def probe(model: nn.Module, shape: tuple[int, ...], batch_size: int, dtype: torch.dtype | None,
          steps: int = 6, warmup: int = 2) -> float:
    """Training images/s of a copy of `model` on random data, in autocast `dtype` (None: fp32). The caller's
    model, optimizer state and random streams are untouched."""
    net = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *shape, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch_size,), generator=gen)
    with torch.random.fork_rng(devices=[]):
        for i in range(warmup + steps):
            if i == warmup:
                t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return steps * batch_size / (time.perf_counter() - t0)


def decisions_file() -> Path | None:
    """Where auto's decisions are remembered: $CNNPIPE_CACHE_DIR, else $XDG_CACHE_HOME/cnnpipe, else
    ~/.cache/cnnpipe; None where no home folder can be found (nothing is remembered then)."""
    base = os.environ.get("CNNPIPE_CACHE_DIR")
    if not base:
        try:
            base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnpipe"
        except RuntimeError:  # no HOME and no passwd entry (a container run as an arbitrary uid)
            return None
    return Path(base) / "cpu-precision.json"


def probe_key(model: str, shape: tuple[int, ...], batch_size: int, threads: int, flags: frozenset[str]) -> str:
    """What a probe's outcome depends on: this processor and torch build, the model, its input and batch, and
    the threads it may use (train.threads, or the cores in its affinity: not the share of the moment, which
    moves with the jobs beside it)."""
    return json.dumps([cpu_model(), sorted(f for f in flags if f in NATIVE_BF16), torch.__version__, model,
                       list(shape), batch_size, threads])


def _read_decisions(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or damaged: probe again and rewrite it
        return {}
    return data if isinstance(data, dict) else {}


def _figures(entry: Any) -> dict[str, float] | None:
    if isinstance(entry, dict) and all(isinstance(entry.get(k), int | float) for k in ("fp32", "bf16")):
        return {"fp32": float(entry["fp32"]), "bf16": float(entry["bf16"])}
    return None


def recalled(path: Path | None, key: str) -> dict[str, float] | None:
    """The probe figures saved for `key`, if any."""
    return _figures(_read_decisions(path).get(key)) if path is not None else None


def remember(path: Path, key: str, figures: dict[str, float]) -> dict[str, float]:
    """Save a probe's figures under `key` unless another process saved that key first (under a lock, so
    parallel runs keep each other's keys); returns the figures that stand. A file that cannot be written is
    only logged: the run goes on with its own probe."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = _read_decisions(path)
            first = _figures(data.get(key))
            if first is not None:
                return first
            data[key] = figures
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(data, indent=1) + "\n")
    except OSError as e:
        log.warning("precision auto: could not remember the probe in %s (%s)", path, e)
    return figures


def choose(name: str, flags: frozenset[str], speed: Callable[[torch.dtype | None], float],
           key: Callable[[], str] | None = None, path: Callable[[], Path | None] | None = None
           ) -> tuple[torch.dtype | None, dict[str, Any]]:
    """The CPU autocast dtype for train.precision `name` (auto, fp32 or bf16) and what decided it. Where auto
    probes, `path()` names the file its figures are remembered in under `key()` (asked only then)."""
    native = native_bf16(flags)
    if name == "fp32":
        return None, {"asked": name}
    if name == "bf16":
        if not native:
            log.warning("train.precision bf16 on a CPU without native bf16 (no %s flag): autocast emulates it and "
                        "trains several times slower than fp32; use precision auto or fp32", " or ".join(NATIVE_BF16))
        return torch.bfloat16, {"asked": name, "native_bf16": native}
    if not native:
        return None, {"asked": name, "native_bf16": False, "chose": "fp32",
                      "why": f"no native bf16 ({' or '.join(NATIVE_BF16)} absent from the CPU flags)"}
    where, what = (path() if path else None), (key() if key else "")
    figures = recalled(where, what)
    source = "remembered" if figures else "measured"
    if figures is None:
        figures = {"fp32": round(speed(None), 1), "bf16": round(speed(torch.bfloat16), 1)}
        if where is not None:
            figures = remember(where, what, figures)
    fp32, bf16 = figures["fp32"], figures["bf16"]
    chose_bf16 = bf16 >= MIN_GAIN * fp32
    decision = {"asked": name, "native_bf16": True, "chose": "bf16" if chose_bf16 else "fp32",
                "probe_images_per_s": {"fp32": round(fp32, 1), "bf16": round(bf16, 1)},
                "probe": source}
    log.info("precision auto: bf16 probe %.0f images/s, fp32 %.0f (%s): training in %s", bf16, fp32, source,
             decision["chose"])
    return (torch.bfloat16 if chose_bf16 else None), decision
