"""A sweep file is checked before anything is queued: bad input gets one line, exit 1, and no study, ticket or
result is written."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.mlops.sweep import Dim, load_spec, open_study, pin_commit

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("space, problem", [
    ({"train.nosuch": [1]}, "train.nosuch"),
    ({}, "the space is empty"),
    ({"train.lr": {"low": 0.1, "high": 0.01}}, "low 0.1 is above high 0.01"),
    ({"train.lr": {"low": 0, "high": 0.01, "log": True}}, "a log range must be above 0"),
    ({"train.model": ["resnet9000"]}, "train.model"),
    ({"train.epochs": {"low": 2, "high": 4.5}}, "train.epochs must be int, got 4.5; fix the sweep file"),
    # trials run up to train: keys of later stages would make every trial the same run
    ({"evaluate.tta_flip": [True, False]}, "space evaluate.tta_flip: the trials run up to stage train, and no "
                                           "stage up to it reads evaluate; sweep keys of download, split, train"),
    ({"train.tag": ["a", "b"]}, "space train.tag: the sweep sets it"),
])
def test_bad_sweep_files_queue_nothing(tmp_path, space, problem):
    assert_refused(tmp_path, {"name": "bad", "space": space}, problem)


@pytest.mark.parametrize("pruner, problem", [
    ({"startup_trials": -1}, "pruner startup_trials -1: must be a whole number of at least 0"),
    ({"warmup_epochs": "two"}, "pruner warmup_epochs 'two': must be a whole number of at least 0"),
    ({"kind": "median", "warmup_epochs": 1.5}, "pruner warmup_epochs 1.5"),
    ({"startup_trials": True}, "pruner startup_trials True"),
])
def test_bad_pruner_values_write_no_study(tmp_path, pruner, problem):
    assert_refused(tmp_path, {"space": {"train.lr": [0.01]}, "pruner": pruner}, problem)


def test_a_pruner_optuna_refuses_opens_no_storage(tmp_path):
    spec = load_spec(ROOT / "sweeps/example.yaml", ROOT / "params.yaml")
    journal = tmp_path / "sweeps" / "bad.journal"
    with pytest.raises(ValueError, match="startup trials"):
        open_study(dataclasses.replace(spec, pruner={"kind": "median", "startup_trials": -1}), str(journal))
    assert not journal.parent.exists()


def test_a_sweep_resumed_with_another_space_or_sampler_is_refused(tmp_path):
    spec = load_spec(ROOT / "sweeps/example.yaml", ROOT / "params.yaml")
    storage = str(tmp_path / "example.journal")
    pin_commit(open_study(spec, storage), spec, "c0ffee")
    bigger = dataclasses.replace(spec, trials=40, parallel=1)  # a new budget is a resume, not another sweep
    pin_commit(open_study(bigger, storage), bigger, "c0ffee")
    changed = (dataclasses.replace(spec, sampler="random"),
               dataclasses.replace(spec, space=[dataclasses.replace(spec.space[0], high=spec.space[0].high * 2),
                                                *spec.space[1:]]))
    for other in changed:
        with pytest.raises(CnnpipeError, match=r"^sweep example started with another space or sampler than its "
                                               r"file now gives; give this sweep a new name \(name: in the file\)"):
            pin_commit(open_study(other, storage), other, "c0ffee")


def test_a_zero_budget_queues_nothing(tmp_path):
    assert_refused(tmp_path, {"space": {"train.lr": [0.01]}, "trials": 0}, "trials 0")
    assert_refused(tmp_path, {"space": {"train.lr": [0.01]}}, "--trials 0", "--trials", "0")


def assert_refused(tmp_path: Path, spec: dict, problem: str, *args: str) -> None:
    root = Path(__file__).resolve().parents[2]
    for name in ("params.yaml", "dvc.yaml"):
        (tmp_path / name).write_text((root / name).read_text())
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", "cnnpipe.cli", "sweep", "bad.yaml", *args], cwd=tmp_path,
                          capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnpipe sweep: error: ") and problem in lines[0], proc.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no study, ticket or result


def test_the_example_sweep_file_loads(tmp_path):
    spec = load_spec(ROOT / "sweeps/example.yaml", ROOT / "params.yaml")
    assert spec.name == "example" and spec.sampler == "tpe" and spec.parallel == 2
    assert [d.key for d in spec.space] == ["train.lr", "train.weight_decay", "train.label_smoothing"]


def test_grid_values_and_budget():
    assert Dim("k", low=1, high=7, step=3).grid() == [1, 4, 7]
    assert Dim("k", low=0.0, high=0.2, step=0.1).grid() == pytest.approx([0.0, 0.1, 0.2])
    with pytest.raises(CnnpipeError, match="a grid needs choices or a step"):
        Dim("k", low=0.0, high=1.0).grid()


def test_exponents_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-5 as a string; a sweep file means the number."""
    (tmp_path / "s.yaml").write_text("space:\n  train.lr: {low: 1e-5, high: 1e-2, log: true}\n")
    dim = load_spec(tmp_path / "s.yaml", ROOT / "params.yaml").space[0]
    assert (dim.low, dim.high, dim.log) == (1e-5, 1e-2, True)


def test_stage_must_be_train_or_after(tmp_path):
    for stage, ok in (("evaluate", True), ("split", False), ("nosuch", False)):
        (tmp_path / "s.yaml").write_text(f"stage: {stage}\nspace:\n  train.lr: [0.01]\n")
        if ok:
            assert load_spec(tmp_path / "s.yaml", ROOT / "params.yaml").stage == stage
        else:
            with pytest.raises(CnnpipeError, match=f"stage '{stage}': trials run the DAG up to a stage at or after"):
                load_spec(tmp_path / "s.yaml", ROOT / "params.yaml")


def test_float_keys_get_float_ranges_and_exponent_choices_are_numbers(tmp_path):
    (tmp_path / "s.yaml").write_text("space:\n  train.label_smoothing: {low: 0, high: 0.5}\n"
                                     "  train.lr: [1e-3, 3e-3]\n  train.epochs: {low: 2, high: 6}\n")
    smoothing, lr, epochs = load_spec(tmp_path / "s.yaml", ROOT / "params.yaml").space
    assert not smoothing.is_int and epochs.is_int and lr.choices == [1e-3, 3e-3]


def test_each_bench_sweep_arm_loads_as_its_pruner(tmp_path):
    """`cnnpipe bench sweep --epochs 9 --warmup-epochs 1` sweeps with the median pruner from the first epoch,
    from the sweep-file default's first epoch (a third of 9), from each warmup given, and with no pruner; each
    arm's sweep file loads as that pruner."""
    import optuna

    from cnnpipe.bench.experiments import SWEEP_SPACE, pruner_arms
    from cnnpipe.core.trial import make_pruner
    from cnnpipe.mlops.sweep import default_warmup

    arms = pruner_arms([default_warmup(9), 1])
    assert list(arms) == ["median", "median_warmup1", "median_warmup3", "none"]
    pruners = {}
    for arm, pruner in arms.items():
        (tmp_path / f"{arm}.yaml").write_text(yaml.safe_dump({"sampler": "random", "pruner": pruner,
                                                               "space": SWEEP_SPACE}))
        pruners[arm] = make_pruner(load_spec(tmp_path / f"{arm}.yaml", ROOT / "params.yaml").pruner)
    assert isinstance(pruners["none"], optuna.pruners.NopPruner)
    # Optuna's steps are epochs from 1, and it prunes from step n_warmup_steps on
    assert [pruners[a]._n_warmup_steps for a in ("median", "median_warmup1", "median_warmup3")] == [1, 2, 4]


@pytest.mark.parametrize("epochs, warmup", [(None, 3), ({"low": 4, "high": 8}, 1), ([9, 6], 2), ([2, 4], 0)])
def test_the_median_pruner_spares_a_third_of_the_fewest_epochs_by_default(tmp_path, epochs, warmup):
    """A high learning rate's trial trails early under the one-cycle schedule; by default no trial is cut in the
    first third of its epochs (params.yaml's 10, or the fewest the space allows). An explicit warmup wins."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["epochs"] = 10
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    space = {"train.lr": [0.001, 0.003]} | ({"train.epochs": epochs} if epochs else {})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"space": space}))
    assert load_spec(tmp_path / "s.yaml", tmp_path / "params.yaml").pruner["warmup_epochs"] == warmup
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"space": space, "pruner": {"warmup_epochs": 0}}))
    assert load_spec(tmp_path / "s.yaml", tmp_path / "params.yaml").pruner["warmup_epochs"] == 0


def test_a_later_stage_makes_its_keys_sweepable(tmp_path):
    (tmp_path / "s.yaml").write_text("stage: evaluate\nspace:\n  evaluate.tta_flip: [true, false]\n")
    spec = load_spec(tmp_path / "s.yaml", ROOT / "params.yaml")
    assert spec.stage == "evaluate" and [d.key for d in spec.space] == ["evaluate.tta_flip"]


def test_a_relative_journal_is_made_absolute_and_a_database_url_kept(tmp_path, monkeypatch):
    """Trials open the storage from DVC's temporary workspaces: a relative path there is another journal."""
    from cnnpipe.mlops.sweep import absolute_storage

    monkeypatch.chdir(tmp_path)
    assert absolute_storage("sweeps/s.journal") == str(tmp_path / "sweeps/s.journal")
    assert absolute_storage("postgresql://host/db") == "postgresql://host/db"

