"""The head's channels-last gradient, on and off, side by side: rescnn training steps on the CPU in fp32 and bf16
(the probe `precision: auto` times) with the gradient of the flatten handed back channels-last (what training
does) against as flatten returns it (N×C×H×W), interleaved in one process so machine noise hits both alike.
Records the median step time of each and the profiler's self time per step of the backward kernels the mixed
layout slows (GELU, batch norm).

    .venv/bin/python scripts/bench_head_grad.py --out bench/head_grad_<cpu kind>.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from cnnpipe.bench.machine import train_machine  # noqa: E402
from cnnpipe.core import cpuprecision, models  # noqa: E402

KERNELS = ("aten::gelu_backward", "aten::native_batch_norm_backward")
KEEP = models._to_channels_last
SHAPE = (1, 28, 28)


def set_hook(on: bool) -> None:
    """on: the gradient comes back channels-last (training's behaviour); off: as flatten returns it."""
    models._to_channels_last = KEEP if on else (lambda grad: grad)


def kernel_ms(net: torch.nn.Module, amp: torch.dtype | None, batch: int, steps: int) -> dict[str, float]:
    """The profiler's self time per step of KERNELS over `steps` of the probe's training step."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        cpuprecision.probe(net, SHAPE, batch, amp, steps=steps, warmup=0)
    totals = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    return {k: round(totals.get(k, 0.0) / steps / 1000, 3) for k in KERNELS}


def compare(amp: torch.dtype | None, batch: int, rounds: int, steps: int) -> dict:
    """The probe that `precision: auto` runs (cnnpipe.core.cpuprecision), timed with the hook on and off in turn."""
    torch.manual_seed(0)
    net = models.build_model("rescnn", SHAPE, 10).to(memory_format=torch.channels_last)
    step_ms: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for on in (True, False):
            set_hook(on)
            step_ms[on].append(batch / cpuprecision.probe(net, SHAPE, batch, amp, steps=steps, warmup=3) * 1000)
    kernels = {}
    for on in (True, False):
        set_hook(on)
        kernels[on] = kernel_ms(net, amp, batch, steps)
    set_hook(True)
    on, off = statistics.median(step_ms[True]), statistics.median(step_ms[False])
    return {"precision": str(amp or torch.float32).removeprefix("torch."),
            "step_ms_median": {"channels_last_grad": round(on, 2), "as_flatten_returns": round(off, 2)},
            "speedup": round(off / on, 3), "kernel_self_ms_per_step": {"channels_last_grad": kernels[True],
                                                                       "as_flatten_returns": kernels[False]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the bench file to write (JSON)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds per precision")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
    args = ap.parse_args()
    result = {"command": f"scripts/bench_head_grad.py --out {args.out}", "model": "rescnn", "batch": args.batch,
              "rounds": args.rounds, "steps_per_round": args.steps, "threads": torch.get_num_threads(),
              "machine": train_machine(torch.device("cpu")),
              "runs": [compare(amp, args.batch, args.rounds, args.steps) for amp in (None, torch.bfloat16)]}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in result["runs"]:
        print(r["precision"], r["step_ms_median"], f"{r['speedup']}×", r["kernel_self_ms_per_step"])


if __name__ == "__main__":
    main()
