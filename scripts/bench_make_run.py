"""A fresh clone's `make run`, timed: clones this repository's HEAD into a temporary folder, runs `make run` there
(the venv created and installed, the whole pipeline run) with an empty cnnpipe cache (so `precision: auto`
probes afresh) and writes the wall time, the precision choice and the accuracies to a bench file.

    .venv/bin/python scripts/bench_make_run.py --out bench/make_run_<cpu kind>.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from cnnpipe.bench.machine import machine, source_revision  # noqa: E402


def run_fresh_clone(where: Path) -> tuple[str | None, float]:
    """Clone HEAD into `where`, run `make run` there; the commit and the wall seconds. Fails on a non-zero exit."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(where)], check=True)
    revision = source_revision(where)  # before the run rewrites the tracked metrics
    env = dict(os.environ, CNNPIPE_CACHE_DIR=str(where.parent / "cache"))
    env.pop("VIRTUAL_ENV", None)
    start = time.perf_counter()
    subprocess.run(["make", "run"], cwd=where, env=env, check=True)
    return revision, time.perf_counter() - start


def summary(clone: Path, revision: str | None, wall: float) -> dict:
    metrics = {name: json.loads((clone / "metrics" / f"{name}.json").read_text())
               for name in ("train", "train.info", "eval", "quantize", "quantize.info")}
    info = metrics["train.info"]
    ran_on = dict(machine(), source_revision=revision,  # the clone's own versions:
                  torch=info["torch"], onnxruntime=metrics["quantize.info"]["onnxruntime"],
                  python=info["environment"]["python"], uv_lock_sha256=info["environment"]["uv_lock_sha256"])
    return {"command": "make run",
            "from": "a fresh clone (git clone, then make run: the venv created and installed, the whole pipeline run)",
            "script": "scripts/bench_make_run.py", "machine": ran_on, "wall_seconds": round(wall, 1),
            "train": {"precision": info["precision"], "precision_choice": info.get("precision_choice"),
                      "images_per_second": info["images_per_second"], "seconds": metrics["train"]["sec"]},
            "eval": {"acc": metrics["eval"]["acc"]}, "quantize": {"acc": metrics["quantize"]["acc"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the bench file to write (JSON)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cnnpipe-make-run-"))
    clone = tmp / "clone"
    try:
        result = summary(clone, *run_fresh_clone(clone))
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: `{shlex.join(e.cmd)}` failed (exit {e.returncode}); the clone is kept in {clone}: "
                 f"fix what its output above names, then run this again")
    shutil.rmtree(tmp)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("wall_seconds", "train", "eval", "quantize")}, indent=1))


if __name__ == "__main__":
    main()
