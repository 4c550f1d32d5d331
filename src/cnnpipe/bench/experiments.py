"""`cnnpipe bench queue` and `cnnpipe bench sweep`: experiments at scale, measured in a throwaway clone of the
checkout (its commit; DVC's cache shared, so the data is there and nothing lands in the checkout).

bench queue: the same four one-epoch experiments through `dvc queue start -j 1`, `-j 2`, and `-j 2` with every
process on all the cores (train.threads = the core count, the baseline: no sharing). Wall time from
`dvc queue start` until the last one ends, and images/s and threads per process.

bench sweep: one search space swept with the same random draws, with the median pruner from the first epoch, from
the sweep-file default's first epoch and from each `--warmup-epochs` given, and without a pruner: epochs run,
best validation accuracy, wall time.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from cnnpipe.core import cpushare
from cnnpipe.core.cpuinfo import cpu_model
from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.fsutil import write_json
from cnnpipe.mlops import sweep as sw
from cnnpipe.mlops.dvcops import checked as sh
from cnnpipe.mlops.dvcops import dvc_checked as dvc


@contextlib.contextmanager
def clone_of(repo: Path) -> Iterator[Path]:
    """A clone of the checkout's commit that uses the checkout's DVC cache. Outputs the cache lacks (a fresh
    clone of the project has none) stay missing: the experiments train their own models."""
    tmp = Path(tempfile.mkdtemp(prefix="cnnpipe-bench-"))
    try:
        clone = tmp / "clone"
        sh(tmp, "git", "clone", "-q", str(repo.resolve()), str(clone))
        dvc(clone, "cache", "dir", "--local", str((repo / ".dvc/cache").resolve()))
        dvc(clone, "checkout", "-q", "--allow-missing")
        dvc(clone, "repro", "-q", "split")  # data up to date in the commit the experiments start from
        if sh(clone, "git", "status", "--porcelain", "--untracked-files=no"):
            sh(clone, "git", "commit", "-qam", "bench: data")
        yield clone
    finally:
        with contextlib.suppress(Exception):
            dvc(tmp / "clone", "queue", "stop", "--kill")
        shutil.rmtree(tmp, ignore_errors=True)


def wait_for(clone: Path, names: list[str], timeout: float) -> dict[str, str]:
    from dvc.repo import Repo

    deadline = time.monotonic() + timeout
    while True:
        with Repo(str(clone)) as repo:
            states = {e["name"]: e["status"] for e in repo.experiments.celery_queue.status() if e.get("name")}
        if all(states.get(n) in ("Success", "Failed") for n in names):
            return states
        if time.monotonic() > deadline:
            raise CnnpipeError(f"experiments still running after {timeout:.0f} s: {states}")
        time.sleep(0.5)


def exp_info(clone: Path, name: str) -> dict[str, Any]:
    refs = sh(clone, "git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").splitlines()
    commit = next(r.split()[0] for r in refs if r.endswith(f"/{name}"))
    return json.loads(sh(clone, "git", "show", f"{commit}:metrics/train.info.json"))


def queue_batch(clone: Path, label: str, jobs: int, seeds: list[int], threads: int, epochs: int) -> dict:
    """Queue one experiment per seed (distinct seeds: nothing comes from DVC's run cache), start `jobs` workers
    and time them to the end."""
    names = []
    for seed in seeds:
        name = f"bench-{label}-{seed}"
        dvc(clone, "exp", "run", "--queue", "-n", name, "-S", f"train.epochs={epochs}", "-S", f"train.seed={seed}",
            "-S", f"train.threads={threads}", "train")
        names.append(name)
    t0 = time.perf_counter()
    dvc(clone, "queue", "start", "-j", str(jobs))
    states = wait_for(clone, names, 3600)
    wall = time.perf_counter() - t0
    failed = [n for n in names if states[n] != "Success"]
    if failed:
        raise CnnpipeError(f"{failed[0]} failed: dvc queue logs {failed[0]} (in the bench clone)")
    infos = [exp_info(clone, n) for n in names]
    return {"label": label, "jobs": jobs, "train_threads_param": threads, "experiments": len(names),
            "wall_seconds": round(wall, 1),
            "images_per_second": [i["images_per_second"] for i in infos],
            "threads": [i["threads"] for i in infos]}


def bench_queue(repo: Path, out: Path, experiments: int = 4, epochs: int = 1) -> dict:
    cores = len(cpushare.affinity())
    base = int(time.time()) % 90000 * 10  # fresh seeds each run
    with clone_of(repo) as clone:
        rows = []
        for k, (label, jobs, threads) in enumerate([("j1", 1, 0), ("j2", 2, 0), ("j2-all-cores", 2, cores)]):
            seeds = [base + 100 * k + i for i in range(experiments)]
            rows.append(queue_batch(clone, label, jobs, seeds, threads, epochs))
            print(f"{label:<14} wall {rows[-1]['wall_seconds']:7.1f} s   images/s per process "
                  f"{rows[-1]['images_per_second']}   threads {rows[-1]['threads']}", flush=True)
    result = {"cpu": cpu_model(), "cores": cores, "epochs": epochs, "rows": rows,
              "ratio_j2_to_j1": round(rows[1]["wall_seconds"] / rows[0]["wall_seconds"], 2),
              "ratio_j2_all_cores_to_j1": round(rows[2]["wall_seconds"] / rows[0]["wall_seconds"], 2)}
    print(f"-j 2 / -j 1 wall time: {result['ratio_j2_to_j1']}x (every process on all cores: "
          f"{result['ratio_j2_all_cores_to_j1']}x)")
    write_json(out, result)
    return result


SWEEP_SPACE = {
    "train.lr": {"low": 0.0003, "high": 0.03, "log": True},
    "train.weight_decay": {"low": 0.00005, "high": 0.005, "log": True},
    "train.label_smoothing": [0.0, 0.1],
}


def pruner_arms(warmups: list[int]) -> dict[str, dict[str, Any]]:
    """The sweeps to run: the median pruner with no warmup (pruning from the first epoch), one median pruner per
    warmup in `warmups` (no cut in a trial's first N epochs), and no pruner."""
    arms = {"median": {"kind": "median", "warmup_epochs": 0}}
    arms |= {f"median_warmup{w}": {"kind": "median", "warmup_epochs": w} for w in sorted(set(warmups)) if w > 0}
    return arms | {"none": {"kind": "none"}}


def bench_sweep(repo: Path, out: Path, trials: int = 12, parallel: int = 2, epochs: int = 6,
                train_size: int | None = 10000, seed: int = 0, warmups: list[int] | None = None) -> dict:
    """The same random draws swept with each pruner of `pruner_arms`: the given warmups and the sweep-file
    default at `epochs` epochs. In one clone."""

    default = sw.default_warmup(epochs)
    results = {}
    with clone_of(repo) as clone:
        from cnnpipe.mlops.dvcops import apply_overrides

        # the trials' epochs and, to keep the bench to minutes, a smaller training split; committed
        apply_overrides(clone / "params.yaml", {"split.train_size": train_size, "train.epochs": epochs})
        dvc(clone, "repro", "-q", "split")
        sh(clone, "git", "commit", "-qam", "bench: sweep settings")
        for arm, pruner in pruner_arms([default, *(warmups or [])]).items():
            spec_file = clone / f"bench-{arm}.yaml"
            spec_file.write_text(yaml.safe_dump({"sampler": "random", "seed": seed, "trials": trials,
                                                 "parallel": parallel, "pruner": pruner, "space": SWEEP_SPACE}))
            spec = sw.load_spec(spec_file, clone / "params.yaml")
            t0 = time.perf_counter()
            table = sw.run(spec, clone, log=lambda line, tag=arm: print(f"[{tag}] {line}", flush=True))
            wall = time.perf_counter() - t0
            best = sw.best_row(table)
            results[arm] = {"pruner": pruner, "wall_seconds": round(wall, 1), "epochs": sum(r["epochs"] for r in table),
                            "best_val_acc": best["val_acc"] if best else None,
                            "states": {s: sum(r["state"] == s for r in table)
                                       for s in ("complete", "pruned", "failed")},
                            "trials": table}
    full = results["none"]
    result = {"cpu": cpu_model(), "cores": len(cpushare.affinity()), "trials": trials, "parallel": parallel,
              "epochs_per_trial": epochs, "train_size": train_size, "space": SWEEP_SPACE,
              "default_warmup": default, **results}
    for arm, pruned in results.items():
        if arm == "none":
            continue
        ratios = {"epochs_ratio": round(pruned["epochs"] / full["epochs"], 2),
                  "best_gap_points": round(100 * (full["best_val_acc"] - pruned["best_val_acc"]), 2),
                  "wall_ratio": round(pruned["wall_seconds"] / full["wall_seconds"], 2)}
        pruned |= ratios
        print(f"{arm}: {pruned['epochs']} epochs, best {pruned['best_val_acc']:.4f}, {pruned['wall_seconds']} s; "
              f"unpruned: {full['epochs']} epochs, best {full['best_val_acc']:.4f}, {full['wall_seconds']} s; "
              f"epochs {ratios['epochs_ratio']}x, best {ratios['best_gap_points']} points apart")
    write_json(out, result)
    return result
