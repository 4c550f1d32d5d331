"""cnnpipe sweep: search params.yaml keys with Optuna, every trial a DVC experiment run by DVC's queue.

A sweep file names the keys and their ranges; Optuna (grid, random or TPE) proposes each trial's values; the
trial is queued as `dvc exp run --queue -n <sweep>-<NNN> -S key=value ... <stage>` and `dvc queue start -j
<parallel>` runs it, so `dvc exp show` lists every trial with its params and metrics. The train stage reports
validation accuracy after every epoch to the study (core/trial.py) and Optuna's median pruner stops hopeless
trials early; a pruned trial ends like any other run, with whole outputs and a model of the epoch it keeps
(the last; with early stopping, the best).

The study lives in a storage many processes share (a journal file, or a database URL), so a sweep that is
stopped and started again keeps its finished trials and runs only what is left. At the end: a table of the
trials, the best one (`dvc exp apply <name>`), and sweeps/<name>/trials.csv with a dvc.yaml beside it whose
plots `dvc plots show` draws: validation accuracy against each swept key.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cnnpipe.core import trial as trialmod
from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.fsutil import atomic_path, write_json
from cnnpipe.mlops.dvcops import EXP_NAME, check_overrides, dvc_env, head_commit, set_param_args

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("median", "none")
RESULTS = Path("sweeps")
STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}  # Optuna's, as the table shows them


@dataclass(frozen=True)
class Dim:
    """One swept key: a list of choices, or an int/float range (optionally log-scaled or stepped)."""

    key: str
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    is_int: bool = False  # an int range: the params.yaml value is a whole number

    def grid(self) -> list:
        if self.choices is not None:
            return list(self.choices)
        if self.step is None and not self.is_int:
            raise CnnpipeError(f"sweep space {self.key}: a grid needs choices or a step for a float range; "
                               "add step: or use sampler: tpe")
        step = self.step or 1
        n = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        return [self.low + i * step if not self.is_int else int(self.low + i * step) for i in range(n)]


@dataclass(frozen=True)
class Spec:
    name: str
    space: list[Dim]
    sampler: str = "tpe"
    trials: int = 12
    parallel: int = 1
    stage: str = "train"  # trials run the DAG up to this stage; the test set stays unseen until you apply one
    pruner: dict[str, Any] = field(default_factory=lambda: {"kind": "median", "startup_trials": 4,
                                                              "warmup_epochs": 0})
    seed: int = 0


def _fail(path: Path, problem: str) -> CnnpipeError:
    return CnnpipeError(f"{path}: {problem}")


def _number(value: Any) -> Any:
    """YAML 1.1 reads 1e-5 (no dot) as a string: take it as the number it is meant to be."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _dim(path: Path, key: str, raw: Any) -> Dim:
    if isinstance(raw, list):
        raw = {"choices": raw}
    if not isinstance(raw, dict):
        raise _fail(path, f"space {key}: give choices: [...] or low:/high: (and log: true, step:)")
    unknown = set(raw) - {"choices", "low", "high", "log", "step"}
    if unknown:
        raise _fail(path, f"space {key}: unknown field {sorted(unknown)[0]}; use choices, low, high, log, step")
    if "choices" in raw:
        if not isinstance(raw["choices"], list) or not raw["choices"]:
            raise _fail(path, f"space {key}: choices must be a non-empty list")
        return Dim(key, choices=[_number(c) for c in raw["choices"]])
    low, high = (_number(raw.get(k)) for k in ("low", "high"))
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
        raise _fail(path, f"space {key}: low and high must both be numbers")
    if low > high:
        raise _fail(path, f"space {key}: low {low} is above high {high}; swap them")
    log = bool(raw.get("log", False))
    if log and low <= 0:
        raise _fail(path, f"space {key}: a log range must be above 0 (low is {low}); raise low or drop log")
    step = _number(raw.get("step"))
    if step is not None and (not isinstance(step, int | float) or step <= 0 or log):
        raise _fail(path, f"space {key}: step must be a positive number, and not with log")
    return Dim(key, low=low, high=high, log=log, step=step,
               is_int=all(isinstance(v, int) for v in (low, high, step or 1)))


def load_spec(path: str | Path, params_path: str | Path = "params.yaml") -> Spec:
    """Read and check a sweep file: every key must be in params.yaml and every value it can take must pass
    that key's checks (the same as `dvc exp run -S`), before anything is queued."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CnnpipeError(f"{path}: sweep file not found; see sweeps/example.yaml") from None
    except yaml.YAMLError as e:
        raise _fail(path, f"not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(raw, dict):
        raise _fail(path, "a sweep file is a mapping with space: and optional name, sampler, trials, parallel")
    unknown = set(raw) - {"name", "space", "sampler", "trials", "parallel", "stage", "pruner", "seed"}
    if unknown:
        raise _fail(path, f"unknown field {sorted(unknown)[0]}; use name, space, sampler, trials, parallel, "
                          "stage, pruner, seed")
    space_raw = raw.get("space")
    if not isinstance(space_raw, dict) or not space_raw:
        raise _fail(path, "the space is empty; add keys of params.yaml, e.g. space: {train.lr: {low: 0.001, "
                          "high: 0.01, log: true}}")
    space = [_dim(path, str(k), v) for k, v in space_raw.items()]
    for dim in space:
        values = dim.choices if dim.choices is not None else [dim.low, dim.high]
        for value in values:
            try:
                check_overrides(params_path, {dim.key: value})
            except CnnpipeError as e:
                why = str(e).removeprefix(f"override {dim.key}: ").removeprefix("override: ")
                raise _fail(path, f"space {dim.key}: {why.replace('fix the override', 'fix the sweep file')}") from e
    current = yaml.safe_load(Path(params_path).read_text())
    for i, dim in enumerate(space):  # an int range only where params.yaml holds a whole number
        if dim.choices is None:
            value = current
            for part in dim.key.split("."):
                value = value[part]
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if is_int and not dim.is_int:
                raise _fail(path, f"space {dim.key}: a whole-number key; give whole numbers for low, high, step")
            space[i] = dataclasses.replace(dim, is_int=is_int)
    stage = str(raw.get("stage", "train"))
    dvc_yaml = Path(params_path).parent / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise CnnpipeError(f"{dvc_yaml} not found; run cnnpipe sweep in the project checkout (--repo)")
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    if stage not in stages or "train" not in _upstream(stages, stage) | {stage}:
        raise _fail(path, f"stage {stage!r}: trials run the DAG up to a stage at or after train; "
                          f"use one of {', '.join(s for s in stages if 'train' in _upstream(stages, s) | {s})}")
    read = {str(p if isinstance(p, str) else next(iter(p))).split(".")[0]
            for s in _upstream(stages, stage) | {stage} for p in stages[s].get("params", [])}
    for dim in space:  # a key no stage of the trials reads would make every trial the same run
        if dim.key == "train.tag":
            raise _fail(path, "space train.tag: the sweep sets it (each trial's name); sweep another key")
        if dim.key.split(".")[0] not in read:
            raise _fail(path, f"space {dim.key}: the trials run up to stage {stage}, and no stage up to it reads "
                              f"{dim.key.split('.')[0]}; sweep keys of {', '.join(sorted(read))}, or set stage: "
                              "to a stage that reads it")
    name = str(raw.get("name") or path.stem)
    if not EXP_NAME.fullmatch(name) or len(name) > 90:
        raise _fail(path, f"name {name!r}: use letters, digits, '.', '_' or '-' (at most 90)")
    sampler = raw.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise _fail(path, f"sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    ints = {}
    for key, default in (("trials", 12), ("parallel", 1), ("seed", 0)):
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
            raise _fail(path, f"{key} {value!r}: must be a whole number of at least {0 if key == 'seed' else 1}")
        ints[key] = value
    pruner = {"kind": "median", "startup_trials": 4, "warmup_epochs": default_warmup(fewest_epochs(space, current))}
    given = raw.get("pruner", "median")
    given = {"kind": given} if isinstance(given, str) else given
    if not isinstance(given, dict) or given.get("kind", "median") not in PRUNERS or set(given) - set(pruner):
        raise _fail(path, "pruner: median or none, or {kind: median, startup_trials: N, warmup_epochs: M}")
    for key in ("startup_trials", "warmup_epochs"):
        value = given.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _fail(path, f"pruner {key} {value!r}: must be a whole number of at least 0")
    pruner.update(given)
    return Spec(name, space, sampler, ints["trials"], ints["parallel"], stage, pruner, ints["seed"])


def fewest_epochs(space: list[Dim], params: dict) -> int:
    """The fewest epochs a trial trains: params.yaml's train.epochs, or the least the space allows."""
    dim = next((d for d in space if d.key == "train.epochs"), None)
    return int(params["train"]["epochs"] if dim is None else min(dim.choices or [dim.low]))


def default_warmup(epochs: int) -> int:
    """The median pruner's default warmup: a third of a trial's epochs, in which no trial is cut. Under the
    one-cycle schedule a high learning rate's trial trails the others until its rate has come down, and can
    still end ahead (docs/benchmarks.md, "Sweeps: what pruning saves")."""
    return epochs // 3


def _upstream(stages: dict, stage: str) -> set[str]:
    """Stages whose outputs `stage` depends on, transitively (from dvc.yaml's deps and outs)."""
    outs = {str(o if isinstance(o, str) else next(iter(o))): name for name, s in stages.items()
            for o in s.get("outs", []) + s.get("metrics", []) + s.get("plots", [])}
    seen: set[str] = set()
    todo = [stage]
    while todo:
        for dep in stages.get(todo.pop(), {}).get("deps", []):
            up = next((n for out, n in outs.items() if str(dep) == out or str(dep).startswith(out + "/")), None)
            if up and up not in seen:
                seen.add(up)
                todo.append(up)
    return seen


def check_budget(spec: Spec, trials: int | None, parallel: int | None) -> Spec:
    """Command-line overrides of the budget and the parallelism."""
    for flag, value in (("--trials", trials), ("--parallel", parallel)):
        if value is not None and value < 1:
            raise CnnpipeError(f"{flag} {value}: must be at least 1")
    spec = dataclasses.replace(spec, trials=trials or spec.trials, parallel=parallel or spec.parallel)
    if spec.sampler == "grid":
        size = math.prod(len(d.grid()) for d in spec.space)
        spec = dataclasses.replace(spec, trials=min(spec.trials, size))
    return spec


def distributions(spec: Spec) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for d in spec.space:
        if d.choices is not None:
            out[d.key] = CategoricalDistribution(d.choices)
        elif d.is_int:
            out[d.key] = IntDistribution(int(d.low), int(d.high), log=d.log, step=int(d.step or 1))
        else:
            out[d.key] = FloatDistribution(float(d.low), float(d.high), log=d.log, step=d.step)
    return out


def open_study(spec: Spec, storage: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = trialmod.make_pruner(spec.pruner)  # before the storage: a pruner Optuna refuses writes no study
    if spec.sampler in ("grid", "random"):  # a grid: every point enqueued below, in order
        sampler = optuna.samplers.RandomSampler(seed=spec.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=min(4, spec.trials),
                                             constant_liar=spec.parallel > 1)
    study = optuna.create_study(study_name=spec.name, storage=trialmod.open_storage(storage), sampler=sampler,
                                pruner=pruner, direction="maximize",
                                load_if_exists=True)
    n = len(study.trials)
    if spec.sampler == "grid" and not n:
        import itertools

        keys = [d.key for d in spec.space]
        for values in itertools.product(*(d.grid() for d in spec.space)):
            study.enqueue_trial(dict(zip(keys, values, strict=True)))
    elif n:  # a resumed sweep: new draws, not the first run's again
        study.sampler = type(sampler)(seed=spec.seed + n, **({"n_startup_trials": min(4, spec.trials),
                                                               "constant_liar": spec.parallel > 1}
                                                              if spec.sampler == "tpe" else {}))
    return study


def default_storage(repo: str | Path, spec: Spec) -> str:
    return str(Path(repo).resolve() / ".dvc/tmp/sweeps" / f"{spec.name}.journal")


def absolute_storage(storage: str) -> str:
    """A journal file's path made absolute (trials open it from DVC's temporary workspaces and from worker
    clones, where a relative path would name another, empty journal); a database URL as it is."""
    return storage if "://" in storage else str(Path(storage).resolve())


def exp_name(spec: Spec, number: int) -> str:
    return f"{spec.name}-{number:03d}"


def write_ticket(repo: str | Path, name: str, spec: Spec, storage: str, trial_id: int) -> None:
    write_json(trialmod.ticket_path(repo, name), {"study": spec.name, "storage": storage, "trial_id": trial_id,
                                                  "pruner": spec.pruner})


def trial_overrides(trial, name: str) -> dict[str, Any]:
    """The trial's params, and its name as train.tag: no two trials (and no plain run) share a run-cache key,
    so no trial is restored instead of trained and no pruned model is ever restored for a plain run."""
    return {**trial.params, "train.tag": name}


def counted(t) -> bool:
    """Trials that count against the budget: finished ones, not those a stopped sweep left behind."""
    from optuna.trial import TrialState

    return t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) and not t.user_attrs.get("requeued")


# ---- DVC's queue ------------------------------------------------------------------------------------------

class DvcQueue:
    """Trials as `dvc exp run --queue` entries of this checkout, run by `dvc queue start -j <parallel>`."""

    where = "dvc queue logs"

    def __init__(self, repo: Path, spec: Spec, storage: str):
        self.repo, self.spec, self.storage = repo, spec, storage

    def submit(self, trial, name: str) -> None:
        write_ticket(self.repo, name, self.spec, self.storage, trial._trial_id)
        sets = set_param_args(trial_overrides(trial, name))
        proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", name, *sets,
                               self.spec.stage], cwd=self.repo, env=dvc_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise CnnpipeError(f"dvc exp run --queue failed for {name}: "
                               f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")

    def tick(self) -> None:
        """`dvc queue start -j N` starts only the workers that are missing; they stop when the queue is empty."""
        proc = subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(self.spec.parallel)],
                              cwd=self.repo, env=dvc_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise CnnpipeError(f"dvc queue start failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")

    def finished(self, name: str) -> None:
        trialmod.ticket_path(self.repo, name).unlink(missing_ok=True)

    def states(self, study) -> dict[str, str]:
        """Experiment name -> Queued | Running | Success | Failed, as `dvc queue status` reports them."""
        from dvc.repo import Repo

        with Repo(str(self.repo)) as dvc_repo:
            return {e["name"]: e["status"] for e in dvc_repo.experiments.celery_queue.status() if e.get("name")}


# ---- results ----------------------------------------------------------------------------------------------

def conclude(study, trial_number: int, succeeded: bool, why: str = "") -> str:
    """Tell the study how a trial ended: the validation accuracy of the epoch its model keeps (the last, or with
    early stopping the best; the train stage records it), complete or pruned early; or failed."""
    from optuna.trial import TrialState

    t = study.trials[trial_number]
    values = t.intermediate_values
    if succeeded and values:
        state = TrialState.PRUNED if "pruned_after_epoch" in t.user_attrs else TrialState.COMPLETE
        kept = t.user_attrs.get("kept_val_acc", values[max(values)])  # recorded with each epoch, else the last
        if "kept_val_acc" not in t.user_attrs:  # Optuna keeps no value for a pruned trial; the table shows this
            study._storage.set_trial_user_attr(t._trial_id, "kept_val_acc", kept)
        study.tell(t.number, kept if state == TrialState.COMPLETE else None, state=state)
        return state.name.lower()
    study._storage.set_trial_user_attr(t._trial_id, "failure", why or "reported no validation accuracy")
    study.tell(t.number, state=TrialState.FAIL)
    return "failed"


def rows(study) -> list[dict[str, Any]]:
    """One row per trial that counts: its experiment, state, epochs run, its model's validation accuracy, params."""
    out = []
    for t in study.trials:
        if not counted(t):
            continue
        acc = t.user_attrs.get("kept_val_acc", t.value)  # pruned: Optuna's value is None
        out.append({"trial": t.number, "experiment": t.user_attrs.get("dvc_exp", ""), "state": STATES[t.state.name],
                    "epochs": len(t.intermediate_values), "val_acc": acc, **t.params})
    return out


def best_row(table: list[dict[str, Any]]) -> dict[str, Any] | None:
    done = [r for r in table if r["state"] == "complete"]
    return max(done, key=lambda r: r["val_acc"]) if done else None


def format_table(table: list[dict[str, Any]], keys: list[str]) -> str:
    head = ["trial", "experiment", "state", "epochs", "val_acc", *keys]
    lines = [head] + [[str(r["trial"]), r["experiment"], r["state"], str(r["epochs"]),
                       f"{r['val_acc']:.4f}" if r["val_acc"] is not None else "-",
                       *(f"{r.get(k):.4g}" if isinstance(r.get(k), float) else str(r.get(k)) for k in keys)]
                      for r in table]
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines)


def write_results(repo: str | Path, spec: Spec, table: list[dict[str, Any]]) -> Path:
    """sweeps/<name>/trials.csv and a dvc.yaml beside it: a scatter plot of val_acc against each swept key."""
    folder = Path(repo) / RESULTS / spec.name
    keys = [d.key for d in spec.space]
    with atomic_path(folder / "trials.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["trial", "experiment", "state", "epochs", "val_acc", *keys])
        writer.writeheader()
        writer.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in table])
    plots = [{f"{spec.name}: val_acc vs {k}": {"template": "scatter", "x": {"trials.csv": k},
                                               "y": {"trials.csv": "val_acc"}, "title": f"{spec.name}: {k}"}}
             for k in keys]
    with atomic_path(folder / "dvc.yaml") as tmp:
        tmp.write_text("# written by cnnpipe sweep: `dvc plots show` draws validation accuracy against each key\n"
                       + yaml.safe_dump({"plots": plots}, sort_keys=False))
    return folder / "trials.csv"


# ---- the loop ---------------------------------------------------------------------------------------------

def recover(study, states: dict[str, str], where: str) -> list[int]:
    """Trials a stopped sweep left running: still queued or running -> wait for them; finished -> conclude;
    lost -> re-propose the same params to a new trial. Returns the numbers still in flight."""
    from optuna.trial import TrialState

    waiting = []
    for t in study.trials:
        if t.state != TrialState.RUNNING:
            continue
        name = t.user_attrs.get("dvc_exp", "")
        status = states.get(name)
        if status in ("Queued", "Running"):
            waiting.append(t.number)
        elif status in ("Success", "Failed"):
            conclude(study, t.number, status == "Success", f"the trial failed: {where} {name}")
        else:
            study._storage.set_trial_user_attr(t._trial_id, "requeued", True)
            study.tell(t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params, skip_if_exists=False)
    return waiting


MAX_FAILED_IN_A_ROW = 5  # a broken environment or space: stop rather than spend the budget on failures


def say(line: str) -> None:
    print(line, flush=True)  # progress shows as it happens, also through a pipe or a log file


def drive(spec: Spec, study, backend, poll: float = 2.0, log: Callable[[str], None] = say) -> None:
    """Keep `spec.parallel` trials in flight on the backend (DVC's queue, or a Prefect work pool) until the
    budget is spent; conclude each trial as it ends (unless its runner already did) and log the progress."""
    from optuna.trial import TrialState

    dists = distributions(spec)
    in_flight = recover(study, backend.states(study), backend.where)
    done = sum(counted(t) for t in study.trials)
    if done or in_flight:
        log(f"sweep {spec.name}: resuming with {done} finished trials, {len(in_flight)} still queued")
    seen: dict[int, int] = {}
    failed_in_a_row = 0
    backend.tick()
    while done + len(in_flight) < spec.trials or in_flight:
        submitted = False
        while done + len(in_flight) < spec.trials and len(in_flight) < spec.parallel:
            t = study.ask(dists)
            name = exp_name(spec, t.number)
            t.set_user_attr("dvc_exp", name)
            backend.submit(t, name)
            in_flight.append(t.number)
            submitted = True
            log(f"trial {t.number} queued as {name}: {json.dumps(t.params)}")
        if submitted:
            backend.tick()
        time.sleep(poll)
        states = backend.states(study)
        for number in list(in_flight):
            t = study.trials[number]
            name, epochs = t.user_attrs["dvc_exp"], len(t.intermediate_values)
            if epochs != seen.get(number, 0):
                seen[number] = epochs
                log(f"trial {number}: epoch {epochs} val_acc {t.intermediate_values[max(t.intermediate_values)]:.4f}")
            status = states.get(name)
            if t.state == TrialState.RUNNING:  # else its runner has told the study already
                if status not in ("Success", "Failed"):
                    continue
                conclude(study, number, status == "Success", f"the trial failed: {backend.where} {name}")
            t = study.trials[number]
            in_flight.remove(number)
            done += 1
            backend.finished(name)
            state = STATES.get(t.state.name, t.state.name.lower())
            log(f"trial {number} {state} after {len(t.intermediate_values)} epochs"
                + (f" (see `{backend.where} {name}`)" if state == "failed" else ""))
            failed_in_a_row = failed_in_a_row + 1 if state == "failed" else 0
            if failed_in_a_row >= MAX_FAILED_IN_A_ROW:
                raise CnnpipeError(f"{failed_in_a_row} trials in a row failed, the sweep stops; see "
                                   f"`{backend.where} {name}` (queued trials finish on their own)")


def search_key(spec: Spec) -> str:
    """A hash of what the trials are drawn from: the space and the sampler."""
    text = json.dumps({"sampler": spec.sampler, "space": [dataclasses.asdict(d) for d in spec.space]},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pin_commit(study, spec: Spec, commit: str) -> None:
    """A study belongs to the commit and the search it started with: trials of two code versions, or drawn
    from two spaces, are not compared."""
    started = study.user_attrs.get("commit")
    if started is None:
        study.set_user_attr("commit", commit)
    elif started != commit:
        raise CnnpipeError(f"sweep {spec.name} started on commit {started[:12]}, the checkout is at {commit[:12]}; "
                           "give this sweep a new name (name: in the file) or go back to that commit")
    searched = study.user_attrs.get("search")
    if searched is None:
        study.set_user_attr("search", search_key(spec))
    elif searched != search_key(spec):
        raise CnnpipeError(f"sweep {spec.name} started with another space or sampler than its file now gives; "
                           "give this sweep a new name (name: in the file) or undo the edit")


def load_existing(spec: Spec, storage: str):
    """The sweep's study as it stands, or a one-line error; creates nothing."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if "://" not in storage and not Path(storage).is_file():
        raise CnnpipeError(f"no sweep named {spec.name} yet ({storage} does not exist); run it first")
    try:
        return optuna.load_study(study_name=spec.name, storage=trialmod.open_storage(storage))
    except KeyError:
        raise CnnpipeError(f"no sweep named {spec.name} in {storage}; run it first") from None


def run(spec: Spec, repo: str | Path = ".", storage: str | None = None, poll: float = 2.0,
        log: Callable[[str], None] = say) -> list[dict[str, Any]]:
    """Run the sweep to its budget through DVC's queue; returns the table (also written to sweeps/<name>/).
    Trials start from the checkout as it is (DVC's queue takes uncommitted changes along)."""
    repo = Path(repo).resolve()
    storage = absolute_storage(storage) if storage else default_storage(repo, spec)
    commit = head_commit(repo)
    study = open_study(spec, storage)
    pin_commit(study, spec, commit)
    drive(spec, study, DvcQueue(repo, spec, storage), poll, log)
    table = rows(study)
    write_results(repo, spec, table)
    return table


def summary(spec: Spec, table: list[dict[str, Any]]) -> str:
    keys = [d.key for d in spec.space]
    best = best_row(table)
    counts = {s: sum(r["state"] == s for r in table) for s in ("complete", "pruned", "failed")}
    epochs = sum(r["epochs"] for r in table)
    lines = [format_table(table, keys), "",
             f"{len(table)} trials: {counts['complete']} complete, {counts['pruned']} pruned, "
             f"{counts['failed']} failed; {epochs} epochs in all"]
    if best:
        lines.append(f"best: trial {best['trial']} ({best['experiment']}), val_acc {best['val_acc']:.4f}; "
                     f"to use it: dvc exp apply {best['experiment']} && dvc repro")
    lines.append(f"plots: dvc plots show {RESULTS / spec.name / 'dvc.yaml'}")
    return "\n".join(lines)
