"""`cnnpipe predict IMAGE_OR_DIR...`: top-k labels per image; a table on a terminal, JSON with --json.

An unreadable file is reported on stderr and skipped; the exit status is 1 if any file was skipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.own_images import IMAGE_SUFFIXES
from cnnpipe.serve.predictor import InputError, Predictor

BATCH = 256


def expand(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            files.append(p)
    return files


def predict_files(predictor: Predictor, files: list[Path], k: int, resize: bool = True):
    """Yield (path, top-k) for readable images and (path, error message) for the others, in order; BATCH files
    at a time, so memory stays flat however many there are."""
    for i in range(0, len(files), BATCH):
        results: dict[Path, object] = {}
        good: list[tuple[Path, np.ndarray]] = []
        for f in files[i: i + BATCH]:
            try:
                good.append((f, predictor.preprocess([f.read_bytes()], resize)[0]))
            except (OSError, InputError) as e:
                results[f] = str(e) if isinstance(e, InputError) else f"cannot read ({e.strerror or e})"
        if good:
            tops = predictor.top_k(predictor.logits(np.stack([x for _, x in good])), k)
            results.update({f: top for (f, _), top in zip(good, tops, strict=True)})
        yield from ((f, results[f]) for f in files[i: i + BATCH])


def main(model: str, paths: list[str], k: int, as_json: bool) -> int:
    predictor = Predictor(model)
    files = expand(paths)
    if not files:
        raise CnnpipeError("no images found in the given paths; pass image files or directories holding them")
    failed = 0
    rows = []
    for path, result in predict_files(predictor, files, k):
        if isinstance(result, str):
            failed += 1
            print(f"cnnpipe predict: skipped {path}: {result}", file=sys.stderr)
            continue
        rows.append({"path": str(path), "top_k": result})
    if as_json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        width = max((len(r["path"]) for r in rows), default=4)
        print(f"{'image':<{width}}  top-{k}")
        for r in rows:
            print(f"{r['path']:<{width}}  " + "  ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top_k"]))
    return 1 if failed else 0
