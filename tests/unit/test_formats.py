import gzip

import numpy as np
import pytest
from helpers import make_images, write_cifar_archive

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.formats import (
    CIFAR_RECORD,
    CIFAR_TEST,
    CIFAR_TRAIN,
    parse_cifar_records,
    parse_idx,
    read_cifar_tar,
    read_idx,
    write_idx,
)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 28, 30), dtype=np.uint8)
    write_idx(tmp_path / "x", images, compress=compress)
    assert np.array_equal(read_idx(tmp_path / "x"), images)
    raw = (tmp_path / "x").read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == compress
    data = gzip.decompress(raw) if compress else raw
    header = bytes([0, 0, 8, 3]) + (7).to_bytes(4, "big") + (28).to_bytes(4, "big") + (30).to_bytes(4, "big")
    assert data == header + images.tobytes()


def test_idx_labels_are_one_dimensional(tmp_path):
    write_idx(tmp_path / "y", np.arange(10, dtype=np.uint8))
    assert read_idx(tmp_path / "y").tolist() == list(range(10))


def test_idx_header_fields_are_big_endian():
    data = bytes([0, 0, 8, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6))
    assert parse_idx(data).tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("data, message", [
    (b"\x1f\x00\x08\x01" + bytes(8), "bad magic"),
    (b"", "bad magic"),
    (bytes([0, 0, 0x0D, 1]) + (2).to_bytes(4, "big") + bytes(8), "not unsigned byte"),
    (bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big"), "header truncated"),
    (bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + bytes(3), "declares 5"),
])
def test_idx_rejects_bad_files(data, message):
    with pytest.raises(CnnpipeError, match=message):
        parse_idx(data, "f")


def test_idx_truncated_gzip_names_file_and_fix(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((50, 28, 28), np.uint8))
    raw = (tmp_path / "x.gz").read_bytes()
    (tmp_path / "x.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CnnpipeError, match=r"x\.gz: truncated or corrupt gzip.*rerun download"):
        read_idx(tmp_path / "x.gz")


def test_cifar_records():
    labels = np.array([3, 9], np.uint8)
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 3072), dtype=np.uint8)
    x, y = parse_cifar_records(np.concatenate([labels[:, None], pixels], 1).tobytes())
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [3, 9]
    for i in range(2):
        for c in range(3):  # R plane, then G, then B; each row-major
            assert np.array_equal(x[i, c], pixels[i, c * 1024: (c + 1) * 1024].reshape(32, 32))


@pytest.mark.parametrize("size", [0, CIFAR_RECORD - 1, CIFAR_RECORD + 1])
def test_cifar_rejects_partial_records(size):
    with pytest.raises(CnnpipeError, match="whole number"):
        parse_cifar_records(bytes(size))


def test_cifar_rejects_bad_label():
    with pytest.raises(CnnpipeError, match="out of range"):
        parse_cifar_records(bytes([10]) + bytes(3072))


def test_cifar_tar_reads_batches_without_extracting(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    write_cifar_archive(archive, per_batch=4)
    written = [make_images(4, 10, (3, 32, 32), seed) for seed in range(6)]  # as the helper writes batch i
    x, y = read_cifar_tar(archive, CIFAR_TRAIN)
    assert np.array_equal(x, np.concatenate([w[0] for w in written[:5]]))
    assert np.array_equal(y, np.concatenate([w[1] for w in written[:5]]))
    tx, ty = read_cifar_tar(archive, CIFAR_TEST)
    assert np.array_equal(tx, written[5][0]) and np.array_equal(ty, written[5][1])
    x2, _ = read_cifar_tar(archive, (CIFAR_TRAIN[1], CIFAR_TRAIN[0]))  # in the order asked for
    assert np.array_equal(x2, np.concatenate([written[1][0], written[0][0]]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-binary.tar.gz"]


def test_cifar_tar_missing_member_and_corrupt_archive(tmp_path):
    archive = tmp_path / "c.tar.gz"
    write_cifar_archive(archive, per_batch=2)
    with pytest.raises(CnnpipeError, match="no data_batch_9.bin"):
        read_cifar_tar(archive, ("data_batch_9.bin",))
    archive.write_bytes(gzip.compress(b"not a tar"))
    with pytest.raises(CnnpipeError, match="unreadable archive"):
        read_cifar_tar(archive, CIFAR_TEST)
