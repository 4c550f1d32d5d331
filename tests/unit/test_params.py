import copy

import pytest
import yaml
from conftest import ROOT

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.params import SECTIONS, TrainParams, defaults, load_section, parse_section


def test_project_params_yaml_is_valid_for_every_section():
    for name in SECTIONS:
        load_section(name, ROOT / "params.yaml")


def test_defaults_round_trip():
    for name, raw in defaults().items():
        assert parse_section(name, raw) == SECTIONS[name]()


def test_int_accepted_for_float():
    raw = defaults()["train"] | {"lr": 1}
    assert parse_section("train", raw).lr == 1.0


@pytest.mark.parametrize("key, value, message", [
    ("epochs", "ten", r"train\.epochs must be int, got 'ten'"),
    ("epochs", True, r"train\.epochs must be int"),
    ("flip", 1, r"train\.flip must be bool"),
    ("optimizer", "rmsprop", r"train\.optimizer must be 'sgd' \| 'adam' \| 'adamw'"),
    ("lr", None, r"train\.lr must be float"),
])
def test_wrong_types_name_the_key(key, value, message):
    raw = defaults()["train"] | {key: value}
    with pytest.raises(CnnpipeError, match=message):
        parse_section("train", raw)


def test_missing_key_says_what_to_add():
    raw = defaults()["train"]
    del raw["epochs"]
    with pytest.raises(CnnpipeError, match=r"train\.epochs is missing; add it \(default: 9\)"):
        parse_section("train", raw)


def test_unknown_key_refused():
    with pytest.raises(CnnpipeError, match=r"unknown key split\.valsize"):
        parse_section("split", defaults()["split"] | {"valsize": 3})


def test_missing_section_and_bad_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": defaults()["train"]}))
    assert load_section("train", path) == TrainParams()
    with pytest.raises(CnnpipeError, match="section 'split' is missing"):
        load_section("split", path)
    path.write_text("train: [unclosed")
    with pytest.raises(CnnpipeError, match="not valid YAML"):
        load_section("train", path)
    with pytest.raises(CnnpipeError, match="not found"):
        load_section("train", tmp_path / "nope.yaml")


def test_nested_types_checked():
    raw = copy.deepcopy(defaults()["download"])
    raw["sources"] = ["official", 3]
    with pytest.raises(CnnpipeError, match=r"download\.sources must be"):
        parse_section("download", raw)


def test_params_yaml_holds_the_code_defaults():
    """One source of truth: the committed params.yaml and the dataclass defaults are the same values."""
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == defaults()


def test_enum_params_name_what_exists():
    import typing

    from cnnpipe.core import own_images
    from cnnpipe.core.catalog import DATASETS
    from cnnpipe.core.models import MODELS
    from cnnpipe.core.params import Dataset, Model

    assert set(typing.get_args(Model)) == set(MODELS)
    assert set(typing.get_args(Dataset)) == set(DATASETS) | set(own_images.KINDS)


@pytest.mark.parametrize("section, key, value, message", [
    ("train", "epochs", 0, r"train\.epochs is 0, out of range; set train\.epochs to a whole number from 1 to 100000"),
    ("train", "lr", -0.1, r"train\.lr is -0\.1, out of range; set train\.lr to a number above 0 and at most 10$"),
    ("train", "patience", -1, r"set train\.patience to a whole number at least 0 \(0 = off\)$"),
    ("train", "seed", 2**32, r"train\.seed is 4294967296, out of range"),
    ("train", "device", "gpu", r"train\.device is 'gpu', not a known value; set train\.device to auto, cpu, cuda"),
    ("evaluate", "batch_size", 0, r"evaluate\.batch_size is 0, out of range"),
    ("quantize", "latency_runs", 0, r"quantize\.latency_runs is 0, out of range"),
    ("download", "retries", 0, r"download\.retries is 0, out of range"),
    ("split", "val_size", 1.5, r"split\.val_size is 1\.5, out of range; set split\.val_size to a whole count "
                               r"from 1 to 1000000000 or a fraction strictly between 0 and 1"),
    ("split", "channels", 2, r"split\.channels must be 1 \| 3, got 2"),
    ("split", "channels", True, r"split\.channels must be 1 \| 3, got True"),
])
def test_out_of_range_values_name_key_value_and_range(section, key, value, message):
    with pytest.raises(CnnpipeError, match=message):
        parse_section(section, defaults()[section] | {key: value})


@pytest.mark.parametrize("section, key, value", [
    ("train", "epochs", 1), ("train", "lr", 10), ("train", "momentum", 0.0), ("train", "device", "cuda:1"),
    ("train", "seed", 2**32 - 1), ("split", "val_size", 0.5), ("split", "val_size", 1), ("split", "channels", 1),
    ("train", "patience", 0), ("download", "timeout", 0.5),
])
def test_edges_of_the_ranges_are_accepted(section, key, value):
    assert getattr(parse_section(section, defaults()[section] | {key: value}), key) == value
