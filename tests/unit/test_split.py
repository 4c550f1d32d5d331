import json

import numpy as np
import pytest
from helpers import write_cifar_archive

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.params import DownloadParams, SplitParams
from cnnpipe.stages.download import download
from cnnpipe.stages.split import allocate, split, stratified_split


def labels(counts):
    return np.repeat(np.arange(len(counts)), counts).astype(np.uint8)


def test_allocate_is_proportional_and_exact():
    alloc = allocate(np.array([50, 30, 20]), 10)
    assert alloc.tolist() == [5, 3, 2]
    alloc = allocate(np.array([7, 7, 7]), 10)
    assert alloc.sum() == 10 and alloc.max() - alloc.min() <= 1


def test_split_is_deterministic_disjoint_and_stratified():
    y = labels([100, 60, 40])
    tr, va = stratified_split(y, 20, None, seed=3, num_classes=3)
    tr2, va2 = stratified_split(y, 20, None, seed=3, num_classes=3)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == len(y)
    assert np.bincount(y[va]).tolist() == [10, 6, 4]
    _, va_other = stratified_split(y, 20, None, seed=4, num_classes=3)
    assert not np.array_equal(va, va_other)


def test_train_size_subsamples_stratified():
    y = labels([100, 100])
    tr, va = stratified_split(y, 10, 50, seed=0, num_classes=2)
    assert np.bincount(y[tr]).tolist() == [25, 25] and len(va) == 10


@pytest.mark.parametrize("val, train", [(0, None), (200, None), (100, 101), (250, 10)])
def test_sizes_that_do_not_fit(val, train):
    with pytest.raises(CnnpipeError, match="split sizes do not fit.*lower split"):
        stratified_split(labels([100, 100]), val, train, 0, 2)


def test_class_starved_by_split():
    with pytest.raises(CnnpipeError, match="leave class 1 with no train or validation image"):
        stratified_split(labels([100, 1]), 10, None, 0, 2)


def test_split_stage_on_mnist_format(tmp_path, mnist_mirror):
    mirror, md5 = mnist_mirror
    download(DownloadParams(dataset="mnist", sources=[str(mirror)], md5=md5), tmp_path / "raw")
    split(SplitParams(val_size=50, train_size=None, seed=0), tmp_path / "raw", tmp_path / "prep",
          tmp_path / "split.json")
    x = np.load(tmp_path / "prep" / "train_x.npy", mmap_mode="r")
    assert x.dtype == np.uint8 and x.shape == (350, 1, 28, 28)
    meta = json.loads((tmp_path / "prep" / "meta.json").read_text())
    assert meta["sizes"] == {"train": 350, "val": 50, "test": 100}
    assert meta["flip"] is False and len(meta["mean"]) == 1 and 0 < meta["std"][0] < 1
    assert json.loads((tmp_path / "split.json").read_text()) == {"train": 350, "val": 50, "test": 100}
    info = json.loads((tmp_path / "split.info.json").read_text())
    rows = info["per_class"]
    assert info["dataset"] == "mnist" and [r["class"] for r in rows] == [str(c) for c in range(10)]
    assert all(r["val"] == 5 for r in rows) and sum(r["test"] for r in rows) == 100


def test_split_stage_on_cifar_binary(tmp_path):
    mirror = tmp_path / "mirror"
    md5 = write_cifar_archive(mirror / "cifar-10-binary.tar.gz", per_batch=20)
    download(DownloadParams(dataset="cifar10", sources=[str(mirror)], md5={"cifar-10-binary.tar.gz": md5}),
             tmp_path / "raw")
    split(SplitParams(val_size=20, train_size=None, seed=0), tmp_path / "raw", tmp_path / "prep",
          tmp_path / "split.json")
    meta = json.loads((tmp_path / "prep" / "meta.json").read_text())
    assert meta["shape"] == [3, 32, 32] and meta["sizes"] == {"train": 80, "val": 20, "test": 20}
    assert len(meta["mean"]) == 3


def test_split_sizes_error_leaves_no_output(tmp_path, mnist_mirror):
    mirror, md5 = mnist_mirror
    download(DownloadParams(dataset="mnist", sources=[str(mirror)], md5=md5), tmp_path / "raw")
    with pytest.raises(CnnpipeError, match="split sizes do not fit"):
        split(SplitParams(val_size=5000, train_size=None, seed=0), tmp_path / "raw", tmp_path / "prep",
              tmp_path / "split.json")
    assert not (tmp_path / "prep").exists() and not (tmp_path / "split.json").exists()


def test_corrupt_raw_file_reported(tmp_path, mnist_mirror):
    mirror, md5 = mnist_mirror
    download(DownloadParams(dataset="mnist", sources=[str(mirror)], md5=md5), tmp_path / "raw")
    (tmp_path / "raw" / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(b"\x00\x00\x09\x01")
    with pytest.raises(CnnpipeError, match="train-labels-idx1-ubyte.gz: IDX element type"):
        split(SplitParams(), tmp_path / "raw", tmp_path / "prep", tmp_path / "split.json")
    assert not (tmp_path / "prep").exists()


def test_flips_of_own_images_are_the_users_call(tmp_path):
    """Own images: flips keep labels only where split.flip says so (default off); a built-in dataset keeps its
    known setting whatever split.flip says."""
    from cnnpipe.core.demo_images import make_example_images

    make_example_images(tmp_path / "own", per_class=12, size=8)
    download(DownloadParams(dataset="imagefolder", sources=[str(tmp_path / "own")]), tmp_path / "raw")
    flips = {}
    for flip in (False, True):
        split(SplitParams(val_size=6, image_size=8, flip=flip, workers=1), tmp_path / "raw",
              tmp_path / f"prep-{flip}", tmp_path / f"split-{flip}.json")
        flips[flip] = json.loads((tmp_path / f"prep-{flip}" / "meta.json").read_text())["flip"]
    assert flips == {False: False, True: True}
    assert SplitParams().flip is False

    mirror = tmp_path / "mirror"
    md5 = write_cifar_archive(mirror / "cifar-10-binary.tar.gz", per_batch=20)
    download(DownloadParams(dataset="cifar10", sources=[str(mirror)], md5={"cifar-10-binary.tar.gz": md5}),
             tmp_path / "raw-cifar")
    split(SplitParams(val_size=20, flip=False), tmp_path / "raw-cifar", tmp_path / "prep-cifar",
          tmp_path / "split-cifar.json")
    assert json.loads((tmp_path / "prep-cifar" / "meta.json").read_text())["flip"] is True


def test_a_test_class_without_training_images_is_refused(tmp_path):
    """An image folder whose test/ has a class that train/ lacks: a model could never predict it."""
    import shutil

    from cnnpipe.core.demo_images import make_example_images

    own = tmp_path / "own"
    make_example_images(own / "train", per_class=6, size=8)
    make_example_images(own / "test", per_class=2, size=8)
    download(DownloadParams(dataset="imagefolder", sources=[str(own)]), tmp_path / "raw")
    split(SplitParams(val_size=3, image_size=8, workers=1), tmp_path / "raw", tmp_path / "prep",
          tmp_path / "split.json")  # every class on both sides: fine
    shutil.rmtree(own / "train" / "square")
    with pytest.raises(CnnpipeError, match=r"class square has test images but no readable training images"):
        split(SplitParams(val_size=2, image_size=8, workers=1), tmp_path / "raw", tmp_path / "prep2",
              tmp_path / "split2.json")
    assert not (tmp_path / "prep2").exists() and not (tmp_path / "split2.json").exists()


def test_a_split_failing_while_it_writes_keeps_the_previous_output(tmp_path, mnist_mirror, monkeypatch):
    """The outputs appear whole or not at all: a failure halfway through writing them (a full disk) leaves the
    previous split's files as they were, and no temporary folder behind."""
    from cnnpipe.stages import split as stage

    mirror, md5 = mnist_mirror
    download(DownloadParams(dataset="mnist", sources=[str(mirror)], md5=md5), tmp_path / "raw")
    split(SplitParams(val_size=50, seed=0), tmp_path / "raw", tmp_path / "prep", tmp_path / "split.json")
    before = {f.name: f.read_bytes() for f in (tmp_path / "prep").iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stage, "write_meta", disk_full)  # after the arrays are written
    with pytest.raises(OSError, match="No space left"):
        split(SplitParams(val_size=50, seed=1), tmp_path / "raw", tmp_path / "prep", tmp_path / "split.json")
    assert {f.name: f.read_bytes() for f in (tmp_path / "prep").iterdir()} == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["mirror", "prep", "raw", "split.info.json",
                                                          "split.json"]
