"""`cnnpipe bench train`: the tutorial 000 training loop and our engine side by side, and time to accuracy.

(a) the tutorial loop, as tutorial 000 writes it: torchvision's MNIST dataset class over our train split, converting
    each image with PIL + Resize + ToTensor + Normalize in Python, a shuffled DataLoader (batch 100), its LeNet
    module (ReLU then pool), Adam at 1e-5, and its per-batch loss/accuracy bookkeeping, on the same device;
(b) our engine (cnnpipe.stages.train's own epoch loop, `train_epoch`): the same architecture, optimizer and batch
    size on uint8 data resident on the device. A third row runs our engine's data path on the tutorial's LeNet module as
    it is (NCHW), to show what our LeNet (pool before ReLU, the same function; channels_last) adds.
    All run the same number of optimizer steps on the prepared train split, interleaved `repeats` times;
    medians and ratios are reported;
(c) time to accuracy: the train stage's own `train()` on a config (params.yaml's train section, with
    overrides), scoring the test set after every epoch as the evaluate stage does; that scoring is not
    counted as training time;
(d) with --synthetic-cifar instead: the config's training throughput on random CIFAR-shaped data, beside
    airbench94's A100 figure;
(e) on the CPU: the engine's FLOP rate (FlopCounterMode's count of a training image × images/s) as a fraction
    of the matmul peak of the precision it ran in, fp32 and bf16 peaks both measured in the same run.
    Prints tables and writes JSON.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnpipe.bench.machine import command_line, train_machine
from cnnpipe.core.data import stats_tensors, to_device
from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.formats import write_idx
from cnnpipe.core.fsutil import write_json
from cnnpipe.core.params import TrainParams
from cnnpipe.core.prepared import Meta, load_meta, load_split, write_meta
from cnnpipe.core.runtime import Dist, resolve_device


def tutorial_dataset(x: np.ndarray, y: np.ndarray, root: Path):
    """Tutorial 000's dataset: torchvision's own MNIST class and the tutorial's transforms, over our train split
    (written as the uncompressed IDX files the class reads; it needs a t10k pair too, so a 1-image one)."""
    from torchvision import datasets, transforms

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, (images, labels) in {"train": (x[:, 0], y), "t10k": (x[:1, 0], y[:1])}.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, compress=False)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, compress=False)
    transform1 = transforms.Compose([transforms.Resize((28, 28)), transforms.ToTensor(),
                                     transforms.Normalize((0.5,), (0.5,))])
    return datasets.MNIST(root=str(root), train=True, download=False, transform=transform1)


class TutorialLeNet(nn.Module):
    """Tutorial 000's LeNet module, as written there."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fully1 = nn.Linear(4 * 4 * 50, 500)
        self.fully2 = nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        x = x.view(-1, 4 * 4 * 50)
        return self.fully2(F.relu(self.fully1(x)))


def tutorial_loop(training_dataset, steps: int, batch: int, seed: int, device: torch.device) -> float:
    """Images/s of tutorial 000's training loop, its per-batch bookkeeping included, over `steps` batches
    (after 5 warm-up batches)."""
    torch.manual_seed(seed)
    model = TutorialLeNet().to(device)
    criteron = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.00001)
    training_loader = torch.utils.data.DataLoader(dataset=training_dataset, batch_size=batch, shuffle=True)
    loss, correct, t0 = 0.0, 0.0, time.perf_counter()
    for step, (inputs, labels) in enumerate(training_loader):
        if step == 5:
            t0 = time.perf_counter()
        elif step == steps + 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            break
        inputs = inputs.to(device)
        labels = labels.to(device)
        outputs = model(inputs)
        loss1 = criteron(outputs, labels)
        optimizer.zero_grad()
        loss1.backward()
        optimizer.step()
        _, preds = torch.max(outputs, 1)
        loss += loss1.item()
        correct += torch.sum(preds == labels.data)
    return steps * batch / (time.perf_counter() - t0)


def engine_loop(x: torch.Tensor, y: torch.Tensor, meta, steps: int, batch: int, seed: int,
                tutorial_module: bool = False) -> float:
    """Images/s of cnnpipe.stages.train's own epoch loop (train_epoch: batches, steps and its loss/accuracy
    bookkeeping) with the tutorial's model, optimizer, lr and batch size, no augmentation (the tutorial has none),
    over `steps` batches after a 5-batch warm-up epoch."""
    from cnnpipe.stages.train import build_engine, make_optimizer, make_schedule, train_epoch

    torch.manual_seed(seed)
    p = TrainParams(model="lenet", batch_size=batch, optimizer="adam", lr=1e-5, weight_decay=0.0, norm_lr=1.0,
                    schedule="constant", translate=0, flip=False, epochs=1)
    engine = build_engine(p, meta, steps, x.device, Dist())
    if tutorial_module:
        engine.net = engine.model = TutorialLeNet().to(x.device)  # its view() needs contiguous (NCHW) tensors
        engine.channels_last = False
        engine.optimizer = make_optimizer(engine.net, p)
        engine.scheduler = make_schedule(engine.optimizer, p, steps)
    mean, std = stats_tensors(meta, x.device)
    g = torch.Generator(device=x.device).manual_seed(seed)
    train_epoch(engine, x[:5 * batch], y[:5 * batch], mean, std, False, g, None)  # ends in .item(): synced
    t0 = time.perf_counter()
    train_epoch(engine, x[:steps * batch], y[:steps * batch], mean, std, False, g, None)
    return steps * batch / (time.perf_counter() - t0)


def throughput(prepared: Path, steps: int, repeats: int, batch: int, device: torch.device) -> dict:
    """Parts (a) and (b)."""
    meta = load_meta(prepared)
    if tuple(meta.shape) != (1, 28, 28):
        raise CnnpipeError(f"the tutorial's loop (--steps) takes 1×28×28 images and {prepared} holds "
                           f"{'×'.join(map(str, meta.shape))} ones; pass --steps 0 to time the training runs alone")
    x_np, y_np = load_split(prepared, "train")
    if (steps + 5) * batch > len(y_np):
        raise CnnpipeError(f"--steps {steps} at --batch {batch} needs {(steps + 5) * batch} training images "
                           f"(5 warm-up batches included) and the split has {len(y_np)}; lower --steps")
    x, y = to_device(x_np, y_np, device)
    rates: dict[str, list[float]] = {"tutorial_loop": [], "engine": [], "engine_tutorial_module": []}
    with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-") as tmp:
        dataset = tutorial_dataset(x_np, y_np, Path(tmp))
        for r in range(repeats):  # interleaved: machine noise hits all alike
            rates["tutorial_loop"].append(tutorial_loop(dataset, steps, batch, r, device))
            rates["engine"].append(engine_loop(x, y, meta, steps, batch, r))
            rates["engine_tutorial_module"].append(engine_loop(x, y, meta, steps, batch, r, tutorial_module=True))
    result = {"model": "lenet", "batch": batch, "steps": steps, "repeats": repeats, "device": str(device),
              "threads": torch.get_num_threads()}
    for name, values in rates.items():
        result[f"{name}_images_per_s"] = [round(v, 1) for v in values]
        result[f"{name}_median"] = round(statistics.median(values), 1)
    result["ratio_of_medians"] = round(result["engine_median"] / result["tutorial_loop_median"], 2)
    result["ratio_tutorial_module"] = round(result["engine_tutorial_module_median"] / result["tutorial_loop_median"], 2)
    return result


def time_to_accuracy(prepared: Path, p: TrainParams, tta_flip: bool, targets: list[float]) -> dict:
    """Part (c): train with `p`, score the test set after each epoch; the training seconds at which each
    target test accuracy was first reached."""
    from cnnpipe.core.inference import tta_logits
    from cnnpipe.stages.evaluate import use_flip_tta
    from cnnpipe.stages.train import train

    device = resolve_device(p.device)
    meta = load_meta(prepared)
    tx, ty = to_device(*load_split(prepared, "test"), device)
    mean, std = stats_tensors(meta, device)
    tta = use_flip_tta(tta_flip, meta.flip, p.flip)  # as the evaluate stage scores the model
    rows: list[dict] = []

    def score(row: dict, model: nn.Module) -> None:
        acc = (tta_logits(model, tx, mean, std, 1000, tta).argmax(1) == ty).float().mean().item()
        rows.append({"epoch": row["epoch"], "train_seconds": row["train_seconds"], "val_acc": row["val_acc"],
                     "test_acc": round(acc, 5)})
        print(f"  epoch {row['epoch']:>3}  {row['train_seconds']:>8.1f} s  val {row['val_acc']:.4f}  test {acc:.4f}",
              flush=True)

    with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-") as tmp:
        metrics = train(p, prepared, Path(tmp) / "model.pt", Path(tmp) / "train.json", Path(tmp) / "history.csv",
                        on_epoch=score)
    reached = {f"{t:.2f}": next((r["train_seconds"] for r in rows if r["test_acc"] >= t), None) for t in targets}
    return {"train_params": dataclasses.asdict(p), "train_images": (meta.sizes or {}).get("train"),
            "tta_flip": tta, "device": metrics["device"],
            "precision": metrics["precision"], "epochs": rows, "seconds_to_test_acc": reached,
            "final_test_acc": rows[-1]["test_acc"], "train_seconds": rows[-1]["train_seconds"],
            "images_per_second": metrics["images_per_second"]}


# images/s: 9.9 epochs of CIFAR-10 in 3.83 s on one A100 (airbench94.py in KellerJordan/cifar10-airbench's README)
AIRBENCH94_A100 = 50_000 * 9.9 / 3.83


def synthetic_throughput(p: TrainParams, n: int = 50_000, shape: tuple[int, int, int] = (3, 32, 32)) -> dict:
    """Part (d): training throughput of the config on CIFAR-shaped random data (no registry here ships
    CIFAR-10), through the train stage's own `train()`. Steady state = the median epoch after the first
    (which carries cudnn autotuning and any torch.compile); each epoch also scores 1,000 validation images."""
    from cnnpipe.stages.train import train

    rng = np.random.default_rng(0)
    seconds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-") as tmp:
        d = Path(tmp)
        for split, size in (("train", n), ("val", 1000)):
            np.save(d / f"{split}_x.npy", rng.integers(0, 256, (size, *shape), dtype=np.uint8))
            np.save(d / f"{split}_y.npy", rng.integers(0, 10, size, dtype=np.uint8))
        write_meta(d, Meta("synthetic-cifar10-shape", [str(i) for i in range(10)], shape, [0.5] * shape[0],
                           [0.25] * shape[0], flip=True))
        metrics = train(p, d, d / "model.pt", d / "train.json", d / "history.csv",
                        on_epoch=lambda row, model: seconds.append(row["seconds"]))
    per_epoch = n // p.batch_size * p.batch_size
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    return {"data": f"random uint8, {n} x {'x'.join(map(str, shape))}", "train_params": dataclasses.asdict(p),
            "device": metrics["device"], "precision": metrics["precision"], "epoch_seconds": seconds,
            "total_seconds": metrics["sec"], "steady_images_per_second": round(per_epoch / steady, 1),
            "airbench94_a100_images_per_second": round(AIRBENCH94_A100, 1),
            "ratio_to_airbench94_a100": float(f"{per_epoch / steady / AIRBENCH94_A100:.3g}")}


def train_flops_per_image(model: nn.Module, shape: tuple[int, ...], batch: int = 32) -> float:
    """FLOPs of one training image through `model`: forward and backward, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def matmul_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 20) -> float:
    """GFLOP/s of an n×n matmul in `dtype` on the CPU, the fastest of `repeats`: the peak this precision reaches
    (a median of a few millisecond-long runs reads a busy spell of a shared host as the peak)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def matmul_peaks() -> dict[str, float]:
    return {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}


def against_peak(model_name: str, shape: tuple[int, int, int], classes: int, images_per_s: float,
                 precision: str, peaks: dict[str, float] | None = None) -> dict:
    """Part (e): the engine's FLOP rate as a fraction of the matmul peak of the precision it trained in, both
    peaks measured here (fp32 and bf16; `peaks` when one run compares several), so a bf16 run is not flattered
    by the fp32 peak. Without native bf16 (AVX2), torch's bf16 matmul is a slow fallback rather than a peak."""
    from cnnpipe.core.cpuinfo import cpu_flags
    from cnnpipe.core.cpuprecision import native_bf16
    from cnnpipe.core.models import build_model

    model = build_model(model_name, shape, classes).to(memory_format=torch.channels_last)
    flops = train_flops_per_image(model, shape)
    peaks = peaks or matmul_peaks()
    engine = flops * images_per_s / 1e9
    return {"model": model_name, "train_gflop_per_image": round(flops / 1e9, 6), "images_per_second": images_per_s,
            "engine_gflops": round(engine, 2), "precision": precision,
            "matmul_peak_gflops": {k: round(v, 1) for k, v in peaks.items()},
            "fraction_of_peak": round(engine / peaks[precision], 3),
            "native_bf16": native_bf16(cpu_flags())}


def print_report(result: dict) -> None:
    t = result.get("throughput")
    if t:
        print(f"{'(a)/(b) loop, LeNet, batch ' + str(t['batch']):<44}{'images/s (median)':>18}   each run")
        for key, label in [("tutorial_loop", "tutorial 000 (DataLoader + transforms)"),
                           ("engine", "cnnpipe engine"),
                           ("engine_tutorial_module", "cnnpipe engine, tutorial's LeNet module")]:
            print(f"{label:<44}{t[key + '_median']:>18.1f}   {t[key + '_images_per_s']}")
        print(f"ratio engine / tutorial loop: {t['ratio_of_medians']}x "
              f"(with the tutorial's LeNet module: {t['ratio_tutorial_module']}x)")
    a = result.get("accuracy")
    if a:
        print(f"(c) time to test accuracy, {a['train_params']['model']}, {a['train_params']['epochs']} epochs on "
              f"{a['device']} ({a['precision']}), tta_flip={a['tta_flip']}:")
        for target, seconds in a["seconds_to_test_acc"].items():
            print(f"  >= {target}: " + (f"{seconds:.1f} s of training" if seconds is not None else "not reached"))
        print(f"  final test accuracy {a['final_test_acc']:.4f} after {a['train_seconds']:.1f} s")
    for row in result.get("summary", []):
        reached = ", ".join(f">= {t}: " + (f"{v['median_seconds']:.1f} s ({v['seeds_reached']} of "
                                            f"{len(row['seeds'])} seeds)" if v["median_seconds"] is not None
                                            else "not reached") for t, v in row["to_test_acc"].items())
        print(f"(c) {row['precision_asked']} ({row['precision']}), seeds {row['seeds']}: final test accuracy "
              f"{', '.join(f'{a:.4f}' for a in row['final_test_acc'])}; mean {row['mean_test_acc']:.4f}, lowest "
              f"{row['min_test_acc']:.4f}, spread {row['spread_test_acc']:.4f}; "
              f"{row['images_per_second_median']:.0f} images/s; {reached}"
              + (f" (the same runs as {row['same_runs_as']})" if row.get("same_runs_as") else ""))
    for e in result.get("peak", []):
        m = e["matmul_peak_gflops"]
        print(f"(e) {e['model']} at {e['images_per_second']:.0f} images/s in {e['precision']}: "
              f"{e['engine_gflops']:.1f} GFLOP/s, {100 * e['fraction_of_peak']:.1f} % of the {e['precision']} "
              f"matmul peak ({m[e['precision']]:.0f} GFLOP/s; float32 {m['float32']:.0f}, "
              f"bfloat16 {m['bfloat16']:.0f})")
    s = result.get("synthetic")
    if s:
        print(f"(d) {s['train_params']['model']} on {s['data']} ({s['device']}, {s['precision']}): "
              f"{s['steady_images_per_second']:.0f} images/s steady, {s['total_seconds']:.1f} s in all; "
              f"airbench94 on an A100: {s['airbench94_a100_images_per_second']:.0f} images/s "
              f"(ratio {s['ratio_to_airbench94_a100']})")


def bench_synthetic(p: TrainParams, images: int, out: Path) -> dict:
    """(d) alone: writes and prints the synthetic CIFAR-shaped throughput."""
    result = {"command": command_line(), "synthetic": synthetic_throughput(p, images),
              "machine": train_machine(resolve_device(p.device))}
    write_json(out, result)
    print_report(result)
    return result


def subset_train(prepared: Path, n: int, out: Path) -> Path:
    """A prepared folder in `out` whose train split is n images drawn (seed 0) from `prepared`'s; val and test
    as they are. For quick comparisons, e.g. bf16 where it is emulated and slow."""
    import shutil

    meta = load_meta(prepared)
    x, y = load_split(prepared, "train", mmap=True)
    if not 0 < n <= len(y):
        raise CnnpipeError(f"--train-size {n}: the train split holds {len(y)} images; use 1 to {len(y)}")
    keep = np.sort(np.random.default_rng(0).permutation(len(y))[:n])
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "train_x.npy", np.asarray(x[keep]))
    np.save(out / "train_y.npy", y[keep])
    for name in ("val_x.npy", "val_y.npy", "test_x.npy", "test_y.npy"):
        shutil.copy(prepared / name, out / name)
    write_meta(out, dataclasses.replace(meta, sizes=dict(meta.sizes or {}, train=n)))
    return out


def summarize(precision: str, runs: list[dict], targets: list[float]) -> dict:
    """One precision's runs over seeds: final test accuracy (mean, spread, lowest), median images/s, and the
    median seconds to each target over the seeds that reached it."""
    accs = [r["final_test_acc"] for r in runs]
    reached = {}
    for t in (f"{t:.2f}" for t in targets):
        seconds = [r["seconds_to_test_acc"][t] for r in runs if r["seconds_to_test_acc"][t] is not None]
        reached[t] = {"median_seconds": round(statistics.median(seconds), 1) if seconds else None,
                      "seeds_reached": len(seconds)}
    chosen = sorted({r["precision"] for r in runs})  # auto may choose per run (a timing probe decides)
    devices = sorted({r["device"] for r in runs})
    return {"precision_asked": precision, "precision": chosen[0] if len(chosen) == 1 else "+".join(chosen),
            "device": devices[0] if len(devices) == 1 else "+".join(devices),
            "seeds": [r["train_params"]["seed"] for r in runs], "final_test_acc": accs,
            "mean_test_acc": round(statistics.mean(accs), 5), "min_test_acc": min(accs),
            "spread_test_acc": round(max(accs) - min(accs), 5),
            "images_per_second_median": round(statistics.median(r["images_per_second"] for r in runs), 1),
            "train_seconds_median": round(statistics.median(r["train_seconds"] for r in runs), 1),
            "to_test_acc": reached}


def seeds_and_precisions(prepared: Path, p: TrainParams, tta_flip: bool, targets: list[float], seeds: int,
                         precisions: list[str]) -> tuple[list[dict], list[dict]]:
    """Part (c) for each precision over seeds p.seed, p.seed + 1, ...: (every run, a summary per precision).
    Interleaved (each seed in every precision before the next seed), so a machine that slows down during the
    run slows every precision alike. A forced fp32 beside an `auto` that chose fp32 for the seed reuses auto's
    run: it is the same training."""
    runs: list[dict] = []
    mine: dict[str, list[dict]] = {q: [] for q in precisions}
    reused = 0  # fp32 runs that are auto's
    for seed in range(p.seed, p.seed + seeds):
        for precision in precisions:
            auto = mine.get("auto", [])
            if precision == "fp32" and len(auto) > len(mine["fp32"]) and auto[-1]["precision"] == "float32":
                mine["fp32"].append(auto[-1])
                reused += 1
                continue
            print(f"(c) precision {precision}, seed {seed}:", flush=True)
            run = time_to_accuracy(prepared, dataclasses.replace(p, seed=seed, precision=precision), tta_flip,
                                   targets)
            mine[precision].append(run)
            runs.append(run)
    summaries = [summarize(q, mine[q], targets) for q in precisions]
    return runs, [dict(s, same_runs_as="auto") if s["precision_asked"] == "fp32" and reused == seeds else s
                  for s in summaries]


def bench_train(prepared: Path, out: Path, steps: int, repeats: int, batch: int, device: str,
                accuracy: TrainParams | None, tta_flip: bool, targets: list[float], seeds: int = 1,
                precisions: list[str] | None = None, train_size: int = 0) -> dict:
    """(a) and (b) when steps and repeats are positive, then (c) when `accuracy` is a config: one run, or with
    `seeds` > 1 or several `precisions`, every precision over every seed and a summary of each; (c) on
    `train_size` images of the train split when it is positive."""
    with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-") as tmp:
        subset = subset_train(prepared, train_size, Path(tmp)) if train_size and accuracy else prepared
        return _bench_train(prepared, subset, out, steps, repeats, batch, device, accuracy, tta_flip, targets,
                            seeds, list(dict.fromkeys(precisions or [])), train_size)


def _bench_train(prepared: Path, subset: Path, out: Path, steps: int, repeats: int, batch: int, device: str,
                 accuracy: TrainParams | None, tta_flip: bool, targets: list[float], seeds: int,
                 precisions: list[str], train_size: int) -> dict:
    result: dict = {"train_size": train_size} if train_size and accuracy else {}
    result["command"] = command_line()
    result["machine"] = train_machine(resolve_device(accuracy.device if accuracy is not None else device))
    if steps > 0 and repeats > 0:
        result["throughput"] = throughput(prepared, steps, repeats, batch, resolve_device(device))
        write_json(out, result)
        print_report(result)
    if accuracy is not None and seeds == 1 and not precisions:
        result["accuracy"] = time_to_accuracy(subset, accuracy, tta_flip, targets)
        write_json(out, result)
        print_report({"accuracy": result["accuracy"]})
    elif accuracy is not None:
        runs, result["summary"] = seeds_and_precisions(subset, accuracy, tta_flip, targets, seeds,
                                                       precisions or [accuracy.precision])
        result["accuracy"], result["runs"] = runs[0], runs
        write_json(out, result)
        print_report({"summary": result["summary"]})
    # (e) for what ran on the CPU, each in one precision (auto may choose per seed: no one peak for such a row)
    throughput_on_cpu = "throughput" in result and resolve_device(device).type == "cpu"
    cpu_rows = [a for a in result.get("summary") or ([result["accuracy"]] if "accuracy" in result else [])
                if a.get("device") == "cpu" and a["precision"] in ("float32", "bfloat16")]
    if throughput_on_cpu or cpu_rows:
        meta = load_meta(prepared)
        result["peak"] = []
        peaks = matmul_peaks()  # once: every row of this run against the same peaks
        if throughput_on_cpu:
            result["peak"].append(against_peak("lenet", tuple(meta.shape), len(meta.classes),
                                               result["throughput"]["engine_median"], "float32", peaks))
        for a in cpu_rows:
            speed = a.get("images_per_second_median", a.get("images_per_second"))
            model = a["train_params"]["model"] if "train_params" in a else accuracy.model
            result["peak"].append(against_peak(model, tuple(meta.shape), len(meta.classes), speed, a["precision"],
                                               peaks))
        write_json(out, result)
        print_report({"peak": result["peak"]})
    return result
