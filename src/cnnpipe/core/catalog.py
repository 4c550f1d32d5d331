"""Built-in datasets: their files, published checksums, official URLs, classes and image shape."""

from __future__ import annotations

from dataclasses import dataclass

from cnnpipe.core.errors import CnnpipeError


@dataclass(frozen=True)
class RemoteFile:
    name: str
    md5: str  # of the file as published by the dataset's authors (and checked by torchvision)
    # MD5 of the decompressed content: re-compressed mirrors (Debian's dataset-fashion-mnist
    # package) hold the same bytes under a different gzip wrapper, so their file MD5 differs.
    content_md5: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    format: str  # "idx" (MNIST family) or "cifar-binary"
    urls: tuple[str, ...]  # official base URLs, tried in order
    files: tuple[RemoteFile, ...]
    classes: tuple[str, ...]
    shape: tuple[int, int, int]  # C, H, W
    flip: bool  # is a horizontal flip label-preserving?


_IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _idx_files(md5s: tuple[str, ...], content_md5s: tuple[str, ...]) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(n, m, c) for n, m, c in zip(_IDX_NAMES, md5s, content_md5s, strict=True))

DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        format="idx",
        urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files=_idx_files(
            ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
             "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
            ("f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9",
             "8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965"),
        ),
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        shape=(1, 28, 28),
        flip=True,
    ),
    "mnist": DatasetSpec(
        name="mnist",
        format="idx",
        urls=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        files=_idx_files(
            ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
             "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
            ("6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624",
             "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637"),
        ),
        classes=tuple(str(d) for d in range(10)),
        shape=(1, 28, 28),
        flip=False,
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        format="cifar-binary",
        urls=("https://www.cs.toronto.edu/~kriz/",),
        files=(RemoteFile("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"),),
        classes=("airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"),
        shape=(3, 32, 32),
        flip=True,
    ),
}


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise CnnpipeError(
            f"unknown dataset '{name}'; set download.dataset to one of: {', '.join(DATASETS)}"
        )
    return DATASETS[name]
