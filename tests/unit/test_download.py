import gzip
import hashlib
import json
import types
from pathlib import Path

import pytest
from helpers import IDX_FILES, md5_of

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.params import DownloadParams
from cnnpipe.stages import download as download_module
from cnnpipe.stages.download import download


def params(sources, md5=None, **kw) -> DownloadParams:
    return DownloadParams(dataset="mnist", sources=[str(s) for s in sources], md5=md5 or {}, **kw)


def test_download_from_mirror_dir_writes_files_and_manifest(tmp_path, mnist_mirror):
    mirror, md5 = mnist_mirror
    out = tmp_path / "raw"
    manifest = json.loads(download(params([tmp_path / "nowhere", mirror], md5), out).read_text())
    assert manifest["dataset"] == "mnist"
    assert [f["name"] for f in manifest["files"]] == list(IDX_FILES)
    assert sorted(p.name for p in (out / "mnist").iterdir()) == sorted(IDX_FILES)
    for f in manifest["files"]:
        data = (mirror / f["name"]).read_bytes()
        assert (out / "mnist" / f["name"]).read_bytes() == data
        assert f["size"] == len(data) and f["md5"] == hashlib.md5(data).hexdigest()
        assert f["sha256"] == hashlib.sha256(data).hexdigest()


def test_file_url_source(tmp_path, mnist_mirror):
    mirror, md5 = mnist_mirror
    download(params([mirror.as_uri()], md5), tmp_path / "raw")
    for name in IDX_FILES:
        assert (tmp_path / "raw" / "mnist" / name).read_bytes() == (mirror / name).read_bytes()


def test_http_source_retries_transient_errors(tmp_path, mnist_mirror, http_server, monkeypatch):
    mirror, md5 = mnist_mirror
    sleeps: list[float] = []
    monkeypatch.setattr(download_module, "time", types.SimpleNamespace(sleep=sleeps.append))
    url, requests = http_server(mirror, fail_first={IDX_FILES[1]: 2})
    download(params([url], md5, retries=3), tmp_path / "raw")
    assert requests.count(IDX_FILES[1]) == 3  # two 503s, then the file
    assert [requests.count(name) for name in IDX_FILES if name != IDX_FILES[1]] == [1, 1, 1]
    assert sleeps == [1, 2]  # backing off between attempts
    assert md5_of(tmp_path / "raw" / "mnist" / IDX_FILES[1]) == md5[IDX_FILES[1]]


def test_transient_errors_past_the_retries_try_the_next_source(tmp_path, mnist_mirror, http_server, monkeypatch):
    mirror, md5 = mnist_mirror
    monkeypatch.setattr(download_module, "time", types.SimpleNamespace(sleep=lambda s: None))
    url, requests = http_server(mirror, fail_first={IDX_FILES[0]: 5})
    download(params([url, mirror], md5, retries=2), tmp_path / "raw")
    assert requests.count(IDX_FILES[0]) == 2  # then the mirror directory
    assert (tmp_path / "raw" / "mnist" / IDX_FILES[0]).read_bytes() == (mirror / IDX_FILES[0]).read_bytes()


def test_recompressed_mirror_accepted_by_content_checksum(tmp_path):
    """A mirror that re-gzips the published bytes (as Debian's package does) passes the content check."""
    from cnnpipe.core.catalog import RemoteFile
    from cnnpipe.stages.download import content_matches

    payload = b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc"
    path = tmp_path / "f.gz"
    path.write_bytes(gzip.compress(payload, mtime=12345))
    import hashlib

    f = RemoteFile("f.gz", "0" * 32, hashlib.md5(payload).hexdigest())
    assert content_matches(path, f.content_md5)
    assert not content_matches(path, "1" * 32)
    path.write_bytes(path.read_bytes()[:10])  # truncated gzip
    assert not content_matches(path, f.content_md5)


def test_checksum_mismatch_fails_and_leaves_nothing(tmp_path, mnist_mirror):
    mirror, md5 = mnist_mirror
    target = mirror / IDX_FILES[2]
    target.write_bytes(target.read_bytes()[:-100])  # truncated in the mirror
    out = tmp_path / "raw"
    with pytest.raises(CnnpipeError, match=r"t10k-images-idx3-ubyte\.gz: checksum mismatch from every source"):
        download(params([mirror], md5), out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["mirror"]  # no temp leftovers either


def test_no_source_reachable(tmp_path, mnist_mirror, http_server):
    mirror, md5 = mnist_mirror
    empty = tmp_path / "empty"
    empty.mkdir()
    url, _ = http_server(empty)  # reachable, but 404 for every file
    with pytest.raises(CnnpipeError, match=r"no source reachable .*HTTP 404.*add a mirror to download\.sources"):
        download(params([tmp_path / "missing", url, "http://127.0.0.1:9/"], md5, retries=1), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_fashion_mnist_error_suggests_debian_package(tmp_path):
    p = DownloadParams(dataset="fashion-mnist", sources=[str(tmp_path)], md5={}, retries=1)
    with pytest.raises(CnnpipeError, match="apt-get install dataset-fashion-mnist"):
        download(p, tmp_path / "raw")


def test_unknown_dataset_and_md5_key(tmp_path):
    with pytest.raises(CnnpipeError, match=r"unknown dataset 'imagenet'; set download\.dataset to one of"):
        download(DownloadParams(dataset="imagenet"), tmp_path / "raw")
    with pytest.raises(CnnpipeError, match=r"download\.md5 names foo\.gz"):
        download(DownloadParams(dataset="mnist", md5={"foo.gz": "0"}), tmp_path / "raw")


def test_images_read_in_place_outside_data_own_are_named_as_unwatched(tmp_path, monkeypatch, caplog):
    """Under data/own (the split stage's dependency) a folder is read in place quietly; elsewhere the stage
    warns that DVC does not see its images change."""
    from cnnpipe.core.demo_images import make_example_images

    monkeypatch.chdir(tmp_path)
    for folder in ("data/own/shapes", "elsewhere/shapes"):
        make_example_images(tmp_path / folder, per_class=2, size=8)
        caplog.clear()
        with caplog.at_level("WARNING"):
            download(DownloadParams(dataset="imagefolder", sources=[folder]), tmp_path / "raw")
        warned = [r.getMessage() for r in caplog.records if "DVC does not watch" in r.getMessage()]
        assert len(warned) == (folder == "elsewhere/shapes"), warned
    assert warned[0].startswith("elsewhere/shapes is outside data/own")


def test_a_labels_csv_under_data_own_listing_images_elsewhere_is_named(tmp_path, monkeypatch, caplog):
    """A CSV under data/own is watched, the images it lists are watched only where they are under it too."""
    from cnnpipe.core.demo_images import make_example_images

    monkeypatch.chdir(tmp_path)
    make_example_images(tmp_path / "data/own/shapes", per_class=2, size=8)
    make_example_images(tmp_path / "elsewhere/shapes", per_class=2, size=8)
    inside = sorted((tmp_path / "data/own/shapes").rglob("*.png"))
    outside = sorted((tmp_path / "elsewhere/shapes").rglob("*.png"))
    rows = [(p.relative_to(tmp_path / "data/own"), p.parent.name) for p in inside]
    for listed, count in ((rows, 0), (rows + [(outside[0], "circle"), (outside[1], "square")], 2)):
        (tmp_path / "data/own/labels.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in listed))
        caplog.clear()
        with caplog.at_level("WARNING"):
            download(DownloadParams(dataset="csv", sources=["data/own/labels.csv"]), tmp_path / "raw")
        warned = [r.getMessage() for r in caplog.records if "DVC does not watch" in r.getMessage()]
        assert len(warned) == (count > 0), warned
    assert warned[0].startswith(f"data/own/labels.csv lists 2 images outside data/own (the first: {outside[0]})")


@pytest.mark.parametrize("download, said", [
    ({"dataset": "mnist"}, "dataset: mnist (download.dataset): nothing to check here"),
    ({"dataset": "fashion-mnist", "sources": ["official", "{tmp}/nothing", "{tmp}/fm"]},
     "dataset: Fashion-MNIST found in {tmp}/fm"),
])
def test_make_dataset_follows_params(tmp_path, download, said):
    """`make dataset` (scripts/ensure_dataset.sh) checks the dataset params.yaml names, in its sources."""
    import subprocess
    import sys

    import yaml

    (tmp_path / "fm").mkdir()
    (tmp_path / "fm" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    sources = [s.format(tmp=tmp_path) for s in download.get("sources", [])]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"download": download | {"sources": sources}}))
    script = Path(__file__).resolve().parents[2] / "scripts" / "ensure_dataset.sh"
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, env={"PY": sys.executable, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == said.format(tmp=tmp_path), proc.stdout + proc.stderr
