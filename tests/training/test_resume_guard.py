"""Resuming a checkpoint under a changed config: a change of trajectory is refused, naming the setting; places,
logging and the evaluation / saving cadence may change; ``--allow_config_change`` resumes anyway."""

import re
from pathlib import Path

import pytest
import yaml

from pyramid_peft.cli import main
from pyramid_peft.training.checkpoints import (
    WEIGHTS_CONFIG_FILE,
    ConfigChangedError,
    check_resume_config,
    resume_differences,
)

RECORD = {
    "model": {"name": "minilm-l6", "dtype": "float32"},
    "method": {"name": "ept", "r": 8},
    "tasks": ["rte", "sst2"],
    "data": {"data_dir": "/data/a", "max_eval_examples": 100},
    "sampling": {"strategy": "temperature", "temperature": 10.0},
    "training": {"output_dir": "runs/a", "max_steps": 300, "learning_rate": 1e-3, "logging_steps": 10},
}


def checkpoint_with(tmp_path, record: dict) -> Path:
    folder = tmp_path / "checkpoint-100"
    folder.mkdir()
    (folder / WEIGHTS_CONFIG_FILE).write_text(yaml.safe_dump(record))
    return folder


def changed(section: str, **values) -> dict:
    return {**RECORD, section: {**RECORD[section], **values}}


@pytest.mark.parametrize(
    ("section", "values", "named"),
    [
        ("training", {"max_steps": 600}, "training.max_steps: was 300, now 600"),
        ("training", {"learning_rate": 3e-4}, "training.learning_rate: was 0.001, now 0.0003"),
        ("training", {"lr_scheduler_type": "constant"}, "training.lr_scheduler_type: was '(unset)', now 'constant'"),
        ("method", {"r": 4}, "method.r: was 8, now 4"),
        ("sampling", {"temperature": 2.0}, "sampling.temperature: was 10.0, now 2.0"),
    ],
)
def test_a_change_of_trajectory_is_refused_naming_the_setting(tmp_path, section, values, named):
    checkpoint = checkpoint_with(tmp_path, RECORD)
    with pytest.raises(ConfigChangedError, match=f"{checkpoint}.*{re.escape(named)}.*--allow_config_change"):
        check_resume_config(checkpoint, changed(section, **values))
    check_resume_config(checkpoint, changed(section, **values), allow_change=True)  # extended on purpose


def test_places_logging_and_evaluation_and_saving_cadence_may_change(tmp_path):
    checkpoint = checkpoint_with(tmp_path, RECORD)
    moved = changed(
        "training", output_dir="runs/b", logging_steps=1, eval_steps=50, eval_strategy="steps", save_steps=50
    )
    moved["data"] = {**RECORD["data"], "data_dir": "/elsewhere", "max_eval_examples": 10}
    assert resume_differences(checkpoint, moved) == []
    assert resume_differences(tmp_path, RECORD) == []  # a folder without a record: nothing to compare


def test_ept_train_refuses_a_changed_max_steps_and_continues_with_allow_config_change(tiny_experiment, tmp_path):
    raw = tiny_experiment("seq2seq", max_steps=4)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0
    checkpoint = Path(raw["training"]["output_dir"]) / "checkpoint-2"

    def resume(into: str, *extra: str) -> int:
        return main(["train", str(path), "--resume_from_checkpoint", str(checkpoint), "--output_dir", into, *extra])

    assert resume(str(tmp_path / "same")) == 0  # the same config, into another output folder
    with pytest.raises(ConfigChangedError, match=r"training\.max_steps: was 4, now 6"):
        resume(str(tmp_path / "longer"), "--max_steps", "6", "--debug")
    with pytest.raises(SystemExit, match="2"):  # without --debug: the message alone, exit status 2
        resume(str(tmp_path / "longer"), "--max_steps", "6")
    assert resume(str(tmp_path / "longer"), "--max_steps", "6", "--allow_config_change") == 0
    record = yaml.safe_load((tmp_path / "longer" / "config.yaml").read_text())
    assert record["training"]["max_steps"] == 6 and (tmp_path / "longer" / "checkpoint-6").is_dir()
