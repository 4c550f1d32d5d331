"""Every numeric param of every stage, set to 0, -1 and an absurdly large value, and the stage run for real
through `cnnpipe <stage>` on tiny data: each case either succeeds or stops with one line that names the key,
exit code 1, no traceback and no file left behind."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml
from helpers import write_mnist_mirror

from cnnpipe import cli
from cnnpipe.core.params import SECTIONS, defaults

# Inputs each stage reads, relative to the project folder it runs in.
INPUTS = {
    "download": [],
    "split": ["data/raw"],
    "train": ["data/prepared"],
    "evaluate": ["data/prepared", "models/model.pt"],
    "export": ["data/prepared", "models/model.pt"],
    "quantize": ["data/prepared", "models/model.onnx"],
}


def numeric_fields() -> list[tuple[str, str]]:
    return [(name, f.name) for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)
            if f.default is None or (isinstance(f.default, int | float) and not isinstance(f.default, bool))]


def cases() -> list:
    out = []
    for section, key in numeric_fields():
        is_float = isinstance(getattr(SECTIONS[section](), key), float) and key not in ("test_size",)
        for value in ((0.0, -1.0, 1e12) if is_float else (0, -1, 10**12)):
            out.append(pytest.param(section, key, value, id=f"{section}.{key}={value:g}"))
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    """Tiny inputs of every stage (a real download, split, training and export) and the params that made them."""
    root = tmp_path_factory.mktemp("sweep")
    md5 = write_mnist_mirror(root / "mirror")
    params = defaults()
    params["download"].update(dataset="mnist", sources=[str(root / "mirror")], md5=md5, retries=1)
    params["split"].update(val_size=50)
    params["train"].update(model="lenet", epochs=1, batch_size=50, device="cpu")
    params["evaluate"].update(device="cpu")
    params["export"].update(check_images=16)
    params["quantize"].update(calibration_images=16, latency_runs=5)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in ("download", "split", "train", "export"):
            assert cli.main(["-q", stage]) == 0, stage
    finally:
        os.chdir(cwd)
    return root, params


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("section, key, value", cases())
def test_numeric_param_sweep(section, key, value, project, tmp_path, monkeypatch, capsys):
    root, params = project
    work = tmp_path / "work"
    for rel in INPUTS[section]:
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).symlink_to(root / rel)
    work.mkdir(exist_ok=True)
    params = {name: dict(values) for name, values in params.items()}
    params[section][key] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    before = files_under(work)
    monkeypatch.chdir(work)

    status = cli.main(["-q", section])  # any exception but the one-line kind fails the test with its traceback

    err = capsys.readouterr().err.strip()
    if status == 0:
        assert files_under(work) > before, "a successful stage wrote nothing"
        return
    assert status == 1, err
    assert len(err.splitlines()) == 1 and err.startswith(f"cnnpipe {section}: error: "), err
    assert f"{section}.{key}" in err, err
    assert files_under(work) == before, f"left behind: {sorted(files_under(work) - before)}"
