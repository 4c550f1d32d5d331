"""The base install serves and predicts on its own: a fresh venv with uv.lock's serving pins and the project
(what the Dockerfile runs) has no torch, DVC or Prefect, answers `cnnpipe predict` and `cnnpipe serve`, and a
pipeline command there says in one line what to install."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import venv
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import ROOT, make_images
from PIL import Image

from cnnpipe.bench.launch import free_port
from cnnpipe.serve.predictor import Predictor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    env = tmp_path_factory.mktemp("serving") / "venv"
    venv.create(env, with_pip=False)  # this suite's pip installs into it (`pip --python`): no pip of its own to set up
    src = tmp_path_factory.mktemp("src")  # a copy: building in the checkout would leave build/ behind
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run(["cp", "-r", str(ROOT / "src"), str(src / "src")], check=True)
    for args in (["--require-hashes", "--no-deps", "-r", str(ROOT / "requirements/serve.txt")],  # as the Dockerfile
                 ["--no-deps", str(src)]):
        proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin/python"), "install", "-q",
                               *args], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return env


def test_base_install_has_no_training_stack(base_venv):
    code = "import importlib.util as u; print([m for m in ('torch', 'torchvision', 'dvc', 'prefect', 'onnx', " \
           "'pandas', 'yaml') if u.find_spec(m)])"
    out = subprocess.run([str(base_venv / "bin/python"), "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_base_install_predicts_and_serves(base_venv, onnx_model, tmp_path):
    x, _ = make_images(3, 10, (1, 28, 28), seed=5)
    for i, img in enumerate(x[:, 0]):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    expected = Predictor(onnx_model, threads=1).predict([(tmp_path / f"{i}.png").read_bytes() for i in range(3)], k=1)
    cli = str(base_venv / "bin/cnnpipe")
    out = subprocess.run([cli, "predict", "--model", str(onnx_model), "--json", "-k", "1", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [r["top_k"][0]["label"] for r in json.loads(out.stdout)] == [e[0]["label"] for e in expected]

    port = free_port()
    server = subprocess.Popen([cli, "serve", str(onnx_model), "--port", str(port), "--threads", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        r = httpx.post(url + "/predict?k=1", content=(tmp_path / "0.png").read_bytes(),
                       headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.json()["predictions"][0][0]["label"] == expected[0][0]["label"]
        v2 = httpx.post(url + "/v2/models/bncnn/infer", json={"inputs": [
            {"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": x[0].reshape(-1).tolist()}]})
        assert v2.status_code == 200
        assert np.argmax(v2.json()["outputs"][1]["data"]) == expected[0][0]["index"]
    finally:
        server.terminate()
        server.wait(30)


def test_pipeline_command_without_the_extra_says_what_to_install(base_venv, tmp_path):
    proc = subprocess.run([str(base_venv / "bin/cnnpipe"), "train"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("cnnpipe train: error: needs the pipeline extra (no module 'yaml'); install it "
                                   "with pip install 'cnnpipe[pipeline]'")


def test_serving_venv_is_far_smaller(base_venv):
    def size(path: Path) -> int:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())

    full = Path(sys.prefix)
    print(f"serving venv {size(base_venv) / 1e6:.0f} MB, full venv {size(full) / 1e6:.0f} MB")
    assert size(full) >= 10 * size(base_venv)
