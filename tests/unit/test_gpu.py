"""The GPU paths of the train stage: autocast bf16 and fp16 (with its gradient scaler), torch.compile and the
deterministic mode. Skipped where no CUDA GPU is present (CI); run on a lent GPU machine."""

import dataclasses

import pytest
import torch

from cnnpipe.core.params import TrainParams
from cnnpipe.stages.train import train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = TrainParams(model="bncnn", epochs=4, batch_size=32, lr=0.01, flip=False, translate=1, device="cuda")


def run(tmp_path, prepared, p: TrainParams) -> dict:
    return train(p, prepared, tmp_path / "model.pt", tmp_path / "train.json", tmp_path / "history.csv")


@pytest.mark.parametrize("precision, expected", [("auto", "bfloat16"), ("bf16", "bfloat16"),
                                                 ("fp16", "float16"), ("fp32", "float32")])
def test_precisions_learn(tmp_path, prepared, precision, expected):
    metrics = run(tmp_path, prepared, dataclasses.replace(TINY, precision=precision))
    assert metrics["precision"] == expected and metrics["val_acc"] >= 0.8


def test_compiled_model_learns_and_saves_plain_weights(tmp_path, prepared):
    from cnnpipe.core.checkpoint import load_checkpoint

    metrics = run(tmp_path, prepared, dataclasses.replace(TINY, model="airnet", compile=True, lr=0.003))
    assert metrics["compiled"] and metrics["val_acc"] >= 0.8
    model, _ = load_checkpoint(tmp_path / "model.pt")  # no torch.compile prefixes in the state dict
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_deterministic_mode_repeats_exactly(tmp_path, prepared):
    p = dataclasses.replace(TINY, epochs=2, deterministic=True)
    a, b = run(tmp_path / "a", prepared, p), run(tmp_path / "b", prepared, p)
    assert (a["val_loss"], a["val_acc"]) == (b["val_loss"], b["val_acc"])


def test_bench_records_the_gpu_and_its_driver():
    from cnnpipe.bench.machine import train_machine

    m = train_machine(torch.device("cuda"))
    assert m["gpu"] == torch.cuda.get_device_name(0) and m["driver"] and m["cuda"] == torch.version.cuda
