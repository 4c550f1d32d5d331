"""The benchmark commands in their tiny mode: they run end to end and write what they print."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CLI = str(Path(sys.executable).parent / "cnnpipe")


def test_bench_train_tiny(tmp_path, prepared):
    out = tmp_path / "train.json"
    proc = subprocess.run([CLI, "bench", "train", "--prepared", str(prepared), "--out", str(out), "--steps", "3",
                           "--repeats", "2", "--batch", "20", "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert len(result["seed_loop_images_per_s"]) == 2 and result["seed_loop_median"] > 0
    assert result["ratio_of_medians"] == round(result["engine_median"] / result["seed_loop_median"], 2)
    assert "ratio:" in proc.stdout


def test_bench_serve_tiny(tmp_path, onnx_model):
    out = tmp_path / "serve.json"
    d = onnx_model.parent
    proc = subprocess.run([CLI, "bench", "serve", "--onnx", str(onnx_model), "--int8", str(d / "none.onnx"),
                           "--checkpoint", str(d / "model.pt"), "--prepared", str(d / "prepared"), "--out", str(out),
                           "--clients", "4", "--seconds", "0.5", "--repeats", "1", "--runs", "5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert {r["engine"] for r in result["latency"]} == {"onnxruntime fp32", "torch eager"}
    assert [r["batching"] for r in result["service"]] == ["on", "off"]
    assert all(r["errors"] == 0 and r["requests_per_s"] > 0 for r in result["service"])
