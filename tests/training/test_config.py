"""Experiment configs: YAML sections, command-line overrides, and errors that name the key to fix."""

from pathlib import Path

import pytest
from transformers import Seq2SeqTrainingArguments

from pyramid_peft.training.config import (
    ConfigError,
    ExperimentConfig,
    from_dict,
    load_config,
    parse_overrides,
    read_yaml,
)
from pyramid_peft.training.experiment import peft_config

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT_CONFIGS = [
    REPO / "configs" / name
    for name in (
        "quickstart.yaml",
        "smollm2-commonsense.yaml",
        "paper/t5-base-glue.yaml",
        "paper/llama2-7b-commonsense.yaml",
    )
]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_configs_load_and_build_training_arguments(path):
    config = load_config(path)
    assert config.tasks and config.method.name == "ept"
    assert config.training["max_steps"] > 0
    if not config.training.get("bf16"):  # bf16 needs hardware support to validate
        assert isinstance(config.training_arguments(), Seq2SeqTrainingArguments)


def test_quickstart_is_the_readme_recipe():
    config = load_config(REPO / "configs" / "quickstart.yaml")
    assert config.model.name == "minilm-l6"
    assert config.tasks == ["mnli", "qnli", "qqp", "sst2", "stsb"]  # the tasks that learn in its budget (README)
    assert config.training["learning_rate"] == 2e-3  # a LoRA-typical rate, at EPT's default init
    assert config.method.options["kernel_sizes"] == [2, 2, 4, 4, 6, 6, 8, 8]
    options = config.method.options
    assert (options["r"], options["lora_alpha"], options["top_k"]) == (8, 32, 2)


def test_paper_t5_config_matches_table_2():
    config = load_config(REPO / "configs" / "paper" / "t5-base-glue.yaml")
    training = config.training
    assert training["learning_rate"] == 3e-4 and training["warmup_steps"] == 500
    assert training["per_device_train_batch_size"] == 32
    assert config.data.max_source_length == 128
    assert config.method.options["target_modules"] == ["q", "k", "v", "o", "wi", "wo"]


def test_overrides_apply_on_top_of_the_file(tmp_path):
    path = write(tmp_path, "method: {name: ept, r: 8}\ntasks: [rte]\ntraining: {max_steps: 300, output_dir: a}\n")
    config = load_config(
        path,
        [
            "--max_steps",
            "20",
            "--output_dir",
            "X",
            "--method.r",
            "4",
            "--tasks",
            "rte",
            "sst2",
            "--bf16",
            "--data.max_eval_examples=50",
            "--learning_rate",
            "3e-4",
            "--eval_strategy",
            "no",
        ],
    )
    assert config.training["max_steps"] == 20 and config.training["output_dir"] == "X"
    assert config.training["bf16"] is True and config.training["learning_rate"] == pytest.approx(3e-4)
    assert config.training["eval_strategy"] == "no"
    assert config.method.options["r"] == 4
    assert config.tasks == ["rte", "sst2"]
    assert config.data.max_eval_examples == 50


def test_yaml_reads_no_as_a_string_and_exponents_as_floats():
    assert read_yaml("eval_strategy: no\nlr: 3e-4\nsteps: 20\nflag: true") == {
        "eval_strategy": "no",
        "lr": 3e-4,
        "steps": 20,
        "flag": True,
    }


def test_parse_overrides_lists_flags_and_errors():
    assert parse_overrides(["--method.kernel_sizes", "2", "4", "--fp16", "--seed=3"]) == {
        "method.kernel_sizes": [2, 4],
        "fp16": True,
        "seed": 3,
    }
    with pytest.raises(ConfigError, match="no key before it"):
        parse_overrides(["20"])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"trainig": {}}, "unknown key 'trainig'.*Did you mean 'training'"),
        ({"training": {"max_stpes": 3}}, "unknown key 'training.max_stpes'.*Did you mean 'max_steps'"),
        ({"data": {"max_eval_exmples": 3}}, "unknown key 'data.max_eval_exmples'.*Did you mean 'max_eval_examples'"),
        ({"model": "minilm-l6"}, "section 'model'.*must be a mapping"),
    ],
)
def test_unknown_keys_name_the_closest_valid_one(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_unknown_override_is_reported_with_its_closest_key(tmp_path):
    path = write(tmp_path, "tasks: [rte]\n")
    with pytest.raises(ConfigError, match="Did you mean 'learning_rate'"):
        load_config(path, ["--learning_rat", "0.1"])


def test_unknown_method_option_names_the_closest_field():
    with pytest.raises(ConfigError, match="method.kernel_size'.*Did you mean 'kernel_sizes'"):
        from_dict({"method": {"name": "ept", "kernel_size": [2, 4]}, "tasks": ["rte"]})


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="method.name='etp'.*Did you mean 'ept'"):
        from_dict({"method": {"name": "etp"}, "tasks": ["rte"]})


def test_peft_config_fills_task_count_and_type():
    config = from_dict({"method": {"name": "ept", "r": 4, "target_modules": ["q"]}, "tasks": ["rte", "sst2"]})
    built = peft_config(config, "seq2seq", 2)
    assert built.num_tasks == 2 and built.r == 4 and built.task_type == "SEQ_2_SEQ_LM"
    lora = peft_config(from_dict({"method": {"name": "lora", "r": 2}}), "encoder", 3)
    assert lora.r == 2 and lora.task_type is None and not hasattr(lora, "num_tasks")


def test_config_round_trips_through_yaml(tmp_path):
    config = load_config(REPO / "configs" / "quickstart.yaml", ["--eval_strategy", "no"])
    config.save(tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert again == config
    assert isinstance(again, ExperimentConfig)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_field_problems_checks_any_config_dataclass_by_its_annotations():
    from pyramid_peft.methods.config_base import field_problems
    from pyramid_peft.training.config import DataSection

    assert field_problems(DataSection, {"max_source_length": 64, "data_dir": None}, "data.") == []
    assert field_problems(DataSection, {"max_source_length": "64", "max_eval_exampels": 3}, "data.") == [
        "data.max_source_length='64' is a str; expected int.",
        "unknown key 'data.max_eval_exampels'. Did you mean 'max_eval_examples'? Valid keys: answer_scoring, "
        "data_dir, max_eval_examples, max_source_length, max_target_length, protocol.",
    ]
