"""The benchmark commands in their tiny mode: they run end to end and write what they print."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from cnnpipe.bench.train import AIRBENCH94_A100

CLI = str(Path(sys.executable).parent / "cnnpipe")


@pytest.mark.slow
def test_bench_train_tiny(tmp_path, prepared):
    import yaml

    from cnnpipe.core.params import defaults

    params = defaults()
    params["train"].update(model="lenet", batch_size=25, device="cpu", lr=0.01)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "train.json"
    proc = subprocess.run([CLI, "bench", "train", "--prepared", str(prepared), "--out", str(out), "--steps", "3",
                           "--repeats", "2", "--batch", "20", "--device", "cpu", "--params",
                           str(tmp_path / "params.yaml"), "--set", "epochs=3", "--set", "train.translate=0",
                           "--targets", "0.2,1.01"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    t = result["throughput"]
    for loop in ("tutorial_loop", "engine", "engine_tutorial_module"):
        runs = t[f"{loop}_images_per_s"]
        assert len(runs) == 2  # --repeats
        assert t[f"{loop}_median"] == pytest.approx(statistics.median(runs), abs=0.051)  # runs are rounded
    assert t["ratio_of_medians"] == round(t["engine_median"] / t["tutorial_loop_median"], 2)
    assert f"ratio engine / tutorial loop: {t['ratio_of_medians']}x" in proc.stdout
    a = result["accuracy"]
    assert a["train_params"]["epochs"] == 3 and a["train_params"]["translate"] == 0
    assert [r["epoch"] for r in a["epochs"]] == [1, 2, 3]
    seconds = [r["train_seconds"] for r in a["epochs"]]
    assert all(earlier < later for earlier, later in itertools.pairwise(seconds))  # cumulative training time
    first = next(r["train_seconds"] for r in a["epochs"] if r["test_acc"] >= 0.2)
    assert a["seconds_to_test_acc"] == {"0.20": first, "1.01": None}
    assert a["final_test_acc"] == a["epochs"][-1]["test_acc"] and "not reached" in proc.stdout
    m = result["machine"]  # what the figures were measured on
    assert m["cpus"] == os.cpu_count() and m["processor"] and "gpu" not in m and "driver" not in m


@pytest.mark.slow
def test_bench_train_over_seeds_and_precisions(tmp_path, prepared):
    import yaml

    from cnnpipe.core.params import defaults

    params = defaults()
    params["train"].update(model="lenet", batch_size=25, device="cpu", lr=0.01, epochs=1, seed=3)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "seeds.json"
    proc = subprocess.run([CLI, "bench", "train", "--prepared", str(prepared), "--out", str(out), "--steps", "0",
                           "--device", "cpu", "--params", str(tmp_path / "params.yaml"), "--seeds", "2", "--precisions",
                           "auto,bf16,fp32", "--targets", "0.2,1.01", "--train-size", "200"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["train_size"] == 200 and {r["train_images"] for r in result["runs"]} == {200}
    auto, bf16, fp32 = result["summary"]
    assert [s["precision_asked"] for s in result["summary"]] == ["auto", "bf16", "fp32"]
    assert auto["seeds"] == bf16["seeds"] == [3, 4]
    bf16_runs = [r for r in result["runs"] if r["train_params"]["precision"] == "bf16"]
    assert [r["train_params"]["seed"] for r in result["runs"][:2]] == [3, 3]  # interleaved: seed 3 in each first
    assert bf16["precision"] == "bfloat16" and bf16["final_test_acc"] == [r["final_test_acc"] for r in bf16_runs]
    accs = auto["final_test_acc"]
    assert auto["mean_test_acc"] == pytest.approx(statistics.mean(accs), abs=1e-5)
    assert auto["min_test_acc"] == min(accs) and auto["spread_test_acc"] == pytest.approx(max(accs) - min(accs))
    assert auto["to_test_acc"]["1.01"] == {"median_seconds": None, "seeds_reached": 0}
    if auto["precision"] == "float32":  # auto chose fp32 here: forced fp32 is the same training, not rerun
        assert fp32.get("same_runs_as") == "auto" and len(result["runs"]) == 4
        assert fp32["final_test_acc"] == accs
    else:
        assert fp32["precision"] == "float32" and len(result["runs"]) == 6
    assert [e["precision"] for e in result["peak"]] == [auto["precision"], "bfloat16", "float32"]
    assert len({json.dumps(e["matmul_peak_gflops"]) for e in result["peak"]}) == 1  # one measurement for all
    assert f"seeds [3, 4]: final test accuracy {accs[0]:.4f}, {accs[1]:.4f}; mean" in proc.stdout


@pytest.mark.slow
def test_bench_train_synthetic_cifar_shape(tmp_path):
    out = tmp_path / "syn.json"
    proc = subprocess.run([CLI, "bench", "train", "--synthetic-cifar", "--synthetic-images", "200", "--out", str(out),
                           "--set", "model=airnet", "--set", "epochs=2", "--set", "batch_size=100",
                           "--set", "device=cpu"], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    s = json.loads(out.read_text())["synthetic"]
    assert s["data"] == "random uint8, 200 x 3x32x32" and len(s["epoch_seconds"]) == 2
    assert s["train_params"]["model"] == "airnet" and s["train_params"]["batch_size"] == 100
    assert s["steady_images_per_second"] == round(200 / s["epoch_seconds"][1], 1)  # the epoch after the first
    assert s["ratio_to_airbench94_a100"] == pytest.approx(s["steady_images_per_second"] / AIRBENCH94_A100, rel=5e-3)
    assert f"{s['steady_images_per_second']:.0f} images/s steady" in proc.stdout
    assert "airbench94 on an A100" in proc.stdout


def test_bench_train_bad_train_size(tmp_path, prepared):
    proc = subprocess.run([CLI, "bench", "train", "--prepared", str(prepared), "--out", str(tmp_path / "o.json"),
                           "--steps", "0", "--train-size", "100000"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith("--train-size 100000: the train split holds 350 images; "
                                                         "use 1 to 350")
    assert not (tmp_path / "o.json").exists()


def test_bench_train_bad_override(tmp_path, prepared):
    proc = subprocess.run([CLI, "bench", "train", "--prepared", str(prepared), "--out", str(tmp_path / "o.json"),
                           "--steps", "0", "--set", "epochs=many"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode != 0
    assert "train.epochs must be int, got 'many'" in proc.stderr
    assert not (tmp_path / "o.json").exists()


def test_bench_train_too_many_steps(tmp_path, prepared):
    """350 training images hold 17 batches of 20: 13 timed + 5 warm-up is one too many."""
    out = tmp_path / "o.json"
    proc = subprocess.run([CLI, "bench", "train", "--prepared", str(prepared), "--out", str(out), "--steps", "13",
                           "--batch", "20", "--device", "cpu", "--no-accuracy"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "cnnpipe bench: error: --steps 13 at --batch 20 needs 360 training images (5 warm-up batches included) "
        "and the split has 350; lower --steps")
    assert not out.exists()


def test_bench_train_tutorial_loop_needs_28_by_28_grey_images(tmp_path, prepared):
    """The tutorial's LeNet takes 1×28×28 images: other data is refused before anything runs."""
    meta = json.loads((prepared / "meta.json").read_text())
    (prepared / "meta.json").write_text(json.dumps(meta | {"shape": [3, 16, 16]}))
    out = tmp_path / "o.json"
    proc = subprocess.run([CLI, "bench", "train", "--prepared", str(prepared), "--out", str(out), "--steps", "2",
                           "--batch", "20", "--device", "cpu", "--no-accuracy"], capture_output=True, text=True)
    assert proc.returncode == 1 and not out.exists()
    assert proc.stderr.strip().splitlines()[-1] == (
        f"cnnpipe bench: error: the tutorial's loop (--steps) takes 1×28×28 images and {prepared} holds 3×16×16 "
        "ones; pass --steps 0 to time the training runs alone")


@pytest.mark.parametrize("args, message", [
    (["serve", "--onnx", "nonexistent.onnx"], "argument --onnx: nonexistent.onnx: no such file; run `dvc repro`"),
    (["hostile", "--onnx", "nonexistent.onnx"], "argument --onnx: nonexistent.onnx: no such file"),
    (["serve", "--repeats", "0"], "argument --repeats: '0' is not a whole number of at least 1"),
    (["hostile", "--seconds", "0"], "argument --seconds: '0' is not a number above 0"),
    (["swap", "--seconds", "nan"], "argument --seconds: 'nan' is not a number above 0"),
    (["swap", "--seconds", "5", "--promote-at", "5"], "--promote-at 5 is not within the load's --seconds 5"),
])
def test_bench_arguments_out_of_range_are_one_line_errors(tmp_path, onnx_model, args, message):
    """Refused before any server starts or any load runs, with nothing written."""
    models = [] if "--onnx" in args else ["--onnx", str(onnx_model)]
    models += ["--int8", str(onnx_model)] if args[0] in ("serve", "swap") else []
    out = tmp_path / "o.json"
    proc = subprocess.run([CLI, "bench", *args, *models, "--out", str(out)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode in (1, 2) and message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["train", "--targets", "abc"], "argument --targets: 'abc' is not a list of accuracies above 0"),
    (["train", "--targets", "0.9,-1"], "argument --targets: '0.9,-1' is not a list of accuracies above 0"),
    (["train", "--repeats", "0"], "argument --repeats: '0' is not a whole number of at least 1"),
    (["train", "--steps", "-5"], "argument --steps: '-5' is not a whole number of at least 0"),
    (["train", "--seeds", "0"], "argument --seeds: '0' is not a whole number of at least 1"),
    (["queue", "--experiments", "0"], "argument --experiments: '0' is not a whole number of at least 1"),
    (["sweep", "--parallel", "0"], "argument --parallel: '0' is not a whole number of at least 1"),
])
def test_bench_counts_that_would_time_nothing_are_refused(tmp_path, args, message):
    """A bench told to do nothing would exit 0 with nothing written, or time empty runs into its file."""
    out = tmp_path / "o.json"
    proc = subprocess.run([CLI, "bench", *args, "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_bench_serve_tiny(tmp_path, onnx_model):
    out = tmp_path / "serve.json"
    d = onnx_model.parent
    proc = subprocess.run([CLI, "bench", "serve", "--onnx", str(onnx_model), "--int8", str(d / "none.onnx"),
                           "--checkpoint", str(d / "model.pt"), "--prepared", str(d / "prepared"), "--out", str(out),
                           "--clients", "4", "--seconds", "0.5", "--repeats", "1", "--runs", "5", "--skip-heavy"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert sorted((r["engine"], r["batch"]) for r in result["latency"]) == [
        ("onnxruntime fp32", 1), ("onnxruntime fp32", 64), ("torch eager", 1), ("torch eager", 64)]  # no int8 file
    assert all(r["p50_ms"] <= r["p99_ms"] for r in result["latency"])
    rows = {r["setup"]: r for r in result["service"]}
    assert list(rows) == ["baseline (FastAPI + onnxruntime, inline)", "cnnpipe /predict", "cnnpipe /v2 infer",
                          "cnnpipe /predict --max-batch 1", "cnnpipe /predict --workers 2"]
    assert rows["cnnpipe /v2 infer"]["route"] == "/v2/models/bncnn/infer"
    for row in rows.values():  # every server answered every request of its load with 200
        assert row["errors"] == 0 and row["requests_per_s"] > 0, row
    assert result["load_generator"].startswith("wrk") == (shutil.which("wrk") is not None)
    base = rows["baseline (FastAPI + onnxruntime, inline)"]["requests_per_s"]
    assert result["ratios"]["predict_over_baseline_rps"] == round(rows["cnnpipe /predict"]["requests_per_s"] / base, 2)
    per_image = result["onnxruntime_ms_per_image"]["default"]  # the ceiling: onnxruntime alone at batch 64
    assert result["ratios"]["onnxruntime_batch64_over_baseline_rps"] == round(1000 / per_image["batch_64"] / base, 2)
    assert result["ratios"]["airnet_onnxruntime_batch64_over_baseline_rps"] is None  # --skip-heavy


@pytest.mark.slow
def test_bench_hostile_answers_every_attack_as_it_should(tmp_path, onnx_model):
    out = tmp_path / "hostile.json"
    proc = subprocess.run([CLI, "bench", "hostile", "--onnx", str(onnx_model), "--out", str(out), "--seconds", "2",
                           "--connections", "1", "--body-timeout", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["probe"]["failures"] == [] and result["probe"]["probes"] >= 20
    assert result["attacks"] == {name: result["attacks"][name] for name in [
        "slow body (1 byte / 200 ms)", "slow headers (1 byte / 200 ms)", "50 idle connections", "header 1 MB long",
        "header declaring 3.6 gigapixels", "1-megapixel image",
        "JSON nested 100,000 deep", "65 images in one request", "body over the size limit",
        "upload abandoned mid-body", "malformed multipart", "ordinary request"]}
    expected = {"slow body (1 byte / 200 ms)": "408", "slow headers (1 byte / 200 ms)": "0",  # 0: closed on them
                "50 idle connections": "0", "header 1 MB long": "431", "header declaring 3.6 gigapixels": "422",
                "1-megapixel image": "200", "JSON nested 100,000 deep": "400", "65 images in one request": "413",
                "body over the size limit": "413", "upload abandoned mid-body": "0", "malformed multipart": "400",
                "ordinary request": "200"}
    for name, status in expected.items():  # every answer of each kind had the one right status
        assert list(result["attacks"][name]) == [status], (name, result["attacks"][name])


@pytest.mark.slow
def test_bench_swap_follows_prod_under_load_without_errors(tmp_path, onnx_model):
    out = tmp_path / "swap.json"
    proc = subprocess.run([CLI, "bench", "swap", "--onnx", str(onnx_model), "--int8", str(onnx_model),
                           "--out", str(out), "--seconds", "6", "--promote-at", "1", "--clients", "4"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["versions"] == ["v1.0.0", "v1.1.0"]
    assert 0 < result["follow_s"] < 5
    for name in ("before", "during", "after"):  # load in every window, and not one request failed
        assert result[name]["requests"] > 0 and result[name]["errors"] == 0, (name, result[name])
    assert f"the server followed {result['follow_s']} s later" in proc.stdout


@pytest.mark.slow
def test_bench_clone_works_without_the_outputs_in_the_dvc_cache(reproduced, tmp_path):
    """`cnnpipe bench queue` / `sweep` start from a clone of the checkout; in a fresh clone of the project the
    DVC cache holds none of dvc.lock's outputs, and the clone reproduces the data it needs."""
    from helpers import dvc

    from cnnpipe.bench.experiments import clone_of

    repo = reproduced(tmp_path)
    shutil.rmtree(repo / ".dvc/cache")  # as a fresh clone: dvc.lock names the model, no cache holds it
    with clone_of(repo) as clone:
        assert (clone / "data/prepared").is_dir()
        assert not (clone / "models/model.pt").exists()
        assert "up to date" in dvc(clone, "status", "split")


@pytest.mark.parametrize("generator", ["wrk", "python asyncio"])
def test_bench_serve_counts_only_answered_requests(tmp_path, onnx_model, generator):
    """Requests/s counts the requests served, whichever load generator runs: error answers (here 422s for a
    body that is no image) are errors, not throughput."""
    from helpers import start_server, stop

    from cnnpipe.bench.serve import Load, load_generator, measure

    if generator == "wrk" and not load_generator().startswith("wrk"):
        pytest.skip("wrk is not installed")
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    proc, url = start_server(onnx_model)
    try:
        port = int(url.rsplit(":", 1)[1])
        bad = measure(port, Load("/predict", b"not an image", "image/png"), 2, 1.0, generator, tmp_path)
        good = measure(port, Load("/predict", png, "image/png"), 2, 1.0, generator, tmp_path)
    finally:
        stop(proc)
    assert bad["requests"] == 0 and bad["requests_per_s"] == 0 and bad["errors"] > 0, bad
    assert good["requests"] > 0 and good["errors"] == 0, good
