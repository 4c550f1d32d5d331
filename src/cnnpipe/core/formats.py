"""Parsers for the raw dataset formats: IDX (MNIST family) and CIFAR-10's binary records.

Both read bytes into uint8 numpy arrays; nothing is unpickled.
"""

from __future__ import annotations

import gzip
import tarfile
import zlib
from pathlib import Path

import numpy as np

from cnnpipe.core.errors import CnnpipeError

IDX_UBYTE = 0x08  # the only IDX element type the MNIST family uses
CIFAR_RECORD = 1 + 3 * 32 * 32  # 1 label byte + 3,072 pixel bytes (R, G, B planes)
CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST = ("test_batch.bin",)


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise CnnpipeError(f"{path}: truncated or corrupt gzip ({e}); delete it and rerun download") from e


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse an IDX file of unsigned bytes into an array of its declared shape."""
    fix = "delete it and rerun download"
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise CnnpipeError(f"{source}: not an IDX file (bad magic {data[:4].hex() or 'empty'}); {fix}")
    if data[2] != IDX_UBYTE:
        raise CnnpipeError(f"{source}: IDX element type 0x{data[2]:02x} is not unsigned byte; {fix}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise CnnpipeError(f"{source}: IDX header truncated; {fix}")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise CnnpipeError(
            f"{source}: IDX body has {len(data) - header} bytes but its header declares {expected}; {fix}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: str | Path) -> np.ndarray:
    path = Path(path)
    return parse_idx(_read_maybe_gzip(path), str(path))


def parse_cifar_records(data: bytes, source: str = "<bytes>") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary records -> (images N×3×32×32 uint8, labels N uint8)."""
    if len(data) == 0 or len(data) % CIFAR_RECORD:
        raise CnnpipeError(
            f"{source}: {len(data)} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR records; "
            "delete the archive and rerun download"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].copy()
    if labels.max() > 9:
        raise CnnpipeError(f"{source}: label {labels.max()} out of range 0-9; the file is not CIFAR-10")
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


def read_cifar_tar(path: str | Path, members: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Read the named batch files straight out of cifar-10-binary.tar.gz (nothing is extracted)."""
    path = Path(path)
    xs, ys = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            by_name = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for name in members:
                if name not in by_name:
                    raise CnnpipeError(f"{path}: archive has no {name}; it is not cifar-10-binary.tar.gz")
                x, y = parse_cifar_records(tar.extractfile(by_name[name]).read(), f"{path}:{name}")
                xs.append(x)
                ys.append(y)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise CnnpipeError(f"{path}: unreadable archive ({e}); delete it and rerun download") from e
    return np.concatenate(xs), np.concatenate(ys)


def write_idx(path: str | Path, array: np.ndarray, compress: bool = True) -> None:
    """Write a uint8 array as IDX (used to build test fixtures and mirrors)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    Path(path).write_bytes(gzip.compress(data, mtime=0) if compress else data)
