"""The user's own images: `imagefolder` (root/<class>/*.png, .jpg, ...) and `csv` (columns path,label).

Sources are local directories or CSV files, file:// URLs, or http(s) .zip / .tar.gz archives, unpacked
safely (no member may escape the target folder, no links, a total size limit). Images are decoded with
Pillow in a process pool into the same uint8 N×C×H×W arrays the built-in datasets use.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np

from cnnpipe.core.errors import CnnpipeError

KINDS = ("imagefolder", "csv")
# image files, by suffix: what own-image folders, CSVs and `cnnpipe predict DIR` read (all decoded by Pillow)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".pgm", ".ppm")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM")  # Pillow's decoders for those; no others
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")


# --- listing ---------------------------------------------------------------------------------------------
def subfolders(root: Path) -> list[Path]:
    """The folders in root, sorted, without hidden ones and the __MACOSX folder of zips made on a Mac."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")


def list_imagefolder(root: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """([(path relative to root, class)], [unsupported files]) of root/<class>/..., classes sorted."""
    if not root.is_dir():
        raise CnnpipeError(f"{root}: not a directory; point download.sources at a folder of class folders")
    items, unsupported = [], []
    for class_dir in subfolders(root):
        for f in sorted(class_dir.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                rel = f.relative_to(root).as_posix()
                (items if f.suffix.lower() in IMAGE_SUFFIXES else unsupported).append(
                    (rel, class_dir.name) if f.suffix.lower() in IMAGE_SUFFIXES else rel)
    if not items:
        raise CnnpipeError(f"{root}: no images in class folders (root/<class>/*{'|'.join(IMAGE_SUFFIXES)}); "
                           "check the path")
    return items, unsupported


def read_label_csv(csv_path: Path) -> list[tuple[Path, str]]:
    """[(absolute image path, label)] from a CSV with columns path,label; paths resolve against the CSV."""
    import pandas as pd

    if not csv_path.is_file():
        raise CnnpipeError(f"{csv_path}: CSV not found; point download.sources at the labels CSV")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise CnnpipeError(f"{csv_path}: unreadable CSV ({str(e).splitlines()[0]}); fix the file") from e
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise CnnpipeError(f"{csv_path}: missing column '{missing[0]}'; the CSV needs a header with path,label")
    for column in ("path", "label"):
        blank = df.index[df[column].str.strip() == ""].tolist()
        if blank:
            raise CnnpipeError(f"{csv_path}: row {blank[0] + 2} has no {column}; fill it in or drop the row")
    out = []
    for path, label in zip(df["path"], df["label"], strict=True):
        p = Path(path)
        p = p if p.is_absolute() else csv_path.parent / p
        if not p.is_file():
            raise CnnpipeError(f"{csv_path}: image {path} does not exist ({p}); fix the path or drop the row")
        out.append((p, label.strip()))
    return out


def check_source(kind: str, path: Path) -> tuple[Path, list[Path]]:
    """Fail early, naming the file, if the source cannot be used; returns the folder or CSV to read, and the
    images a CSV lists (none for a folder)."""
    if kind == "imagefolder":
        for part in imagefolder_parts(path).values():
            list_imagefolder(part)
        return path, []
    if path.is_dir():
        csvs = sorted(path.glob("*.csv"))
        if len(csvs) != 1:
            raise CnnpipeError(f"{path}: expected one labels CSV in the folder, found {len(csvs)}; "
                               "point download.sources at the CSV")
        path = csvs[0]
    return path, [image for image, _ in read_label_csv(path)]


SPLIT_FOLDERS = ("train", "val", "valid", "validation", "test")  # names that mean a split, not a class


def imagefolder_parts(root: Path) -> dict[str, Path]:
    """{"train": root/train, "test": root/test} when the folder brings its own test set, else {"all": root}.
    Other split folders (two or more split names, or train/ alone) are refused: read as classes they would
    train a classifier of splits, and ignored they would lose images. One split name among other folders is
    a class (a `train` among vehicles)."""
    folders = [p.name for p in subfolders(root)]
    names = sorted(name.lower() for name in folders)
    if names == ["test", "train"]:  # Train/ and Test/ too
        return {name.lower(): root / name for name in folders}
    if names == ["train"] or len([n for n in names if n in SPLIT_FOLDERS]) > 1:
        if names == ["train"]:
            fix = "add test/ beside train/, or move train/'s class folders up into the root"
        else:
            others = ", ".join(f"{name}/" for name in folders if name.lower() not in ("train", "test"))
            fix = f"move the images of {others} into train/<class>/ (split.val_size holds validation images out)"
        raise CnnpipeError(f"{root}: holds {', '.join(f'{name}/' for name in folders)}; an image folder is "
                           f"root/<class>/, or root/train/<class>/ and root/test/<class>/ alone: {fix}")
    return {"all": root}


# --- archives --------------------------------------------------------------------------------------------
def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _check_member(archive: Path, name: str) -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and p.parts[0].endswith(":")):
        raise CnnpipeError(f"{archive}: member '{name}' escapes the target folder; the archive is unsafe, repack it")


def safe_extract(archive: Path, dest: Path, max_bytes: int) -> None:
    """Unpack a .zip or .tar.gz into dest: every member stays inside, no links, at most max_bytes."""
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    _check_member(archive, info.filename)
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        raise CnnpipeError(f"{archive}: member '{info.filename}' is a link; repack without links")
                    total += info.file_size
                if total > max_bytes:
                    raise CnnpipeError(f"{archive}: unpacks to {total} bytes, over download.max_bytes {max_bytes}")
                z.extractall(dest)
        else:
            with tarfile.open(archive, "r:*") as t:
                members = t.getmembers()
                for m in members:
                    _check_member(archive, m.name)
                    if m.issym() or m.islnk() or m.isdev():
                        raise CnnpipeError(f"{archive}: member '{m.name}' is a link or device; repack without them")
                    total += m.size
                if total > max_bytes:
                    raise CnnpipeError(f"{archive}: unpacks to {total} bytes, over download.max_bytes {max_bytes}")
                t.extractall(dest, members=members, filter="data")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise CnnpipeError(f"{archive}: unreadable archive ({e}); check the file or its download.md5") from e


def archive_root(dest: Path) -> Path:
    """The folder that holds the data: dest itself, or its single top-level folder."""
    entries = [p for p in dest.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else dest


# --- decoding ------------------------------------------------------------------------------------------
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")  # Pillow's modes for 16-bit greyscale PNG and TIFF


def open_image(source):
    """Pillow's Image.open (a path or a binary file) limited to IMAGE_FORMATS: a file that another of its
    plugins (DDS, IM, ...) would claim is refused as unidentified, not decoded by less-used code."""
    from PIL import Image

    return Image.open(source, formats=IMAGE_FORMATS)


def convert_image(im, mode: str):
    """A PIL image in `mode` ("L" or "RGB"), 8 bits a channel. Pillow's own conversion clips 16-bit greyscale
    to 0-255 (nearly all white); here its 0-65535 range is scaled down instead."""
    from PIL import Image

    if im.mode in SIXTEEN_BIT:
        wide = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(wide / 257), 0, 255).astype(np.uint8), "L")
    return im if im.mode == mode else im.convert(mode)


def decode(path: str, channels: int, size: int) -> np.ndarray | str:
    """One image file -> C×size×size uint8, or the reason it cannot be read."""
    from PIL import Image

    try:
        with open_image(path) as im:
            im.load()
            im = convert_image(im, "L" if channels == 1 else "RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # Pillow's decoders raise many types on damaged or hostile files
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else 'unreadable'}"
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _decode_chunk(args: tuple[list[str], int, int]) -> list[np.ndarray | str]:
    paths, channels, size = args
    return [decode(p, channels, size) for p in paths]


def decode_all(paths: list[str], channels: int, size: int, workers: int = 0,
               chunk: int = 256) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Decode in a process pool: (images of the good files, their indices, {bad index: reason})."""
    workers = workers or os.cpu_count() or 1
    chunks = [(paths[i: i + chunk], channels, size) for i in range(0, len(paths), chunk)]
    if workers == 1 or len(chunks) == 1:
        results = [r for c in chunks for r in _decode_chunk(c)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = [r for part in pool.map(_decode_chunk, chunks) for r in part]
    good = [i for i, r in enumerate(results) if not isinstance(r, str)]
    bad = {i: r for i, r in enumerate(results) if isinstance(r, str)}
    images = np.stack([results[i] for i in good]) if good else np.zeros((0, channels, size, size), np.uint8)
    return images, good, bad


def label_indices(labels: Iterable[str]) -> tuple[list[str], np.ndarray]:
    """Sorted class names and each label's index."""
    labels = list(labels)
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.array([index[lb] for lb in labels], dtype=np.int64)
