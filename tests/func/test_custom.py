"""Your own images: imagefolder and CSV sources through the real pipeline, archives, and bad input."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
import zipfile

import httpx
import onnx
import pytest
from helpers import commit, dvc, make_repo, md5_of, ran, set_params, start_server, stop

from cnnpipe.core.demo_images import SHAPES, make_example_images
from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.params import DownloadParams, SplitParams
from cnnpipe.serve.predictor import Predictor
from cnnpipe.stages.download import download
from cnnpipe.stages.split import split

ALL = ["download", "split", "train", "evaluate", "export", "quantize"]
SMALL = SplitParams(val_size=0.2, test_size=0.2, image_size=16, max_bad_fraction=0.1)


def tiny_params(repo, source: str, kind: str) -> None:
    set_params(repo, download={"dataset": kind, "sources": [source], "md5": {}},
               split={"val_size": 0.2, "test_size": 0.2, "image_size": 16, "channels": 3, "max_bad_fraction": 0.1},
               train={"model": "simplecnn", "epochs": 2, "batch_size": 8, "flip": True})


def onnx_classes(path) -> list[str]:
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    return json.loads(meta["cnnpipe.classes"])


@pytest.mark.slow
def test_imagefolder_end_to_end_and_a_changed_image(tmp_path):
    repo = make_repo(tmp_path, "unused", {})
    shapes = make_example_images(repo / "data/own/shapes")
    (shapes / "circle" / "empty.png").write_bytes(b"")  # zero-byte: skipped and listed
    tiny_params(repo, "data/own/shapes", "imagefolder")
    commit(repo, "own images")

    assert ran(dvc(repo, "repro")) == ALL
    assert onnx_classes(repo / "models/model.onnx") == list(SHAPES)
    split_info = json.loads((repo / "metrics/split.info.json").read_text())
    assert split_info["skipped"] == 1 and split_info["skipped_files"] == ["data/own/shapes/circle/empty.png"]
    assert max(len(line.rstrip()) for line in dvc(repo, "metrics", "show").splitlines()) <= 160
    rows = list(csv.DictReader((repo / "data/prepared/manifest.csv").open()))
    assert len(rows) == 37 and {r["split"] for r in rows} == {"train", "val", "test", "skipped"}
    sizes = json.loads((repo / "data/prepared/meta.json").read_text())["sizes"]
    assert {s: sum(r["split"] == s for r in rows) for s in sizes} == sizes
    commit(repo, "baseline")

    from PIL import Image

    Image.new("RGB", (24, 24), (250, 0, 0)).save(shapes / "square" / "003.png")
    assert ran(dvc(repo, "repro")) == ALL  # data/own is a dependency of download (archives) and split


def test_csv_end_to_end(tmp_path):
    """Every stage's library function in turn (the DVC wiring is the imagefolder test's)."""
    from cnnpipe.core.params import EvaluateParams, ExportParams, TrainParams
    from cnnpipe.stages.evaluate import evaluate
    from cnnpipe.stages.export import export
    from cnnpipe.stages.train import train

    labels = make_example_images(tmp_path / "csvset", kind="csv")
    run_both(tmp_path, DownloadParams(dataset="csv", sources=[labels.as_uri()]))  # a file:// URL
    train(TrainParams(model="simplecnn", epochs=1, batch_size=8, device="cpu"), tmp_path / "prep",
          tmp_path / "model.pt", tmp_path / "train.json", tmp_path / "history.csv")
    m = evaluate(EvaluateParams(device="cpu"), tmp_path / "prep", tmp_path / "model.pt", tmp_path / "eval.json",
                 tmp_path / "confusion.csv", tmp_path / "per_class.csv")
    export(ExportParams(check_images=8), tmp_path / "prep", tmp_path / "model.pt", tmp_path / "m.onnx",
           tmp_path / "export.json")
    assert m["images"] == 7 and onnx_classes(tmp_path / "m.onnx") == list(SHAPES)

    image = next((tmp_path / "csvset").rglob("*.jpg"))  # 24×24: the service resizes it
    expected = Predictor(tmp_path / "m.onnx", threads=1).predict(image.read_bytes(), k=3)[0]
    proc, url = start_server(tmp_path / "m.onnx")  # the real service reports and answers with those classes
    try:
        meta = httpx.get(url + "/metadata").json()
        assert meta["classes"] == list(SHAPES) and meta["input_shape"] == [3, 16, 16]
        r = httpx.post(url + "/predict?k=3", files=[("files", (image.name, image.read_bytes(), "image/jpeg"))])
        assert r.status_code == 200, r.text
        top = r.json()["predictions"][0]
        assert [(p["index"], p["label"]) for p in top] == [(p["index"], SHAPES[p["index"]]) for p in expected]
        assert [p["probability"] for p in top] == pytest.approx([p["probability"] for p in expected], abs=1e-4)
    finally:
        stop(proc)


def run_both(tmp_path, params: DownloadParams, sp: SplitParams = SMALL):
    download(params, tmp_path / "raw")
    return split(sp, tmp_path / "raw", tmp_path / "prep", tmp_path / "split.json")


def test_split_is_deterministic_and_stratified(tmp_path):
    make_example_images(tmp_path / "shapes", per_class=20)
    run_both(tmp_path, DownloadParams(dataset="imagefolder", sources=[str(tmp_path / "shapes")]))
    first = (tmp_path / "prep/manifest.csv").read_text()
    rows = json.loads((tmp_path / "split.info.json").read_text())["per_class"]
    assert [r["class"] for r in rows] == list(SHAPES) and all(r["test"] == 4 for r in rows)  # 20% of 60
    val = [r["val"] for r in rows]  # 20% of the other 48 = 10: as even as classes allow
    assert sum(val) == 10 and max(val) - min(val) == 1
    shutil.rmtree(tmp_path / "prep")
    run_both(tmp_path, DownloadParams(dataset="imagefolder", sources=[str(tmp_path / "shapes")]))
    assert (tmp_path / "prep/manifest.csv").read_text() == first


def test_train_test_folders_keep_their_test_set(tmp_path):
    make_example_images(tmp_path / "ds/train", per_class=10)
    make_example_images(tmp_path / "ds/test", per_class=3, seed=1)
    run_both(tmp_path, DownloadParams(dataset="imagefolder", sources=[str(tmp_path / "ds")]))
    sizes = json.loads((tmp_path / "prep/meta.json").read_text())["sizes"]
    assert sizes["test"] == 9 and sizes["train"] + sizes["val"] == 30
    rows = list(csv.DictReader((tmp_path / "prep/manifest.csv").open()))
    assert sorted(r["path"] for r in rows if r["split"] == "test") == sorted(
        str(f) for f in (tmp_path / "ds/test").rglob("*.png"))


@pytest.mark.parametrize("folders, fix", [
    (["train", "val"], "move the images of val/ into train/<class>/"),
    (["train", "val", "test"], "move the images of val/ into train/<class>/"),
    (["train", "test", "extra"], "move the images of extra/ into train/<class>/"),
    (["train"], "add test/ beside train/"),
])
def test_split_folders_other_than_train_and_test_are_refused(tmp_path, folders, fix):
    """Read as class folders, train/ and val/ would make a two-class classifier of splits; beside train/ and
    test/, another folder would be dropped unseen."""
    for folder in folders:
        make_example_images(tmp_path / "ds" / folder, per_class=3)
    held = ", ".join(f"{name}/" for name in sorted(folders))
    with pytest.raises(CnnpipeError, match=rf"ds: holds {held}; an image folder is root/<class>/, .*: {fix}"):
        download(DownloadParams(dataset="imagefolder", sources=[str(tmp_path / "ds")]), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_a_class_named_train_is_a_class_and_a_macs_zip_folder_is_no_class(tmp_path):
    """One split name among class folders is a class (a train among vehicles); the __MACOSX folder of a zip
    made on a Mac is neither a class nor a split."""
    for vehicle, seed in (("bus", 0), ("car", 1), ("train", 2)):
        make_example_images(tmp_path / "vehicles" / vehicle, per_class=4, seed=seed)  # shapes as stand-ins
        for shape in SHAPES:
            for f in (tmp_path / "vehicles" / vehicle / shape).iterdir():
                f.rename(tmp_path / "vehicles" / vehicle / f"{shape}-{f.name}")
            (tmp_path / "vehicles" / vehicle / shape).rmdir()
    make_example_images(tmp_path / "vehicles/__MACOSX/bus", per_class=1)
    run_both(tmp_path, DownloadParams(dataset="imagefolder", sources=[str(tmp_path / "vehicles")]))
    assert json.loads((tmp_path / "prep/meta.json").read_text())["classes"] == ["bus", "car", "train"]

    shutil.rmtree(tmp_path / "prep")
    make_example_images(tmp_path / "mac/train", per_class=10)
    make_example_images(tmp_path / "mac/test", per_class=3, seed=1)
    make_example_images(tmp_path / "mac/__MACOSX/train", per_class=1)
    run_both(tmp_path, DownloadParams(dataset="imagefolder", sources=[str(tmp_path / "mac")]))
    assert json.loads((tmp_path / "prep/meta.json").read_text())["sizes"]["test"] == 9


def test_capitalized_train_and_test_folders_are_the_split(tmp_path):
    make_example_images(tmp_path / "ds/Train", per_class=10)
    make_example_images(tmp_path / "ds/Test", per_class=3, seed=1)
    run_both(tmp_path, DownloadParams(dataset="imagefolder", sources=[str(tmp_path / "ds")]))
    meta = json.loads((tmp_path / "prep/meta.json").read_text())
    assert meta["classes"] == list(SHAPES) and meta["sizes"]["test"] == 9


def zip_of(folder, path, extra: dict[str, bytes] | None = None):
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, "shapes/" + f.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return path


@pytest.mark.slow
def test_an_archive_under_data_own_is_watched_and_one_elsewhere_is_named(tmp_path, caplog):
    """download unpacks an archive into data/raw: under data/own (a dependency of download) a changed archive
    reruns it and what follows; elsewhere the stage warns that DVC does not see it change."""
    repo = make_repo(tmp_path, "unused", {})
    make_example_images(tmp_path / "src")
    zip_of(tmp_path / "src", repo / "data/own/shapes.zip")
    tiny_params(repo, "data/own/shapes.zip", "imagefolder")
    commit(repo, "an archive of own images")
    assert ran(dvc(repo, "repro", "split")) == ["download", "split"]
    assert json.loads((repo / "data/prepared/meta.json").read_text())["classes"] == list(SHAPES)
    commit(repo, "split")

    shutil.rmtree(tmp_path / "src" / SHAPES[-1])
    zip_of(tmp_path / "src", repo / "data/own/shapes.zip")
    assert ran(dvc(repo, "repro", "split")) == ["download", "split"]
    assert json.loads((repo / "data/prepared/meta.json").read_text())["classes"] == list(SHAPES[:-1])

    elsewhere = zip_of(tmp_path / "src", tmp_path / "shapes.zip")
    with caplog.at_level("WARNING"):
        download(DownloadParams(dataset="imagefolder", sources=[str(elsewhere)]), tmp_path / "raw")
    warned = [r.getMessage() for r in caplog.records if "DVC does not watch" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"{elsewhere} is outside data/own")
    assert "`dvc repro -f -s download && dvc repro`" in warned[0]


def test_http_zip_archive_with_checksum(tmp_path, http_server):
    make_example_images(tmp_path / "src")
    served = tmp_path / "served"
    served.mkdir()
    archive = zip_of(tmp_path / "src", served / "shapes.zip")
    url, requests = http_server(served)
    params = DownloadParams(dataset="imagefolder", sources=[url + "shapes.zip"], md5={"shapes.zip": md5_of(archive)})
    run_both(tmp_path, params)
    manifest = json.loads((tmp_path / "raw/manifest.json").read_text())
    assert manifest["in_raw"] and manifest["root"] == "imagefolder/shapes" and requests == ["shapes.zip"]
    assert json.loads((tmp_path / "prep/meta.json").read_text())["classes"] == list(SHAPES)

    bad = DownloadParams(dataset="imagefolder", sources=[url + "shapes.zip"], md5={"shapes.zip": "0" * 32})
    with pytest.raises(CnnpipeError, match="shapes.zip: checksum mismatch"):
        download(bad, tmp_path / "raw2")
    assert not (tmp_path / "raw2").exists()


def test_archive_escaping_its_folder_is_refused(tmp_path):
    make_example_images(tmp_path / "src", per_class=2)
    archive = zip_of(tmp_path / "src", tmp_path / "evil.zip", {"../../escaped.png": b"x"})
    with pytest.raises(CnnpipeError, match=r"member '\.\./\.\./escaped\.png' escapes the target folder"):
        download(DownloadParams(dataset="imagefolder", sources=[str(archive)]), tmp_path / "raw")
    assert not (tmp_path / "raw").exists() and not (tmp_path.parent / "escaped.png").exists()

    tar_path = tmp_path / "link.tar.gz"
    with tarfile.open(tar_path, "w:gz") as t:
        info = tarfile.TarInfo("shapes/circle/link.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(info)
        info = tarfile.TarInfo("shapes/circle/a.png")
        info.size = 3
        t.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(CnnpipeError, match="'shapes/circle/link.png' is a link or device"):
        download(DownloadParams(dataset="imagefolder", sources=[str(tar_path)]), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_archive_over_size_limit(tmp_path):
    make_example_images(tmp_path / "src", per_class=2)
    archive = zip_of(tmp_path / "src", tmp_path / "a.zip")
    with pytest.raises(CnnpipeError, match=r"over download\.max_bytes 10"):
        download(DownloadParams(dataset="imagefolder", sources=[str(archive)], max_bytes=10), tmp_path / "raw")


@pytest.mark.parametrize("csv_text, message", [
    ("file,label\nimages/circle_000.jpg,circle\n", "missing column 'path'"),
    ("path,label\nimages/circle_000.jpg,\n", "row 2 has no label"),
    ("path,label\nimages/nope.jpg,circle\n", r"image images/nope\.jpg does not exist"),
])
def test_bad_csv(tmp_path, csv_text, message):
    make_example_images(tmp_path / "set", kind="csv", per_class=2)
    (tmp_path / "set/labels.csv").write_text(csv_text)
    with pytest.raises(CnnpipeError, match=message):
        download(DownloadParams(dataset="csv", sources=[str(tmp_path / "set/labels.csv")]), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_missing_path_and_class_too_small(tmp_path):
    with pytest.raises(CnnpipeError, match=r"no imagefolder source found .*does not exist"):
        download(DownloadParams(dataset="imagefolder", sources=[str(tmp_path / "nothing")]), tmp_path / "raw")
    make_example_images(tmp_path / "shapes", per_class=10)
    for f in sorted((tmp_path / "shapes/triangle").iterdir())[1:]:
        f.unlink()
    with pytest.raises(CnnpipeError, match=r"split\.test_size leaves class triangle with no test image or none "
                                           r"to learn from \(1 in all\); change split\.test_size"):
        run_both(tmp_path, DownloadParams(dataset="imagefolder", sources=[str(tmp_path / "shapes")]))
    assert not (tmp_path / "prep").exists() and not (tmp_path / "split.json").exists()


@pytest.mark.parametrize("split_params, message", [
    ({"test_size": 40}, r"test_size 40 must be 1 to 35 of the 36 images \(the rest are training and validation "
                        r"images\); lower split\.test_size$"),
    ({"test_size": 1.5}, r"split\.test_size 1\.5 must be a count or a fraction between 0 and 1"),
    ({"test_size": 0.05}, r"split\.test_size leaves class \w+ with no test image or none to learn from"),
    ({"test_size": 0.2, "val_size": 0.05}, r"leave class \w+ with no train or validation image .*raise "
                                           r"split\.val_size/split\.train_size"),
])
def test_split_errors_name_the_setting_to_change(tmp_path, split_params, message):
    """Own images without a test set are split twice: test first (split.test_size), then validation."""
    import dataclasses

    make_example_images(tmp_path / "shapes", per_class=12)
    with pytest.raises(CnnpipeError, match=message):
        run_both(tmp_path, DownloadParams(dataset="imagefolder", sources=[str(tmp_path / "shapes")]),
                 dataclasses.replace(SMALL, **split_params))
    assert not (tmp_path / "prep").exists()


def test_16_bit_images_are_scaled_and_an_oversized_one_is_skipped(tmp_path, monkeypatch):
    """A 16-bit greyscale PNG keeps its picture (Pillow's own conversion clips it to white); an image over
    Pillow's decompression-bomb limit is one more unreadable file, listed, not a traceback."""
    import numpy as np
    from PIL import Image

    from cnnpipe.core.own_images import decode

    ramp = np.tile(np.arange(0, 65536, 1024, dtype=np.uint16), (64, 1))  # 0 .. 64,512 across
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    Image.fromarray(np.rint(ramp / 257).astype(np.uint8)).save(tmp_path / "ramp8.png")
    assert np.array_equal(decode(str(tmp_path / "ramp16.png"), 1, 64), decode(str(tmp_path / "ramp8.png"), 1, 64))
    assert np.array_equal(decode(str(tmp_path / "ramp16.png"), 3, 64), decode(str(tmp_path / "ramp8.png"), 3, 64))
    Image.fromarray(np.rint(ramp / 257).astype(np.int32)).save(tmp_path / "ramp32.tif")  # 32-bit: values as they are
    assert Image.open(tmp_path / "ramp32.tif").mode == "I"
    assert np.array_equal(decode(str(tmp_path / "ramp32.tif"), 1, 64), decode(str(tmp_path / "ramp8.png"), 1, 64))

    make_example_images(tmp_path / "shapes", per_class=10)  # 24×24: 576 pixels
    Image.new("L", (80, 80)).save(tmp_path / "shapes/circle/huge.png")  # 6,400 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # Pillow refuses over twice this
    run_both(tmp_path, DownloadParams(dataset="imagefolder", sources=[str(tmp_path / "shapes")]))
    huge = str(tmp_path / "shapes/circle/huge.png")
    assert json.loads((tmp_path / "split.info.json").read_text())["skipped_files"] == [huge]
    row = next(r for r in csv.reader((tmp_path / "prep/manifest.csv").open()) if r[0] == huge)
    assert row[2] == "skipped" and row[3].startswith("DecompressionBombError: "), row


def test_too_many_bad_images_fail_the_stage(tmp_path):
    make_example_images(tmp_path / "shapes", per_class=4)
    for i in range(3):
        (tmp_path / "shapes/circle" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(CnnpipeError, match=r"3 of 15 files unreadable .*broken0\.png.*max_bad_fraction"):
        run_both(tmp_path, DownloadParams(dataset="imagefolder", sources=[str(tmp_path / "shapes")]))
    assert not (tmp_path / "prep").exists()
