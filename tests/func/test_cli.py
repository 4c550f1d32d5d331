"""`cnnpipe <stage>` as a user runs it: bad input gives one line, a non-zero exit, no partial output."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import write_mnist_mirror

from cnnpipe.core.params import defaults

CLI = [str(Path(sys.executable).parent / "cnnpipe")]


def cnnpipe(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), cwd=cwd, capture_output=True, text=True)


def write_params(cwd: Path, **sections) -> None:
    params = defaults()
    for section, values in sections.items():
        params[section].update(values)
    (cwd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def assert_one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in proc.stderr


def leftovers(cwd: Path) -> list[str]:
    return sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.is_file() and p.name != "params.yaml")


@pytest.fixture
def cwd(tmp_path):
    d = tmp_path / "work"
    d.mkdir()
    return d


def test_no_source_reachable(cwd):
    write_params(cwd, download={"dataset": "mnist", "sources": ["http://127.0.0.1:9/", str(cwd / "none")]})
    proc = cnnpipe(cwd, "download")
    assert_one_line_error(proc, r"no source reachable.*add a mirror")
    assert leftovers(cwd) == []


def test_checksum_mismatch(cwd, tmp_path):
    mirror = tmp_path / "mirror"
    md5 = write_mnist_mirror(mirror)
    (mirror / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b corrupted")
    write_params(cwd, download={"dataset": "mnist", "sources": [str(mirror)], "md5": md5})
    assert_one_line_error(cnnpipe(cwd, "download"), r"train-labels-idx1-ubyte.gz: checksum mismatch")
    assert leftovers(cwd) == []


def test_truncated_idx_in_split(cwd, tmp_path):
    mirror = tmp_path / "mirror"
    md5 = write_mnist_mirror(mirror)
    write_params(cwd, download={"dataset": "mnist", "sources": [str(mirror)], "md5": md5},
                 split={"val_size": 50})
    assert cnnpipe(cwd, "download").returncode == 0
    target = cwd / "data/raw/mnist/t10k-images-idx3-ubyte.gz"
    import gzip

    target.write_bytes(gzip.compress(gzip.decompress(target.read_bytes())[:-10]))
    assert_one_line_error(cnnpipe(cwd, "split"), r"t10k-images-idx3-ubyte.gz: IDX body has .* rerun download")
    assert not (cwd / "data/prepared").exists() and not (cwd / "metrics").exists()


@pytest.mark.parametrize("stage, section, values, pattern", [
    ("download", "download", {"dataset": "imagenet"}, r"download\.dataset must be .*'mnist'.*, got 'imagenet'"),
    ("train", "train", {"epochs": "many"}, r"train\.epochs must be int, got 'many'"),
    ("train", "train", {"model": "vgg"}, r"train\.model must be .*'lenet'.*, got 'vgg'"),
    ("split", "split", {"val_size": 10**9}, r"split sizes do not fit"),
])
def test_bad_params(cwd, tmp_path, stage, section, values, pattern):
    mirror = tmp_path / "mirror"
    md5 = write_mnist_mirror(mirror)
    write_params(cwd, download={"dataset": "mnist", "sources": [str(mirror)], "md5": md5},
                 split={"val_size": 50})
    if stage in ("split", "train"):
        assert cnnpipe(cwd, "download").returncode == 0
    if stage == "train":
        assert cnnpipe(cwd, "split").returncode == 0
    sections = {"download": {"dataset": "mnist", "sources": [str(mirror)], "md5": md5}, "split": {"val_size": 50}}
    sections.setdefault(section, {}).update(values)
    write_params(cwd, **sections)
    before = leftovers(cwd)
    assert_one_line_error(cnnpipe(cwd, stage), pattern)
    assert leftovers(cwd) == before


def test_missing_key(cwd):
    params = defaults()
    del params["train"]["lr"]
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    assert_one_line_error(cnnpipe(cwd, "train"), r"train\.lr is missing; add it")


def test_model_does_not_fit_image_size(cwd, tmp_path):
    """A 28×28 net on 8×8 images: fails before training starts."""
    import numpy as np

    from cnnpipe.core.fsutil import write_json

    prep = cwd / "data/prepared"
    prep.mkdir(parents=True)
    for split in ("train", "val"):
        np.save(prep / f"{split}_x.npy", np.zeros((20, 1, 8, 8), np.uint8))
        np.save(prep / f"{split}_y.npy", np.arange(20, dtype=np.uint8) % 2)
    write_json(prep / "meta.json", {"dataset": "mnist", "classes": ["a", "b"], "shape": [1, 8, 8],
                                    "mean": [0.5], "std": [0.5], "flip": False, "sizes": {}})
    write_params(cwd, train={"model": "lenet", "device": "cpu", "batch_size": 4})
    before = leftovers(cwd)
    assert_one_line_error(cnnpipe(cwd, "train"), r"model 'lenet' does not fit 8×8 images")
    assert leftovers(cwd) == before
