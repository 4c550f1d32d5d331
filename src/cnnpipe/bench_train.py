"""`cnnpipe bench train`: training throughput of the seed 000 loop and of our engine, side by side.

(a) the seed loop: a Dataset that converts each image with PIL + ToTensor + Normalize in Python, a
    DataLoader (batch 100, shuffled), LeNet, Adam; (b) our engine's hot path: the same model and batch size on
    uint8 data resident on the device, normalized there per batch, channels_last. Both run the same number of
    optimizer steps on the prepared Fashion-MNIST train split, interleaved `repeats` times; medians and the
    ratio are reported. Prints a table and writes JSON.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cnnpipe.data import load_meta, load_split, normalize, stats_tensors, to_device
from cnnpipe.fsutil import write_json
from cnnpipe.models import build_model


class SeedDataset(torch.utils.data.Dataset):
    """What torchvision's MNIST dataset does per sample: PIL image, then the seed's transforms."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        from torchvision import transforms

        self.x, self.y = x, y
        self.transform = transforms.Compose([transforms.Resize((28, 28)), transforms.ToTensor(),
                                             transforms.Normalize((0.5,), (0.5,))])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i, 0], mode="L")), int(self.y[i])


def seed_loop(x: np.ndarray, y: np.ndarray, steps: int, batch: int, seed: int) -> float:
    """Images/s of the seed 000 training loop over `steps` batches (after 5 warm-up batches)."""
    torch.manual_seed(seed)
    model = build_model("lenet", (1, 28, 28), 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    loader = torch.utils.data.DataLoader(SeedDataset(x, y), batch_size=batch, shuffle=True)
    it = iter(loader)
    t0 = None
    for step in range(steps + 5):
        if step == 5:
            t0 = time.perf_counter()
        inputs, labels = next(it)
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - t0)


def engine_loop(x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, steps: int, batch: int,
                seed: int) -> float:
    """Images/s of our hot path: device-resident uint8 data, per-batch normalize, channels_last."""
    torch.manual_seed(seed)
    model = build_model("lenet", (1, 28, 28), 10).to(x.device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    g = torch.Generator(device=x.device).manual_seed(seed)
    perm = torch.randperm(len(x), generator=g, device=x.device)
    t0 = None
    for step in range(steps + 5):
        if step == 5:
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        idx = perm[(step * batch) % (len(x) - batch):][:batch]
        xb = normalize(x[idx], mean, std).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(xb), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def bench_train(prepared: Path, out: Path, steps: int, repeats: int, batch: int, device: str) -> dict:
    from cnnpipe.runtime import resolve_device

    dev = resolve_device(device)
    meta = load_meta(prepared)
    x_np, y_np = load_split(prepared, "train")
    x, y = to_device(x_np, y_np, dev)
    mean, std = stats_tensors(meta, dev)
    seed_rates, engine_rates = [], []
    for r in range(repeats):  # interleaved: machine noise hits both alike
        seed_rates.append(seed_loop(x_np, y_np, steps, batch, r))
        engine_rates.append(engine_loop(x, y, mean, std, steps, batch, r))
    result = {
        "model": "lenet", "batch": batch, "steps": steps, "repeats": repeats, "device": str(dev),
        "threads": torch.get_num_threads(),
        "seed_loop_images_per_s": [round(v, 1) for v in seed_rates],
        "engine_images_per_s": [round(v, 1) for v in engine_rates],
        "seed_loop_median": round(statistics.median(seed_rates), 1),
        "engine_median": round(statistics.median(engine_rates), 1),
    }
    result["ratio_of_medians"] = round(result["engine_median"] / result["seed_loop_median"], 2)
    write_json(out, result)
    print(f"{'loop':<34}{'images/s (median)':>20}   each run")
    print(f"{'seed 000 (DataLoader + transforms)':<34}{result['seed_loop_median']:>20.1f}   "
          f"{result['seed_loop_images_per_s']}")
    print(f"{'cnnpipe engine (device-resident)':<34}{result['engine_median']:>20.1f}   {result['engine_images_per_s']}")
    print(f"ratio: {result['ratio_of_medians']}x")
    return result
