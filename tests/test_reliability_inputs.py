"""Reliability, issue 14: bad input is caught before anything loads or is written, every problem at once, naming
the key, the value, the file (and line) where there is one, and the fix."""

import pytest
import torch
import yaml
from peft import get_peft_model

from conftest import TINY_BUILDERS, TINY_TARGETS, tiny_batch
from pyramid_peft import EptConfig, TaskRoutingError
from pyramid_peft.cli import main
from pyramid_peft.training.config import ConfigError, from_dict, load_config


def exit_code_and_error(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def write_config(raw: dict, folder) -> str:
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_every_problem_of_a_config_is_reported_at_once_before_anything_is_written(tiny_experiment, tmp_path, capsys):
    raw = tiny_experiment("encoder")
    raw["method"]["r"] = "four"
    raw["tasks"] = ["rte", "rte", "sst-2"]
    raw["training"].update(learning_rate=-1e-3, per_device_train_batch_size=0)
    raw["sampling"] = {"temperature": 0, "strategy": "temprature"}
    raw["model"]["name"] = "minilm"
    code, err = exit_code_and_error(["train", write_config(raw, tmp_path)], capsys)
    assert code == 2 and "has 8 problems" in err
    for expected in (
        "method.r='four' is a str; expected int.",
        "tasks: rte listed more than once",
        "Unknown task 'sst-2'",
        "Did you mean 'sst2'?",
        "training.learning_rate=-0.001 must be positive (> 0).",
        "training.per_device_train_batch_size=0 must be positive",
        "sampling.temperature=0 must be positive",
        "sampling.strategy='temprature' is not one of: uniform, proportional, temperature, exp. Did you "
        "mean 'temperature'?",
        "model.name 'minilm' is not an offline alias or a local folder",
    ):
        assert expected in err, expected
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing loaded, nothing written


def test_a_wrong_type_from_a_file_or_an_override_names_key_value_and_type(tiny_experiment, tmp_path, capsys):
    path = write_config(tiny_experiment("encoder"), tmp_path)
    code, err = exit_code_and_error(["train", path, "--method.r", "abc"], capsys)
    assert code == 2 and "method.r='abc' is a str; expected int." in err
    code, err = exit_code_and_error(
        ["train", path, "--learning_rate", "fast", "--data.max_source_length", "1.5"], capsys
    )
    assert "training.learning_rate='fast' is a str; expected float." in err
    assert "data.max_source_length=1.5 is a float; expected int." in err


def test_a_duplicate_task_is_refused(tiny_experiment):
    with pytest.raises(ConfigError, match=r"tasks: rte listed more than once in \['rte', 'rte'\]: each task gets one"):
        from_dict({**tiny_experiment("encoder"), "tasks": ["rte", "rte"]})


def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("tasks: [rte, sst2\nmethod: {name: ept}\n")
    code, err = exit_code_and_error(["train", str(path)], capsys)
    assert code == 2 and f"{path}, line 2, column 7: invalid YAML" in err and "Fix the syntax there" in err
    path.write_bytes(b"tasks: [rte]\nmodel: {name: caf\xe9}\n")
    with pytest.raises(ConfigError, match=rf"{path}, line 2: not UTF-8 text \(byte 0xe9\)"):
        load_config(path)


def test_an_unknown_model_name_shows_the_aliases_and_the_hub_id_form(tiny_experiment, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    raw = tiny_experiment("encoder")
    raw["model"] = {"name": "minilm-l7"}
    code, err = exit_code_and_error(["train", write_config(raw, tmp_path)], capsys)
    assert code == 2 and "model.name 'minilm-l7' is not an offline alias or a local folder" in err
    assert "minilm-l6, smollm2-135m" in err and "a hub id such as 'google-t5/t5-base'" in err
    assert "Did you mean 'minilm-l6'?" in err
    code, err = exit_code_and_error(["params", "minilm-l7"], capsys)
    assert code == 2 and "model 'minilm-l7' was not found" in err and "minilm-l6, smollm2-135m" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def routed_bert():
    model = TINY_BUILDERS["bert"]()
    return get_peft_model(
        model, EptConfig(target_modules=TINY_TARGETS["bert"], num_tasks=2, r=2, kernel_sizes=[2, 4], top_k=1)
    ).eval()


def test_fewer_task_ids_than_rows_are_an_error_outside_generate():
    model, batch = routed_bert(), tiny_batch("bert", batch=4)
    with pytest.raises(TaskRoutingError, match=r"task_ids has 2 entries but the batch has 4 rows: pass exactly one"):
        model(**batch, task_ids=torch.tensor([0, 1]))
    one = model(**batch, task_ids=1).last_hidden_state  # one int: every row
    torch.testing.assert_close(one, model(**batch, task_ids=torch.ones(4, dtype=torch.long)).last_hidden_state)


@pytest.mark.parametrize(
    ("ids", "named"),
    [
        (["rte", "sst2", "rte", "rte"], r"got str values \['rte', 'sst2', 'rte', 'rte'\]"),
        ("rte", r"got a str 'rte'"),
        ([0.0, 1.5, 0.0, 1.0], r"got float values \[0.0, 1.5, 0.0, 1.0\]"),
        (torch.tensor([0.0, 1.0, 0.0, 1.0]), "got a tensor of dtype torch.float32"),
    ],
)
def test_task_ids_that_are_not_integers_are_named_as_such(ids, named):
    with pytest.raises(TaskRoutingError, match=rf"task_ids must be integer task indices, {named}"):
        routed_bert()(**tiny_batch("bert", batch=4), task_ids=ids)
