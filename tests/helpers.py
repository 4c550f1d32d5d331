"""Tiny generated datasets in the real raw formats, for tests (no downloads)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np

from cnnpipe.formats import CIFAR_TEST, CIFAR_TRAIN, write_idx

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def make_images(n: int, num_classes: int, shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: class c lights a bright block whose position depends on c, plus noise."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    y = np.arange(n) % num_classes
    rng.shuffle(y)
    x = rng.integers(0, 60, size=(n, c, h, w)).astype(np.uint8)
    bh, bw = h // 4, w // 4
    for i, label in enumerate(y):
        r, col = divmod(int(label), 4)
        x[i, :, r * bh: (r + 1) * bh, col * bw: (col + 1) * bw] = 220
    return x, y.astype(np.uint8)


def write_mnist_mirror(directory: Path, n_train: int = 400, n_test: int = 100, seed: int = 0) -> dict[str, str]:
    """Write the four MNIST-format files; returns their MD5s (for download.md5)."""
    directory.mkdir(parents=True, exist_ok=True)
    train_x, train_y = make_images(n_train, 10, (1, 28, 28), seed)
    test_x, test_y = make_images(n_test, 10, (1, 28, 28), seed + 1)
    for name, arr in zip(IDX_FILES, (train_x[:, 0], train_y, test_x[:, 0], test_y), strict=True):
        write_idx(directory / name, arr)
    return {name: md5_of(directory / name) for name in IDX_FILES}


def write_cifar_archive(path: Path, per_batch: int = 20, seed: int = 0) -> str:
    """A cifar-10-binary.tar.gz with tiny batches; returns its MD5."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate(CIFAR_TRAIN + CIFAR_TEST):
            x, y = make_images(per_batch, 10, (3, 32, 32), seed + i)
            data = np.concatenate([y[:, None], x.reshape(per_batch, -1)], axis=1).astype(np.uint8).tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return md5_of(path)


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()
