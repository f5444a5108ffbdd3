"""backend/config.py and presets: flat keys, validation, method defaults, YAML round trip."""

import pytest
import yaml

from backend.config import ConfigError, RunSpec, parse_set
from backend.presets import PRESET_DIR, build_spec, list_presets, load_preset


def test_set_values_are_yaml_and_land_in_their_section():
    spec = RunSpec.from_flat(parse_set(["r=8", "learning_rate=1e-4", "target_modules=[q_proj,k_proj]",
                                        "system_prompt=Be brief.", "mix_ratio=0.5"]))
    assert spec.lora.r == 8 and spec.lora.target_modules == ["q_proj", "k_proj"]
    assert spec.train.learning_rate == 1e-4  # YAML 1.1 would have given the string '1e-4'
    assert spec.data.system_prompt == "Be brief." and spec.data.mix_ratio == 0.5


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        RunSpec.from_flat({"r": 0, "lora_dropout": 1.5, "method": "dora"})
    message = str(err.value)
    assert "r must be" in message and "lora_dropout" in message and "method must be" in message


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match="unknown key"):
        RunSpec.from_flat({"lora_rank": 8})


@pytest.mark.parametrize("method,lr,accum", [("lora", 2e-4, 1), ("qlora", 2e-4, 1), ("full", 3e-5, 4)])
def test_method_defaults_follow_common_practice(method, lr, accum):
    spec = RunSpec.from_flat({"method": method}).resolved()
    assert spec.train.learning_rate == lr and spec.train.gradient_accumulation_steps == accum
    assert spec.lora.r == 16 and spec.lora.lora_alpha == 32 and spec.lora.target_modules == ["q_proj", "v_proj"]


def test_config_yaml_round_trip(tmp_path):
    spec = build_spec({"method": "qlora", "data": "x.json", "r": 4})
    spec.save(tmp_path / "config.yaml")
    assert RunSpec.load(tmp_path / "config.yaml") == spec


def test_embedded_model_takes_its_preset_unless_told_otherwise():
    spec = build_spec({"method": "lora", "data": "x.json"})
    assert spec.preset == "smollm2-135m-lora" and spec.lora.target_modules == "all-linear"
    override = build_spec({"method": "lora", "data": "x.json", "learning_rate": 1e-5})
    assert override.train.learning_rate == 1e-5
    other = build_spec({"method": "lora", "data": "x.json", "model": "some/model"})
    assert other.preset is None and other.train.learning_rate == 2e-4


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_and_has_a_header(name):
    text = (PRESET_DIR / f"{name}.yaml").read_text(encoding="utf-8")
    assert text.startswith("#") and "memory" in text.lower()
    RunSpec.from_flat(load_preset(name))
    assert yaml.safe_load(text)


def test_fixed_choices_are_the_libraries_and_the_data_readers_own():
    """The Literal choices in config.py are the one list the form, the CLI and validation use; they stay
    inside what transformers and backend.data accept."""
    from typing import get_args

    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from backend import data
    from backend.config import FORMATS, Optimizer, Scheduler

    assert set(get_args(Optimizer)) <= {o.value for o in OptimizerNames}
    assert set(get_args(Scheduler)) <= {s.value for s in SchedulerType}
    assert FORMATS == ("auto", *data.FORMATS)
    for key, bad in (("optim", "adam"), ("lr_scheduler_type", "cosinus"), ("bias", "some"), ("format", "csv")):
        with pytest.raises(ConfigError, match=f"{key} must be one of"):
            RunSpec.from_flat({key: bad})


def test_the_cli_takes_its_choices_and_defaults_from_the_schema():
    from backend.__main__ import build_parser
    from backend.config import FORMATS, METHODS, DataArgs

    parser = build_parser()
    prepare = parser.parse_args(["prepare", "x.json"])
    assert prepare.format == DataArgs.format and prepare.max_length == DataArgs.max_length
    assert prepare.system == DataArgs.system_prompt
    actions = {a.dest: a for sub in parser._subparsers._group_actions for name, p in sub.choices.items()
               for a in p._actions if name in ("prepare", "train")}
    assert tuple(actions["format"].choices) == FORMATS and tuple(actions["method"].choices) == METHODS
