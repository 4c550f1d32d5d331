import copy

import pytest
import yaml
from conftest import ROOT

from cnnpipe.errors import CnnpipeError
from cnnpipe.params import SECTIONS, TrainParams, defaults, load_section, parse_section


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
    with pytest.raises(CnnpipeError, match=r"train\.epochs is missing; add it \(default: 10\)"):
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
