"""Stage 1, download: fetch a dataset's raw files into data/raw/<dataset>/ and verify their checksums.

Sources are tried in order. Each file streams into a temp file and is moved into place only once its
MD5 matches; the whole data/raw directory appears only when every file is in, with a manifest.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import socket
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from tqdm import tqdm

from cnnpipe.core import own_images
from cnnpipe.core.catalog import DatasetSpec, RemoteFile, get_dataset
from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.fsutil import atomic_dir, file_digest, write_json
from cnnpipe.core.params import DownloadParams

log = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = "cnnpipe/0.1 (+dataset download)"


class TransientError(Exception):
    """Worth retrying: a timeout, a reset connection, a 5xx."""


class SourceError(Exception):
    """This source cannot give the file (unreachable, 404, missing from the mirror)."""


@dataclass(frozen=True)
class Fetched:
    name: str
    source: str
    size: int
    md5: str
    sha256: str


def resolve_sources(sources: list[str], spec: DatasetSpec) -> list[str]:
    """Expand "official" into the dataset's published base URLs."""
    out: list[str] = []
    for s in sources:
        out.extend(spec.urls if s == "official" else [s])
    return out


def _copy_stream(src, dst: Path, total: int | None, label: str) -> None:
    with open(dst, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=label,
                                    disable=None, leave=False) as bar:
        while chunk := src.read(CHUNK):
            f.write(chunk)
            bar.update(len(chunk))


def _fetch_http(url: str, dst: Path, timeout: float, label: str) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            _copy_stream(response, dst, int(length) if length else None, label)
            if length and dst.stat().st_size != int(length):
                raise TransientError(f"connection closed after {dst.stat().st_size} of {length} bytes")
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code == 429:
            raise TransientError(f"HTTP {e.code}") from e
        raise SourceError(f"HTTP {e.code}") from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError | socket.timeout):
            raise TransientError("timed out") from e
        raise SourceError(str(e.reason)) from e
    except (TimeoutError, ConnectionResetError) as e:
        raise TransientError(type(e).__name__) from e


def _fetch_local(path: Path, dst: Path, label: str) -> None:
    if not path.is_file():
        raise SourceError("no such file")
    with open(path, "rb") as src:
        _copy_stream(src, dst, path.stat().st_size, label)


def fetch(base: str, name: str, dst: Path, timeout: float) -> None:
    """Copy `name` from one source (directory, file:// or http(s):// base) to `dst`."""
    scheme = urlparse(base).scheme
    if scheme in ("http", "https"):
        _fetch_http(base.rstrip("/") + "/" + name, dst, timeout, name)
    elif scheme == "file":
        _fetch_local(Path(urlparse(base).path) / name, dst, name)
    elif scheme == "":
        _fetch_local(Path(base) / name, dst, name)
    else:
        raise SourceError(f"unsupported scheme '{scheme}:' (use a directory, file:// or http(s)://)")


def content_matches(path: Path, content_md5: str | None) -> bool:
    """Does a gzip file decompress to the published content? (for re-compressed mirrors)"""
    if content_md5 is None:
        return False
    digest = hashlib.md5()
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error):
        return False
    return digest.hexdigest() == content_md5


def fetch_verified(file: RemoteFile, md5: str, sources: list[str], dst: Path, params: DownloadParams,
                   dataset: str) -> Fetched:
    """Try each source until one gives the file with the expected MD5."""
    failures: list[str] = []
    for source in sources:
        for attempt in range(1, params.retries + 1):
            try:
                fetch(source, file.name, dst, params.timeout)
            except TransientError as e:
                if attempt < params.retries:
                    delay = min(2 ** (attempt - 1), 10)
                    log.warning("%s from %s: %s; retrying in %ss", file.name, source, e, delay)
                    time.sleep(delay)
                    continue
                failures.append(f"{source}: {e}")
                break
            except SourceError as e:
                failures.append(f"{source}: {e}")
                break
            got = file_digest(dst, "md5")
            if got == md5 or (md5 == file.md5 and content_matches(dst, file.content_md5)):
                log.info("%s: %d bytes from %s, checksum ok", file.name, dst.stat().st_size, source)
                return Fetched(file.name, source, dst.stat().st_size, got, file_digest(dst, "sha256"))
            failures.append(f"{source}: checksum mismatch (md5 {got}, expected {md5})")
            break
    dst.unlink(missing_ok=True)
    if failures and all("checksum mismatch" in f for f in failures):
        raise CnnpipeError(
            f"{file.name}: checksum mismatch from every source ({'; '.join(failures)}); the file is corrupt "
            "or truncated: replace it in the mirror (or set download.md5 if the mirror is re-packed on purpose)"
        )
    fix = "connect to the internet, add a mirror to download.sources"
    if dataset == "fashion-mnist":
        fix += ", or install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"
    raise CnnpipeError(f"{file.name}: no source reachable ({'; '.join(failures) or 'no sources'}); {fix}")


def download(params: DownloadParams, out_dir: str | Path = "data/raw") -> Path:
    """Fetch every file of the dataset; returns the path of the manifest."""
    if params.dataset in own_images.KINDS:
        return download_custom(params, Path(out_dir))
    spec = get_dataset(params.dataset)
    unknown = sorted(set(params.md5) - {f.name for f in spec.files})
    if unknown:
        raise CnnpipeError(f"download.md5 names {unknown[0]}, which {spec.name} does not have; remove it")
    sources = resolve_sources(params.sources, spec)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / spec.name).mkdir()
        fetched = [
            fetch_verified(f, params.md5.get(f.name, f.md5), sources, tmp / spec.name / f.name, params, spec.name)
            for f in spec.files
        ]
        manifest = {
            "dataset": spec.name,
            "format": spec.format,
            "files": [
                {"name": f.name, "size": f.size, "md5": f.md5, "sha256": f.sha256}
                for f in fetched
            ],
        }
        write_json(tmp / "manifest.json", manifest)
    return out_dir / "manifest.json"




OWN_IMAGES = Path("data/own")  # a dependency of download and split (dvc.yaml): images and archives here are watched


def warn_if_untracked(root: Path, listed: list[Path] | None = None, reader: str = "split",
                      watched: Path = OWN_IMAGES) -> None:
    """A folder, CSV or archive of images outside `watched` is no dependency of any stage: say that a changed
    image would rerun nothing. A labels CSV inside it may still list images elsewhere (`listed`). `reader`: the
    stage that reads the images (split reads them in place, download unpacks an archive)."""
    rerun = f"(or run `dvc repro -f -s {reader} && dvc repro` after a change)"
    if not root.resolve().is_relative_to(watched.resolve()):
        log.warning("%s is outside %s, so DVC does not watch its images: a changed image reruns nothing; move "
                    "it under %s %s", root, watched, watched, rerun)
    else:
        elsewhere = [path for path in listed or [] if not path.resolve().is_relative_to(watched.resolve())]
        if elsewhere:
            log.warning("%s lists %d images outside %s (the first: %s), so DVC does not watch them: a changed "
                        "image reruns nothing; move them under %s %s", root, len(elsewhere), watched,
                        elsewhere[0], watched, rerun)


def download_custom(params: DownloadParams, out_dir: Path) -> Path:
    """The user's images: a local folder or CSV is read in place (under data/own, a dependency of download
    and split, DVC sees a changed image); an archive (local or http(s)) is checked against download.md5 and
    unpacked safely."""
    kind = params.dataset
    failures: list[str] = []
    with atomic_dir(out_dir) as tmp:
        for source in params.sources:
            scheme = urlparse(source).scheme
            local = Path(urlparse(source).path) if scheme == "file" else Path(source) if scheme == "" else None
            if local is not None and not local.exists():
                failures.append(f"{source}: does not exist")
                continue
            if local is not None and not own_images.is_archive(local.name):
                root, listed = own_images.check_source(kind, local)
                warn_if_untracked(root, listed)
                manifest = {"dataset": kind, "root": str(root), "in_raw": False}
                break
            name = (local.name if local is not None else PurePosixPath(urlparse(source).path).name)
            if not own_images.is_archive(name):
                failures.append(f"{source}: not a .zip or .tar.gz archive")
                continue
            if local is not None:
                warn_if_untracked(local, reader="download")
            archive = tmp / name
            try:
                fetch(str(local.parent) if local is not None else source.rsplit("/", 1)[0], name, archive,
                      params.timeout)
            except (TransientError, SourceError) as e:
                failures.append(f"{source}: {e}")
                continue
            if name in params.md5 and file_digest(archive, "md5") != params.md5[name]:
                raise CnnpipeError(f"{name}: checksum mismatch (md5 {file_digest(archive, 'md5')}, expected "
                                   f"{params.md5[name]}); the archive is corrupt or truncated: fetch it again")
            own_images.safe_extract(archive, tmp / kind, params.max_bytes)
            archive.unlink()
            root, _ = own_images.check_source(kind, own_images.archive_root(tmp / kind))
            manifest = {"dataset": kind, "root": root.relative_to(tmp).as_posix(), "in_raw": True,
                        "archive": {"name": name, "md5": params.md5.get(name)}}
            break
        else:
            raise CnnpipeError(f"no {kind} source found ({'; '.join(failures) or 'no sources'}); "
                               "set download.sources to your image folder, CSV or archive URL")
        write_json(tmp / "manifest.json", manifest)
    log.info("%s source: %s", kind, manifest["root"])
    return out_dir / "manifest.json"
